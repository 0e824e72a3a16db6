"""The exporter on hand-built audit results: render, parse back, check every family.

No kernel: results are built by hand or by ``audit()`` over a fake ``KernelSource``.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Collection
from dataclasses import replace
from typing import Any

from helpers import FakeKernel, make_sock, sysctls
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from auditd import __version__
from auditd.audit.run import IDLE_BUCKETS, AuditResult, NamespaceReport, audit, count_findings
from auditd.config import Match, Rule, RuleSet
from auditd.exporter import ExporterState, make_registry
from auditd.model import (
    Counters,
    Finding,
    FindingKind,
    Keepalive,
    ProcessInfo,
    Severity,
    Sock,
    Sysctls,
    TcpState,
    TimerKind,
)

Labels = frozenset[tuple[str, str]]

# Written out rather than imported: a change to these sets must show up here.
KINDS = (
    "idle_no_keepalive",
    "keepalive_too_slow",
    "keepalive_probing",
    "retransmitting",
    "close_wait",
    "detection_budget",
    "sysctl",
    "user_timeout_too_short",
)
SEVERITIES = ("info", "warning", "critical")
PRESET_STATES = (
    "established",
    "syn_sent",
    "syn_recv",
    "fin_wait1",
    "fin_wait2",
    "close_wait",
    "last_ack",
    "closing",
)
ERROR_STAGES = (
    "dump", "sysctls", "counters", "attribution", "netns", "config", "http", "log", "internal",
)  # fmt: skip
LABEL_NAMES = {"netns", "kind", "severity", "rule", "state", "keepalive", "case", "stage"}
LABEL_NAMES |= {"version"}  # keepalive_build_info
LABEL_NAMES |= {"sysctl"}  # keepalive_sysctl_differs_from_host: a known sysctl name

RULES = RuleSet(
    rules=(
        Rule("postgres", Match(remote_ports=frozenset({5432})), severity=Severity.CRITICAL),
        Rule("ssh", Match(local_ports=frozenset({22})), ignore=True),
        Rule("redis", Match(remote_ports=frozenset({6379}))),
    ),
    source="rules.yaml",
)
SYSCTLS = Sysctls(
    {
        "net.ipv4.tcp_keepalive_time": 7200,
        "net.ipv4.tcp_keepalive_intvl": 75,
        "net.ipv4.tcp_keepalive_probes": 9,
        "net.ipv4.tcp_retries2": 15,
        "net.netfilter.nf_conntrack_tcp_timeout_established": 432000,
    }
)
HOST_INODE = 4026531840


def render(state: ExporterState) -> dict[str, Metric]:
    text = generate_latest(make_registry(lambda: state)).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def values(family: Metric, suffix: str = "") -> dict[Labels, float]:
    """Sample values of one family by label set; ``suffix`` picks ``_bucket``, ``_sum``..."""
    name = family.name + suffix
    return {frozenset(s.labels.items()): s.value for s in family.samples if s.name == name}


def key(**labels: str) -> Labels:
    return frozenset(labels.items())


def finding(kind: str, severity: Severity, rule: str, **extra: object) -> Finding:
    return Finding(kind, severity, rule, "host", message="m", hint="h", **extra)  # type: ignore[arg-type]


def namespace(netns: str = "host", findings: tuple[Finding, ...] = ()) -> NamespaceReport:
    off = [0] * (len(IDLE_BUCKETS) + 1)
    off[0], off[2], off[-1] = 2, 1, 1  # two under 10 s, one in (60, 240], one over 7200
    on = [0] * (len(IDLE_BUCKETS) + 1)
    on[5] = 1
    return NamespaceReport(
        netns=netns,
        inode=HOST_INODE,
        sysctls=SYSCTLS,
        counters=Counters(keepalive_probes=12, abort_on_timeout=3),
        detection_idle_seconds=7875.0,
        detection_in_flight_seconds=924.6,
        connections={
            ("established", "off"): 4,
            ("established", "on"): 1,
            ("close_wait", "unknown"): 2,
            ("time_wait", "unknown"): 5,  # outside the preset states: shown because seen
        },
        sockets=12,
        idle_histogram={"off": off, "on": on},
        idle_sum={"off": 7300.5, "on": 700.0},
        finding_counts=count_findings(findings),
    )


FINDINGS = (
    finding(
        "idle_no_keepalive", Severity.CRITICAL, "postgres", local="10.0.0.1:40001",
        remote="10.0.0.2:5432", inode=91001, pid=4242,
    ),
    finding(
        "idle_no_keepalive", Severity.CRITICAL, "postgres", local="10.0.0.1:40002",
        remote="10.0.0.2:5432", inode=91002,
    ),
    finding("close_wait", Severity.WARNING, "default", local="[2001:db8::1]:8080", inode=91003),
    finding("sysctl", Severity.WARNING, "default", sysctl="net.ipv4.tcp_keepalive_time"),
)  # fmt: skip

RESULT = AuditResult(
    generated_at=1_700_000_000.0,
    duration_seconds=0.25,
    namespaces=(namespace(findings=FINDINGS),),
    findings=FINDINGS,
)
STATE = ExporterState(
    result=RESULT,
    rules=RULES,
    errors={"dump": 1},
    last_success=1_700_000_000.0,
    reload_ok=True,
    reload_success_time=1_699_999_000.0,
)


# --- findings ----------------------------------------------------------------------------


def test_findings_every_rule_kind_severity_present_and_counted() -> None:
    got = values(render(STATE)["keepalive_findings"])
    # The ignored rule "ssh" can have no findings, so it has no series.
    expected = {
        key(netns="host", kind=kind, severity=sev, rule=rule): 0.0
        for kind in KINDS
        for sev in SEVERITIES
        for rule in ("default", "postgres", "redis")
    }
    expected[key(netns="host", kind="idle_no_keepalive", severity="critical", rule="postgres")] = 2
    expected[key(netns="host", kind="close_wait", severity="warning", rule="default")] = 1
    expected[key(netns="host", kind="sysctl", severity="warning", rule="default")] = 1
    assert got == expected


def test_findings_counted_beyond_the_ones_described() -> None:
    # --audit.max-findings 1: the report describes one finding, the metric counts all 3000.
    counts = {("idle_no_keepalive", "warning", "default"): 3000}
    ns = replace(namespace(), finding_counts=counts)
    result = AuditResult(0.0, 0.1, (ns,), FINDINGS[:1], findings_omitted=2999)
    got = values(render(ExporterState(result=result, rules=RULES))["keepalive_findings"])
    assert (
        got[key(netns="host", kind="idle_no_keepalive", severity="warning", rule="default")] == 3000
    )
    assert sum(got.values()) == 3000


def test_findings_of_a_rule_no_longer_configured_still_counted() -> None:
    # After a reload renames a rule, the last result still carries the old name.
    state = ExporterState(result=RESULT, rules=RuleSet())
    got = values(render(state)["keepalive_findings"])
    assert got[key(netns="host", kind="idle_no_keepalive", severity="critical", rule="postgres")]
    assert {dict(k)["rule"] for k in got} == {"default", "postgres"}


def test_findings_series_per_namespace() -> None:
    result = AuditResult(0.0, 0.1, (namespace("host", FINDINGS), namespace("kaud-1")), FINDINGS)
    got = values(render(ExporterState(result=result, rules=RULES))["keepalive_findings"])
    per_ns = {ns: sum(1 for k in got if dict(k)["netns"] == ns) for ns in ("host", "kaud-1")}
    assert per_ns == {"host": len(KINDS) * 3 * 3, "kaud-1": len(KINDS) * 3 * 3}
    assert sum(v for k, v in got.items() if dict(k)["netns"] == "kaud-1") == 0


# --- per-namespace families ----------------------------------------------------------------


def test_sysctls_detection_and_counters() -> None:
    families = render(STATE)
    host = key(netns="host")
    assert values(families["keepalive_sysctl_tcp_keepalive_time_seconds"]) == {host: 7200}
    assert values(families["keepalive_sysctl_tcp_keepalive_intvl_seconds"]) == {host: 75}
    assert values(families["keepalive_sysctl_tcp_keepalive_probes"]) == {host: 9}
    assert values(families["keepalive_sysctl_tcp_retries2"]) == {host: 15}
    conntrack = families["keepalive_sysctl_nf_conntrack_tcp_timeout_established_seconds"]
    assert values(conntrack) == {host: 432000}
    assert values(families["keepalive_dead_peer_detection_seconds"]) == {
        key(netns="host", case="idle"): 7875.0,
        key(netns="host", case="in_flight"): 924.6,
    }
    probes = families["keepalive_kernel_keepalive_probes"]
    aborts = families["keepalive_kernel_abort_on_timeout"]
    assert (probes.type, aborts.type) == ("counter", "counter")
    assert values(probes, "_total") == {host: 12}
    assert values(aborts, "_total") == {host: 3}


def test_sysctl_or_counter_missing_in_the_kernel_leaves_no_series() -> None:
    bare = replace(
        namespace(), sysctls=Sysctls({"net.ipv4.tcp_keepalive_time": 7200}), counters=Counters()
    )
    families = render(ExporterState(result=AuditResult(0.0, 0.1, (bare,), ())))
    assert values(families["keepalive_sysctl_tcp_keepalive_time_seconds"])
    assert not values(families["keepalive_sysctl_nf_conntrack_tcp_timeout_established_seconds"])
    assert not values(families["keepalive_kernel_keepalive_probes"], "_total")


def test_tcp_connections_preset_zeros() -> None:
    got = values(render(STATE)["keepalive_tcp_connections"])
    expected = {
        key(netns="host", state=state, keepalive=ka): 0.0
        for state in (*PRESET_STATES, "time_wait")
        for ka in ("on", "off", "unknown")
    }
    expected[key(netns="host", state="established", keepalive="off")] = 4
    expected[key(netns="host", state="established", keepalive="on")] = 1
    expected[key(netns="host", state="close_wait", keepalive="unknown")] = 2
    expected[key(netns="host", state="time_wait", keepalive="unknown")] = 5
    assert got == expected


def check_histogram(family: Metric) -> dict[str, tuple[list[float], float, float]]:
    """Per keepalive status: cumulative bucket counts, _count, _sum; asserts the invariants."""
    assert family.type == "histogram"
    bounds = [f"{b:g}" for b in IDLE_BUCKETS]
    out = {}
    counts = values(family, "_count")
    sums = values(family, "_sum")
    for ka in ("on", "off", "unknown"):
        labels = {"netns": "host", "keepalive": ka}
        buckets = {
            s.labels["le"]: s.value
            for s in family.samples
            if s.name == family.name + "_bucket"
            and {k: v for k, v in s.labels.items() if k != "le"} == labels
        }
        assert list(buckets) == [*bounds, "+Inf"]
        series = list(buckets.values())
        assert series == sorted(series), f"{ka}: buckets not cumulative: {series}"
        count = counts[frozenset(labels.items())]
        assert series[-1] == count
        out[ka] = (series, count, sums[frozenset(labels.items())])
    return out


def test_idle_histogram_cumulative() -> None:
    got = check_histogram(render(STATE)["keepalive_connection_idle_seconds"])
    assert got["off"] == ([2, 2, 3, 3, 3, 3, 3, 3, 3, 4], 4, 7300.5)
    assert got["on"] == ([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], 1, 700.0)
    assert got["unknown"] == ([0] * 10, 0, 0.0)


def test_help_texts() -> None:
    families = render(STATE)
    for family in families.values():
        if any("netns" in s.labels for s in family.samples):
            assert "As of the last audit" in family.documentation, family.name
    for name, sysctl in (
        ("keepalive_sysctl_tcp_keepalive_time_seconds", "net.ipv4.tcp_keepalive_time"),
        ("keepalive_sysctl_tcp_keepalive_intvl_seconds", "net.ipv4.tcp_keepalive_intvl"),
        ("keepalive_sysctl_tcp_keepalive_probes", "net.ipv4.tcp_keepalive_probes"),
        ("keepalive_sysctl_tcp_retries2", "net.ipv4.tcp_retries2"),
    ):
        assert sysctl in families[name].documentation


def label_leaks(families: Collection[Metric], ports: set[int], inodes: set[int]) -> list[str]:
    """Label names outside the known set, and label values that look like an address,
    a port or an inode of the audited sockets."""
    leaks = []
    for family in families:
        for s in family.samples:
            for name, value in s.labels.items():
                if name == "le":
                    continue
                if name not in LABEL_NAMES:
                    leaks.append(f"{s.name}: label {name}")
                host, _, port = value.rpartition(":")
                for text in (value, host.strip("[]")):
                    try:
                        ipaddress.ip_address(text)
                        leaks.append(f"{s.name}: {name}={value}")
                    except ValueError:
                        pass
                numbers = {value, port}
                if any(n.isdigit() and int(n) in ports | inodes for n in numbers):
                    leaks.append(f"{s.name}: {name}={value}")
    return leaks


def test_no_label_carries_an_address_port_or_inode() -> None:
    families = render(STATE).values()
    assert label_leaks(families, {40001, 40002, 5432, 8080}, {91001, 91002, 91003, 4242}) == []
    assert label_leaks(families, set(), {HOST_INODE}) == []


# --- audit metadata ------------------------------------------------------------------------


def test_metadata_with_a_result() -> None:
    families = render(STATE)
    assert values(families["keepalive_build_info"]) == {key(version=__version__): 1}
    assert values(families["keepalive_audit_duration_seconds"]) == {key(): 0.25}
    last = families["keepalive_audit_last_success_timestamp_seconds"]
    assert values(last) == {key(): 1_700_000_000.0}
    errors = families["keepalive_audit_errors"]
    assert errors.type == "counter"
    assert values(errors, "_total") == {
        key(stage=s): (1.0 if s == "dump" else 0.0) for s in ERROR_STAGES
    }
    assert values(families["keepalive_config_last_reload_successful"]) == {key(): 1}
    reloaded = families["keepalive_config_last_reload_success_timestamp_seconds"]
    assert values(reloaded) == {key(): 1_699_999_000.0}


def test_before_the_first_audit() -> None:
    families = render(ExporterState())
    assert values(families["keepalive_build_info"]) == {key(version=__version__): 1}
    assert values(families["keepalive_audit_errors"], "_total") == {
        key(stage=s): 0.0 for s in ERROR_STAGES
    }
    assert values(families["keepalive_config_last_reload_successful"]) == {key(): 1}
    assert "keepalive_config_last_reload_success_timestamp_seconds" in families
    # Nothing measured yet: no value rather than a misleading 0.
    assert not values(families["keepalive_audit_last_success_timestamp_seconds"])
    assert not values(families["keepalive_audit_duration_seconds"])
    assert "keepalive_findings" not in families
    assert "keepalive_tcp_connections" not in families
    assert not [n for n in families if n.startswith("keepalive_sysctl_")]


def test_failed_reload_and_unknown_error_stage() -> None:
    state = ExporterState(errors={"config": 2, "future_stage": 1}, reload_ok=False)
    families = render(state)
    assert values(families["keepalive_config_last_reload_successful"]) == {key(): 0}
    errors = values(families["keepalive_audit_errors"], "_total")
    assert errors[key(stage="config")] == 2
    assert errors[key(stage="future_stage")] == 1
    assert set(errors) == {key(stage=s) for s in (*ERROR_STAGES, "future_stage")}


def test_render_is_stateless() -> None:
    registry = make_registry(lambda: STATE)
    assert generate_latest(registry) == generate_latest(registry)


# --- through audit() with a fake kernel ----------------------------------------------------


def sock(idle_s: float, sport: int, dport: int = 80, **fields: Any) -> Sock:
    return make_sock(idle_s=idle_s, sport=sport, dport=dport, inode=sport + 500000, **fields)


def fake_socks() -> list[Sock]:
    return [
        sock(5, 41001),
        sock(100, 41002),
        sock(8000, 41003),  # past the 350 s default idle timeout: critical, rule default
        sock(400, 41004, dport=5432),  # critical under the postgres rule
        sock(200, 41005, dport=6379),  # past warn_at (175 s): warning under redis
        sock(1, 41006, timer=TimerKind.KEEPALIVE, expires_ms=59000),
        sock(0, 41007, state=TcpState.CLOSE_WAIT, timer=TimerKind.KEEPALIVE, expires_ms=59000),
        sock(0, 41008, state=TcpState.TIME_WAIT, has_info=False),
    ]


def test_audit_of_a_fake_kernel() -> None:
    socks = fake_socks()
    # Short timers: no detection_budget findings to count around.
    short = sysctls(tcp_keepalive_time=60, tcp_keepalive_intvl=10, tcp_keepalive_probes=3,
                    tcp_retries2=8)  # fmt: skip
    owners = {s.inode: ProcessInfo(pid=4000 + i, name="app") for i, s in enumerate(socks)}
    kernel = FakeKernel(socks, owners, short, Counters(keepalive_probes=7), HOST_INODE)
    result = audit(RULES, [("host", kernel)], clock=lambda: 1_700_000_000.0)
    families = render(ExporterState(result=result, rules=RULES, last_success=1_700_000_000.0))

    found = values(families["keepalive_findings"])
    nonzero = {k: v for k, v in found.items() if v}
    assert nonzero == {
        key(netns="host", kind="idle_no_keepalive", severity="critical", rule="default"): 1,
        key(netns="host", kind="idle_no_keepalive", severity="critical", rule="postgres"): 1,
        key(netns="host", kind="idle_no_keepalive", severity="warning", rule="redis"): 1,
    }
    assert len(found) == len(KINDS) * len(SEVERITIES) * 3

    conns = values(families["keepalive_tcp_connections"])
    assert conns[key(netns="host", state="established", keepalive="off")] == 5
    assert conns[key(netns="host", state="established", keepalive="on")] == 1
    assert conns[key(netns="host", state="close_wait", keepalive="on")] == 1
    assert conns[key(netns="host", state="time_wait", keepalive="unknown")] == 1
    assert sum(conns.values()) == len(socks)

    hist = check_histogram(families["keepalive_connection_idle_seconds"])
    # off: 5 | 100 200 | 400 | 8000 -> le 10: 1, 60: 1, 240: 3, 350: 3, 600: 4, ..., 7200: 4
    assert hist["off"] == ([1, 1, 3, 3, 4, 4, 4, 4, 4, 5], 5, 8705.0)
    assert hist["on"] == ([1] * 10, 1, 1.0)
    assert math.isclose(hist["unknown"][2], 0.0)

    probes = values(families["keepalive_kernel_keepalive_probes"], "_total")
    assert probes == {key(netns="host"): 7}
    ports = {s.sport for s in socks} | {80, 5432, 6379}
    inodes = {s.inode for s in socks} | {HOST_INODE}
    assert label_leaks(families.values(), ports, inodes) == []


def test_written_out_sets_match_the_model() -> None:
    assert set(KINDS) == set(FindingKind.ALL)
    assert set(SEVERITIES) == {s.label for s in Severity}
    assert set(Keepalive.ALL) == {"on", "off", "unknown"}


def test_the_leak_check_catches_leaks() -> None:
    leaky = Metric("keepalive_x", "x", "gauge")
    leaky.add_sample("keepalive_x", {"netns": "10.0.0.1:40001"}, 1)
    leaky.add_sample("keepalive_x", {"netns": "[2001:db8::1]:80"}, 1)
    leaky.add_sample("keepalive_x", {"socket": "a"}, 1)
    leaky.add_sample("keepalive_x", {"rule": "91001"}, 1)
    assert len(label_leaks([leaky], {40001}, {91001})) == 5
