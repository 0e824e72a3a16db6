"""Exact mode through the iterators: every socket's options, and every socket's owner.

``BpfAudit`` is one audit's use of a process's ``Iterators``: it tries to load them once per
audit (so an agent recovers when the cause of a failure goes away) and says why not in
``note``. ``ExactInspector`` gives each namespace a ``TableInspector`` over one pass of its
socket iterator, with the ``pidfd_getfd`` inspector as the fallback when BPF cannot load or a
namespace's pass fails; ``BpfAudit.owners`` answers from one pass of the owner iterator for
every namespace of the audit (socket inodes are global), None meaning "use /proc". Passes run
on threads of their own (``Pass``), started before the dump they overlap.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence
from typing import Generic, TypeVar

from auditd.errors import AuditdError, BpfUnavailable
from auditd.kernel.bpf.iterators import Iterators
from auditd.kernel.bpf.records import (
    AuditOutput,
    OwnerTable,
    PassParams,
    RecordError,
    SocketTable,
    decode_audit,
)
from auditd.kernel.inspect import Inspector, InspectScan, SocketInspector, Target
from auditd.kernel.owners.scan import OwnerScan, process_info
from auditd.kernel.sources import Enter, KernelSource
from auditd.model import ProcessInfo, Sysctls

BPF, PIDFD = "bpf", "pidfd"
T = TypeVar("T")


class Pass(Generic[T]):
    """One iterator pass, read and decoded on a thread of its own while the audit dumps:
    the kernel's walk (most of a pass) runs on the other core, outside the GIL."""

    def __init__(self, read: Callable[[], T]) -> None:
        self._result: T | None = None
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(read,), name="bpf pass")
        self._thread.daemon = True
        self._thread.start()

    def _run(self, read: Callable[[], T]) -> None:
        try:
            self._result = read()
        except BpfUnavailable as exc:
            self._error = str(exc)
        except (AuditdError, RecordError, OSError) as exc:  # a namespace gone, a layout surprise
            self._error = f"BPF: {exc}"

    def get(self) -> T | None:
        """The pass's result, None if it failed (``error`` says why)."""
        self._thread.join()
        return self._result

    @property
    def error(self) -> str | None:
        self._thread.join()
        return self._error


class BpfAudit:
    """The iterators for one audit. ``iterators`` outlives it (loaded once per process).
    The owner pass starts with the first source that asks for it (``prefetch_owners``)."""

    def __init__(self, iterators: Iterators) -> None:
        self.iterators = iterators
        self._note: str | None = None  # why BPF is not used in this audit
        try:
            iterators.ensure()
        except BpfUnavailable as exc:
            self._note = str(exc)
        self._owners: Pass[OwnerTable] | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._note is None

    @property
    def note(self) -> str | None:
        """Why BPF is not used in this audit: the iterators did not load."""
        return self._note

    def socket_pass(self, enter: Enter, sysctls: Sysctls) -> Pass[SocketTable]:
        """Starts one namespace's socket pass (``enter`` runs the iterator's creation there)."""
        return Pass(lambda: SocketTable(self.iterators.sockets(enter), sysctls))

    def prefetch_owners(self) -> None:
        """Starts the audit's owner pass, once, if the iterators loaded."""
        with self._lock:
            if self._owners is None and self._note is None:
                iterators = self.iterators
                self._owners = Pass(lambda: OwnerTable(iterators.owners()))

    def owners(self, inodes: Collection[int], proc_root: str = "/proc") -> OwnerScan | None:
        """Owners of ``inodes`` from the audit's owner pass; None if BPF is not usable."""
        self.prefetch_owners()
        if self._owners is None:
            return None
        table = self._owners.get()  # None: the pass failed, the /proc scan takes over
        return None if table is None else owner_scan(table, inodes, proc_root)


def owner_scan(table: OwnerTable, inodes: Collection[int], proc_root: str) -> OwnerScan:
    """The owners ``table`` knows, as the /proc scan reports them: name, command line, unit
    and container read once per process; a process gone since the pass keeps its comm."""
    found: dict[int, ProcessInfo] = {}
    fds: dict[int, int] = {}
    infos: dict[int, ProcessInfo] = {}
    for inode, rec in table.select(inodes).items():
        info = infos.get(rec.pid)
        if info is None:
            info = process_info(rec.pid, proc_root) or ProcessInfo(rec.pid, rec.comm)
            infos[rec.pid] = info
        found[inode] = info
        fds[inode] = rec.fd
    return OwnerScan(found, True, 0, None, fds)


class TableInspector:
    """Answers from one namespace's socket pass: no owner, pidfd or ptrace needed. If the
    pass failed, ``fallback`` answers, and ``method``/``needs_owners``/``note`` say so; each
    waits for the pass (read while the audit dumps), which the audit asks after the dump."""

    def __init__(self, table: Pass[SocketTable], fallback: SocketInspector) -> None:
        self._pass, self.fallback = table, fallback

    def _table(self) -> SocketTable | None:
        return self._pass.get()

    @property
    def method(self) -> str:
        return BPF if self._table() is not None else self.fallback.method

    @property
    def needs_owners(self) -> bool:
        return self._table() is None

    @property
    def note(self) -> str | None:
        return None if self._table() is not None else self._pass.error

    def inspect(self, targets: Sequence[Target]) -> InspectScan:
        table = self._table()
        if table is None:
            return self.fallback.inspect(targets)
        options = table.select({inode for inode, _, _ in targets})
        skipped = len(targets) - len(options)  # opened after the pass, or closed before it
        return InspectScan(options, skipped)


class _Fallback:
    """The pidfd inspector standing in for BPF in one namespace, with BPF's reason."""

    needs_owners = True

    def __init__(self, inner: SocketInspector, note: str | None) -> None:
        self.inner, self.note, self.method = inner, note, inner.method

    def inspect(self, targets: Sequence[Target]) -> InspectScan:
        return self.inner.inspect(targets)


class ExactInspector:
    """``--inspect-sockets``: each namespace's socket iterator when BPF loads, else
    ``pidfd_getfd`` (``fallback``) with BPF's reason as the namespace's ``note``."""

    def __init__(self, bpf: BpfAudit, fallback: SocketInspector) -> None:
        self.bpf, self.fallback = bpf, fallback

    def for_namespace(self, source: KernelSource, sysctls: Sysctls) -> Inspector:
        enter = source.enter()
        if enter is None:  # no kernel namespace behind it (a fake, a recording)
            return _Fallback(self.fallback, f"BPF: cannot enter a {source.describe()}")
        if not self.bpf.loaded:
            return _Fallback(self.fallback, self.bpf.note)
        return TableInspector(self.bpf.socket_pass(enter, sysctls), self.fallback)


class BpfKernelAudit:
    """``KernelAudit`` by the BPF audit pass: one pass per namespace, created from inside
    it (``KernelSource.enter``) under parameters keyed by its inode."""

    def __init__(self, iterators: Iterators) -> None:
        self.iterators = iterators

    def audit_pass(self, source: KernelSource, params: PassParams) -> AuditOutput:
        enter, inode = source.enter(), source.netns_inode()
        if enter is None or inode is None:
            raise BpfUnavailable(f"BPF: cannot enter a {source.describe()}")
        data = self.iterators.audit_pass(
            inode, params.general.pack(), enter, params.port_entries(inode)
        )
        try:
            out = decode_audit(data)
        except RecordError as exc:
            raise BpfUnavailable(f"BPF: {exc}") from exc
        missed = out.aggregates.unconfigured
        if missed:  # another namespace's inode than the one the parameters were keyed by
            raise BpfUnavailable(f"BPF: the audit pass found no parameters for {missed} sockets")
        return out
