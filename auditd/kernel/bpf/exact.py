"""Exact mode through the iterators: every socket's options, and every socket's owner.

``BpfAudit`` is one audit's use of a process's ``Iterators``: it tries to load them once per
audit (so an agent recovers when the cause of a failure goes away) and says why not in
``note``. Its ``inspector`` reads one pass of a namespace's socket iterator and answers the
audit's questions from it, with the ``pidfd_getfd`` inspector as the fallback when BPF cannot
load or a namespace cannot be read; its ``owners`` answer from one pass of the owner iterator
for every namespace of the audit (socket inodes are global), None meaning "use /proc".
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Collection, Sequence

from auditd.errors import BpfUnavailable
from auditd.kernel import KernelSource, LocalKernel
from auditd.kernel.bpf.iterators import Iterators
from auditd.kernel.bpf.records import OwnerTable, RecordError, SocketTable
from auditd.kernel.inspect import Inspector, InspectScan, SocketInspector, Target
from auditd.kernel.limits import ObservedSource
from auditd.kernel.procs import OwnerScan, process_info
from auditd.model import ProcessInfo, SocketOptions, Sysctls

BPF, PIDFD = "bpf", "pidfd"
# Runs a function inside one namespace and returns what it returns (an iterator fd).
Enter = Callable[[Callable[[], int]], int]


class BpfAudit:
    """The iterators for one audit. ``iterators`` outlives it (loaded once per process)."""

    def __init__(self, iterators: Iterators) -> None:
        self.iterators = iterators
        self.note: str | None = None  # why BPF is not used in this audit
        try:
            iterators.ensure()
        except BpfUnavailable as exc:
            self.note = str(exc)
        self._owners: OwnerTable | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self.note is None

    def inspector(self, enter: Enter, sysctls: Sysctls, fallback: Inspector) -> Inspector:
        """The inspector for one namespace: its socket table, else ``fallback``."""
        if self.note is not None:
            return fallback
        try:
            table = SocketTable(self.iterators.sockets(enter), sysctls)
        except (BpfUnavailable, RecordError) as exc:
            self.note = f"BPF: {exc}" if isinstance(exc, RecordError) else str(exc)
            return fallback
        return TableInspector(table)

    def owners(self, inodes: Collection[int], proc_root: str = "/proc") -> OwnerScan | None:
        """Owners of ``inodes`` from one owner pass per audit; None if BPF is not usable."""
        with self._lock:
            if self.note is not None:
                return None
            if self._owners is None:
                try:
                    self._owners = OwnerTable(self.iterators.owners())
                except (BpfUnavailable, RecordError) as exc:
                    self.note = f"BPF: {exc}" if isinstance(exc, RecordError) else str(exc)
                    return None
            table = self._owners
        return owner_scan(table, inodes, proc_root)


def owner_scan(table: OwnerTable, inodes: Collection[int], proc_root: str) -> OwnerScan:
    """The owners ``table`` knows, as the /proc scan reports them: name, command line, unit
    and container read once per process; a process gone since the pass keeps its comm."""
    found: dict[int, ProcessInfo] = {}
    fds: dict[int, int] = {}
    infos: dict[int, ProcessInfo] = {}
    for inode in inodes:
        rec = table.get(inode) if inode else None
        if rec is None:
            continue
        info = infos.get(rec.pid)
        if info is None:
            info = process_info(rec.pid, proc_root) or ProcessInfo(rec.pid, rec.comm)
            infos[rec.pid] = info
        found[inode] = info
        fds[inode] = rec.fd
    return OwnerScan(found, True, 0, None, fds)


class TableInspector:
    """Answers from one namespace's socket table: no owner, pidfd or ptrace needed."""

    method = BPF
    needs_owners = False
    note: str | None = None

    def __init__(self, table: SocketTable) -> None:
        self.table = table

    def for_namespace(self, source: KernelSource, sysctls: Sysctls) -> Inspector:
        return self

    def inspect(self, targets: Sequence[Target]) -> InspectScan:
        options: dict[int, SocketOptions] = {}
        skipped = 0
        for inode, _, _ in targets:
            got = self.table.options(inode)
            if got is None:
                skipped += 1  # opened after the pass, or closed before it
            else:
                options[inode] = got
        return InspectScan(options, skipped)


class _Fallback:
    """The pidfd inspector standing in for BPF in one namespace, with BPF's reason."""

    needs_owners = True

    def __init__(self, inner: SocketInspector, note: str | None) -> None:
        self.inner, self.note, self.method = inner, note, inner.method

    def for_namespace(self, source: KernelSource, sysctls: Sysctls) -> Inspector:
        return self

    def inspect(self, targets: Sequence[Target]) -> InspectScan:
        return self.inner.inspect(targets)


class ExactInspector:
    """``--inspect-sockets``: each namespace's socket iterator when BPF loads, else
    ``pidfd_getfd`` (``fallback``) with BPF's reason as the namespace's ``note``."""

    needs_owners = True

    def __init__(self, bpf: BpfAudit, fallback: SocketInspector) -> None:
        self.bpf, self.fallback = bpf, fallback
        self.method = BPF if bpf.loaded else fallback.method

    @property
    def note(self) -> str | None:
        return self.bpf.note

    def for_namespace(self, source: KernelSource, sysctls: Sysctls) -> Inspector:
        while isinstance(source, ObservedSource):
            source = source.inner
        if isinstance(source, LocalKernel):
            inspector = self.bpf.inspector(source.inside, sysctls, self.fallback)
            if inspector is not self.fallback:
                return inspector
            return _Fallback(self.fallback, self.bpf.note)
        return _Fallback(self.fallback, f"BPF: cannot enter a {type(source).__name__}")

    def inspect(self, targets: Sequence[Target]) -> InspectScan:
        return self.fallback.inspect(targets)


@functools.cache
def process_iterators() -> Iterators:
    """The iterators of this process, loaded at most once (on first use) and kept."""
    return Iterators()
