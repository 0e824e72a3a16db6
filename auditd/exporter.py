"""Prometheus exposition of the last audit. Translates only: no kernel access, no state.

Every scrape builds fresh metric families from an immutable ``ExporterState`` (the daemon
swaps in a new one after each audit or reload), so a scrape never triggers a dump and never
sees half an update. Label values come from small known sets. The agent's own series and
the host namespace's are all present, 0 when nothing is counted; other namespaces and rules
cost series only for what is wrong or different in them (``auditd.nsmetrics``), so the
series count stays bounded whatever the number of namespaces and rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from auditd import __version__
from auditd.audit.matching import DEFAULT_RULE
from auditd.config import RuleSet
from auditd.events import AbortState
from auditd.model import FindingKind, Severity, Stage
from auditd.nsmetrics import AS_OF, namespace_families
from auditd.results import HOST_NETNS, AuditResult

ERROR_STAGES = Stage.ALL  # each exported, 0 until it happens


@dataclass(frozen=True, slots=True)
class ExporterState:
    """Everything a scrape shows; replaced whole, never mutated."""

    result: AuditResult | None = None
    rules: RuleSet = field(default_factory=RuleSet)
    errors: dict[str, int] = field(default_factory=dict)  # stage -> count since start
    last_success: float | None = None  # unix time of the last successful audit
    reload_ok: bool = True
    reload_success_time: float | None = None
    # The abort events' state (counts, the last aborts), replaced on each change by the
    # event thread, so the cached exposition and page are rendered again then, not only
    # after the next audit.
    aborts: AbortState = field(default_factory=AbortState)


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
            yield from namespace_families(state.result)
            yield from _findings(state.result)


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
    loaded = GaugeMetricFamily(
        "keepalive_config_rules",
        "Rules in use (ignore: rules included), from the last successful load of the rules file.",
    )
    loaded.add_metric([], len(state.rules.rules))
    yield loaded


def _findings(result: AuditResult) -> Iterator[Metric]:
    """Nonzero counts only, so thousands of rules cost nothing until they match; the host
    keeps a 0 for every kind and severity under rule ``default`` (24 series), so its
    findings read 0 rather than "no data" and a first finding is a step up from 0."""
    g = GaugeMetricFamily(
        "keepalive_findings",
        "Open findings by kind, severity and rule: nonzero counts only (absent means 0), "
        f"plus a 0 for every kind and severity of rule default in the host namespace. {AS_OF}",
        labels=["netns", "kind", "severity", "rule"],
    )
    counts: dict[tuple[str, str, str, str], int] = {}
    for ns in result.namespaces:  # every finding, described in the report or not
        for (kind, severity, rule), n in ns.finding_counts.items():
            if n:
                counts[(ns.netns, kind, severity, rule)] = n
        if ns.netns == HOST_NETNS:
            for kind in FindingKind.ALL:
                for sev in Severity:
                    counts.setdefault((ns.netns, kind, sev.label, DEFAULT_RULE), 0)
    for key in sorted(counts):
        g.add_metric(list(key), counts[key])
    yield g


def make_registry(get_state: Callable[[], ExporterState]) -> CollectorRegistry:
    """A private registry holding only our collector (no process/platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AuditCollector(get_state))
    return registry
