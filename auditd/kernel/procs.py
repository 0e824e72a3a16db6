"""Which process owns a socket: socket inode -> pid through ``/proc/PID/fd``.

Best effort by nature: processes exit and fds close while we look, and without
CAP_SYS_PTRACE (or CAP_DAC_READ_SEARCH) other users' fd tables are unreadable. All of that
is skipped silently; the caller gets the owners it could find.

Cost is one ``readlink`` per open fd on the host, so the scan only runs for the sockets the
audit flags, and stops as soon as every wanted inode is found.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from auditd.model import ProcessInfo

CMDLINE_MAX = 200


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096)


def process_info(pid: int, proc_root: str = "/proc") -> ProcessInfo | None:
    """Name and command line (cut short) of ``pid``, or None if it is gone."""
    base = os.path.join(proc_root, str(pid))
    try:
        name = _read(os.path.join(base, "comm")).decode(errors="replace").strip()
    except OSError:
        return None
    try:
        raw = _read(os.path.join(base, "cmdline"))
    except OSError:
        raw = b""
    cmdline = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    if len(cmdline) > CMDLINE_MAX:
        cmdline = cmdline[: CMDLINE_MAX - 3] + "..."
    return ProcessInfo(pid=pid, name=name, cmdline=cmdline)


@dataclass(frozen=True, slots=True)
class OwnerScan:
    """Owners found, and whether every process was looked at (False: out of time)."""

    found: dict[int, ProcessInfo] = field(default_factory=dict)
    complete: bool = True


def find_owners(
    inodes: Collection[int],
    proc_root: str = "/proc",
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> OwnerScan:
    """Owner of each socket inode that some process holds open; others are left out.

    ``deadline`` (a ``clock`` time) bounds the scan: on a host with hundreds of thousands of
    open fds, a full scan would cost more than the audit it serves.
    """
    wanted = {f"socket:[{inode}]": inode for inode in inodes if inode}
    found: dict[int, ProcessInfo] = {}
    if not wanted:
        return OwnerScan(found)
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return OwnerScan(found, complete=False)
    readlink = os.readlink
    for entry in entries:
        if not entry.isdigit():
            continue
        if deadline is not None and clock() > deadline:
            return OwnerScan(found, complete=False)
        try:  # readlink relative to the open fd directory: no path building, no path walk
            dir_fd = os.open(os.path.join(proc_root, entry, "fd"), os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # gone, or not ours to read
            continue
        hits: list[int] = []
        try:
            for fd in os.listdir(dir_fd):
                try:
                    target = readlink(fd, dir_fd=dir_fd)
                except OSError:
                    continue
                inode = wanted.get(target)
                if inode is not None and inode not in found:
                    hits.append(inode)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
        if hits:
            info = process_info(int(entry), proc_root)
            if info is not None:
                for inode in hits:
                    found[inode] = info
            if len(found) == len(wanted):
                break
    return OwnerScan(found)
