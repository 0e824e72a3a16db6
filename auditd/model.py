"""Plain data shared by every layer: kernel constants, socket records, findings.

Nothing here does I/O. The kernel layer produces these records, the audit layer reasons
over them, the CLI and exporter render them.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import ClassVar, NamedTuple

# The sysctls read in every namespace, dotted (a path below /proc/sys). Optional ones are
# absent on some kernels or until a module loads (tcp_rto_max_ms: Linux 6.15+; conntrack:
# nf_conntrack loaded).
SYSCTL_NAMES: tuple[str, ...] = (
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_retries1",
    "net.ipv4.tcp_retries2",
    "net.ipv4.tcp_syn_retries",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_orphan_retries",
    "net.ipv4.tcp_rto_max_ms",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
)


class TcpState(IntEnum):
    """TCP states as numbered in include/net/tcp_states.h."""

    UNKNOWN = 0
    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12
    BOUND_INACTIVE = 13

    @classmethod
    def of(cls, value: int) -> TcpState:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN

    @property
    def label(self) -> str:
        """Lower-case name used in JSON and metric labels (``close_wait``)."""
        return self.name.lower()


# Every state but LISTEN (not a connection) and TIME_WAIT/CLOSE: a busy host has many
# TIME_WAIT minisockets, which carry no tcp_info and cannot go half-open.
AUDITED_STATES = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.SYN_SENT,
        TcpState.SYN_RECV,
        TcpState.FIN_WAIT1,
        TcpState.FIN_WAIT2,
        TcpState.CLOSE_WAIT,
        TcpState.LAST_ACK,
        TcpState.CLOSING,
    }
)

# int state -> label, for the hot paths (an IntEnum lookup costs microseconds).
STATE_LABELS: dict[int, str] = {s.value: s.label for s in TcpState}


def state_label(state: int) -> str:
    return STATE_LABELS.get(state, "unknown")


class TimerKind(IntEnum):
    """``idiag_timer`` codes, from net/ipv4/inet_diag.c (inet_sk_diag_fill)."""

    NONE = 0
    RETRANSMIT = 1  # retransmit, loss probe or reorder timer
    KEEPALIVE = 2
    TIME_WAIT = 3
    ZERO_WINDOW_PROBE = 4
    DELAYED_ACK = 5  # only on kernels from 2026
    UNKNOWN = 255

    @classmethod
    def of(cls, value: int) -> TimerKind:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class Label(str, Enum):
    """A closed set of strings of the domain: each member is its own value, so it compares,
    hashes, formats and serialises (JSON, metric labels) as that string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:  # f"{x}": the value on every Python (3.11
        return format(str(self.value), spec)  # changed Enum's)


class Keepalive(Label):
    """Inferred keepalive status of a socket (exact strings used in JSON and labels)."""

    ON = "on"
    OFF = "off"
    UNKNOWN = "unknown"
    ALL: ClassVar[tuple[Keepalive, ...]]  # in this order (indexes of the tallies)


Keepalive.ALL = (Keepalive.ON, Keepalive.OFF, Keepalive.UNKNOWN)


class Severity(IntEnum):
    INFO = 1
    WARNING = 2
    CRITICAL = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        """``"warning"`` -> ``Severity.WARNING``; raises ValueError on anything else."""
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown severity {text!r}") from None


class FindingKind(Label):
    """Exact ``kind`` strings of findings."""

    IDLE_NO_KEEPALIVE = "idle_no_keepalive"
    KEEPALIVE_TOO_SLOW = "keepalive_too_slow"
    KEEPALIVE_PROBING = "keepalive_probing"
    RETRANSMITTING = "retransmitting"
    CLOSE_WAIT = "close_wait"
    DETECTION_BUDGET = "detection_budget"
    SYSCTL = "sysctl"
    USER_TIMEOUT_TOO_SHORT = "user_timeout_too_short"
    ALL: ClassVar[tuple[FindingKind, ...]]


FindingKind.ALL = tuple(FindingKind)


class DetectionCase(Label):
    """The two ways a dead peer is noticed (``detection_budget`` findings' ``case``)."""

    IDLE = "idle"  # keepalive on the namespace's sysctls
    IN_FLIGHT = "in_flight"  # the tcp_retries2 backoff model


class Stage(Label):
    """Where an error happened: the ``stage`` of ``keepalive_audit_errors_total``."""

    DUMP = "dump"
    SYSCTLS = "sysctls"
    COUNTERS = "counters"
    ATTRIBUTION = "attribution"
    NETNS = "netns"
    CONFIG = "config"
    HTTP = "http"
    LOG = "log"
    INTERNAL = "internal"
    ALL: ClassVar[tuple[Stage, ...]]


Stage.ALL = tuple(Stage)
# Stages of an audit itself, cleared ("audit recovered") by the first audit without them.
AUDIT_STAGES = (Stage.DUMP, Stage.NETNS, Stage.INTERNAL, Stage.SYSCTLS, Stage.COUNTERS,
                Stage.ATTRIBUTION)  # fmt: skip


class Sock(NamedTuple):
    """One socket as sock_diag reports it: a flat record, decoded before any logic.

    A NamedTuple rather than a frozen dataclass on purpose: an audit builds one per socket
    (200k on a busy proxy), straight from one ``struct.unpack_from`` in field order, and
    ``tuple.__new__`` is several times cheaper than a frozen dataclass ``__init__``. That is
    also why the ports are kept as the kernel's big-endian bytes read natively
    (``sport_raw``) and addresses as the kernel's 16 bytes: the conversions are properties,
    paid only for the few sockets that are reported. Build records by hand with
    ``make_sock``. Times are kernel units: ``expires_ms`` and the ``last_*_ms`` ages in
    milliseconds, ``rto_us`` and ``rtt_us`` in microseconds.
    """

    family: int
    state: int
    timer: int
    retrans: int  # idiag_retrans: retransmits (timer 1) or probes out (timers 2 and 4)
    sport_raw: int  # network-order port read as a native u16; see .sport
    dport_raw: int
    src16: bytes  # 16 bytes; an IPv4 address is the first 4
    dst16: bytes
    expires_ms: int
    rqueue: int
    wqueue: int
    uid: int
    inode: int
    has_info: bool  # False for sockets without tcp_info (TIME_WAIT, SYN_RECV mini sockets)
    ca_retransmits: int  # tcpi_retransmits
    probes: int  # tcpi_probes
    backoff: int  # tcpi_backoff
    rto_us: int
    unacked: int
    last_data_sent_ms: int
    last_data_recv_ms: int
    last_ack_recv_ms: int
    rtt_us: int
    total_retrans: int

    @property
    def sport(self) -> int:
        return swap16(self.sport_raw) if _LITTLE else self.sport_raw

    @property
    def dport(self) -> int:
        return swap16(self.dport_raw) if _LITTLE else self.dport_raw

    @property
    def src(self) -> bytes:
        return self.src16[:4] if self.family == socket.AF_INET else self.src16

    @property
    def dst(self) -> bytes:
        return self.dst16[:4] if self.family == socket.AF_INET else self.dst16

    @property
    def local(self) -> str:
        return format_endpoint(self.family, self.src16, self.sport)

    @property
    def remote(self) -> str:
        return format_endpoint(self.family, self.dst16, self.dport)

    @property
    def local_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return _ip(self.family, self.src16)

    @property
    def remote_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return _ip(self.family, self.dst16)


_LITTLE = sys.byteorder == "little"


def swap16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


def make_sock(
    *,
    family: int = socket.AF_INET,
    state: int = 1,
    timer: int = 0,
    retrans: int = 0,
    sport: int = 0,
    dport: int = 0,
    src: bytes | str = "127.0.0.1",
    dst: bytes | str = "127.0.0.1",
    expires_ms: int = 0,
    rqueue: int = 0,
    wqueue: int = 0,
    uid: int = 0,
    inode: int = 0,
    has_info: bool = True,
    ca_retransmits: int = 0,
    probes: int = 0,
    backoff: int = 0,
    rto_us: int = 200_000,
    unacked: int = 0,
    last_data_sent_ms: int = 0,
    last_data_recv_ms: int = 0,
    last_ack_recv_ms: int = 0,
    rtt_us: int = 0,
    total_retrans: int = 0,
) -> Sock:
    """A Sock from host-order ports and printable or packed addresses (tests, fakes)."""

    def pack(addr: bytes | str) -> bytes:
        raw = addr if isinstance(addr, bytes) else ipaddress.ip_address(addr).packed
        return raw.ljust(16, b"\0")

    def raw_port(port: int) -> int:
        return swap16(port) if _LITTLE else port

    return Sock(
        family, state, timer, retrans, raw_port(sport), raw_port(dport), pack(src), pack(dst),
        expires_ms, rqueue, wqueue, uid, inode, has_info, ca_retransmits, probes, backoff,
        rto_us, unacked, last_data_sent_ms, last_data_recv_ms, last_ack_recv_ms, rtt_us,
        total_retrans,
    )  # fmt: skip


def _ip(family: int, raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw[:16])


def format_endpoint(family: int, raw: bytes, port: int) -> str:
    """``10.0.0.1:80`` or ``[2001:db8::1]:80`` (the JSON ``local``/``remote`` format)."""
    if family == socket.AF_INET:
        return f"{socket.inet_ntop(socket.AF_INET, raw[:4])}:{port}"
    return f"[{socket.inet_ntop(socket.AF_INET6, raw[:16])}]:{port}"


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    name: str
    cmdline: str = ""
    unit: str | None = None  # systemd unit (service or scope) from /proc/PID/cgroup
    container: str | None = None  # container id, 12 hex digits, from /proc/PID/cgroup
    uid: int | None = None  # real uid (/proc/PID/status)
    user: str | None = None  # its name in the process's own /etc/passwd (auditd.kernel.identity)
    started_at: float | None = None  # unix time the process started (/proc/PID/stat)


class SocketOptions(NamedTuple):
    """A socket's own keepalive settings, read with getsockopt on a duplicate of its fd.

    The kernel answers TCP_KEEPIDLE/KEEPINTVL/KEEPCNT with the socket's value if it set one,
    else the namespace sysctl (keepalive_time_when() and friends in include/net/tcp.h): these
    are the values its timer uses. ``user_timeout_ms`` 0 means TCP_USER_TIMEOUT is not set.
    """

    keepalive: bool  # SO_KEEPALIVE
    idle: int  # TCP_KEEPIDLE, seconds
    intvl: int  # TCP_KEEPINTVL, seconds
    cnt: int  # TCP_KEEPCNT
    user_timeout_ms: int = 0  # TCP_USER_TIMEOUT
    source: str = "pidfd"  # how they were read: "pidfd" (getsockopt) or "bpf" (the iterator)


@dataclass(frozen=True, slots=True)
class Sysctls:
    """The TCP sysctls of one network namespace; ``None`` where the file does not exist."""

    values: dict[str, int] = field(default_factory=dict)
    # Local middleboxes of the namespace: state, not tuning, so not in ``values`` (which the
    # report compares with the host's). nf_conntrack_count, None without conntrack; the IPVS
    # TCP idle timeout and the (16-byte address, port) of its TCP virtual services.
    conntrack_entries: int | None = None
    ipvs_tcp_timeout: int | None = None
    ipvs_services: frozenset[tuple[bytes, int]] = frozenset()

    def get(self, name: str) -> int | None:
        return self.values.get(name)

    @property
    def keepalive_time(self) -> int:
        return self.values.get("net.ipv4.tcp_keepalive_time", 7200)

    @property
    def keepalive_intvl(self) -> int:
        return self.values.get("net.ipv4.tcp_keepalive_intvl", 75)

    @property
    def keepalive_probes(self) -> int:
        return self.values.get("net.ipv4.tcp_keepalive_probes", 9)

    @property
    def retries2(self) -> int:
        return self.values.get("net.ipv4.tcp_retries2", 15)

    @property
    def rto_max_ms(self) -> int:
        """``tcp_rto_max_ms`` on kernels that have it, else the compiled TCP_RTO_MAX."""
        return self.values.get("net.ipv4.tcp_rto_max_ms", 120000)

    @property
    def conntrack_timeout(self) -> int | None:
        """Idle timeout of an established flow in this namespace's conntrack, when conntrack
        tracks anything here (nf_conntrack_count > 0: netfilter registers its hooks in a
        namespace only once a rule needs them); else None."""
        if not self.conntrack_entries:
            return None
        return self.values.get("net.netfilter.nf_conntrack_tcp_timeout_established")


@dataclass(frozen=True, slots=True)
class Counters:
    """Kernel TCP counters of one namespace (/proc/net/netstat and /proc/net/snmp)."""

    keepalive_probes: int | None = None  # TcpExt TCPKeepAlive
    abort_on_timeout: int | None = None  # TcpExt TCPAbortOnTimeout
    timeouts: int | None = None  # TcpExt TCPTimeouts
    retrans_segs: int | None = None  # Tcp RetransSegs


@dataclass(frozen=True, slots=True)
class Finding:
    kind: FindingKind
    severity: Severity
    rule: str
    netns: str
    message: str
    hint: str
    state: str | None = None
    local: str | None = None
    remote: str | None = None
    idle_seconds: float | None = None
    keepalive: Keepalive | None = None
    probes: int | None = None
    retransmits: int | None = None
    abort_in_seconds: float | None = None
    pid: int | None = None
    process: str | None = None
    cmdline: str | None = None  # cut short (auditd.kernel.owners.scan.CMDLINE_MAX)
    unit: str | None = None
    container: str | None = None
    inode: int | None = None
    uid: int | None = None
    user: str | None = None
    started_at: float | None = None  # unix time the owner started
    sysctl: str | None = None
    value: float | None = None  # the sysctl's value, or the detection time in seconds
    expected: str | None = None
    case: DetectionCase | None = None  # detection_budget findings
    # Socket findings: the keepalive settings the verdict used, and where they came from:
    # "bpf" or "pidfd" (read exactly, see SocketOptions), "inferred" (sysctls and timer).
    keepalive_idle_seconds: float | None = None
    keepalive_interval_seconds: float | None = None
    keepalive_count: int | None = None
    user_timeout_ms: int | None = None
    options_source: str | None = None

    @property
    def key(self) -> tuple[str | None, ...]:
        """Identity across audits: the same problem on the same connection (or sysctl)."""
        return (self.kind, self.rule, self.netns, self.local, self.remote, self.sysctl, self.case)
