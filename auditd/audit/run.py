"""One audit of one network namespace: stream the dump, count, flag, attribute, evaluate.

Memory stays bounded by what the report needs: every socket is counted on the fly, the ones
``could_flag`` keeps are judged as they stream by, every finding is counted, and only the
worst ``max_findings`` sockets are kept to be attributed and described. (Rules that match
process names, and socket inspection, need the owner of every flagged socket first: then the
flagged sockets are held until attribution.)
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from auditd.audit.inference import KEEPALIVE_STATES, keepalive_status, path_idle_ms, probe_cadence
from auditd.audit.kernelpass import pass_params
from auditd.audit.matching import DEFAULT_RULE, select_rule
from auditd.audit.namespace import budget_findings, detection_times, sysctl_findings
from auditd.audit.paths import middlebox_cap
from auditd.audit.tally import Tally, by_port, could_flag, loosest
from auditd.audit.verdicts import idle_severity, judge, socket_findings
from auditd.config import RuleSet
from auditd.errors import AuditdError, KernelError, NamespaceGone
from auditd.kernel.bpf.records import REC_EXTRA, REC_KEPT
from auditd.kernel.inspect import Inspector, Inspectors
from auditd.kernel.owners.scan import OwnerScan
from auditd.kernel.sockdiag import DumpStats
from auditd.kernel.sources import KernelAudit, KernelSource
from auditd.model import (
    Counters,
    Finding,
    FindingKind,
    Keepalive,
    ProcessInfo,
    Severity,
    Sock,
    SocketOptions,
    Sysctls,
    TcpState,
)
from auditd.results import (
    DEFAULT_MAX_FINDINGS,
    HOST_NETNS,
    NEEDS_EVERY_SOCKET,
    AuditResult,
    Inspection,
    NamespaceReport,
    count_findings,
    sort_findings,
)

_SEVERITY_LABELS = {s: s.label for s in Severity}
# NamespaceReport.source: what counted the namespace's sockets and found its candidates.
SOCK_DIAG, BPF_SOURCE = "sock_diag", "bpf"
KERNEL_PASS_NEEDS_EVERY_SOCKET = NEEDS_EVERY_SOCKET


class _Judged:
    """The socket findings of one namespace as they are decided: every one counted, and the
    sockets that have them kept only while among the worst ``limit`` (0: all), in the order
    of ``sort_findings`` (severity, then the longest idle)."""

    def __init__(self, rules: RuleSet, sysctls: Sysctls, limit: int, matched: set[str]) -> None:
        self.rules, self.sysctls, self.limit, self.matched = rules, sysctls, limit, matched
        self.counts: dict[tuple[str, str, str], int] = {}
        self._heap: list[tuple[int, int, int, Sock]] = []  # the best kept on top: a min-heap
        self._seq = 0
        # Without rules or a local middlebox, an idle ESTABLISHED socket without keepalive
        # (the bulk of a host where everything is flagged) is judged here, as ``judge`` would,
        # at a third of the cost; test_run holds the two equal.
        t = rules.defaults
        simple = not rules.rules and middlebox_cap(sysctls) is None
        self._idle_limits = (t.warn_at * t.idle_timeout, t.idle_timeout) if simple else None

    def add(
        self, sock: Sock, process: ProcessInfo | None = None, options: SocketOptions | None = None
    ) -> None:
        limits = self._idle_limits
        if limits is not None and options is None and sock.state == 1 and sock.timer == 0:
            self._idle(sock, *limits)
            return
        rule, verdicts = judge(self.rules, sock, process, self.sysctls, options)
        if rule is not None:
            self.matched.add(rule.name)
        if not verdicts:
            return
        name = rule.name if rule is not None else DEFAULT_RULE
        counts, worst, labels = self.counts, 0, _SEVERITY_LABELS
        for v in verdicts:
            key = (v.kind, labels[v.severity], name)
            counts[key] = counts.get(key, 0) + 1
            worst = max(worst, int(v.severity))
        self._keep((worst, path_idle_ms(sock)), sock)

    def _idle(self, sock: Sock, warn_after: float, timeout: float) -> None:
        """``add`` of an ESTABLISHED socket without keepalive under the defaults alone."""
        idle_ms = path_idle_ms(sock)
        severity = idle_severity(idle_ms / 1000, warn_after, timeout)
        if severity is None:
            return
        key = (FindingKind.IDLE_NO_KEEPALIVE, _SEVERITY_LABELS[severity], DEFAULT_RULE)
        self.counts[key] = self.counts.get(key, 0) + 1
        self._keep((int(severity), idle_ms), sock)

    def _keep(self, rank: tuple[int, int], sock: Sock) -> None:
        self._seq -= 1  # the first seen wins a tie: dump order
        entry = (*rank, self._seq, sock)
        heap = self._heap
        if not self.limit or len(heap) < self.limit:
            heapq.heappush(heap, entry)
        elif entry[:3] > heap[0][:3]:
            heapq.heapreplace(heap, entry)

    def socks(self) -> list[Sock]:
        """The sockets kept, worst first."""
        return [entry[3] for entry in sorted(self._heap, reverse=True)]


# Attribution may take this fraction of the dump's own time (at least the minimum): a full
# /proc/*/fd scan costs a readlink per open fd, several times a socket's share of the dump.
ATTRIBUTION_FRACTION = 0.3
ATTRIBUTION_MIN_SECONDS = 0.25
# With socket inspection every socket whose keepalive is on or unknown needs its owner's fd:
# the scan is mostly a full one, and gets a budget to match (an opt-in cost, see README).
INSPECT_ATTRIBUTION_FRACTION = 2.0
INSPECT_ATTRIBUTION_MIN_SECONDS = 2.0
# A one-shot audit (the CLI) has no next cycle to resume in: it looks until every owner of
# the findings described is found (the scans stop as soon as they are) or the whole of /proc
# is read, within this cap. On a loaded host 0.25 s found 0 of 22 owners (issue 11).
ONE_SHOT_ATTRIBUTION_CAP_SECONDS = 10.0


def _may_need_options(sock: Sock) -> bool:
    """Sockets whose keepalive settings only inspection can tell: all but the ones whose
    timer already proves keepalive off (ESTABLISHED or CLOSE_WAIT with no timer)."""
    return sock.inode != 0 and not (sock.timer == 0 and sock.state in KEEPALIVE_STATES)


@dataclass(slots=True)
class _Inspected:
    """What socket inspection read in one namespace, and what it changed in the tally."""

    options: dict[int, SocketOptions] = field(default_factory=dict)
    wanted: int = 0
    error: str | None = None
    extra: list[Sock] = field(default_factory=list)  # not kept by the pre-filter, now flagged
    read: int | None = None  # sockets read, when not those of ``options`` (the kernel pass)


def _inspect(
    inspector: Inspector,
    candidates: list[Sock],
    kept: list[Sock],
    scan: OwnerScan,
    tally: Tally,
) -> _Inspected:
    """Reads the options of the candidates (and kept sockets) whose owner was found, moves
    the ones whose keepalive status changes in the tally, and finds the sockets that the
    exact options flag beyond the pre-filter."""
    socks = {s.inode: s for s in candidates}
    if not inspector.needs_owners:
        # The BPF iterator read every socket: each flagged one gets its exact settings, also
        # those whose timer already proves keepalive off (their TCP_USER_TIMEOUT is news).
        socks.update((s.inode, s) for s in kept if s.inode)
        targets = [(inode, 0, -1) for inode in socks]
    else:
        socks.update((s.inode, s) for s in kept if _may_need_options(s))
        targets = [
            (inode, scan.found[inode].pid, scan.fds[inode])
            for inode in socks
            if inode in scan.fds and inode in scan.found
        ]
    result = inspector.inspect(targets)
    done = _Inspected(result.options, len(socks), result.error)
    kept_inodes = {s.inode for s in kept}
    for inode, options in result.options.items():
        sock = socks[inode]
        tally.reclassify(sock, keepalive_status(sock), keepalive_status(sock, options))
        if inode not in kept_inodes and could_flag(sock, tally.limits, options):
            done.extra.append(sock)
    return done


def audit_namespace(
    rules: RuleSet,
    source: KernelSource,
    netns: str = HOST_NETNS,
    monotonic: Callable[[], float] = time.monotonic,
    inspector: Inspectors | None = None,
    host: Sysctls | None = None,
    max_findings: int = DEFAULT_MAX_FINDINGS,
    attribution_cap: float | None = None,
    kernel: KernelAudit | None = None,
) -> tuple[NamespaceReport, list[Finding]]:
    """Raises KernelError when the socket dump cannot be read; everything else is best effort.
    ``host``: the host namespace's sysctls when this is another namespace, so namespace-level
    findings say where it differs (it did not inherit the host's tuning).

    ``inspector`` (opt-in): read the exact keepalive options of every socket whose keepalive
    is on or unknown, through its owner's fd; without it the audit infers them.
    ``kernel``: the audit pass in the kernel (BPF), which counts every socket and hands over
    only those the pre-filter keeps (with their options in exact mode) instead of the dump;
    the sock_diag dump serves when it cannot (``NamespaceReport.source`` says which).
    ``max_findings``: socket findings described (the worst; 0: all); every one is counted in
    ``finding_counts``, and only the sockets described are attributed. ``attribution_cap``:
    the owner scan's budget becomes this (see ONE_SHOT_ATTRIBUTION_CAP_SECONDS) instead of a
    share of the dump's time, which suits an agent that resumes the scan next cycle.

    Three phases: the dump (counted, pre-filtered, judged as it streams where it can), the
    owners (and options) of the sockets kept, then the findings described and the report.
    """
    sysctls = source.sysctls()
    counters = source.counters()
    run = _Dumped(rules, sysctls, inspector, max_findings)
    run.dump(source, monotonic, kernel)
    attributed = run.attribute(source, monotonic, attribution_cap)
    findings = run.describe(attributed, netns)
    namespace_findings = [
        *sysctl_findings(rules, sysctls, netns, host),
        *budget_findings(rules, sysctls, netns, frozenset(run.matched), host),
    ]
    report = _report(run, attributed, source.netns_inode(), netns, counters, host)
    counts = count_findings(namespace_findings, dict(run.judged.counts))
    return replace(report, finding_counts=counts), [*findings, *namespace_findings]


@dataclass(slots=True)
class _Attributed:
    """The owners of the sockets kept, and what inspection read of them."""

    scan: OwnerScan
    wanted: list[int]
    inspected: _Inspected


class _Dumped:
    """One namespace's dump, and what it left to attribute and describe."""

    def __init__(
        self, rules: RuleSet, sysctls: Sysctls, inspector: Inspectors | None, max_findings: int
    ) -> None:
        self.rules, self.sysctls = rules, sysctls
        self.exact = inspector is not None
        self._unbound = inspector  # bound to the namespace only if the dump serves
        self.inspector: Inspector | None = None
        self.stats = DumpStats()
        self.source: str = SOCK_DIAG
        self.source_note: str | None = None
        self.extra: list[Sock] = []  # kernel pass, exact mode: flagged by their options only
        self.options: dict[int, SocketOptions] = {}  # kernel pass, exact mode: of the records
        self.read = 0  # kernel pass, exact mode: sockets whose status SO_KEEPALIVE gave
        self.matched: set[str] = set()
        self.judged = _Judged(rules, sysctls, max_findings, self.matched)
        # Judged while the dump streams, unless the verdict needs the owner (process rules)
        # or the socket's options (inspection): then the flagged sockets wait for attribution.
        self.direct = inspector is None and not rules.uses_processes
        self.kept: list[Sock] = []
        self.candidates: list[Sock] = []  # with an inspector: the sockets to read options of
        cap = middlebox_cap(sysctls)
        silence = probe_cadence(sysctls.keepalive_time, sysctls.keepalive_intvl)
        self.ports = by_port(rules, cap)
        self.tally = Tally(loosest(rules, cap), silence, self.ports)
        self.seconds = 0.0

    def _sink(self) -> Callable[[Sock], None]:
        """Where the pre-filter's sockets go: judged at once, or kept for attribution."""
        keep = self.judged.add if self.direct else self.kept.append
        if self.exact and not self.rules.uses_processes:
            # Exact mode: a socket whose timer already proves keepalive off needs no options
            # for its verdict: judged now, kept only while among the worst, as without it.
            keep = _split(self.judged.add, self.kept.append)
        return keep

    def _kernel_pass(self, source: KernelSource, kernel: KernelAudit) -> bool:
        """The namespace's counts and candidates from the kernel's audit pass; False (and
        ``source_note`` says why) when the dump has to serve instead."""
        if source.enter() is None or source.netns_inode() is None:
            return False  # no kernel namespace behind it (a fake, a recording, a fake /proc)
        if _rule_watcher(self.rules, set()) is not None:
            self.source_note = KERNEL_PASS_NEEDS_EVERY_SOCKET
            return False
        params = pass_params(self.tally, self.sysctls, self.exact, self.ports)
        try:
            out = kernel.audit_pass(source, params)
        except AuditdError as exc:
            self.source_note = str(exc)
            return False
        agg = out.aggregates
        self.tally.absorb(agg.counts, agg.hist, agg.idle_ms_sum, agg.total)
        keep = self._sink()
        for rec in out.records:
            sock = rec.sock
            if self.exact and sock.inode:
                self.options[sock.inode] = rec.options(self.sysctls)
            if rec.flags & REC_KEPT:
                # The kernel ran the loosest thresholds; the rules' ports narrow them (one
                # tight rule for one port had every idle socket judged: tally.by_port).
                if self.exact or self.tally.keeps(sock):
                    keep(sock)
            elif rec.flags & REC_EXTRA:
                self.extra.append(sock)
        self.read = agg.inspected
        self.source, self.source_note = BPF_SOURCE, None
        return True

    def dump(
        self,
        source: KernelSource,
        monotonic: Callable[[], float],
        kernel: KernelAudit | None = None,
    ) -> None:
        started = monotonic()
        if kernel is not None and self._kernel_pass(source, kernel):
            self.seconds = monotonic() - started
            return
        if self._unbound is not None:
            self.inspector = self._unbound.for_namespace(source, self.sysctls)
        visit = _rule_watcher(self.rules, self.matched)
        if self.inspector is not None:
            visit = _collector(self.candidates, visit)
        keep = self._sink()
        self.tally.run(source.sockets(self.stats), keep, visit)
        self.seconds = monotonic() - started

    def attribute(
        self, source: KernelSource, monotonic: Callable[[], float], cap: float | None
    ) -> _Attributed:
        """Owners of the sockets kept (within a budget), their options when inspected, and
        the verdicts that waited for them."""
        if self.source == BPF_SOURCE:
            return self._attribute_kernel(source, monotonic, cap)
        inspector = self.inspector
        # The BPF socket pass reads options without owners: then only flagged sockets need one.
        by_fd = inspector is not None and inspector.needs_owners
        if not by_fd:
            budget = max(ATTRIBUTION_MIN_SECONDS, ATTRIBUTION_FRACTION * self.seconds)
            wanted = list({s.inode for s in (*self.judged.socks(), *self.kept) if s.inode})
        else:
            budget = max(
                INSPECT_ATTRIBUTION_MIN_SECONDS, INSPECT_ATTRIBUTION_FRACTION * self.seconds
            )
            socks = (*self.judged.socks(), *self.kept, *self.candidates)
            wanted = list({s.inode for s in socks if s.inode})
        if cap is not None:
            budget = max(budget, cap)
        scan = source.owners(wanted, monotonic() + budget) if wanted else OwnerScan()
        inspected = _Inspected() if inspector is None else _inspect(
            inspector, self.candidates, self.kept, scan, self.tally
        )  # fmt: skip
        if inspected.extra and not by_fd:  # flagged only by their exact options: owners too
            more = [s.inode for s in inspected.extra if s.inode]
            wanted += more
            scan = _merged(scan, source.owners(more, monotonic() + budget))
        owners, options = scan.found, inspected.options
        for sock in (*self.kept, *inspected.extra):
            self.judged.add(sock, owners.get(sock.inode), options.get(sock.inode))
        if inspector is not None and not by_fd:  # the BPF pass has the rest, for the findings
            unread = [(s.inode, 0, -1) for s in self.judged.socks() if s.inode not in options]
            if unread:
                options.update(inspector.inspect([t for t in unread if t[0]]).options)
        return _Attributed(scan, wanted, inspected)

    def _attribute_kernel(
        self, source: KernelSource, monotonic: Callable[[], float], cap: float | None
    ) -> _Attributed:
        """``attribute`` after the kernel's pass: its records carry the options already."""
        budget = max(ATTRIBUTION_MIN_SECONDS, ATTRIBUTION_FRACTION * self.seconds)
        if cap is not None:
            budget = max(budget, cap)
        socks = (*self.judged.socks(), *self.kept, *self.extra)
        wanted = list({s.inode for s in socks if s.inode})
        scan = source.owners(wanted, monotonic() + budget) if wanted else OwnerScan()
        owners, options = scan.found, self.options
        for sock in (*self.kept, *self.extra):
            self.judged.add(sock, owners.get(sock.inode), options.get(sock.inode))
        inspected = _Inspected(options, self.read, None, self.extra, self.read)
        return _Attributed(scan, wanted, inspected)

    def describe(self, attributed: _Attributed, netns: str) -> list[Finding]:
        """The findings of the sockets kept among the worst, rendered."""
        owners, options = attributed.scan.found, attributed.inspected.options
        findings: list[Finding] = []
        for sock in self.judged.socks():
            inode = sock.inode
            findings += socket_findings(
                self.rules, sock, owners.get(inode), self.sysctls, netns, options.get(inode)
            )
        return findings


def _rule_watcher(rules: RuleSet, matched: set[str]) -> Callable[[Sock], None] | None:
    """A ``visit`` that notes which rules with a detection budget of their own match one of
    the namespace's sockets (only those are checked for it): a rule lookup per socket until
    each has matched. (Rules on process names can only be seen matching a flagged, attributed
    socket.) None when no rule needs it."""
    pending = {r.name for r in rules.rules if "detection_budget" in r.overrides and not r.ignore}
    if not pending:
        return None

    def note_rule(sock: Sock) -> None:
        if pending and sock.state == TcpState.ESTABLISHED:
            rule = select_rule(rules, sock, None)
            if rule is not None and rule.name in pending:
                pending.discard(rule.name)
                matched.add(rule.name)

    return note_rule


def _report(
    run: _Dumped,
    attributed: _Attributed,
    inode: int | None,
    netns: str,
    counters: Counters,
    host: Sysctls | None,
) -> NamespaceReport:
    sysctls, tally, stats, scan = run.sysctls, run.tally, run.stats, attributed.scan
    inspector, inspected = run.inspector, attributed.inspected
    differs = () if host is None else tuple(
        sorted(n for n, v in sysctls.values.items() if host.values.get(n, v) != v)
    )  # fmt: skip
    idle, in_flight = detection_times(sysctls)
    return NamespaceReport(
        netns=netns,
        inode=inode,
        sysctls=sysctls,
        counters=counters,
        detection_idle_seconds=idle,
        detection_in_flight_seconds=in_flight,
        connections=tally.connections(),
        sockets=tally.total,
        dump_messages=stats.messages,
        dump_skipped=stats.skipped,
        dump_interrupted=stats.interrupted or stats.truncated,
        idle_histogram=dict(zip(Keepalive.ALL, tally.hist)),
        idle_sum={ka: ms / 1000 for ka, ms in zip(Keepalive.ALL, tally.idle_ms_sum)},
        attribution_wanted=len(attributed.wanted),
        attribution_found=len(scan.found),
        attribution_complete=scan.complete,
        attribution_hidden=scan.hidden,
        attribution_failed=scan.error is not None,
        inspection=None if not run.exact else Inspection(
            inspected.wanted,
            len(inspected.options) if inspected.read is None else inspected.read,
            inspected.error,
            BPF_SOURCE if inspector is None else inspector.method,
            None if inspector is None else inspector.note,
        ),
        source=run.source,
        source_note=run.source_note,
        differs_from_host=differs,
    )  # fmt: skip


def _split(judge: Callable[[Sock], None], keep: Callable[[Sock], None]) -> Callable[[Sock], None]:
    """The pre-filter's sink in exact mode: ``keep`` what inspection may change, else
    ``judge`` at once."""

    def sink(sock: Sock) -> None:
        if _may_need_options(sock):
            keep(sock)
        else:
            judge(sock)

    return sink


def _merged(a: OwnerScan, b: OwnerScan) -> OwnerScan:
    return OwnerScan(
        {**a.found, **b.found},
        a.complete and b.complete,
        a.denied + b.denied,
        a.error or b.error,
        {**a.fds, **b.fds},
        a.hidden or b.hidden,
    )


def _collector(into: list[Sock], then: Callable[[Sock], None] | None) -> Callable[[Sock], None]:
    """A ``visit`` for the tally that keeps the sockets inspection may need, then calls on."""
    may_need, append = _may_need_options, into.append

    def collect(sock: Sock) -> None:
        if may_need(sock):
            append(sock)
        if then is not None:
            then(sock)

    return collect


def _audit_retrying(
    rules: RuleSet,
    source: KernelSource,
    name: str,
    inspector: Inspectors | None = None,
    host: Sysctls | None = None,
    max_findings: int = DEFAULT_MAX_FINDINGS,
    attribution_cap: float | None = None,
    kernel: KernelAudit | None = None,
) -> tuple[NamespaceReport, list[Finding]]:
    def once() -> tuple[NamespaceReport, list[Finding]]:
        return audit_namespace(
            rules, source, name, inspector=inspector, host=host, max_findings=max_findings,
            attribution_cap=attribution_cap, kernel=kernel,
        )  # fmt: skip

    try:
        return once()
    except KernelError as exc:
        if not exc.transient:
            raise
        return once()  # ENOBUFS/EINTR: the socket table moved faster than we read it


def audit(
    rules: RuleSet,
    sources: list[tuple[str, KernelSource]],
    clock: Callable[[], float] = time.time,
    timer: Callable[[], float] = time.perf_counter,
    inspector: Inspectors | None = None,
    max_findings: int = DEFAULT_MAX_FINDINGS,
    attribution_cap: float | None = None,
    kernel: KernelAudit | None = None,
) -> AuditResult:
    """Audit each (name, source) namespace, the host first: the others are compared with its
    sysctls. A namespace gone or refused (NamespaceGone), or any other namespace whose kernel
    cannot be read, is skipped and listed in the result, so one broken container cannot blank
    the rest; a KernelError from the agent's own namespace propagates.

    ``max_findings``: socket findings described, the worst of all namespaces (0: all); the
    others are counted (``findings_omitted``). Namespace findings are always described.
    ``attribution_cap``: seconds the owner scans of the whole audit may take together, for a
    one-shot audit (``audit_namespace``); each namespace gets what is left, at least the
    usual minimum."""
    cap_ends = None if attribution_cap is None else time.monotonic() + attribution_cap
    started = clock()
    t0 = timer()
    reports: list[NamespaceReport] = []
    findings: list[Finding] = []
    skipped: list[tuple[str, str]] = []
    host: Sysctls | None = None
    for name, source in sorted(sources, key=lambda pair: pair[0] != HOST_NETNS):
        try:
            cap = None if cap_ends is None else max(cap_ends - time.monotonic(), 0.0)
            report, found = _audit_retrying(
                rules, source, name, inspector, host, max_findings, attribution_cap=cap,
                kernel=kernel,
            )  # fmt: skip
        except KernelError as exc:
            if name == HOST_NETNS and not isinstance(exc, NamespaceGone):
                raise
            skipped.append((name, str(exc)))
            continue
        if name == HOST_NETNS:
            host = report.sysctls
        reports.append(report)
        findings.extend(found)
    listed = sort_findings(findings)
    described = [f for f in listed if f.local is not None]  # socket findings
    if max_findings and len(described) > max_findings:
        cut = {id(f) for f in described[max_findings:]}
        listed = tuple(f for f in listed if id(f) not in cut)
        described = described[:max_findings]
    result = AuditResult(
        generated_at=started,
        duration_seconds=timer() - t0,
        namespaces=tuple(reports),
        findings=listed,
        skipped_namespaces=tuple(skipped),
    )
    namespace_level = len(listed) - len(described)
    omitted = result.findings_total - namespace_level - len(described)
    return replace(result, findings_omitted=omitted)
