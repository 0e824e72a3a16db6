"""The one layer that touches the OS: netlink sock_diag, procfs, the process table.

Everything above it works on the records of ``auditd.model``. ``KernelSource`` is the seam:
the audit takes one as a parameter, tests hand in fakes or recorded dumps.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING, Protocol, TypeVar

from auditd.kernel import netns, procfs, procs, sockdiag
from auditd.kernel.netns import NamespaceRef
from auditd.kernel.prescan import FdPrescan
from auditd.kernel.procs import OwnerCache, OwnerScan
from auditd.kernel.sockdiag import DumpStats
from auditd.model import Counters, Sock, Sysctls

if TYPE_CHECKING:
    from auditd.kernel.bpf.exact import BpfAudit

T = TypeVar("T")

__all__ = [
    "DumpStats",
    "KernelSource",
    "LocalKernel",
    "NamespaceKernel",
    "NamespaceRef",
    "OwnerCache",
    "OwnerScan",
]


class KernelSource(Protocol):
    """What an audit reads from one network namespace."""

    def netns_inode(self) -> int | None: ...

    def sysctls(self) -> Sysctls: ...

    def counters(self) -> Counters: ...

    def sockets(self, stats: DumpStats) -> Iterator[Sock]:
        """Streams TCP sockets; raises KernelError if the dump cannot be read."""
        ...

    def owners(self, inodes: Collection[int], deadline: float | None = None) -> OwnerScan:
        """Owners of socket inodes; ``deadline`` is a time.monotonic() bound on the search."""
        ...


class LocalKernel:
    """The namespace of the calling thread, read through the real kernel."""

    def __init__(
        self,
        proc_root: str = "/proc",
        netlink: sockdiag.SocketFactory = sockdiag.netlink_socket,
        owner_cache: OwnerCache | None = None,
        prescan: FdPrescan | None = None,
    ) -> None:
        self.proc_root = proc_root
        self.netlink = netlink
        self.owner_cache = owner_cache  # kept across audits by the daemon
        self.prescan = prescan  # the fd scan started with the audit, if any
        self.bpf: BpfAudit | None = None  # the owner iterator of the audit, if it loaded

    def share(self, prescan: FdPrescan | None) -> None:
        """Ask ``prescan`` for owners, if it scans the /proc this source reads."""
        if prescan is not None and prescan.proc_root == self.proc_root:
            self.prescan = prescan

    def share_bpf(self, bpf: BpfAudit | None) -> None:
        """Ask the audit's owner iterator for owners; the /proc scan stays the fallback. Only
        for a source reading the real /proc: the iterator sees the real kernel's processes."""
        self.bpf = bpf if os.path.realpath(self.proc_root) == "/proc" else None
        if self.bpf is not None:
            self.bpf.prefetch_owners()  # its pass runs while this source dumps

    def inside(self, fn: Callable[[], T]) -> T:
        """``fn()`` in this source's namespace (here: the calling thread's)."""
        return fn()

    def netns_inode(self) -> int | None:
        try:
            return os.stat(os.path.join(self.proc_root, "thread-self", "ns", "net")).st_ino
        except OSError:
            return None

    def sysctls(self) -> Sysctls:
        return procfs.read_sysctls(self.proc_root)

    def counters(self) -> Counters:
        return procfs.read_counters(self.proc_root)

    def sockets(self, stats: DumpStats) -> Iterator[Sock]:
        return sockdiag.dump(stats, factory=self.netlink)

    def owners(self, inodes: Collection[int], deadline: float | None = None) -> OwnerScan:
        if self.bpf is not None:
            scan = self.bpf.owners(inodes, self.proc_root)
            if scan is not None:
                return scan
        return procs.find_owners(
            inodes, self.proc_root, deadline, cache=self.owner_cache, prescan=self.prescan
        )


class NamespaceKernel(LocalKernel):
    """Another network namespace, read from short-lived threads that enter it.

    Each read enters anew (``netns.call_in_netns``): sysctls and counters are read inside,
    since /proc/sys/net and /proc/thread-self/net resolve the namespace of the thread that
    opens them; the sock_diag socket is created inside and then read from the calling
    thread, as a socket keeps the namespace it was made in. Owners need no entering: /proc
    and socket inodes are global. Every read raises NamespaceGone when the namespace has
    gone or cannot be entered.
    """

    def __init__(
        self,
        ref: NamespaceRef,
        proc_root: str = "/proc",
        netlink: sockdiag.SocketFactory = sockdiag.netlink_socket,
        owner_cache: OwnerCache | None = None,
        prescan: FdPrescan | None = None,
    ) -> None:
        super().__init__(proc_root, netlink, owner_cache, prescan)
        self.ref = ref

    def _inside(self, fn: Callable[[], T]) -> T:
        return netns.call_in_netns(self.ref.path, fn, (self.ref.dev, self.ref.ino))

    def inside(self, fn: Callable[[], T]) -> T:
        return self._inside(fn)

    def netns_inode(self) -> int | None:
        return self.ref.ino

    def sysctls(self) -> Sysctls:
        return self._inside(lambda: procfs.read_sysctls(self.proc_root))

    def counters(self) -> Counters:
        return self._inside(lambda: procfs.read_counters(self.proc_root))

    def _netlink_inside(self) -> socket.socket:
        return self._inside(self.netlink)

    def sockets(self, stats: DumpStats) -> Iterator[Sock]:
        return sockdiag.dump(stats, factory=self._netlink_inside)
