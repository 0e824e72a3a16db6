"""A socket's exact keepalive options, read through a duplicate of its owner's fd.

sock_diag shows the keepalive timer but not TCP_KEEPIDLE/KEEPINTVL/KEEPCNT/USER_TIMEOUT
(shared/KERNEL.md). With the owner's pid and fd from the ``/proc/*/fd`` scan, ``pidfd_open``
plus ``pidfd_getfd`` (Linux 5.6+) put a duplicate of the socket in this process; getsockopt on
it reads what the kernel's timers use, and the duplicate is closed at once. Read-only: the
socket is shared, never changed, and holding it a few microseconds does not keep it open
beyond its owner's close in any way the owner could notice.

pidfd_getfd needs ptrace attach permission over the owner (PTRACE_MODE_ATTACH_REALCREDS:
CAP_SYS_PTRACE for other users' processes). EPERM or ENOSYS turns inspection off for the rest
of the inspector's life (one audit) with one message; a process or fd gone in between, or an
fd number reused by another file, only skips that socket.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from auditd.kernel.sources import KernelSource
from auditd.model import SocketOptions, Sysctls

# pidfd_getfd's number. Since Linux 5.1 new syscalls share one number on every architecture
# (424 + n; alpha adds 110, mips its ABI base), see arch/*/tbl and include/uapi/asm-generic/
# unistd.h: 438 wherever this agent is expected to run.
PIDFD_GETFD: dict[str, int] = {
    "x86_64": 438,
    "aarch64": 438,
    "arm64": 438,
    "i386": 438,
    "i686": 438,
    "armv7l": 438,
    "riscv64": 438,
    "ppc64le": 438,
    "s390x": 438,
    "loongarch64": 438,
}

SOL_TCP = socket.IPPROTO_TCP
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)  # include/uapi/linux/tcp.h

# A seccomp filter says EPERM too: systemd's @system-service leaves pidfd_getfd out (@debug).
NEEDS = "needs CAP_SYS_PTRACE, Linux 5.6+, and pidfd_getfd allowed by any seccomp filter"

# A socket to read: (inode, owner pid, fd number in the owner).
Target = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class InspectScan:
    """What one ``inspect`` call read: options by socket inode, and what it could not."""

    options: dict[int, SocketOptions] = field(default_factory=dict)
    skipped: int = 0  # process or fd gone, fd reused for another file
    error: str | None = None  # inspection is off: why (no permission, old kernel)


class Inspector(Protocol):
    """Reads the keepalive options of one namespace's sockets."""

    @property
    def method(self) -> str:
        """How: "pidfd" (pidfd_getfd and getsockopt) or "bpf" (the socket iterator)."""
        ...

    @property
    def needs_owners(self) -> bool:
        """True when targets need their owner's pid and fd (False: the inode is enough)."""
        ...

    @property
    def note(self) -> str | None:
        """Why a better method was not used (BPF could not load), else None."""
        ...

    def inspect(self, targets: Sequence[Target]) -> InspectScan: ...


class Inspectors(Protocol):
    """What exact mode hands the audit: the inspector of each namespace (the BPF iterator
    reads one namespace at a time; pidfd_getfd serves every one as it is)."""

    def for_namespace(self, source: KernelSource, sysctls: Sysctls) -> Inspector: ...


def read_options(sock: socket.socket) -> SocketOptions:
    g = sock.getsockopt
    return SocketOptions(
        keepalive=bool(g(socket.SOL_SOCKET, socket.SO_KEEPALIVE)),
        idle=g(SOL_TCP, socket.TCP_KEEPIDLE),
        intvl=g(SOL_TCP, socket.TCP_KEEPINTVL),
        cnt=g(SOL_TCP, socket.TCP_KEEPCNT),
        user_timeout_ms=g(SOL_TCP, TCP_USER_TIMEOUT),
    )


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def syscall_getfd(number: int) -> Callable[[int, int], int]:
    """``pidfd_getfd(pidfd, fd, 0)`` through libc's syscall(); raises OSError."""
    libc = _libc()
    nr, c_int, get_errno = ctypes.c_long(number), ctypes.c_int, ctypes.get_errno

    def getfd(pidfd: int, fd: int) -> int:
        new = libc.syscall(nr, c_int(pidfd), c_int(fd), c_int(0))
        if new < 0:
            err = get_errno()
            raise OSError(err, os.strerror(err))
        return int(new)

    return getfd


class _Off(Exception):
    """Inspection is impossible for this audit: the one message."""


def _off_reason(exc: OSError, what: str) -> str | None:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return f"socket inspection unavailable: {what} refused ({NEEDS})"
    if exc.errno == errno.ENOSYS:
        return f"socket inspection unavailable: {what} not implemented by this kernel ({NEEDS})"
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return f"socket inspection stopped: {what}: {exc.strerror} (open-files limit)"
    return None


class SocketInspector:
    """The real inspector: one pidfd per process per ``inspect`` call, one duplicate per socket.

    ``pidfd_open`` and ``getfd`` are parameters so tests can make them fail. Once inspection
    is found impossible (``unavailable``), every later call returns that message at once.
    """

    method = "pidfd"
    needs_owners = True
    note: str | None = None  # nothing better was tried

    def __init__(
        self,
        pidfd_open: Callable[[int], int] | None = None,
        getfd: Callable[[int, int], int] | None = None,
        machine: str | None = None,
    ) -> None:
        self.unavailable: str | None = None
        self._pidfd_open = pidfd_open or getattr(os, "pidfd_open", None)
        self._getfd = getfd
        if getfd is None:
            arch = machine or platform.machine()
            number = PIDFD_GETFD.get(arch)
            if number is None:
                self.unavailable = (
                    f"socket inspection unavailable: unsupported architecture {arch} "
                    f"(pidfd_getfd's syscall number unknown)"
                )
            else:
                self._getfd = syscall_getfd(number)
        if self._pidfd_open is None:
            self.unavailable = "socket inspection unavailable: os.pidfd_open missing (Linux 5.3+)"

    def for_namespace(self, source: KernelSource, sysctls: Sysctls) -> SocketInspector:
        """Any namespace's sockets: the owner's fd is what it reads through."""
        return self

    def inspect(self, targets: Sequence[Target]) -> InspectScan:
        if self.unavailable is not None or not targets:
            return InspectScan(error=self.unavailable)
        by_pid: dict[int, list[tuple[int, int]]] = {}
        for inode, pid, fd in targets:
            by_pid.setdefault(pid, []).append((inode, fd))
        options: dict[int, SocketOptions] = {}
        skipped = 0
        try:
            for pid, socks in by_pid.items():
                skipped += self._process(pid, socks, options)
        except _Off as off:
            self.unavailable = str(off)
            return InspectScan(options, skipped, self.unavailable)
        return InspectScan(options, skipped)

    def _process(
        self, pid: int, socks: list[tuple[int, int]], options: dict[int, SocketOptions]
    ) -> int:
        """Reads the sockets of one process into ``options``; returns how many it skipped."""
        assert self._pidfd_open is not None and self._getfd is not None
        try:
            pidfd = self._pidfd_open(pid)
        except OSError as exc:
            reason = _off_reason(exc, "pidfd_open")
            if reason is not None and exc.errno not in (errno.EPERM, errno.EACCES):
                raise _Off(reason) from exc
            return len(socks)  # ESRCH: the process is gone
        getfd, fstat, skipped = self._getfd, os.fstat, 0
        try:
            for inode, fd in socks:
                try:
                    dup = getfd(pidfd, fd)
                except OSError as exc:
                    reason = _off_reason(exc, "pidfd_getfd")
                    if reason is not None:
                        raise _Off(reason) from exc
                    skipped += 1  # EBADF: closed since the scan; ESRCH: the process exited
                    continue
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, dup)
                try:
                    # The fd number may have been reused since the /proc scan: same inode?
                    if fstat(dup).st_ino != inode:
                        skipped += 1
                        continue
                    options[inode] = read_options(sock)
                except OSError:
                    skipped += 1
                finally:
                    sock.close()
        finally:
            os.close(pidfd)
        return skipped
