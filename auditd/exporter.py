"""Prometheus exposition of the last audit. Translates only: no kernel access, no state.

Every scrape builds fresh metric families from an immutable ``ExporterState`` (the daemon
swaps in a new one after each audit or reload), so a scrape never triggers a dump and never
sees half an update. Label values come from small known sets; series for known values are
exported as 0 rather than left out, so alerts and rates see them appear.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from auditd import __version__
from auditd.audit.evaluate import DEFAULT_RULE
from auditd.audit.run import IDLE_BUCKETS, AuditResult
from auditd.config import RuleSet
from auditd.kernel.sockdiag import DEFAULT_STATES
from auditd.model import FindingKind, Keepalive, Severity, TcpState

ERROR_STAGES = (
    "dump", "sysctls", "counters", "attribution", "netns", "config", "http", "log", "internal",
)  # fmt: skip

AS_OF = "As of the last audit."

# (metric suffix, sysctl, help, unit conversion); seconds-valued sysctls get _seconds.
SYSCTL_METRICS = (
    ("tcp_keepalive_time_seconds", "net.ipv4.tcp_keepalive_time",
     "Idle seconds before the first keepalive probe (net.ipv4.tcp_keepalive_time)."),
    ("tcp_keepalive_intvl_seconds", "net.ipv4.tcp_keepalive_intvl",
     "Seconds between keepalive probes (net.ipv4.tcp_keepalive_intvl)."),
    ("tcp_keepalive_probes", "net.ipv4.tcp_keepalive_probes",
     "Unanswered keepalive probes before abort (net.ipv4.tcp_keepalive_probes)."),
    ("tcp_retries2", "net.ipv4.tcp_retries2",
     "Retransmission count bounding unacknowledged data (net.ipv4.tcp_retries2)."),
    ("nf_conntrack_tcp_timeout_established_seconds",
     "net.netfilter.nf_conntrack_tcp_timeout_established",
     "Conntrack idle timeout of established TCP flows "
     "(net.netfilter.nf_conntrack_tcp_timeout_established), when conntrack is loaded."),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ExporterState:
    """Everything a scrape shows; replaced whole, never mutated."""

    result: AuditResult | None = None
    rules: RuleSet = field(default_factory=RuleSet)
    errors: dict[str, int] = field(default_factory=dict)  # stage -> count since start
    last_success: float | None = None  # unix time of the last successful audit
    reload_ok: bool = True
    reload_success_time: float | None = None


def rule_names(rules: RuleSet) -> list[str]:
    return [DEFAULT_RULE, *(r.name for r in rules.rules if not r.ignore)]


class AuditCollector(Collector):
    """Yields the keepalive_* families from the state returned by ``get_state``."""

    def __init__(self, get_state: Callable[[], ExporterState]) -> None:
        self._get_state = get_state

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: the families depend on the namespaces seen

    def collect(self) -> Iterator[Metric]:
        state: ExporterState = self._get_state()
        yield from _build_info()
        yield from _audit_meta(state)
        if state.result is not None:
            yield from _namespaces(state.result)
            yield from _findings(state.result, state.rules)


def _build_info() -> Iterator[Metric]:
    g = GaugeMetricFamily(
        "keepalive_build_info", "Build of keepalive-auditd; the value is always 1.",
        labels=["version"],
    )  # fmt: skip
    g.add_metric([__version__], 1)
    yield g


def _audit_meta(state: ExporterState) -> Iterator[Metric]:
    d = GaugeMetricFamily(
        "keepalive_audit_duration_seconds",
        "Wall time of the last audit (dump, rules, attribution).",
    )
    if state.result is not None:
        d.add_metric([], state.result.duration_seconds)
    yield d
    ts = GaugeMetricFamily(
        "keepalive_audit_last_success_timestamp_seconds",
        "Unix time at which the last successful audit started.",
    )
    if state.last_success is not None:
        ts.add_metric([], state.last_success)
    yield ts
    err = CounterMetricFamily(
        "keepalive_audit_errors",
        "Audit errors since the agent started, by stage (dump, sysctls, counters, "
        "attribution, netns, config, http, log, internal).",
        labels=["stage"],
    )
    for stage in sorted(set(ERROR_STAGES) | set(state.errors)):
        err.add_metric([stage], state.errors.get(stage, 0))
    yield err
    ok = GaugeMetricFamily(
        "keepalive_config_last_reload_successful",
        "1 if the last load of the rules file succeeded, 0 if the old rules are still in use.",
    )
    ok.add_metric([], 1 if state.reload_ok else 0)
    yield ok
    when = GaugeMetricFamily(
        "keepalive_config_last_reload_success_timestamp_seconds",
        "Unix time of the last successful load of the rules file.",
    )
    if state.reload_success_time is not None:
        when.add_metric([], state.reload_success_time)
    yield when


def _namespaces(result: AuditResult) -> Iterator[Metric]:
    sysctl_families = [
        (
            GaugeMetricFamily(f"keepalive_sysctl_{suffix}", f"{help_} {AS_OF}", labels=["netns"]),
            name,
        )
        for suffix, name, help_ in SYSCTL_METRICS
    ]
    detection = GaugeMetricFamily(
        "keepalive_dead_peer_detection_seconds",
        "Seconds until a dead peer is noticed on the namespace defaults: case idle = "
        "tcp_keepalive_time + tcp_keepalive_probes * tcp_keepalive_intvl (keepalive on), "
        f"case in_flight = the tcp_retries2 backoff model. {AS_OF}",
        labels=["netns", "case"],
    )
    conns = GaugeMetricFamily(
        "keepalive_tcp_connections",
        f"TCP sockets by state and inferred keepalive status (on, off, unknown). {AS_OF}",
        labels=["netns", "state", "keepalive"],
    )
    probes = CounterMetricFamily(
        "keepalive_kernel_keepalive_probes",
        f"Keepalive probes sent by the kernel (TcpExt TCPKeepAlive). {AS_OF}",
        labels=["netns"],
    )
    aborts = CounterMetricFamily(
        "keepalive_kernel_abort_on_timeout",
        f"Connections the kernel aborted on timeout (TcpExt TCPAbortOnTimeout). {AS_OF}",
        labels=["netns"],
    )
    idle = HistogramMetricFamily(
        "keepalive_connection_idle_seconds",
        f"Path idle time of ESTABLISHED connections by keepalive status. {AS_OF}",
        labels=["netns", "keepalive"],
    )
    states = sorted({TcpState(s).label for s in DEFAULT_STATES})
    for ns in result.namespaces:
        for family, name in sysctl_families:
            value = ns.sysctls.get(name)
            if value is not None:
                family.add_metric([ns.netns], value)
        detection.add_metric([ns.netns, "idle"], ns.detection_idle_seconds)
        detection.add_metric([ns.netns, "in_flight"], ns.detection_in_flight_seconds)
        seen = {state for state, _ in ns.connections}
        for state in sorted(set(states) | seen):
            for ka in Keepalive.ALL:
                conns.add_metric([ns.netns, state, ka], ns.connections.get((state, ka), 0))
        if ns.counters.keepalive_probes is not None:
            probes.add_metric([ns.netns], ns.counters.keepalive_probes)
        if ns.counters.abort_on_timeout is not None:
            aborts.add_metric([ns.netns], ns.counters.abort_on_timeout)
        for ka in Keepalive.ALL:
            counts = ns.idle_histogram.get(ka, [0] * (len(IDLE_BUCKETS) + 1))
            buckets, running = [], 0
            for bound, n in zip([*(f"{b:g}" for b in IDLE_BUCKETS), "+Inf"], counts):
                running += n
                buckets.append((bound, running))
            idle.add_metric([ns.netns, ka], buckets, ns.idle_sum.get(ka, 0.0))
    for family, _ in sysctl_families:
        yield family
    yield detection
    yield conns
    yield probes
    yield aborts
    yield idle
    yield from _namespace_set(result)


def _namespace_set(result: AuditResult) -> Iterator[Metric]:
    """How many namespaces were audited, and where each one's sysctls are not the host's."""
    count = GaugeMetricFamily(
        "keepalive_namespaces",
        "Network namespaces audited (--audit.netns); those skipped because they vanished or "
        f'could not be entered count in keepalive_audit_errors_total{{stage="netns"}}. {AS_OF}',
    )
    count.add_metric([], len(result.namespaces))
    yield count
    differs = GaugeMetricFamily(
        "keepalive_sysctl_differs_from_host",
        "1 if the namespace's sysctl has another value than the host's (a new netns starts at "
        f"the kernel defaults: the host's tuning is not inherited), else 0. {AS_OF}",
        labels=["netns", "sysctl"],
    )
    for ns in result.namespaces:
        for name in sorted(ns.sysctls.values):
            differs.add_metric([ns.netns, name], 1 if name in ns.differs_from_host else 0)
    yield differs


def _findings(result: AuditResult, rules: RuleSet) -> Iterator[Metric]:
    g = GaugeMetricFamily(
        "keepalive_findings",
        "Open findings by kind, severity and rule (every configured rule that is not "
        f"ignored, and every kind and severity, present; 0 when clear). {AS_OF}",
        labels=["netns", "kind", "severity", "rule"],
    )
    counts: dict[tuple[str, str, str, str], int] = {}
    names = rule_names(rules)
    for ns in result.namespaces:  # every finding, described in the report or not
        for (kind, severity, rule), n in ns.finding_counts.items():
            counts[(ns.netns, kind, severity, rule)] = n
        for kind in FindingKind.ALL:
            for sev in Severity:
                for rule in names:
                    counts.setdefault((ns.netns, kind, sev.label, rule), 0)
    for key in sorted(counts):
        g.add_metric(list(key), counts[key])
    yield g


def make_registry(get_state: Callable[[], ExporterState]) -> CollectorRegistry:
    """A private registry holding only our collector (no process/platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AuditCollector(get_state))
    return registry
