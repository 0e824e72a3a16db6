"""The one layer that touches the OS: netlink sock_diag, procfs, the process table.

Everything above it works on the records of ``auditd.model``. ``KernelSource`` is the seam:
the audit takes one as a parameter, tests hand in fakes or recorded dumps.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from typing import Protocol

from auditd.kernel import procfs, procs, sockdiag
from auditd.kernel.procs import OwnerScan
from auditd.kernel.sockdiag import DumpStats
from auditd.model import Counters, Sock, Sysctls

__all__ = ["DumpStats", "KernelSource", "LocalKernel", "OwnerScan"]


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
    ) -> None:
        self.proc_root = proc_root
        self.netlink = netlink

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
        return procs.find_owners(inodes, self.proc_root, deadline)
