"""What an audit found, as plain data: per namespace, and for the whole audit.

Produced by ``auditd.audit.run``, read by ``auditd.report`` (JSON, table, explain) and
``auditd.exporter`` (metrics), which need nothing else of the audit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from auditd.model import Counters, Finding, Severity, Sysctls

HOST_NETNS = "host"  # the name of the auditing process's own network namespace
# Socket findings described per audit (the worst first); all of them are counted.
DEFAULT_MAX_FINDINGS = 1000


@dataclass(frozen=True, slots=True)
class Inspection:
    """Socket inspection in one namespace: sockets whose options were wanted, read, and why
    inspection was off (no CAP_SYS_PTRACE, kernel before 5.6), said once per audit."""

    wanted: int
    read: int
    error: str | None = None
    method: str = "pidfd"  # "bpf" (the socket iterator) or "pidfd" (pidfd_getfd + getsockopt)
    note: str | None = None  # why not "bpf": the iterator could not load or run


def inspection_error(namespaces: Iterable[NamespaceReport]) -> str | None:
    """Why socket inspection was off in this audit (the same for every namespace), or None."""
    for ns in namespaces:
        if ns.inspection is not None and ns.inspection.error:
            return ns.inspection.error
    return None


def attribution_note(namespaces: Iterable[NamespaceReport]) -> str | None:
    """One line when an owner scan was cut short by its time budget, or None: the findings
    without a process then also lack their application's hint (issue 11)."""
    # A scan short of processes /proc hides (hidepid), or of /proc itself, has a note of its
    # own (kernel/limits): it was not the time budget.
    short = [
        ns
        for ns in namespaces
        if not (ns.attribution_complete or ns.attribution_hidden or ns.attribution_failed)
    ]
    if not short:
        return None
    wanted = sum(ns.attribution_wanted for ns in short)
    found = sum(ns.attribution_found for ns in short)
    where = ", ".join(ns.netns for ns in short[:3]) + (" ..." if len(short) > 3 else "")
    return (
        f"owner scan cut short by its time budget ({where}): {wanted - found} of {wanted} "
        f"sockets described have no process, and a generic hint"
    )


# NamespaceReport.source_note when the rules, not a failure, kept the kernel's pass out.
NEEDS_EVERY_SOCKET = "a rule with a detection_budget of its own must see every ESTABLISHED socket"


def kernel_pass_note(namespaces: Iterable[NamespaceReport]) -> str | None:
    """Why the BPF audit pass failed to serve some namespace (the dump counted it), or None;
    not when the rules asked for the dump."""
    for ns in namespaces:
        if ns.source != "bpf" and ns.source_note and ns.source_note != NEEDS_EVERY_SOCKET:
            return f"sockets counted by sock_diag, not the BPF audit pass: {ns.source_note}"
    return None


def bpf_note(namespaces: Iterable[NamespaceReport]) -> str | None:
    """Why exact mode read some namespace's options by pidfd_getfd, not BPF, or None."""
    for ns in namespaces:
        if ns.inspection is not None and ns.inspection.note:
            return f"exact options by pidfd_getfd, not BPF: {ns.inspection.note}"
    return None


@dataclass(frozen=True, slots=True)
class NamespaceReport:
    netns: str
    inode: int | None
    sysctls: Sysctls
    counters: Counters
    detection_idle_seconds: float
    detection_in_flight_seconds: float
    connections: dict[tuple[str, str], int]  # (state label, keepalive) -> sockets
    sockets: int
    dump_messages: int = 0
    dump_skipped: int = 0
    dump_interrupted: bool = False
    # ESTABLISHED sockets by keepalive status: counts per IDLE_BUCKETS bucket (+Inf last),
    # and the sum of their idle seconds.
    idle_histogram: dict[str, list[int]] = field(default_factory=dict)
    idle_sum: dict[str, float] = field(default_factory=dict)
    attribution_wanted: int = 0  # flagged sockets whose owner was looked for
    attribution_found: int = 0
    attribution_complete: bool = True  # False: the time budget ran out, or processes hidden
    attribution_hidden: bool = False  # /proc hid other users' processes (hidepid=2)
    attribution_failed: bool = False  # /proc itself could not be listed
    differs_from_host: tuple[str, ...] = ()  # sysctls whose value is not the host's
    inspection: Inspection | None = None  # None: not asked for (--inspect-sockets)
    # Every finding of the namespace, described or not: (kind, severity, rule) -> count.
    finding_counts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    # What counted the sockets and found the candidates: "bpf" (the kernel's audit pass) or
    # "sock_diag" (the dump, decoded and counted here); why not "bpf" when it was tried.
    source: str = "sock_diag"
    source_note: str | None = None


@dataclass(frozen=True, slots=True)
class AuditResult:
    generated_at: float  # unix time the audit started
    duration_seconds: float
    namespaces: tuple[NamespaceReport, ...]
    findings: tuple[Finding, ...]
    # Namespaces that could not be read (gone, refused, or their kernel failed): (name, reason).
    skipped_namespaces: tuple[tuple[str, str], ...] = field(default=())
    # Socket findings counted but not described: beyond max_findings.
    findings_omitted: int = 0

    @property
    def findings_total(self) -> int:
        return sum(n for ns in self.namespaces for n in ns.finding_counts.values())

    def severity_counts(self) -> dict[Severity, int]:
        """Findings by severity, described or not."""
        out = dict.fromkeys(Severity, 0)
        for ns in self.namespaces:
            for (_, severity, _), n in ns.finding_counts.items():
                out[Severity.parse(severity)] += n
        return out


def _order(f: Finding) -> tuple[int, float, str, str]:
    return (-int(f.severity), -(f.idle_seconds or 0.0), f.kind, f.local or "")


def sort_findings(findings: list[Finding]) -> tuple[Finding, ...]:
    """Worst first: severity, then the longest idle."""
    return tuple(sorted(findings, key=_order))


def count_findings(
    findings: Iterable[Finding], into: dict[tuple[str, str, str], int] | None = None
) -> dict[tuple[str, str, str], int]:
    """(kind, severity, rule) -> findings, added to ``into`` if given."""
    counts = {} if into is None else into
    for f in findings:
        key = (f.kind, f.severity.label, f.rule)
        counts[key] = counts.get(key, 0) + 1
    return counts
