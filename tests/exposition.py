"""What the exporter exposes, from a state where every family has samples: the metric
documentation test (unit/test_metrics_doc.py) and the fleet configs and dashboard
(process/test_prometheus.py, process/test_grafana.py) check against it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from auditd.abort_metrics import AbortCollector
from auditd.audit.tally import IDLE_BUCKETS
from auditd.config import Match, Rule, RuleSet
from auditd.events import AbortState
from auditd.exporter import ExporterState, make_registry
from auditd.model import Counters, Finding, FindingKind, Severity, Sysctls
from auditd.results import AuditResult, NamespaceReport, count_findings


@dataclass(frozen=True)
class Row:
    type: str
    labels: frozenset[str]


def full_state() -> ExporterState:
    """The host with every sysctl and counter, one finding, and a namespace that differs:
    every family has samples."""
    buckets = [0] * (len(IDLE_BUCKETS) + 1)
    buckets[1] = 1
    found = Finding(
        FindingKind.IDLE_NO_KEEPALIVE, Severity.CRITICAL, "postgres", "host", "idle",
        "set keepalive", local="10.0.0.1:40000", remote="10.0.0.2:5432",
    )  # fmt: skip
    ns = NamespaceReport(
        netns="host",
        inode=4026531840,
        sysctls=Sysctls(
            {
                "net.ipv4.tcp_keepalive_time": 7200,
                "net.ipv4.tcp_keepalive_intvl": 75,
                "net.ipv4.tcp_keepalive_probes": 9,
                "net.ipv4.tcp_retries2": 15,
                "net.netfilter.nf_conntrack_tcp_timeout_established": 432000,
            }
        ),
        counters=Counters(keepalive_probes=1, abort_on_timeout=0),
        detection_idle_seconds=7875.0,
        detection_in_flight_seconds=924.6,
        connections={("established", "off"): 1},
        sockets=1,
        idle_histogram={"off": buckets},
        idle_sum={"off": 30.0},
        finding_counts=count_findings([found]),
    )
    rules = RuleSet(rules=(Rule("postgres", Match(remote_ports=frozenset({5432}))),))
    # Another namespace that differs from the host: differs_from_host has only its 1s.
    pod = replace(ns, netns="pod:a", differs_from_host=("net.ipv4.tcp_keepalive_time",))
    result = AuditResult(1_700_000_000.0, 0.1, (ns, pod), (found,))
    return ExporterState(result, rules, {}, 1_700_000_000.0, True, 1_699_999_000.0)


def exposed() -> dict[str, Row]:
    """Metric name (as in the table) -> type and labels, from a rendered exposition."""
    state = full_state()
    registry = make_registry(lambda: state)
    aborts = AbortState({("host", "peer_reset", "postgres", "true"): 1}, 0, ("host",))
    registry.register(AbortCollector(lambda: aborts))  # the agent adds it (auditd.daemon)
    text = generate_latest(registry).decode()
    out: dict[str, Row] = {}
    for family in text_string_to_metric_families(text):
        assert family.samples, f"{family.name}: no samples, so its labels cannot be checked"
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        out[name] = Row(family.type, labels)
    return out
