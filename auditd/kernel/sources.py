"""The kernel of one network namespace, as an audit reads it: ``KernelSource`` is the seam.

The audit takes sources as parameters; tests hand in fakes or recorded dumps.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Collection, Iterator
from typing import Protocol, TypeVar

from auditd.kernel import netns, procfs, sockdiag
from auditd.kernel.bpf.records import AuditOutput, PassParams
from auditd.kernel.netns import NamespaceRef
from auditd.kernel.owners.attribution import OwnerFinder
from auditd.kernel.owners.scan import OwnerScan
from auditd.kernel.sockdiag import DumpStats
from auditd.model import Counters, Sock, Sysctls

T = TypeVar("T")
# Runs a function inside one namespace and returns what it returns (an iterator's fd).
Enter = Callable[[Callable[[], int]], int]


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

    def enter(self) -> Enter | None:
        """How to run a function inside this namespace (a BPF iterator walks the namespace of
        the thread that creates it), or None when no kernel namespace is behind the source."""
        ...

    def describe(self) -> str:
        """What the source is, for a note (``FakeKernel``, ``NamespaceKernel``)."""
        ...


class KernelAudit(Protocol):
    """A namespace's audit done in the kernel (the BPF audit pass, ``audit.bpf.c``): what
    ``Tally`` would count over the dump, and only the sockets its pre-filter keeps, as full
    records, instead of every socket."""

    def audit_pass(self, source: KernelSource, params: PassParams) -> AuditOutput:
        """One pass over ``source``'s namespace; raises AuditdError (BpfUnavailable,
        KernelError) when it cannot serve, and the audit then dumps by sock_diag."""
        ...


class LocalKernel:
    """The namespace of the calling thread, read through the real kernel. ``owners``: how
    its owners are looked up (the session's cache and child scan; else a plain scan)."""

    def __init__(
        self,
        proc_root: str = "/proc",
        netlink: sockdiag.SocketFactory = sockdiag.netlink_socket,
        owners: OwnerFinder | None = None,
    ) -> None:
        self.proc_root = proc_root
        self.netlink = netlink
        self.finder = owners if owners is not None else OwnerFinder(proc_root)

    def inside(self, fn: Callable[[], T]) -> T:
        """``fn()`` in this source's namespace (here: the calling thread's)."""
        return fn()

    def enter(self) -> Enter:
        return self.inside

    def describe(self) -> str:
        return type(self).__name__

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
        return self.finder.find(inodes, deadline)


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
        owners: OwnerFinder | None = None,
    ) -> None:
        super().__init__(proc_root, netlink, owners)
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
