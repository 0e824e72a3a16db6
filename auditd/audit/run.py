"""One audit of one network namespace: stream the dump, count, flag, attribute, evaluate.

Memory stays bounded by what the findings need: every socket is counted on the fly and only
the ones ``could_flag`` keeps are held until attribution and evaluation.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable
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
from auditd.config import RuleSet, Thresholds
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


_ON, _OFF, _UNKNOWN = range(3)  # indexes of Keepalive.ALL
_KA_INDEX = {ka: i for i, ka in enumerate(Keepalive.ALL)}


class _Tally:
    """The per-socket pass over a dump: counts, idle histogram, and the pre-filter.

    This loop runs 200k times per audit on a busy host, so it inlines, for ESTABLISHED
    sockets, what ``keepalive_status``, ``path_idle_ms`` and ``could_flag`` decide (those
    stay the reference; other states call them). Thresholds are compared in whole
    milliseconds, one below the limit: the pre-filter may keep a few sockets too many,
    never one too few, and ``socket_findings`` decides exactly.
    """

    def __init__(self, limits: Thresholds) -> None:
        self.limits = limits
        self.warn_ms = int(limits.warn_at * limits.idle_timeout * 1000) - 1
        self.idle_timeout_ms = int(limits.idle_timeout * 1000) - 1
        self.retransmits = limits.retransmit_threshold
        self.counts = [0] * (64 * 3)  # state * 3 + keepalive index
        self.hist = [[0] * (len(IDLE_BUCKETS) + 1) for _ in Keepalive.ALL]
        self.idle_ms_sum = [0, 0, 0]
        self.total = 0

    def run(
        self, socks: Iterable[Sock], kept: list[Sock], visit: Callable[[Sock], None] | None
    ) -> None:
        """Accounts for every socket and appends the ones that may be flagged to ``kept``;
        ``visit`` (rarely needed) sees every socket."""
        counts, hist, sums = self.counts, self.hist, self.idle_ms_sum
        warn_ms, idle_timeout_ms, retransmits = self.warn_ms, self.idle_timeout_ms, self.retransmits
        bounds, where, limits = _IDLE_BOUNDS_MS, bisect.bisect_left, self.limits
        status, flag, ka_index = keepalive_status, could_flag, _KA_INDEX
        total = 0
        for sock in socks:
            total += 1
            (_, state, timer, retrans, _, _, _, _, expires, _, _, _, _, _, _, _, _, _, _,
             sent, received, acked, _, _) = sock  # fmt: skip
            if state == 1:  # ESTABLISHED
                heard = received if received < acked else acked
                idle = heard if heard < sent else sent
                if timer == 0:
                    k, keep = _OFF, idle >= warn_ms
                elif timer == 2:
                    k, keep = _ON, retrans > 0 or heard + expires >= idle_timeout_ms
                else:
                    k, keep = _UNKNOWN, (timer == 1 or timer == 4) and retrans >= retransmits
                counts[3 + k] += 1
                hist[k][where(bounds, idle)] += 1
                sums[k] += idle
                if keep:
                    kept.append(sock)
            else:
                counts[(state & 63) * 3 + ka_index[status(sock)]] += 1
                if flag(sock, limits):
                    kept.append(sock)
            if visit is not None:
                visit(sock)
        self.total += total

    def connections(self) -> dict[tuple[str, str], int]:
        return {
            (state_label(i // 3), Keepalive.ALL[i % 3]): n for i, n in enumerate(self.counts) if n
        }


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
    kept: list[Sock] = []
    # Rules with a detection budget of their own are checked for the namespace only if they
    # match one of its sockets; that needs a rule lookup per socket until each has matched.
    # Rules that match on process names can only be seen matching a flagged, attributed socket.
    pending = {r.name for r in rules.rules if "detection_budget" in r.overrides and not r.ignore}
    matched: set[str] = set()

    def note_rule(sock: Sock) -> None:
        if pending and sock.state == TcpState.ESTABLISHED:
            rule = select_rule(rules, sock, None)
            if rule is not None and rule.name in pending:
                pending.discard(rule.name)
                matched.add(rule.name)

    tally = _Tally(limits)
    dump_started = monotonic()
    tally.run(source.sockets(stats), kept, note_rule if pending else None)
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
        connections=tally.connections(),
        sockets=tally.total,
        dump_messages=stats.messages,
        dump_skipped=stats.skipped,
        dump_interrupted=stats.interrupted or stats.truncated,
        idle_histogram=dict(zip(Keepalive.ALL, tally.hist)),
        idle_sum={ka: ms / 1000 for ka, ms in zip(Keepalive.ALL, tally.idle_ms_sum)},
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
