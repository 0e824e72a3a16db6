"""Decoding what the iterators write: pure functions over bytes, no kernel.

The layouts mirror ``struct sock_rec`` (sockets.bpf.c) and ``struct owner_rec``
(owners.bpf.c), native byte order, no padding. A pass over 200k sockets yields about 8 MB,
of which an audit needs a few fields of some sockets: the records are kept as they came and
indexed column-wise (``memoryview.cast`` slices run in C), and a socket's record is unpacked
only when it is asked for.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
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
    """The records of one namespace's pass, indexed by socket inode (0: no inode, left out).

    ``options(inode)`` unpacks one record: what exact mode asks for each socket it judges.
    """

    def __init__(self, data: bytes, sysctls: Sysctls) -> None:
        _check(data, SOCK_REC.size, "socket")
        self._data = data
        self._sysctls = sysctls
        inodes = memoryview(data).cast("Q")[1::_SOCK_WORDS]
        self._index = dict(zip(inodes, range(len(inodes))))
        self._index.pop(0, None)

    def __len__(self) -> int:
        return len(self._data) // SOCK_REC.size

    def __contains__(self, inode: object) -> bool:
        return inode in self._index

    def record(self, inode: int) -> SockRecord | None:
        i = self._index.get(inode)
        return None if i is None else sock_record(self._data, i)

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
    lowest pid, as the /proc scan picks."""

    def __init__(self, data: bytes) -> None:
        _check(data, OWNER_REC.size, "owner")
        self._data = data
        inodes = memoryview(data).cast("Q")[::_OWNER_WORDS]
        n = len(inodes)
        # dict() keeps the last value of a repeated key: feed it backwards so the first wins.
        self._index = dict(zip(reversed(inodes), range(n - 1, -1, -1)))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, inode: object) -> bool:
        return inode in self._index

    def get(self, inode: int) -> OwnerRecord | None:
        i = self._index.get(inode)
        if i is None:
            return None
        _, pid, fd, comm = OWNER_REC.unpack_from(self._data, i * OWNER_REC.size)
        return OwnerRecord(pid, fd, comm.split(b"\0", 1)[0].decode(errors="replace"))
