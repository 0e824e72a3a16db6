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
from auditd.audit.run import audit
from auditd.audit.tally import IDLE_BUCKETS
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
from auditd.results import AuditResult, NamespaceReport, count_findings

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
LABEL_NAMES |= {"part"}  # keepalive_namespace_read_incomplete

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


def test_findings_nonzero_counts_and_the_hosts_default_zeros() -> None:
    got = values(render(STATE)["keepalive_findings"])
    # Rules cost series only where they have findings: postgres has 2, redis and ssh none.
    expected = {
        key(netns="host", kind=kind, severity=sev, rule="default"): 0.0
        for kind in KINDS
        for sev in SEVERITIES
    }
    expected[key(netns="host", kind="idle_no_keepalive", severity="critical", rule="postgres")] = 2
    expected[key(netns="host", kind="close_wait", severity="warning", rule="default")] = 1
    expected[key(netns="host", kind="sysctl", severity="warning", rule="default")] = 1
    assert got == expected


def test_findings_series_stay_bounded_with_thousands_of_rules() -> None:
    many = RuleSet(
        rules=tuple(Rule(f"r{i}", Match(remote_ports=frozenset({10000 + i}))) for i in range(5000))
    )
    hit = finding("idle_no_keepalive", Severity.WARNING, "r4321")
    ns = namespace(findings=(hit,))
    state = ExporterState(result=AuditResult(0.0, 0.1, (ns,), (hit,)), rules=many)
    got = values(render(state)["keepalive_findings"])
    assert len(got) == len(KINDS) * len(SEVERITIES) + 1
    assert got[key(netns="host", kind="idle_no_keepalive", severity="warning", rule="r4321")] == 1
    assert values(render(state)["keepalive_config_rules"]) == {key(): 5000}


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
    other = (finding("sysctl", Severity.WARNING, "default"),)
    namespaces = (namespace("host", FINDINGS), namespace("kaud-1"), namespace("kaud-2", other))
    result = AuditResult(0.0, 0.1, namespaces, FINDINGS + other)
    got = values(render(ExporterState(result=result, rules=RULES))["keepalive_findings"])
    per_ns = {
        n: {k: v for k, v in got.items() if dict(k)["netns"] == n} for n in ("kaud-1", "kaud-2")
    }
    assert sum(1 for k in got if dict(k)["netns"] == "host") == len(KINDS) * 3 + 1
    assert per_ns == {
        "kaud-1": {},  # nothing wrong: no series at all
        "kaud-2": {key(netns="kaud-2", kind="sysctl", severity="warning", rule="default"): 1},
    }


# --- other namespaces: only what is wrong or different ---------------------------------------

PER_NAMESPACE = (
    "keepalive_sysctl_tcp_keepalive_time_seconds",
    "keepalive_sysctl_tcp_keepalive_intvl_seconds",
    "keepalive_sysctl_tcp_keepalive_probes",
    "keepalive_sysctl_tcp_retries2",
    "keepalive_sysctl_nf_conntrack_tcp_timeout_established_seconds",
    "keepalive_dead_peer_detection_seconds",
    "keepalive_tcp_connections",
    "keepalive_kernel_keepalive_probes",
    "keepalive_kernel_abort_on_timeout",
    "keepalive_connection_idle_seconds",
    "keepalive_sysctl_differs_from_host",
    "keepalive_namespace_read_incomplete",
    "keepalive_findings",
)


def quiet(netns: str, **changes: Any) -> NamespaceReport:
    """A namespace with nothing in it and the host's sysctls, as a fresh empty netns is."""
    base = NamespaceReport(
        netns=netns, inode=4026532000, sysctls=SYSCTLS,
        counters=Counters(keepalive_probes=0, abort_on_timeout=0),
        detection_idle_seconds=7875.0, detection_in_flight_seconds=924.6,
        connections={}, sockets=0,
    )  # fmt: skip
    return replace(base, **changes)


def samples_of(state: ExporterState, netns: str) -> dict[str, dict[Labels, float]]:
    """Per family (sample names, so _bucket and _total included), the samples of ``netns``."""
    out: dict[str, dict[Labels, float]] = {}
    for family in render(state).values():
        for s in family.samples:
            if s.labels.get("netns") == netns:
                out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def test_a_namespace_with_nothing_wrong_or_different_costs_no_series() -> None:
    result = AuditResult(0.0, 0.1, (namespace(), *(quiet(f"ns{i}") for i in range(100))), ())
    state = ExporterState(result=result, rules=RULES)
    assert samples_of(state, "ns7") == {}
    total = sum(len(f.samples) for f in render(state).values())
    alone = replace(state, result=replace(result, namespaces=result.namespaces[:1]))
    assert total == sum(len(f.samples) for f in render(alone).values())
    assert set(PER_NAMESPACE) <= set(render(state))  # the host has them all


def test_a_namespace_costs_series_for_what_differs_from_the_host() -> None:
    # Its sockets and keepalive probes are not news (the host's only); its sysctl and an
    # abort on timeout are.
    tuned = Sysctls({**SYSCTLS.values, "net.ipv4.tcp_keepalive_time": 300})
    ns = quiet(
        "pod:a", sysctls=tuned, detection_idle_seconds=975.0,
        differs_from_host=("net.ipv4.tcp_keepalive_time",),
        connections={("established", "off"): 2, ("established", "on"): 0},
        counters=Counters(keepalive_probes=12, abort_on_timeout=4),
    )  # fmt: skip
    state = ExporterState(result=AuditResult(0.0, 0.1, (namespace(), ns), ()))
    pod = key(netns="pod:a")
    assert samples_of(state, "pod:a") == {
        "keepalive_sysctl_tcp_keepalive_time_seconds": {pod: 300},
        "keepalive_dead_peer_detection_seconds": {key(netns="pod:a", case="idle"): 975.0},
        "keepalive_kernel_abort_on_timeout_total": {pod: 4},
        "keepalive_sysctl_differs_from_host": {
            key(netns="pod:a", sysctl="net.ipv4.tcp_keepalive_time"): 1
        },
    }


def test_a_namespace_costs_series_for_what_could_not_be_read() -> None:
    partial = quiet(
        "pod:b", sysctls=Sysctls({"net.ipv4.tcp_keepalive_time": 7200}), counters=Counters(),
        dump_interrupted=True, attribution_complete=False,
    )  # fmt: skip
    state = ExporterState(result=AuditResult(0.0, 0.1, (namespace(), partial), ()))
    got = samples_of(state, "pod:b")
    assert got == {
        "keepalive_namespace_read_incomplete": {
            key(netns="pod:b", part=part): 1
            for part in ("attribution", "counters", "dump", "sysctls")
        }
    }
    host = values(render(state)["keepalive_namespace_read_incomplete"])
    assert {k: v for k, v in host.items() if dict(k)["netns"] == "host"} == {
        key(netns="host", part=p): 0 for p in ("attribution", "counters", "dump", "sysctls")
    }


def test_without_a_host_every_namespace_shows_its_sysctls() -> None:
    # The host's read failed: nothing to compare with, so "absent = as on the host" cannot hold.
    state = ExporterState(result=AuditResult(0.0, 0.1, (quiet("pod:a"), quiet("pod:b")), ()))
    got = values(render(state)["keepalive_sysctl_tcp_retries2"])
    assert got == {key(netns="pod:a"): 15, key(netns="pod:b"): 15}
    assert not values(render(state)["keepalive_connection_idle_seconds"], "_count")


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
    assert len(found) == len(KINDS) * len(SEVERITIES) + 2  # default's zeros, postgres, redis

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
