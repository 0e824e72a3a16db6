"""README.md's ``## Metrics`` table against what the exporter really exposes.

The table has one row per metric: the name in backticks, the type (gauge, counter,
histogram, info), the labels (backticked, comma-separated, or "none"), then free text.
Counters are named with ``_total`` and histograms by their base name, as users query them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from auditd.abort_metrics import AbortCollector
from auditd.audit.tally import IDLE_BUCKETS
from auditd.config import Match, Rule, RuleSet
from auditd.events import AbortState
from auditd.exporter import ExporterState, make_registry
from auditd.model import Counters, Finding, Severity, Sysctls
from auditd.results import AuditResult, NamespaceReport, count_findings

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "## Metrics"


@dataclass(frozen=True)
class Row:
    type: str
    labels: frozenset[str]


def table_rows(markdown: str, heading: str = HEADING) -> dict[str, Row]:
    """Metric name -> row, from the first table under ``heading`` (up to the next heading)."""
    lines = markdown.splitlines()
    assert heading in lines, f"README.md has no {heading!r} section"
    section = []
    for line in lines[lines.index(heading) + 1 :]:
        if line.startswith("#"):
            break
        section.append(line)
    table = [line.strip() for line in section if line.strip().startswith("|")]
    assert len(table) > 2, f"no table under {heading!r}"
    rows: dict[str, Row] = {}
    for line in table[2:]:  # after the header and the |---| separator
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) >= 3, f"row with fewer than 3 cells: {line}"
        name = re.fullmatch(r"`([a-z_:][a-z0-9_:]*)`", cells[0])
        assert name is not None, f"first cell is not a backticked metric name: {line}"
        assert name.group(1) not in rows, f"listed twice: {name.group(1)}"
        labels = (
            frozenset() if cells[2] == "none" else frozenset(re.findall(r"`([^`]+)`", cells[2]))
        )
        assert cells[2] == "none" or labels, f"labels cell is neither backticked nor none: {line}"
        rows[name.group(1)] = Row(cells[1].lower(), labels)
    return rows


def full_state() -> ExporterState:
    """The host with every sysctl and counter, one finding, and a namespace that differs:
    every family has samples."""
    buckets = [0] * (len(IDLE_BUCKETS) + 1)
    buckets[1] = 1
    found = Finding(
        "idle_no_keepalive", Severity.CRITICAL, "postgres", "host", "idle", "set keepalive",
        local="10.0.0.1:40000", remote="10.0.0.2:5432",
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
    aborts = AbortState(
        {("host", "peer_reset", "postgres", "true"): 1}, 0, ("host",), ("postgres",)
    )
    registry.register(AbortCollector(lambda: aborts))  # the agent adds it (auditd.daemon)
    text = generate_latest(registry).decode()
    out: dict[str, Row] = {}
    for family in text_string_to_metric_families(text):
        assert family.samples, f"{family.name}: no samples, so its labels cannot be checked"
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        out[name] = Row(family.type, labels)
    return out


def test_the_table_lists_every_metric_and_only_those() -> None:
    documented = table_rows(README.read_text(encoding="utf-8"))
    real = exposed()
    assert sorted(set(real) - set(documented)) == [], "exposed but not in README.md"
    assert sorted(set(documented) - set(real)) == [], "in README.md but not exposed"


def test_the_table_has_the_right_types_and_labels() -> None:
    documented = table_rows(README.read_text(encoding="utf-8"))
    real = exposed()
    wrong = {
        name: {"README": documented[name], "exposed": row}
        for name, row in real.items()
        if name in documented and documented[name] != row
    }
    assert wrong == {}


def test_table_parser() -> None:
    text = "\n".join(
        [
            "## Metrics",
            "",
            "Some words.",
            "",
            "| metric | type | labels | meaning |",
            "|---|---|---|---|",
            "| `a_total` | counter | `x`, `y` | text with | a pipe |",
            "| `b` | Gauge | none | |",
            "",
            "## Next",
            "| `c` | gauge | none | not in the section |",
        ]
    )
    assert table_rows(text) == {
        "a_total": Row("counter", frozenset({"x", "y"})),
        "b": Row("gauge", frozenset()),
    }
