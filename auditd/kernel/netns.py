"""Every network namespace of the host: find them, name them for people, enter one.

Namespaces are found where shared/KERNEL.md says: ``/proc/*/ns/net`` (one per process) and
the ``ip netns`` bind mounts in ``/run/netns``, deduplicated by (st_dev, st_ino) of the nsfs
inode. Naming is pure (``name_from_cgroup``, ``unique_names``); finding and entering are I/O.

setns(CLONE_NEWNET) moves only the calling thread (kernel/nsproxy.c), so ``call_in_netns``
enters on a short-lived thread of its own and the rest of the process never leaves home.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from auditd.errors import KernelError, NamespaceGone

HOST = "host"  # the agent's own namespace (auditd.audit.run.HOST_NETNS)
CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class NamespaceRef:
    """One network namespace: its nsfs identity, a file to enter it by, and its name."""

    dev: int
    ino: int
    path: str  # /run/netns/NAME (stable) or /proc/PID/ns/net (valid while PID lives)
    name: str
    pid: int | None = None  # a process inside it, the first one seen
    host: bool = False


# --- pure: names from /proc/PID/cgroup -------------------------------------------------------

_HEX64 = r"[0-9a-f]{64}"
# A container's cgroup: bare id (docker and containerd cgroupfs: /docker/<id>, /kubepods/.../<id>)
# or a systemd scope (docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope,
# libpod-<id>.scope).
_CONTAINER = re.compile(rf"(?:[\w.-]*-)?({_HEX64})(?:\.scope)?")
# Kubernetes pod: "pod<uid>" (cgroupfs) or "kubepods-<qos>-pod<uid>.slice" (systemd driver,
# dashes of the uid turned into underscores); static pods have a 32-hex uid without dashes.
_POD = re.compile(
    r"(?:kubepods(?:-\w+)?-)?pod([0-9a-f]{8}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{4}[-_]?"
    r"[0-9a-f]{4}[-_]?[0-9a-f]{12})(?:\.slice)?"
)
_UNIT = re.compile(r"[\w@.:\\-]+\.(?:service|scope)")


def cgroup_paths(text: str) -> list[str]:
    """``ID:CONTROLLERS:PATH`` lines of /proc/PID/cgroup -> the paths, cgroup v2 (``0::``) first."""
    paths: list[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        if parts[0] == "0" and parts[1] == "":
            paths.insert(0, parts[2])
        elif parts[2] not in paths:
            paths.append(parts[2])
    return paths


def name_from_cgroup(paths: Iterable[str]) -> str | None:
    """``pod:<uid>``, ``container:<id12>`` or ``unit:<name>`` from cgroup paths, else None.

    A pod beats a container (every container of a pod shares the pod's netns), a container
    beats a unit (docker-<id>.scope is a unit too); within a path the innermost one wins.
    """
    split = [[part for part in path.split("/") if part] for path in paths]
    for parts in split:
        if any(part.startswith("kubepods") for part in parts):
            for part in reversed(parts):
                m = _POD.fullmatch(part)
                if m:
                    return "pod:" + m.group(1).replace("_", "-")
    for parts in split:
        for part in reversed(parts):
            m = _CONTAINER.fullmatch(part)
            if m:
                return "container:" + m.group(1)[:12]
    for parts in split:
        for part in reversed(parts):
            if _UNIT.fullmatch(part):
                return "unit:" + part
    return None


def unique_names(
    wanted: Sequence[tuple[str, int]], reserved: Collection[str] = (HOST,)
) -> list[str]:
    """Names for (wanted name, inode) pairs, ``#<inode>`` appended where a name is not unique.

    Every claimant of a shared name gets the suffix, not all but the first: which one comes
    first depends on process ids, and metric series must not swap between audits.
    """
    counts = Counter(name for name, _ in wanted)
    return [
        f"{name}#{ino}" if counts[name] > 1 or name in reserved else name for name, ino in wanted
    ]


# --- I/O: finding them -----------------------------------------------------------------------


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(65536)
    except OSError:
        return ""


def _ip_netns(run_netns: str, nsfs_dev: int) -> dict[tuple[int, int], tuple[str, str]]:
    """(dev, ino) -> (name, path) of the ``ip netns`` bind mounts; the first name sorted wins."""
    found: dict[tuple[int, int], tuple[str, str]] = {}
    try:
        names = sorted(os.listdir(run_netns))
    except OSError:
        return found
    for name in names:
        path = os.path.join(run_netns, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        # `ip netns add` makes an empty file, then bind-mounts the namespace on it: a file
        # whose mount is gone is on tmpfs, not on nsfs (one superblock for all namespaces).
        if st.st_dev == nsfs_dev:
            found.setdefault((st.st_dev, st.st_ino), (name, path))
    return found


def _processes(proc_root: str) -> dict[tuple[int, int], int]:
    """(dev, ino) -> the lowest pid inside; processes we may not look at are skipped."""
    found: dict[tuple[int, int], int] = {}
    try:
        pids = sorted(int(e) for e in os.listdir(proc_root) if e.isdigit())
    except OSError as exc:
        raise KernelError(f"cannot list {proc_root}: {exc.strerror}", exc.errno) from exc
    for pid in pids:
        try:  # stat follows the magic link: needs ptrace read access to other users' processes
            st = os.stat(os.path.join(proc_root, str(pid), "ns", "net"))
        except OSError:
            continue
        found.setdefault((st.st_dev, st.st_ino), pid)
    return found


def enumerate_namespaces(
    proc_root: str = "/proc", run_netns: str = "/run/netns"
) -> list[NamespaceRef]:
    """The host (this process's namespace) first, then ``ip netns`` ones, then the others.

    Raises KernelError if this process's own namespace cannot be looked at (no /proc).
    """
    self_path = os.path.join(proc_root, "self", "ns", "net")
    try:
        st = os.stat(self_path)
    except OSError as exc:
        raise KernelError(f"cannot stat {self_path}: {exc.strerror}", exc.errno) from exc
    host = (st.st_dev, st.st_ino)
    named = _ip_netns(run_netns, st.st_dev)
    pids = _processes(proc_root)
    # (key, wanted name, path to enter by): `ip netns` names, then one cgroup read per namespace.
    others = [(key, name, path) for key, (name, path) in named.items() if key != host]
    for key, pid in pids.items():
        if key != host and key not in named:
            cgroups = cgroup_paths(_read_text(os.path.join(proc_root, str(pid), "cgroup")))
            name = name_from_cgroup(cgroups) or f"netns:{key[1]}"
            others.append((key, name, os.path.join(proc_root, str(pid), "ns", "net")))
    names = unique_names([(name, key[1]) for key, name, _ in others])
    refs = [NamespaceRef(host[0], host[1], self_path, HOST, pids.get(host), host=True)]
    for (key, _, path), name in zip(others, names):
        refs.append(NamespaceRef(key[0], key[1], path, name, pids.get(key)))
    return refs


# --- I/O: entering one -----------------------------------------------------------------------


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter(path: str, expect: tuple[int, int] | None = None) -> None:
    """Moves the calling thread into the netns at ``path``; raises NamespaceGone if it is
    gone, refused (EPERM without CAP_SYS_ADMIN), or no longer the (dev, ino) ``expect``ed
    (/proc/PID/ns/net of a pid that exited and was reused)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NamespaceGone(f"cannot open {path}: {exc.strerror}", exc.errno) from exc
    try:
        st = os.fstat(fd)
        if expect is not None and (st.st_dev, st.st_ino) != expect:
            raise NamespaceGone(f"{path} is another namespace now: its process exited")
        try:
            _setns(fd)
        except OSError as exc:
            raise NamespaceGone(f"cannot enter {path}: {exc.strerror}", exc.errno) from exc
    finally:
        os.close(fd)


def call_in_netns(path: str, fn: Callable[[], T], expect: tuple[int, int] | None = None) -> T:
    """``fn()`` on a new thread that entered the netns at ``path`` first; its result or its
    exception comes back here. The thread ends with the call, and the namespace with it:
    what ``fn`` returns (a socket) keeps the namespace it was created in."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            enter(path, expect)
            results.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"netns {path}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]
