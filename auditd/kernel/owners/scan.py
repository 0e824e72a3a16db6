"""Which process owns a socket: socket inode -> pid through ``/proc/PID/fd``.

Best effort by nature: processes exit and fds close while we look, and other users' fd
tables are unreadable without both CAP_DAC_READ_SEARCH (to list the 0500 ``fd`` directory)
and CAP_SYS_PTRACE (to readlink its entries: ptrace_may_access). Processes that vanish are
skipped silently; the ones we were not allowed to read are counted (``OwnerScan.denied``) so
the caller can say why an owner is missing.

Cost is one ``readlink`` per open fd on the host, so the scan only runs for the sockets the
audit flags (or, with socket inspection, the ones whose options it reads), and stops as soon as
every wanted inode is found. On a big host the scan can instead run ahead, in a child process
started with the audit (``auditd.kernel.owners.prescan``): then this only asks it. The fd number of
each socket found comes along: socket inspection duplicates it (``auditd.kernel.inspect``).

The systemd unit and the container of an owner come from ``/proc/PID/cgroup``, read with the
cgroup parser that names network namespaces (``auditd.kernel.netns``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from auditd.kernel import identity
from auditd.kernel.netns import cgroup_paths, name_from_cgroup
from auditd.kernel.owners._fdscan_child import links
from auditd.kernel.owners.prescan import FdPrescan, Session
from auditd.model import ProcessInfo

CMDLINE_MAX = 200
_UNIT_SUFFIXES = (".service", ".scope")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096)


def unit_and_container(cgroup: str) -> tuple[str | None, str | None]:
    """(systemd unit, container id) of a process from the text of its /proc/PID/cgroup.

    The innermost ``.service`` or ``.scope`` of the first path that has one (cgroup v2 first)
    is the unit; the container id (12 hex digits) is what ``name_from_cgroup`` recognises as
    a docker, containerd, cri-o or podman container in one path component.
    ``0::/system.slice/docker-<id>.scope`` -> (``docker-<id>.scope``, ``<id12>``).
    """
    unit: str | None = None
    container: str | None = None
    for path in cgroup_paths(cgroup):
        for part in reversed([p for p in path.split("/") if p]):
            if unit is None and part.endswith(_UNIT_SUFFIXES):
                unit = part
            name = name_from_cgroup([part]) if container is None else None
            if name is not None and name.startswith("container:"):
                container = name.partition(":")[2]
        if unit is not None or container is not None:
            break
    return unit, container


def process_info(pid: int, proc_root: str = "/proc") -> ProcessInfo | None:
    """Name, command line (cut short), unit and container of ``pid``, or None if it is gone."""
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
    # One line: an argument may hold newlines (python -c "..."), and this text ends up in
    # a table row and in log lines.
    cmdline = " ".join(cmdline.split()) if not cmdline.isprintable() else cmdline
    if len(cmdline) > CMDLINE_MAX:
        cmdline = cmdline[: CMDLINE_MAX - 3] + "..."
    try:
        unit, container = unit_and_container(
            _read(os.path.join(base, "cgroup")).decode(errors="replace")
        )
    except OSError:
        unit = container = None
    uid, user, started = _identity(pid, base, proc_root)
    return ProcessInfo(pid=pid, name=name, cmdline=cmdline, unit=unit, container=container,
                       uid=uid, user=user, started_at=started)  # fmt: skip


def _identity(pid: int, base: str, proc_root: str) -> tuple[int | None, str | None, float | None]:
    """(real uid, user name, start time) of a process; None for what cannot be read."""
    try:
        uid = identity.real_uid(_read(os.path.join(base, "status")))
    except OSError:
        uid = None
    try:
        started = identity.start_time(_read(os.path.join(base, "stat")), proc_root)
    except OSError:
        started = None
    user = None if uid is None else identity.user_name(pid, uid, proc_root)
    return uid, user, started


@dataclass(frozen=True, slots=True)
class OwnerScan:
    """Owners found, and whether every process was looked at (False: out of time, or /proc
    could not be listed: ``error``)."""

    found: dict[int, ProcessInfo] = field(default_factory=dict)
    complete: bool = True
    denied: int = 0  # processes whose fd table we were not allowed to read
    error: str | None = None  # why /proc itself could not be listed
    fds: dict[int, int] = field(default_factory=dict)  # inode -> its fd number in the owner
    hidden: bool = False  # /proc hides other users' processes (hidepid=2): not all were seen


class OwnerCache:
    """What one scan learnt, for the next audit: socket inode -> (pid, fd, owner), and the
    pid the last scan stopped at.

    Socket inodes live as long as their sockets, so a daemon re-checks a remembered owner
    with one readlink instead of a scan, and a scan cut short by its deadline resumes where
    it stopped: on a busy host the owners of the flagged sockets are all known after a few
    audits. Only owners of the sockets asked for last time are kept.
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[int, str, ProcessInfo]] = {}
        self.resume_after = 0  # pid

    def __len__(self) -> int:
        return len(self.entries)


def _recheck(
    wanted: dict[str, int], cache: OwnerCache, proc_root: str
) -> dict[int, tuple[int, str, ProcessInfo]]:
    """Remembered owners that still hold their socket; the process is read again (exec)."""
    kept: dict[int, tuple[int, str, ProcessInfo]] = {}
    infos: dict[int, ProcessInfo | None] = {}
    for inode, (pid, fd, _old) in cache.entries.items():
        if f"socket:[{inode}]" not in wanted:
            continue
        try:
            if os.readlink(os.path.join(proc_root, str(pid), "fd", fd)) != f"socket:[{inode}]":
                continue
        except OSError:
            continue
        if pid not in infos:
            infos[pid] = process_info(pid, proc_root)
        info = infos[pid]
        if info is not None:
            kept[inode] = (pid, fd, info)
    return kept


def recheck_owners(
    inodes: Collection[int], cache: OwnerCache, proc_root: str = "/proc"
) -> OwnerScan:
    """The remembered owners of ``inodes`` that still hold them (one readlink each)."""
    hits = _recheck({f"socket:[{inode}]": inode for inode in inodes if inode}, cache, proc_root)
    return OwnerScan(
        {inode: e[2] for inode, e in hits.items()},
        fds={inode: int(e[1]) for inode, e in hits.items()},
    )


def remember(cache: OwnerCache, scan: OwnerScan) -> None:
    """Keeps the owners of ``scan`` (the sockets asked for this time) for the next audit."""
    cache.entries = {
        inode: (info.pid, str(scan.fds[inode]), info)
        for inode, info in scan.found.items()
        if inode in scan.fds
    }


def find_owners(
    inodes: Collection[int],
    proc_root: str = "/proc",
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    cache: OwnerCache | None = None,
    prescan: FdPrescan | None = None,
) -> OwnerScan:
    """Owner of each socket inode that some process holds open; others are left out.

    ``deadline`` (a ``clock`` time) bounds the scan: on a host with hundreds of thousands of
    open fds, a full scan would cost more than the audit it serves. With a ``cache``, known
    owners are re-checked first and the scan resumes after the pid where the last one stopped.
    With a ``prescan``, the owners not in the cache come from the child that has been scanning
    since the audit started (``auditd.kernel.owners.prescan``); if it failed, from the scan here.
    """
    wanted = {f"socket:[{inode}]": inode for inode in inodes if inode}
    hits_by_inode = _recheck(wanted, cache, proc_root) if cache is not None else {}
    found: dict[int, ProcessInfo] = {inode: e[2] for inode, e in hits_by_inode.items()}
    search = _Search(wanted, found, hits_by_inode, proc_root, deadline, clock, cache)
    complete = _ask(prescan, search) if prescan is not None else None
    if complete is None:
        complete = _scan(search)
    if cache is not None:
        cache.entries = hits_by_inode
    fds = {inode: int(entry[1]) for inode, entry in hits_by_inode.items()}
    access = search.access
    return OwnerScan(found, complete, access.denied, access.error, fds)


@dataclass(slots=True)
class _Access:
    """What a scan was refused: fd tables of other users, or /proc itself."""

    denied: int = 0
    error: str | None = None


@dataclass(slots=True)
class _Search:
    """One lookup of owners: what is wanted, what was found, and the scan's bounds."""

    wanted: dict[str, int]  # "socket:[inode]" -> inode
    found: dict[int, ProcessInfo]
    entries: dict[int, tuple[int, str, ProcessInfo]]  # inode -> (pid, fd, owner), for the cache
    proc_root: str
    deadline: float | None
    clock: Callable[[], float]
    cache: OwnerCache | None
    access: _Access = field(default_factory=_Access)

    def out_of_time(self) -> bool:
        return self.deadline is not None and self.clock() > self.deadline

    def record(self, inode: int, pid: int, fd: str, info: ProcessInfo) -> None:
        self.found[inode] = info
        self.entries[inode] = (pid, fd, info)


def _ask(prescan: FdPrescan, search: _Search) -> bool | None:
    """The owners not found yet, from the child scan, with this process scanning from the
    highest pid down until it meets the child's lap; None if the child failed (the owners
    found here are kept, for the in-process scan to go on with the rest). Out of time, the
    ``cache`` is told to resume where the child's lap was: the part neither scan read."""
    wanted, found, proc_root, access = search.wanted, search.found, search.proc_root, search.access
    missing = {inode for inode in wanted.values() if inode not in found}
    if not missing:
        return True
    session = prescan.begin(missing, search.deadline, search.clock)
    if session is None:
        return None
    hits: list[tuple[int, int, str]] = []  # (inode, pid, fd) read here
    left = set(missing)
    try:
        pids = _pids(proc_root, 0, access) or []
        for pid in reversed(pids):
            if not session.poll() or pid < session.position:
                break  # the reply is over, or the child's lap has read the rest
            left.difference_update(session.fds)
            if not left:  # the two scans found everything between them
                session.stop()
                break
            if search.out_of_time():
                break  # the child stops at the same time
            if pid == session.position:  # the child is in it: read it from the top down
                for inode, fd in _look_down(pid, search, session):
                    hits.append((inode, pid, fd))
                break
            own, whole = _look(pid, search)
            for inode, fd in own:
                hits.append((inode, pid, fd))
                left.discard(inode)
            if not left:
                session.stop()
                break
            if not whole:
                break  # out of time inside it: not a process the child may count as read
            session.covered(pid)
        answer = session.finish()
    finally:
        session.fail()  # no-op once the reply is complete
    cache = search.cache
    if cache is not None and (answer is None or not answer.complete) and session.position > 0:
        cache.resume_after = session.position - 1
    infos: dict[int, ProcessInfo | None] = {}
    child = answer.fds.items() if answer is not None else ()
    for inode, pid, fd in [*hits, *((i, p, str(f)) for i, (p, f) in child)]:
        if inode not in missing or inode in found:
            continue
        if pid not in infos:
            infos[pid] = process_info(pid, proc_root)
        info = infos[pid]
        if info is not None:
            search.record(inode, pid, fd, info)
    if answer is None:
        return None
    access.denied += answer.denied
    access.error = access.error or answer.error
    return answer.complete


def _pids(proc_root: str, resume_after: int, access: _Access) -> list[int] | None:
    try:
        pids = sorted(int(e) for e in os.listdir(proc_root) if e.isdigit())
    except OSError as exc:
        access.error = f"cannot list {proc_root}: {exc.strerror or exc}"
        return None
    # Start after the pid where the last scan stopped, then wrap around.
    cut = next((i for i, pid in enumerate(pids) if pid > resume_after), len(pids))
    return pids[cut:] + pids[:cut]


LOOK_CHUNK = 1024  # fds read between two looks at the clock


def _look(pid: int, search: _Search) -> tuple[list[tuple[int, str]], bool]:
    """(inode, fd) of the wanted sockets not found yet that ``pid`` holds, and False if the
    ``deadline`` came before the end of its fd table (20k sockets take 0.1 s to read)."""
    wanted, found, access = search.wanted, search.found, search.access
    proc_root, deadline, clock = search.proc_root, search.deadline, search.clock
    try:  # readlink relative to the open fd directory: no path building, no path walk
        dir_fd = os.open(os.path.join(proc_root, str(pid), "fd"), os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:  # another user's, without CAP_DAC_READ_SEARCH
        access.denied += 1
        return [], True
    except OSError:  # gone
        return [], True
    hits: list[tuple[int, str]] = []
    try:
        for n, (fd, target) in enumerate(links(dir_fd), 1):
            inode = wanted.get(target)
            if inode is not None and inode not in found:
                hits.append((inode, fd))
            if n % LOOK_CHUNK == 0 and deadline is not None and clock() > deadline:
                return hits, False
    except PermissionError:  # listable but not ours: no CAP_SYS_PTRACE
        access.denied += 1
    except OSError:  # gone while being read
        pass
    finally:
        os.close(dir_fd)
    return hits, True


DOWN_CHUNK = 1024  # fds read from the top between two looks at where the child is


def _look_down(pid: int, search: _Search, session: Session) -> list[tuple[int, str]]:
    """``_look`` from the highest fd down, in the process the child's lap is reading, until
    the two meet: a process holding 20k sockets would otherwise be the child's alone."""
    wanted, found, access, proc_root = search.wanted, search.found, search.access, search.proc_root
    try:
        dir_fd = os.open(os.path.join(proc_root, str(pid), "fd"), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # gone, or refused: the child's answer says so
        return []
    hits: list[tuple[int, str]] = []
    try:
        names = sorted(os.listdir(dir_fd), key=int, reverse=True)
        for start in range(0, len(names), DOWN_CHUNK):
            chunk = names[start : start + DOWN_CHUNK]
            if not session.poll() or session.position != pid:
                break  # the reply is over, or the child has finished this process
            if session.position_fd > int(chunk[0]):
                break  # the child has read these
            for fd in chunk:
                try:
                    target = os.readlink(fd, dir_fd=dir_fd)
                except FileNotFoundError:  # closed meanwhile
                    continue
                inode = wanted.get(target)
                if inode is not None and inode not in found:
                    hits.append((inode, fd))
            session.covered(pid, int(chunk[-1]))
    except PermissionError:
        access.denied += 1
    except (OSError, ValueError):  # gone while being read
        pass
    finally:
        os.close(dir_fd)
    return hits


def _scan(search: _Search) -> bool:
    """Look through /proc/*/fd for the owners not found yet; True if it saw every process."""
    wanted, found, cache, proc_root = search.wanted, search.found, search.cache, search.proc_root
    if len(found) >= len(wanted):
        return True
    pids = _pids(proc_root, cache.resume_after if cache is not None else 0, search.access)
    if pids is None:
        return False
    for pid in pids:
        if search.out_of_time():
            return False
        if cache is not None:
            cache.resume_after = pid
        hits, whole = _look(pid, search)
        if hits:
            info = process_info(pid, proc_root)
            if info is not None:
                for inode, fd in hits:
                    search.record(inode, pid, fd, info)
            if len(found) >= len(wanted):
                return True
        if not whole:  # out of time inside it: next time, this process again
            if cache is not None:
                cache.resume_after = pid - 1
            return False
    if cache is not None:
        cache.resume_after = 0  # a full lap: next time, start from the beginning
    return True
