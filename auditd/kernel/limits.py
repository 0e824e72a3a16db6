"""What a namespace's audit could not read, short of failing: the agent's capabilities, and a
KernelSource wrapper that notes each partial read.

An audit answers with what it can: sysctls or counters that cannot be read are left out, a
dump cut short still counts the sockets it got, an owner that cannot be looked up is null.
``ObservedSource`` passes every read through unchanged and records, per error stage, what
was missing and why, so the daemon can count and log it and the CLI can say it once.

Which capability each feature needs (see README "Privileges"): reading other users'
``/proc/PID/fd`` needs CAP_DAC_READ_SEARCH (list the 0500 directory) and CAP_SYS_PTRACE
(readlink its entries, ptrace_may_access in fs/proc/fd.c); entering another network namespace
needs CAP_SYS_ADMIN (setns, kernel/nsproxy.c).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Collection, Iterator, Sequence
from itertools import chain

from auditd.kernel.owners.scan import OwnerScan
from auditd.kernel.sockdiag import DumpStats
from auditd.kernel.sources import Enter, KernelSource
from auditd.model import Counters, Sock, Stage, Sysctls

# Bit numbers from include/uapi/linux/capability.h.
CAPABILITIES = {"CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21}
ATTRIBUTION_CAPS = ("CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE")


def effective_capabilities(proc_root: str = "/proc") -> int | None:
    """The CapEff mask of this process, or None if /proc/self/status cannot be read."""
    try:
        with open(os.path.join(proc_root, "self", "status"), encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def missing_capabilities(names: Sequence[str], proc_root: str = "/proc") -> list[str] | None:
    """Which of ``names`` this process lacks; None if that cannot be told."""
    mask = effective_capabilities(proc_root)
    if mask is None:
        return None
    return [name for name in names if not mask >> CAPABILITIES[name] & 1]


# hidepid values that make other users' /proc/PID vanish (fs/proc/root.c: "invisible" and
# "ptraceable"; the numbers are the old spelling). hidepid=1 ("noaccess") leaves them listed
# and unreadable: that shows as ``OwnerScan.denied``.
_HIDING = ("2", "invisible", "4", "ptraceable")
HIDDEN = "process attribution limited: /proc is mounted"


def proc_mount_options(proc_root: str = "/proc") -> dict[str, str]:
    """The super options of the procfs mounted at ``proc_root`` (the topmost), or {}."""
    options: dict[str, str] = {}
    target = os.path.abspath(proc_root)
    try:
        with open(os.path.join(proc_root, "self", "mountinfo"), encoding="utf-8") as f:
            for line in f:
                fields, _, rest = line.partition(" - ")
                parts, extra = fields.split(), rest.split()
                if len(parts) >= 5 and len(extra) >= 3 and (parts[4], extra[0]) == (target, "proc"):
                    options = dict(o.partition("=")[::2] for o in extra[2].split(","))
    except (OSError, UnicodeDecodeError):
        return {}
    return options


def hidden_processes(proc_root: str = "/proc") -> str | None:
    """The mount option hiding other users' processes from this one (``hidepid=2``), or None.

    They are hidden unless this process is in the mount's ``gid=`` group or may ptrace them
    (CAP_SYS_PTRACE; fs/proc/base.c, ``has_pid_permissions``)."""
    options = proc_mount_options(proc_root)
    hide = options.get("hidepid")
    if hide not in _HIDING:
        return None
    gid = options.get("gid", "")
    if gid.isdigit() and int(gid) in (os.getegid(), *os.getgroups()):
        return None
    if missing_capabilities(("CAP_SYS_PTRACE",), proc_root) == []:
        return None
    return f"hidepid={hide}"


def attribution_problem(scan: OwnerScan, wanted: int) -> str | None:
    """Why owners are missing from ``scan`` when the agent can do something about it, or None.

    Owners go missing for good reasons too (the socket closed during the scan, an orphan), so
    a refusal counts only when a capability is missing: with both, what is still refused (a
    process of another user namespace, an LSM's say) is beyond the agent's reach. The
    message is the same from one audit to the next (no counts), so the daemon logs it once.
    """
    if scan.error is not None:
        return f"process attribution failed: {scan.error}"
    if len(scan.found) >= wanted:
        return None
    hidden = hidden_processes()
    if hidden is not None:
        return f"{HIDDEN} {hidden}, other users' processes are hidden (missing CAP_SYS_PTRACE)"
    if not scan.denied:
        return None
    missing = missing_capabilities(ATTRIBUTION_CAPS)
    if missing == []:
        return None
    why = f"missing {' and '.join(missing)}" if missing else "capabilities unknown"
    return f"process attribution limited: cannot read other users' /proc/PID/fd ({why})"


class Problems:
    """First message per error stage, collected over one audit (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_stage: dict[str, str] = {}

    def add(self, stage: str, message: str) -> None:
        with self._lock:
            self.by_stage.setdefault(stage, message)


class ObservedSource:
    """A KernelSource that notes partial reads of ``inner`` in ``problems``."""

    def __init__(self, name: str, inner: KernelSource, problems: Problems) -> None:
        self.name = name
        self.inner = inner
        self.problems = problems

    def netns_inode(self) -> int | None:
        return self.inner.netns_inode()

    def sysctls(self) -> Sysctls:
        values = self.inner.sysctls()
        if not values.values:
            self.problems.add(
                Stage.SYSCTLS, f"netns {self.name}: no TCP sysctl readable under /proc/sys/net"
            )
        return values

    def counters(self) -> Counters:
        counters = self.inner.counters()
        if all(getattr(counters, f) is None for f in Counters.__dataclass_fields__):
            self.problems.add(
                Stage.COUNTERS, f"netns {self.name}: no TCP counter readable in /proc/net/netstat"
            )
        return counters

    def sockets(self, stats: DumpStats) -> Iterator[Sock]:
        # chain, not a generator resumed per socket: 200k of them in a busy namespace.
        return chain(self.inner.sockets(stats), self._after_dump(stats))

    def _after_dump(self, stats: DumpStats) -> Iterator[Sock]:
        """Runs once the dump is read (a generator of nothing, for ``chain``)."""
        yield from ()
        if stats.truncated:
            self.problems.add(
                Stage.DUMP, f"netns {self.name}: sock_diag dump cut short; audited what came"
            )

    def enter(self) -> Enter | None:
        return self.inner.enter()

    def describe(self) -> str:
        return self.inner.describe()

    def owners(self, inodes: Collection[int], deadline: float | None = None) -> OwnerScan:
        scan = self.inner.owners(inodes, deadline)
        problem = attribution_problem(scan, len(set(inodes)))
        if problem is not None:
            self.problems.add(Stage.ATTRIBUTION, problem)
            if problem.startswith(HIDDEN):  # the scan could not see every process
                scan = dataclasses.replace(scan, complete=False, hidden=True)
        return scan


def observe(
    sources: Sequence[tuple[str, KernelSource]], problems: Problems
) -> list[tuple[str, KernelSource]]:
    return [(name, ObservedSource(name, source, problems)) for name, source in sources]


def netns_note(skipped: Sequence[tuple[str, str]]) -> str | None:
    """One line for namespaces skipped for want of CAP_SYS_ADMIN (setns), or None."""
    refused = [name for name, reason in skipped if os.strerror(1) in reason]  # EPERM
    if not refused:
        return None
    missing = missing_capabilities(("CAP_SYS_ADMIN",))
    why = "missing CAP_SYS_ADMIN" if missing else "refused (another user namespace?)"
    return f"{len(refused)} network namespaces skipped: entering them needs CAP_SYS_ADMIN ({why})"
