"""The settings of a connection just aborted, read from its owner's fd.

An aborted socket is out of every hash table, so sock_diag no longer dumps it, but until
its application closes the fd it is still a file of that process: ``/proc/PID/fd`` finds
it by inode and ``SocketInspector`` (pidfd_getfd, CAP_SYS_PTRACE) reads its keepalive
options and TCP_USER_TIMEOUT, which decide between a retransmission and a user timeout.
"""

from __future__ import annotations

import os

from auditd.kernel.inspect import SocketInspector
from auditd.model import SocketOptions

FD_SCAN_MAX = 65536  # fds looked at in one process at most: an abort must not stall the reader


def fd_of(pid: int, inode: int, proc_root: str = "/proc") -> int | None:
    """The fd number of socket ``inode`` in process ``pid``, or None (gone, not allowed)."""
    target = f"socket:[{inode}]"
    base = os.path.join(proc_root, str(pid), "fd")
    try:
        names = os.listdir(base)
    except OSError:
        return None
    for name in names[:FD_SCAN_MAX]:
        try:
            if os.readlink(os.path.join(base, name)) == target:
                return int(name)
        except (OSError, ValueError):
            continue
    return None


class OptionsReader:
    """``read(pid, inode)`` -> the socket's options, or None when they cannot be read."""

    def __init__(self, proc_root: str = "/proc", inspector: SocketInspector | None = None) -> None:
        self.proc_root = proc_root
        self.inspector = inspector or SocketInspector()

    def read(self, pid: int, inode: int) -> SocketOptions | None:
        fd = fd_of(pid, inode, self.proc_root)
        if fd is None:
            return None
        return self.inspector.inspect([(inode, pid, fd)]).options.get(inode)
