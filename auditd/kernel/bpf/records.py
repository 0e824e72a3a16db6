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

from auditd.model import SocketOptions, Sysctls

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
        """What getsockopt would answer: the socket's value, else the namespace's sysctl
        (keepalive_time_when() and friends, include/net/tcp.h; the kernel divides by HZ)."""
        hz = self.hz
        return SocketOptions(
            keepalive=self.keepalive,
            idle=self.keepalive_time // hz if self.keepalive_time else sysctls.keepalive_time,
            intvl=self.keepalive_intvl // hz if self.keepalive_intvl else sysctls.keepalive_intvl,
            cnt=self.keepalive_probes or sysctls.keepalive_probes,
            user_timeout_ms=self.user_timeout_ms,
            source="bpf",
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
        data, unpack, size = self._data, SOCK_REC.unpack_from, SOCK_REC.size
        idle, intvl, cnt = (
            self._sysctls.keepalive_time,
            self._sysctls.keepalive_intvl,
            self._sysctls.keepalive_probes,
        )
        found: dict[int, SocketOptions] = {}
        # SockRecord.options inlined: this runs for every socket exact mode asks about.
        for i, ino in enumerate(self._inodes):
            if ino in wanted and ino:
                _, _, _, ktime, kintvl, uto, hz, _, probes, keepopen, _ = unpack(data, i * size)
                if not hz:
                    raise RecordError(f"socket iterator: record {i} has HZ 0")
                found[ino] = SocketOptions(
                    bool(keepopen),
                    ktime // hz if ktime else idle,
                    kintvl // hz if kintvl else intvl,
                    probes or cnt,
                    uto,
                    "bpf",
                )
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
