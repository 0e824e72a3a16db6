"""The agent's finding lines at churn (issue 15): one line per finding that lasts, one summary
per audit for the short-lived ones; and a finding logged before its owner was known gets a
line when the owner is found (issue 11)."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

from auditd import logs
from auditd.findlog import FindingLog
from auditd.model import Finding, Severity


def finding(
    port: int, rule: str = "default", kind: str = "idle_no_keepalive", **kw: Any
) -> Finding:
    base: dict[str, Any] = dict(
        kind=kind, severity=Severity.WARNING, rule=rule, netns="host", message=f"idle {port}",
        hint="enable keepalive", local=f"10.0.0.1:{port}", remote="10.0.0.2:5432", pid=7,
        process="psql",
    )  # fmt: skip
    base.update(kw)
    return Finding(**base)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def new_log(after: float) -> tuple[FindingLog, io.StringIO]:
    stream = io.StringIO()
    return FindingLog(logs.setup("info", "json", stream), after), stream


def test_churn_is_one_summary_line_per_audit_that_changed() -> None:
    """100 idle connections every 3 minutes, each living 150 s, audited every 30 s for 37
    minutes: only the summary lines, two per set (its appearance, its clearing)."""
    flog, stream = new_log(after=300)
    for t in range(0, 37 * 60, 30):
        start = t // 180 * 180
        alive = t - start < 150
        found = [finding(20000 + (start // 180) * 100 + i) for i in range(100)] if alive else []
        flog.update(found, float(t))
    got = lines(stream)
    assert len(got) == 2 * 13 - 1  # 13 sets appear, 12 clear within the 37 minutes
    assert all(line["msg"].startswith("findings: ") for line in got)
    assert got[0]["msg"] == "findings: 100 new, 0 cleared within 300s"
    assert got[0]["new_by_kind"] == "idle_no_keepalive/default=100"
    assert got[1]["cleared"] == 100 and got[1]["cleared_by_kind"] == "idle_no_keepalive/default=100"


def test_a_finding_that_lasts_gets_its_own_lines() -> None:
    flog, stream = new_log(after=60)
    short = [finding(1, rule="db"), finding(2, kind="close_wait", rule="db")]
    flog.update([finding(9), *short], 0.0)
    flog.update([finding(9)], 30.0)  # the two short ones clear
    flog.update([finding(9)], 60.0)  # the lasting one reaches 60 s: its own line
    flog.update([finding(9, severity=Severity.CRITICAL)], 90.0)
    flog.update([], 120.0)
    got = lines(stream)
    assert [line["msg"] for line in got] == [
        "findings: 3 new, 0 cleared within 60s",
        "findings: 0 new, 2 cleared within 60s",
        "finding: idle 9",
        "finding now critical: idle 9",
        "finding cleared",
    ]
    assert got[1]["cleared_by_kind"] in (
        "idle_no_keepalive/db=1, close_wait/db=1",
        "close_wait/db=1, idle_no_keepalive/db=1",
    )
    assert got[2]["process_name"] == "psql" and got[2]["hint"] == "enable keepalive"
    assert got[4]["local"] == "10.0.0.1:9"


def test_at_once_with_zero() -> None:
    """--log.findings-after 0s: the old behaviour, a line when new and one when cleared."""
    flog, stream = new_log(after=0)
    flog.update([finding(1)], 0.0)
    flog.update([finding(1)], 1.0)
    flog.update([], 2.0)
    assert [line["msg"] for line in lines(stream)] == ["finding: idle 1", "finding cleared"]


def test_owner_found_later_is_logged_with_the_application_hint() -> None:
    """The owner scan ran out of time on the first audit: the finding's line had no process
    and the generic hint; when a later audit finds the owner, one more line says who."""
    flog, stream = new_log(after=0)
    anonymous = finding(1, pid=None, process=None, hint="in the application: setsockopt")
    flog.update([anonymous], 0.0)
    flog.update([anonymous], 1.0)
    found = replace(anonymous, pid=42, process="postgres", hint="PostgreSQL: tcp_keepalives_idle")
    flog.update([found], 2.0)
    flog.update([found], 3.0)
    got = lines(stream)
    assert [line["msg"] for line in got] == ["finding: idle 1", "finding attributed: idle 1"]
    assert "process_name" not in got[0]
    assert got[1]["process_name"] == "postgres" and got[1]["pid"] == 42
    assert got[1]["hint"].startswith("PostgreSQL: tcp_keepalives_idle")


def test_clears_not_logged_while_findings_are_left_out() -> None:
    flog, stream = new_log(after=0)
    flog.update([finding(1), finding(2)], 0.0)
    flog.update([finding(1)], 1.0, clears=False)
    assert [line["msg"] for line in lines(stream)] == ["finding: idle 1", "finding: idle 2"]
