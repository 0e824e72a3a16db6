"""One audit session: how the CLI's one audit and the agent's audits are put together.

A session knows which network namespaces to read (``namespaces``: a function from the
session's owner lookups to (name, KernelSource) pairs), how (``AuditOptions``), and what
carries from one audit to the next: each namespace's owner cache, and whether the first
audit (the one with cold caches, which scans ``/proc`` in a child process while it dumps)
is done. ``audit`` runs one audit and says what it could only partly read; ``namespace_sysctls``
reads just the sysctls (for ``explain``). New kernel sources plug in here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from auditd.audit.run import audit
from auditd.config import RuleSet
from auditd.errors import NamespaceGone
from auditd.kernel.bpf.exact import BpfAudit, BpfKernelAudit, ExactInspector
from auditd.kernel.bpf.iterators import Iterators
from auditd.kernel.inspect import SocketInspector
from auditd.kernel.limits import Problems, netns_note, observe
from auditd.kernel.netns import enumerate_namespaces
from auditd.kernel.owners.attribution import Attribution
from auditd.kernel.owners.prescan import FdPrescan
from auditd.kernel.owners.scan import OwnerCache
from auditd.kernel.sources import KernelSource, LocalKernel, NamespaceKernel
from auditd.model import Sysctls
from auditd.results import (
    DEFAULT_MAX_FINDINGS,
    HOST_NETNS,
    AuditResult,
    attribution_note,
    bpf_note,
    inspection_error,
    kernel_pass_note,
)

# The namespaces to audit: (name, source) pairs, each source given its owner lookups.
Namespaces = Callable[[Attribution], list[tuple[str, KernelSource]]]


def local_sources(owners: Attribution) -> list[tuple[str, KernelSource]]:
    """The namespace the agent runs in (``--netns self``)."""
    return [(HOST_NETNS, LocalKernel(owners=owners.finder(HOST_NETNS)))]


def all_sources(owners: Attribution) -> list[tuple[str, KernelSource]]:
    """Every network namespace of the host (``--netns all``), named for people: the agent's
    own through LocalKernel, each other one entered from a thread of its own."""
    out: list[tuple[str, KernelSource]] = []
    for ref in enumerate_namespaces():
        finder = owners.finder(ref.name)
        out.append((ref.name, LocalKernel(owners=finder) if ref.host else NamespaceKernel(
            ref, owners=finder
        )))  # fmt: skip
    return out


NETNS_SOURCES: dict[str, Namespaces] = {"self": local_sources, "all": all_sources}


@dataclass(frozen=True, slots=True)
class AuditOptions:
    inspect_sockets: bool = False  # read each socket's exact keepalive options
    max_findings: int = DEFAULT_MAX_FINDINGS  # socket findings described (0: all)
    # Seconds the owner scans of an audit may take, for a one-shot audit with no next cycle
    # to resume in (run.ONE_SHOT_ATTRIBUTION_CAP_SECONDS); None: a share of the dump's time.
    attribution_cap: float | None = None
    # Count and pre-filter in the kernel (the BPF audit pass) when the iterators load; False:
    # always the sock_diag dump (for comparisons).
    kernel_pass: bool = True


@dataclass(frozen=True, slots=True)
class AuditRun:
    """One audit's result, and what it could only partly read: stage -> first message;
    ``bpf``: why the BPF iterators were not used (None: they were)."""

    result: AuditResult
    problems: dict[str, str]
    bpf: str | None = None
    inspect_sockets: bool = False

    def notes(self) -> list[str]:
        """What a person should be told once each: partial reads, namespaces refused, and
        why socket inspection was off (the same for every namespace)."""
        notes = [*self.problems.values()]
        namespaces = self.result.namespaces
        exact = bpf_note(namespaces) if self.inspect_sockets else None
        for note in (netns_note(self.result.skipped_namespaces), inspection_error(namespaces),
                     attribution_note(namespaces), exact,
                     kernel_pass_note(namespaces)):  # fmt: skip
            if note is not None:
                notes.append(note)
        return notes


@dataclass(frozen=True, slots=True)
class NamespaceSysctls:
    """A namespace's sysctls (``explain``), or why it could not be read."""

    netns: str
    inode: int | None
    sysctls: Sysctls | None
    error: str | None = None


class AuditSession:
    """Audits of the same namespaces with the same options, one after the other."""

    def __init__(
        self,
        namespaces: Namespaces = local_sources,
        options: AuditOptions | None = None,
        *,
        start_prescan: Callable[[], FdPrescan | None] | None = None,
        clock: Callable[[], float] = time.time,
        iterators: Iterators | None = None,
    ) -> None:
        self.namespaces = namespaces
        self.options = options or AuditOptions()
        self.start_prescan = start_prescan or (lambda: FdPrescan.start())
        self.clock = clock
        # The BPF iterators, loaded at the first audit and kept (retried until they load).
        self.iterators = iterators if iterators is not None else Iterators()
        self.owner_caches: dict[str, OwnerCache] = {}
        # The first audit, with cold owner caches, scans /proc in a child process while it
        # dumps; the next ones re-check the owners they know and go on in-process from where
        # that scan stopped, if it ran out of time.
        self.owners_cold = True

    def audit(self, rules: RuleSet, prescan: FdPrescan | None = None) -> AuditRun:
        """One audit. Owners (and, in exact mode, every socket's options) come from the BPF
        iterators when they load; else from the /proc scan, which the first audit runs in a
        child process while it dumps (``prescan``: one started already, by the console
        script). Raises what ``run.audit`` raises."""
        bpf = BpfAudit(self.iterators)
        if bpf.loaded and prescan is not None:
            prescan.close()  # the owner iterator does the child's work in one pass
            prescan = None
        elif not bpf.loaded and prescan is None and self.owners_cold:
            prescan = self.start_prescan()
        problems = Problems()
        owners = Attribution(self.owner_caches, prescan, bpf)
        exact = self.options.inspect_sockets
        try:
            sources = observe(self.namespaces(owners), problems)
            inspector = ExactInspector(bpf, SocketInspector()) if exact else None
            kernel = (
                BpfKernelAudit(self.iterators) if bpf.loaded and self.options.kernel_pass else None
            )
            result = audit(
                rules,
                sources,
                clock=self.clock,
                inspector=inspector,
                max_findings=self.options.max_findings,
                attribution_cap=self.options.attribution_cap,
                kernel=kernel,
            )
        finally:
            if prescan is not None:
                prescan.close()
            self.owner_caches = owners.caches  # namespaces gone take their caches along
        self.owners_cold = False
        return AuditRun(result, dict(problems.by_stage), bpf.note, exact)

    def namespace_sysctls(self) -> list[NamespaceSysctls]:
        """Each namespace's sysctls, read without a socket dump."""
        out = []
        for name, source in self.namespaces(Attribution()):
            try:
                out.append(NamespaceSysctls(name, source.netns_inode(), source.sysctls()))
            except NamespaceGone as exc:
                out.append(NamespaceSysctls(name, None, None, str(exc)))
        return out
