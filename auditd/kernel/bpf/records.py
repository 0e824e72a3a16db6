"""Decoding what the iterators write: pure functions over bytes, no kernel.

The layouts mirror ``struct sock_rec`` (sockets.bpf.c) and ``struct owner_rec``
(owners.bpf.c), native byte order, no padding. A pass over 200k sockets yields about 8 MB,
of which an audit needs a few fields of some sockets: the records are kept as they came, the
inode column is a ``memoryview.cast`` slice (no copy), and a record is unpacked only for a
socket asked for.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from auditd.model import Sock, SocketOptions, Sysctls

# struct sock_rec: cookie, ino, netns, keepalive_time, keepalive_intvl, user_timeout, hz,
# state, keepalive_probes, keepopen, family.
SOCK_REC = struct.Struct("=QQIIIIIBBBB")
# struct owner_rec: ino, pid (tgid), fd, comm.
OWNER_REC = struct.Struct("=QII16s")
_SOCK_WORDS = SOCK_REC.size // 8  # u64 columns per socket record
_OWNER_WORDS = OWNER_REC.size // 8


class RecordError(ValueError):
    """The iterator's output does not have the layout this decoder knows."""


@dataclass(frozen=True, slots=True)
class SockRecord:
    """One socket as the kernel holds it: raw keepalive fields, 0 meaning the sysctl."""

    cookie: int
    inode: int
    netns: int
    keepalive_time: int  # jiffies
    keepalive_intvl: int  # jiffies
    user_timeout_ms: int
    hz: int
    state: int
    keepalive_probes: int
    keepalive: bool  # SO_KEEPALIVE (SOCK_KEEPOPEN)
    family: int

    def options(self, sysctls: Sysctls) -> SocketOptions:
        return kernel_options(
            self.keepalive, self.keepalive_time, self.keepalive_intvl, self.keepalive_probes,
            self.user_timeout_ms, self.hz, sysctls,
        )  # fmt: skip


def kernel_options(
    keepalive: bool, ktime: int, kintvl: int, probes: int, user_timeout_ms: int, hz: int,
    sysctls: Sysctls,
) -> SocketOptions:  # fmt: skip
    """What getsockopt would answer from a socket's raw fields (times in jiffies, 0 meaning
    the sysctl): the socket's value, else the namespace's (keepalive_time_when() and friends,
    include/net/tcp.h; the kernel divides by HZ)."""
    return SocketOptions(
        keepalive,
        ktime // hz if ktime else sysctls.keepalive_time,
        kintvl // hz if kintvl else sysctls.keepalive_intvl,
        probes or sysctls.keepalive_probes,
        user_timeout_ms,
        "bpf",
    )


def _check(data: bytes, size: int, what: str) -> None:
    if len(data) % size:
        raise RecordError(f"{what} iterator: {len(data)} bytes is not a whole number of records")


def sock_record(data: bytes, index: int) -> SockRecord:
    """The ``index``-th record; raises RecordError for a record that cannot be one."""
    cookie, ino, netns, ktime, kintvl, uto, hz, state, probes, keepopen, family = (
        SOCK_REC.unpack_from(data, index * SOCK_REC.size)
    )
    if hz == 0:
        raise RecordError(f"socket iterator: record {index} has HZ 0")
    return SockRecord(
        cookie, ino, netns, ktime, kintvl, uto, hz, state, probes, bool(keepopen), family
    )


def iter_sock_records(data: bytes) -> Iterator[SockRecord]:
    _check(data, SOCK_REC.size, "socket")
    for i in range(len(data) // SOCK_REC.size):
        yield sock_record(data, i)


class SocketTable:
    """The records of one namespace's pass, looked up by socket inode (0: no inode).

    ``select`` finds the records of many inodes in one pass over the inode column, without
    an index of every socket (200k entries would cost about 20 MB): what an audit asks once.
    """

    def __init__(self, data: bytes, sysctls: Sysctls) -> None:
        _check(data, SOCK_REC.size, "socket")
        self._data = data
        self._sysctls = sysctls
        self._inodes = memoryview(data).cast("Q")[1::_SOCK_WORDS]

    def __len__(self) -> int:
        return len(self._inodes)

    def select(self, inodes: Collection[int]) -> dict[int, SocketOptions]:
        """Options of those of ``inodes`` the pass saw (a set is fastest)."""
        wanted = inodes if isinstance(inodes, (set, frozenset)) else set(inodes)
        data, unpack, size, sysctls = self._data, SOCK_REC.unpack_from, SOCK_REC.size, self._sysctls
        found: dict[int, SocketOptions] = {}
        for i, ino in enumerate(self._inodes):
            if ino in wanted and ino:
                _, _, _, ktime, kintvl, uto, hz, _, probes, keepopen, _ = unpack(data, i * size)
                if not hz:
                    raise RecordError(f"socket iterator: record {i} has HZ 0")
                found[ino] = kernel_options(bool(keepopen), ktime, kintvl, probes, uto, hz, sysctls)
        return found

    def record(self, inode: int) -> SockRecord | None:
        """One socket's record (a scan of the column: for tests and single lookups)."""
        if inode:
            for i, ino in enumerate(self._inodes):
                if ino == inode:
                    return sock_record(self._data, i)
        return None

    def options(self, inode: int) -> SocketOptions | None:
        rec = self.record(inode)
        return None if rec is None else rec.options(self._sysctls)


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    pid: int
    fd: int
    comm: str


class OwnerTable:
    """Socket inode -> its owner from one pass over every process's files. A socket shared
    by several processes (inherited across fork) gets the first one the kernel walked: the
    lowest pid, as the /proc scan picks. Looked up like ``SocketTable``, by column."""

    def __init__(self, data: bytes) -> None:
        _check(data, OWNER_REC.size, "owner")
        self._data = data
        self._inodes = memoryview(data).cast("Q")[::_OWNER_WORDS]

    def __len__(self) -> int:
        return len(self._inodes)

    def _record(self, i: int) -> OwnerRecord:
        _, pid, fd, comm = OWNER_REC.unpack_from(self._data, i * OWNER_REC.size)
        return OwnerRecord(pid, fd, comm.split(b"\0", 1)[0].decode(errors="replace"))

    def select(self, inodes: Collection[int]) -> dict[int, OwnerRecord]:
        wanted = inodes if isinstance(inodes, (set, frozenset)) else set(inodes)
        found: dict[int, OwnerRecord] = {}
        for i, ino in enumerate(self._inodes):
            if ino in wanted and ino not in found:
                found[ino] = self._record(i)
        return found

    def get(self, inode: int) -> OwnerRecord | None:
        return self.select((inode,)).get(inode)


# The audit pass (audit.bpf.c): struct audit_params, struct audit_rec, struct audit_agg.
AUDIT_PARAMS = struct.Struct("=3Q2I3I9I3B5x")
# struct port_key: netns inode, raw port (as Sock.sport_raw), 1 for the remote port.
PORT_KEY = struct.Struct("=IHBx")
AUDIT_REC = struct.Struct("=QQ16s16s15IHH4B4B2B6x")
AUDIT_AGG = struct.Struct("=4Q48I30I4I")
AGG_MAGIC = 0x6B61616767726567
IDLE_BOUNDS = 9  # tally.IDLE_BUCKETS
REC_KEPT, REC_EXTRA, REC_READ = 1, 2, 4  # audit_rec.flags


@dataclass(frozen=True, slots=True)
class AuditParams:
    """One pass's thresholds, in the kernel's units (see ``auditd.audit.kernelpass``)."""

    warn_ms: int
    probe_ms: int
    close_wait_ms: int
    retransmits: int
    cadence_min: int
    sys_idle: int
    sys_intvl: int
    sys_cnt: int
    bounds_ms: tuple[int, ...]
    slow_defaults: bool
    exact: bool
    ported: bool = False  # thresholds by port follow (``PassParams.ports``)

    def pack(self) -> bytes:
        u32, u64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF

        def c(v: int, top: int) -> int:
            return min(max(v, 0), top)

        if len(self.bounds_ms) != IDLE_BOUNDS:
            raise RecordError(f"audit pass: {len(self.bounds_ms)} idle bounds, need {IDLE_BOUNDS}")
        return AUDIT_PARAMS.pack(
            c(self.warn_ms, u64), c(self.probe_ms, u64), c(self.close_wait_ms, u64),
            c(self.retransmits, u32), c(self.cadence_min, u32), c(self.sys_idle, u32),
            c(self.sys_intvl, u32), c(self.sys_cnt, u32),
            *(c(b, u32) for b in self.bounds_ms), self.slow_defaults, self.exact, self.ported,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class PassParams:
    """A pass's thresholds: the general ones, and those of the rules filed under a port
    (raw port as ``Sock.sport_raw`` holds it, True for the remote port)."""

    general: AuditParams
    ports: tuple[tuple[int, bool, AuditParams], ...] = ()

    def port_entries(self, netns_inode: int) -> list[tuple[bytes, bytes]]:
        """(key, value) of the map "ports" for this pass's namespace."""
        return [
            (PORT_KEY.pack(netns_inode, raw, remote), params.pack())
            for raw, remote, params in self.ports
        ]


@dataclass(frozen=True, slots=True)
class Aggregates:
    """What the pass counted over every socket: as ``Tally`` counts a dump."""

    idle_ms_sum: tuple[int, int, int]  # by Keepalive.ALL index
    counts: tuple[int, ...]  # state * 3 + status, states 0..15
    hist: tuple[tuple[int, ...], ...]  # per status, IDLE_BOUNDS + 1 buckets
    total: int
    handed: int  # records written
    inspected: int  # exact mode: statuses taken from SO_KEEPALIVE
    unconfigured: int  # sockets skipped for want of parameters (0 unless a bug)


class AuditRecord(NamedTuple):
    """One socket the pass handed over: the socket as sock_diag reports it, its cookie, its
    raw keepalive fields (0: the namespace sysctl) and the pass's ``REC_*`` flags."""

    sock: Sock
    cookie: int
    keepalive_time: int  # jiffies
    keepalive_intvl: int
    keepalive_probes: int
    user_timeout_ms: int
    hz: int
    keepalive: bool
    flags: int

    def options(self, sysctls: Sysctls) -> SocketOptions:
        return kernel_options(
            self.keepalive, self.keepalive_time, self.keepalive_intvl, self.keepalive_probes,
            self.user_timeout_ms, self.hz, sysctls,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class AuditOutput:
    records: list[AuditRecord]
    aggregates: Aggregates


def audit_record(data: bytes, offset: int) -> AuditRecord:
    (cookie, ino, src, dst, expires, rqueue, wqueue, uid, rto, unacked, sent, recv, acked,
     rtt, total_retrans, ktime, kintvl, uto, hz, sport, dport, family, state, timer, retrans,
     ca_retransmits, probes, backoff, kprobes, keepopen, flags) = AUDIT_REC.unpack_from(
        data, offset)  # fmt: skip
    if hz == 0:
        raise RecordError(f"audit pass: record at {offset} has HZ 0")
    sock = Sock(family, state, timer, retrans, sport, dport, src, dst, expires, rqueue, wqueue,
                uid, ino, True, ca_retransmits, probes, backoff, rto, unacked, sent, recv,
                acked, rtt, total_retrans)  # fmt: skip
    return AuditRecord(sock, cookie, ktime, kintvl, kprobes, uto, hz, bool(keepopen), flags)


def decode_audit(data: bytes) -> AuditOutput:
    """A whole pass: the records, then the aggregates record that ends it. Raises
    RecordError for output that is not that (a pass cut short, another layout)."""
    size = AUDIT_AGG.size
    if len(data) < size or (len(data) - size) % AUDIT_REC.size:
        raise RecordError(f"audit pass: {len(data)} bytes is not records and aggregates")
    values = AUDIT_AGG.unpack_from(data, len(data) - size)
    if values[0] != AGG_MAGIC:
        raise RecordError("audit pass: no aggregates at its end")
    sums, counts = values[1:4], values[4:52]
    flat, (total, handed, inspected, unconfigured) = values[52:82], values[82:86]
    width = IDLE_BOUNDS + 1
    hist = tuple(tuple(flat[i * width : (i + 1) * width]) for i in range(3))
    n = (len(data) - size) // AUDIT_REC.size
    if n != handed:
        raise RecordError(f"audit pass: {n} records, the pass wrote {handed}")
    records = [audit_record(data, i * AUDIT_REC.size) for i in range(n)]
    aggregates = Aggregates(
        (sums[0], sums[1], sums[2]), tuple(counts), hist, total, handed, inspected, unconfigured
    )
    return AuditOutput(records, aggregates)
