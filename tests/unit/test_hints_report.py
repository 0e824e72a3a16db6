"""report (JSON schema, table, explain) over a fake audit, and the remediation hints."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeKernel, make_sock, ruleset, sysctls

from auditd import report
from auditd.audit import hints
from auditd.audit.run import audit
from auditd.config import RuleSet, SysctlBound, Thresholds
from auditd.model import ProcessInfo, TcpState
from auditd.results import AuditResult
from auditd.session import AuditSession

# --- the JSON schema, version 1 ---------------------------------------------------------------
# As documented in README.md ("JSON output"); test_json_keys_match_the_readme checks the two
# agree. Removing or renaming a key bumps SCHEMA_VERSION (report.py).

TOP_KEYS = {"schema_version", "generated_at", "duration_seconds", "namespaces", "findings",
            "skipped_namespaces", "findings_total", "findings_omitted"}  # fmt: skip
NAMESPACE_KEYS = {
    "netns", "inode", "sysctls", "differs_from_host", "detection", "sockets", "counters", "dump",
    "attribution", "inspection", "finding_counts", "source", "source_note",
}  # fmt: skip
FINDING_COUNT_KEYS = {"kind", "severity", "rule", "count"}
ATTRIBUTION_KEYS = {"wanted", "found", "complete"}
DETECTION_KEYS = {"idle_seconds", "in_flight_seconds"}
SOCKETS_KEYS = {"total", "by_state", "by_keepalive", "by_state_and_keepalive"}
COUNTERS_KEYS = {"keepalive_probes", "abort_on_timeout", "timeouts", "retrans_segs"}
DUMP_KEYS = {"messages", "skipped", "interrupted"}
FINDING_KEYS = {
    "kind", "severity", "rule", "netns", "state", "local", "remote", "idle_seconds",
    "keepalive", "probes", "retransmits", "abort_in_seconds", "pid", "process", "message",
    "hint", "sysctl", "value", "expected", "inode", "case", "cmdline", "unit", "container",
    "keepalive_idle_seconds", "keepalive_interval_seconds", "keepalive_count", "user_timeout_ms",
    "options_source",
    "uid", "user", "started_at",
}  # fmt: skip

GENERATED_AT = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z

OWNERS = {
    101: ProcessInfo(4101, "postgres", "postgres: main"),
    102: ProcessInfo(4102, "redis-server", "redis-server *:6379"),
    103: ProcessInfo(4103, "java", "java -jar app.jar"),
    104: ProcessInfo(4104, "nginx", "nginx: worker process"),
}
SOCKS = [
    make_sock(inode=102, idle_s=200, dport=6379),  # idle, warning
    make_sock(inode=101, idle_s=1000, dport=5432),  # idle, critical
    make_sock(inode=103, idle_s=400, src="2001:db8::1", dst="2001:db8::2", sport=8080,
              dport=51000),  # idle over IPv6, critical
    make_sock(inode=104, state=TcpState.CLOSE_WAIT, idle_s=120, sport=443),  # warning
    make_sock(inode=105, timer=1, retrans=3, backoff=3, rto_us=1_600_000, expires_ms=800,
              unacked=2),  # retransmitting, warning, owner unknown
    make_sock(inode=106, timer=2, expires_ms=200_000, idle_s=10),  # fine
    make_sock(inode=107, idle_s=1),  # fine
]  # fmt: skip
RULES = ruleset(sysctls=[SysctlBound("net.ipv4.tcp_keepalive_time", max=300)])


def run_audit(socks: list[Any] = SOCKS) -> AuditResult:
    ticks = iter([10.0, 10.5])
    kernel = FakeKernel(socks, owners=OWNERS)
    return audit(RULES, [("host", kernel)], clock=lambda: GENERATED_AT, timer=lambda: next(ticks))


@pytest.fixture(scope="module")
def result() -> AuditResult:
    return run_audit()


@pytest.fixture(scope="module")
def doc(result: AuditResult) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(report.to_json(result))
    return data


def test_json_top_level(doc: dict[str, Any]) -> None:
    assert set(doc) == TOP_KEYS
    assert doc["schema_version"] == 1
    assert doc["generated_at"] == "2023-11-14T22:13:20.250Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["generated_at"])
    assert doc["duration_seconds"] == 0.5


def test_json_namespace(doc: dict[str, Any]) -> None:
    (ns,) = doc["namespaces"]
    assert set(ns) == NAMESPACE_KEYS
    assert ns["netns"] == "host" and ns["inode"] == 4026531840
    assert ns["source"] == "sock_diag" and ns["source_note"] is None  # no kernel pass asked
    assert ns["sysctls"]["net.ipv4.tcp_keepalive_time"] == 7200
    assert set(ns["detection"]) == DETECTION_KEYS
    assert ns["detection"] == {"idle_seconds": 7875, "in_flight_seconds": pytest.approx(924.6)}
    assert set(ns["sockets"]) == SOCKETS_KEYS
    assert ns["sockets"]["total"] == len(SOCKS)
    assert ns["sockets"]["by_state"] == {"established": 6, "close_wait": 1}
    assert ns["sockets"]["by_keepalive"] == {"on": 1, "off": 5, "unknown": 1}
    assert ns["sockets"]["by_state_and_keepalive"]["close_wait"] == {
        "on": 0, "off": 1, "unknown": 0,
    }  # fmt: skip
    assert set(ns["counters"]) == COUNTERS_KEYS
    assert set(ns["dump"]) == DUMP_KEYS
    assert ns["dump"]["interrupted"] is False
    assert set(ns["attribution"]) == ATTRIBUTION_KEYS


def test_json_findings(doc: dict[str, Any]) -> None:
    findings = doc["findings"]
    for f in findings:
        assert set(f) == FINDING_KEYS, f["kind"]
        assert f["severity"] in ("info", "warning", "critical")
        assert f["message"] and f["hint"]
    by_inode = {f["inode"]: f for f in findings if f["inode"] is not None}
    assert set(by_inode) == {101, 102, 103, 104, 105}

    pg = by_inode[101]
    assert {k: pg[k] for k in ("kind", "severity", "rule", "netns", "state", "keepalive")} == {
        "kind": "idle_no_keepalive", "severity": "critical", "rule": "default",
        "netns": "host", "state": "established", "keepalive": "off",
    }  # fmt: skip
    assert (pg["local"], pg["remote"]) == ("10.0.0.1:40000", "10.0.0.2:5432")
    assert (pg["idle_seconds"], pg["pid"], pg["process"]) == (1000.0, 4101, "postgres")
    assert (pg["sysctl"], pg["value"], pg["expected"], pg["abort_in_seconds"]) == (
        None, None, None, None,
    )  # fmt: skip

    v6 = by_inode[103]
    assert (v6["local"], v6["remote"]) == ("[2001:db8::1]:8080", "[2001:db8::2]:51000")

    retx = by_inode[105]
    assert (retx["kind"], retx["retransmits"], retx["pid"], retx["process"]) == (
        "retransmitting", 3, None, None,
    )  # fmt: skip
    assert retx["abort_in_seconds"] > 0

    (sysctl,) = [f for f in findings if f["kind"] == "sysctl"]
    assert (sysctl["sysctl"], sysctl["value"], sysctl["expected"]) == (
        "net.ipv4.tcp_keepalive_time", 7200, "<= 300",
    )  # fmt: skip
    assert sysctl["local"] is None and sysctl["state"] is None

    budget = [f for f in findings if f["kind"] == "detection_budget"]
    assert sorted((f["case"], f["value"], f["expected"]) for f in budget) == [
        ("idle", 7875, "<= 900"), ("in_flight", 924.6, "<= 900"),
    ]  # fmt: skip


def test_json_findings_worst_first(doc: dict[str, Any]) -> None:
    rank = {"critical": 3, "warning": 2, "info": 1}
    severities = [rank[f["severity"]] for f in doc["findings"]]
    assert severities == sorted(severities, reverse=True)
    assert [f["inode"] for f in doc["findings"][:2]] == [101, 103]  # then by longest idle


def _readme_example() -> dict[str, Any]:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = text.split("## JSON output", 1)[1]
    block = section.split("```json\n", 1)[1].split("```", 1)[0]
    data: dict[str, Any] = json.loads(block)
    return data


def test_json_keys_match_the_readme(doc: dict[str, Any]) -> None:
    example = _readme_example()
    assert set(example) == set(doc) == TOP_KEYS
    (ns_doc,) = example["namespaces"]
    ns = doc["namespaces"][0]
    assert set(ns_doc) == set(ns) == NAMESPACE_KEYS
    for key, keys in (("detection", DETECTION_KEYS), ("sockets", SOCKETS_KEYS),
                      ("counters", COUNTERS_KEYS), ("dump", DUMP_KEYS),
                      ("attribution", ATTRIBUTION_KEYS)):  # fmt: skip
        assert set(ns_doc[key]) == set(ns[key]) == keys, key
    assert all(set(c) == FINDING_COUNT_KEYS for c in (*ns_doc["finding_counts"],
                                                       *ns["finding_counts"]))  # fmt: skip
    (finding_doc,) = example["findings"]
    assert set(finding_doc) == FINDING_KEYS
    assert all(set(f) == FINDING_KEYS for f in doc["findings"])


def test_rfc3339() -> None:
    assert report.rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert report.rfc3339(GENERATED_AT) == "2023-11-14T22:13:20.250Z"


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.split(" ", 1)[0] in report_sev]


report_sev = ("critical", "warning", "info")


def test_table(result: AuditResult) -> None:
    text = report.to_table(result)
    lines = text.splitlines()
    assert lines[0].startswith("netns host: 7 TCP sockets (keepalive on 1, off 5, unknown 1)")
    assert "7875 s idle, 924.6 s in flight" in lines[0]
    header = next(line for line in lines if line.startswith("SEVERITY"))
    assert header.split() == list(report.COLUMNS)
    rows = _table_rows(text)
    assert len(rows) == len(result.findings)
    severities = [row.split()[0] for row in rows]
    assert severities == sorted(severities, key=report_sev.index)  # worst first
    assert "postgres[4101]" in rows[0] and "java[4103]" in rows[1]
    for name in ("redis-server[4102]", "nginx[4104]"):
        assert any(name in row for row in rows), name
    assert any("[2001:db8::1]:8080" in row for row in rows)
    assert text.count("    why: ") == text.count("    fix: ") == len(result.findings)
    assert lines[-1] == (
        f"{len(result.findings)} findings: 2 critical, "
        f"{sum(f.severity.label == 'warning' for f in result.findings)} warning, 0 info"
    )


def test_table_sorts_worst_first_whatever_the_dump_order() -> None:
    rows = _table_rows(report.to_table(run_audit(list(reversed(SOCKS)))))
    assert "postgres[4101]" in rows[0] and "java[4103]" in rows[1]
    assert [r.split()[0] for r in rows] == sorted((r.split()[0] for r in rows),
                                                  key=report_sev.index)  # fmt: skip


def test_table_without_findings() -> None:
    quiet = audit(ruleset(), [("host", FakeKernel([], sysctls=sysctls(
        tcp_keepalive_time=300, tcp_keepalive_intvl=10, tcp_keepalive_probes=3, tcp_retries2=8,
    )))])  # fmt: skip
    assert quiet.findings == ()
    assert report.to_table(quiet).splitlines()[-1] == "no findings"


def explain(rules: RuleSet, kernel: FakeKernel) -> str:
    """explain as the CLI runs it: from the session's reading of the namespace's sysctls."""
    (ns,) = AuditSession(lambda _: [("host", kernel)]).namespace_sysctls()
    assert ns.sysctls is not None
    return report.explain(rules, ns.netns, ns.inode, ns.sysctls)


def test_explain() -> None:
    text = explain(RULES, FakeKernel(SOCKS))
    assert "7875" in text and "924.6" in text
    assert (
        "tcp_keepalive_time 7200 + tcp_keepalive_probes 9 × tcp_keepalive_intvl 75 = 7875 s" in text
    )
    assert "((2 << 9) - 1) × 0.2 s + (15 - 9) × 120 s = 924.6 s" in text
    assert "TOO SLOW" in text and "OVER BUDGET" in text


def test_explain_tuned_namespace() -> None:
    s = sysctls(tcp_keepalive_time=300, tcp_keepalive_intvl=10, tcp_keepalive_probes=3,
                tcp_retries2=8)  # fmt: skip
    text = explain(ruleset(), FakeKernel([], sysctls=s))
    assert "= 330 s" in text and "((2 << 8) - 1) × 0.2 s = 102.2 s" in text
    assert "TOO SLOW" not in text and "OVER BUDGET" not in text


def test_explain_local_middleboxes() -> None:
    plain = explain(RULES, FakeKernel([]))
    assert "  conntrack: not loaded\n  IPVS: no TCP virtual service\n" in plain
    s = sysctls(nf_conntrack_tcp_timeout_established=3600)
    s = replace(s, conntrack_entries=12, ipvs_tcp_timeout=900,
                ipvs_services=frozenset({(bytes(16), 80)}))  # fmt: skip
    text = explain(RULES, FakeKernel([], sysctls=s))
    assert (
        "  conntrack (12 flows tracked): established flows idle 3600 s "
        "(net.netfilter.nf_conntrack_tcp_timeout_established); a rule's idle_timeout above it "
        "is replaced by it\n"
    ) in text
    assert "  IPVS: TCP timeout 900 s for the 1 virtual services of this namespace" in text
    idle = replace(s, conntrack_entries=0, ipvs_services=frozenset())
    text = explain(RULES, FakeKernel([], sysctls=idle))
    assert "  conntrack: loaded, but tracks no flow in this namespace\n" in text


# --- hints ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("process", "expected"),
    [
        ("postgres", "PostgreSQL: tcp_keepalives_idle"),
        ("postmaster", "PostgreSQL"),
        ("redis-server", "Redis: tcp-keepalive"),
        ("nginx", "nginx: clients: listen ... so_keepalive="),
        ("sshd", "OpenSSH server: ClientAliveInterval"),
        ("ssh", "OpenSSH client: ServerAliveInterval"),
        ("java", "Java: socket.setKeepAlive(true)"),
        ("haproxy", "HAProxy"),
        ("grpc_server", "gRPC"),
        ("javac", "in the application: setsockopt SO_KEEPALIVE=1"),  # globs are exact
        ("mydaemon", "in the application: setsockopt SO_KEEPALIVE=1"),
        ("", "in the application"),
        (None, "in the application"),
    ],
)
def test_app_knob(process: str | None, expected: str) -> None:
    assert hints.app_knob(process).startswith(expected)


def test_generic_knob() -> None:
    assert hints.app_knob(None) == hints.GENERIC_KNOB
    assert "TCP_KEEPIDLE" in hints.GENERIC_KNOB and "libkeepalive" in hints.GENERIC_KNOB


@pytest.mark.parametrize(
    ("idle_timeout", "expected"),
    [
        (350, 280),  # AWS NLB: 80 % rounded down to 10 s
        (240, 190),  # Azure: 192 -> 190
        (1200, 960),
        (7200, 5760),
        (60, 40),  # ALB: 48 -> 40
        (59, 29),  # under a minute: half
        (10, 5),
        (1, 1),
        (0.5, 1),  # never below 1 s
    ],
)
def test_suggest_keepidle(idle_timeout: float, expected: int) -> None:
    assert hints.suggest_keepidle(idle_timeout) == expected
    assert expected < idle_timeout or idle_timeout <= 1


@pytest.mark.parametrize(
    ("idle_timeout", "budget", "expected"),
    [
        (350, 900, (280, 75, 5)),  # 280 + 5 * 75 = 655 <= 900
        (350, 300, (150, 30, 5)),  # half the budget for the first probe: 150 + 5 * 30 = 300
        (350, 100, (50, 16, 3)),  # budget below the idle timeout: 50 + 3 * 16 = 98 <= 100
        (60, 120, (40, 16, 5)),  # 120 - 40 = 80 s left for 5 probes: 40 + 5 * 16 = 120
    ],
)
def test_suggest_keepalive(
    idle_timeout: float, budget: float, expected: tuple[int, int, int]
) -> None:
    t = Thresholds(idle_timeout=idle_timeout, detection_budget=budget)
    idle, intvl, cnt = hints.suggest_keepalive(t)
    assert (idle, intvl, cnt) == expected
    assert idle < idle_timeout and idle + intvl * cnt <= budget


@pytest.mark.parametrize(
    ("budget", "rto_max_ms", "expected"),
    [
        (900, 120000, 14),  # 14: 804.6 s; 15: 924.6 s is over
        (924.6, 120000, 15),
        (5000, 120000, 15),  # never above the default
        (204.6, 120000, 9),
        (200, 120000, 8),
        (100, 120000, 8),  # never below 8 (RFC 1122: at least 100 s)
        (200, 60000, 9),  # rto_max 60 s: 9 -> 162.2 s, 10 -> 222.2 s
    ],
)
def test_retries2_for_budget(budget: float, rto_max_ms: int, expected: int) -> None:
    assert hints.retries2_for_budget(budget, rto_max_ms) == expected


def test_hints_name_the_application() -> None:
    t = Thresholds()
    redis, nginx = hints.recognise("redis-server"), hints.recognise("nginx")
    assert "net.ipv4.tcp_keepalive_time=280" in hints.too_slow(t, redis)
    assert "Redis: tcp-keepalive" in hints.too_slow(t, redis)
    assert hints.no_keepalive(t, nginx).startswith(
        "enable keepalive with keepalive idle 280 s, interval 75 s, 5 probes: nginx:"
    )
    assert hints.close_wait("java").startswith("java must close() the socket")
    assert hints.close_wait(None).startswith("the application must close()")
