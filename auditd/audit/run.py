"""One audit of one network namespace: stream the dump, count, flag, attribute, evaluate.

Memory stays bounded by what the findings need: every socket is counted on the fly and only
the ones ``could_flag`` keeps are held until attribution and evaluation.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from auditd.audit.evaluate import (
    budget_findings,
    could_flag,
    detection_times,
    loosest,
    select_rule,
    socket_findings,
    sysctl_findings,
)
from auditd.audit.inference import keepalive_status
from auditd.config import RuleSet
from auditd.errors import KernelError
from auditd.kernel import DumpStats, KernelSource, OwnerScan
from auditd.model import Counters, Finding, Keepalive, Sock, Sysctls, TcpState, state_label

HOST_NETNS = "host"

# Upper bounds (seconds) of the idle-age histogram: around the middlebox idle timeouts
# (ALB 60, Azure 240, AWS 350, GCP firewall 600, IPVS 900, GCP NAT 1200) and the 7200 s default.
IDLE_BUCKETS = (10.0, 60.0, 240.0, 350.0, 600.0, 900.0, 1200.0, 3600.0, 7200.0)
_IDLE_BOUNDS_MS = [int(b * 1000) for b in IDLE_BUCKETS]


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
    attribution_complete: bool = True  # False: the time budget ran out before the end


@dataclass(frozen=True, slots=True)
class AuditResult:
    generated_at: float  # unix time the audit started
    duration_seconds: float
    namespaces: tuple[NamespaceReport, ...]
    findings: tuple[Finding, ...]
    errors: tuple[tuple[str, str], ...] = field(default=())  # (stage, one-line message)


def _order(f: Finding) -> tuple[int, float, str, str]:
    return (-int(f.severity), -(f.idle_seconds or 0.0), f.kind, f.local or "")


def sort_findings(findings: list[Finding]) -> tuple[Finding, ...]:
    """Worst first: severity, then the longest idle."""
    return tuple(sorted(findings, key=_order))


# Attribution may take this fraction of the dump's own time (at least the minimum): a full
# /proc/*/fd scan costs a readlink per open fd, several times a socket's share of the dump.
ATTRIBUTION_FRACTION = 0.3
ATTRIBUTION_MIN_SECONDS = 0.2


def audit_namespace(
    rules: RuleSet,
    source: KernelSource,
    netns: str = HOST_NETNS,
    monotonic: Callable[[], float] = time.monotonic,
) -> tuple[NamespaceReport, list[Finding]]:
    """Raises KernelError when the socket dump cannot be read; everything else is best effort."""
    sysctls = source.sysctls()
    counters = source.counters()
    stats = DumpStats()
    limits = loosest(rules)
    counts: dict[tuple[int, str], int] = {}
    kept: list[Sock] = []
    total = 0
    status = keepalive_status
    flag = could_flag
    # Rules with a detection budget of their own are checked for the namespace only if they
    # match one of its sockets; that needs a rule lookup per socket until each has matched.
    # Rules that match on process names can only be seen matching a flagged, attributed socket.
    pending = {r.name for r in rules.rules if "detection_budget" in r.overrides and not r.ignore}
    matched: set[str] = set()
    hist = {ka: [0] * (len(IDLE_BUCKETS) + 1) for ka in Keepalive.ALL}
    idle_ms_sum = dict.fromkeys(Keepalive.ALL, 0)
    bounds = _IDLE_BOUNDS_MS
    where = bisect.bisect_left
    established = TcpState.ESTABLISHED
    dump_started = monotonic()
    for sock in source.sockets(stats):
        total += 1
        ka = status(sock)
        key = (sock.state, ka)
        counts[key] = counts.get(key, 0) + 1
        if sock.state == established:
            idle_ms = min(sock.last_data_recv_ms, sock.last_ack_recv_ms, sock.last_data_sent_ms)
            hist[ka][where(bounds, idle_ms)] += 1
            idle_ms_sum[ka] += idle_ms
        if flag(sock, limits):
            kept.append(sock)
        if pending and sock.state == TcpState.ESTABLISHED:
            rule = select_rule(rules, sock, None)
            if rule is not None and rule.name in pending:
                pending.discard(rule.name)
                matched.add(rule.name)

    dump_seconds = monotonic() - dump_started
    budget = max(ATTRIBUTION_MIN_SECONDS, ATTRIBUTION_FRACTION * dump_seconds)
    wanted = [s.inode for s in kept if s.inode]
    scan = source.owners(wanted, monotonic() + budget) if wanted else OwnerScan()
    owners = scan.found
    findings: list[Finding] = []
    for sock in kept:
        process = owners.get(sock.inode)
        rule = select_rule(rules, sock, process)
        if rule is not None:
            matched.add(rule.name)
        findings.extend(socket_findings(rules, sock, process, sysctls, netns))
    findings.extend(sysctl_findings(rules, sysctls, netns))
    findings.extend(budget_findings(rules, sysctls, netns, frozenset(matched)))

    idle, in_flight = detection_times(sysctls)
    report = NamespaceReport(
        netns=netns,
        inode=source.netns_inode(),
        sysctls=sysctls,
        counters=counters,
        detection_idle_seconds=idle,
        detection_in_flight_seconds=in_flight,
        connections={(state_label(st), ka): n for (st, ka), n in counts.items()},
        sockets=total,
        dump_messages=stats.messages,
        dump_skipped=stats.skipped,
        dump_interrupted=stats.interrupted or stats.truncated,
        idle_histogram=hist,
        idle_sum={ka: ms / 1000 for ka, ms in idle_ms_sum.items()},
        attribution_wanted=len(wanted),
        attribution_found=len(owners),
        attribution_complete=scan.complete,
    )
    return report, findings


def audit(
    rules: RuleSet,
    sources: list[tuple[str, KernelSource]],
    clock: Callable[[], float] = time.time,
    timer: Callable[[], float] = time.perf_counter,
) -> AuditResult:
    """Audit each (name, source) namespace; KernelError from any propagates."""
    started = clock()
    t0 = timer()
    reports: list[NamespaceReport] = []
    findings: list[Finding] = []
    for name, source in sources:
        try:
            report, found = audit_namespace(rules, source, name)
        except KernelError as exc:
            if not exc.transient:
                raise
            # ENOBUFS/EINTR: the socket table moved faster than we read it; once more.
            report, found = audit_namespace(rules, source, name)
        reports.append(report)
        findings.extend(found)
    return AuditResult(
        generated_at=started,
        duration_seconds=timer() - t0,
        namespaces=tuple(reports),
        findings=sort_findings(findings),
    )
