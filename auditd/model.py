"""Plain data shared by every layer: kernel constants, socket records, findings.

Nothing here does I/O. The kernel layer produces these records, the audit layer reasons
over them, the CLI and exporter render them.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple


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


class Keepalive:
    """Inferred keepalive status of a socket (exact strings used in JSON and labels)."""

    ON = "on"
    OFF = "off"
    UNKNOWN = "unknown"
    ALL = ("on", "off", "unknown")


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


class FindingKind:
    """Exact ``kind`` strings of findings."""

    IDLE_NO_KEEPALIVE = "idle_no_keepalive"
    KEEPALIVE_TOO_SLOW = "keepalive_too_slow"
    KEEPALIVE_PROBING = "keepalive_probing"
    RETRANSMITTING = "retransmitting"
    CLOSE_WAIT = "close_wait"
    DETECTION_BUDGET = "detection_budget"
    SYSCTL = "sysctl"
    ALL = (
        "idle_no_keepalive",
        "keepalive_too_slow",
        "keepalive_probing",
        "retransmitting",
        "close_wait",
        "detection_budget",
        "sysctl",
    )


class Sock(NamedTuple):
    """One socket as sock_diag reports it: a flat record, decoded before any logic.

    A NamedTuple rather than a frozen dataclass on purpose: an audit builds one per socket
    (200k on a busy proxy) and ``tuple.__new__`` is several times cheaper than a frozen
    dataclass ``__init__``. Times are kernel units: ``expires_ms`` and the ``last_*_ms``
    ages in milliseconds, ``rto_us`` in microseconds.
    """

    family: int
    state: int
    timer: int
    retrans: int  # idiag_retrans: retransmits (timer 1) or keepalive probes out (timer 2)
    sport: int  # host order
    dport: int
    src: bytes  # 4 bytes (IPv4) or 16 (IPv6)
    dst: bytes
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
    def local(self) -> str:
        return format_endpoint(self.family, self.src, self.sport)

    @property
    def remote(self) -> str:
        return format_endpoint(self.family, self.dst, self.dport)

    @property
    def local_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return _ip(self.family, self.src)

    @property
    def remote_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return _ip(self.family, self.dst)


def _ip(family: int, raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw[:16])


def format_endpoint(family: int, raw: bytes, port: int) -> str:
    """``10.0.0.1:80`` or ``[2001:db8::1]:80`` (the JSON ``local``/``remote`` format)."""
    ip = _ip(family, raw)
    if ip.version == 6:
        return f"[{ip}]:{port}"
    return f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    name: str
    cmdline: str = ""


@dataclass(frozen=True, slots=True)
class Sysctls:
    """The TCP sysctls of one network namespace; ``None`` where the file does not exist."""

    values: dict[str, int] = field(default_factory=dict)

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


@dataclass(frozen=True, slots=True)
class Counters:
    """Kernel TCP counters of one namespace (/proc/net/netstat and /proc/net/snmp)."""

    keepalive_probes: int | None = None  # TcpExt TCPKeepAlive
    abort_on_timeout: int | None = None  # TcpExt TCPAbortOnTimeout
    timeouts: int | None = None  # TcpExt TCPTimeouts
    retrans_segs: int | None = None  # Tcp RetransSegs


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    severity: Severity
    rule: str
    netns: str
    message: str
    hint: str
    state: str | None = None
    local: str | None = None
    remote: str | None = None
    idle_seconds: float | None = None
    keepalive: str | None = None
    probes: int | None = None
    retransmits: int | None = None
    abort_in_seconds: float | None = None
    pid: int | None = None
    process: str | None = None
    inode: int | None = None
    sysctl: str | None = None
    value: float | None = None  # the sysctl's value, or the detection time in seconds
    expected: str | None = None
    case: str | None = None  # detection_budget: "idle" or "in_flight"

    @property
    def key(self) -> tuple[str | None, ...]:
        """Identity across audits: the same problem on the same connection (or sysctl)."""
        return (self.kind, self.rule, self.netns, self.local, self.remote, self.sysctl, self.case)
