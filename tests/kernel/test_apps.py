"""Verdicts and hints proven on real applications (issue 11), each in a namespace of its own.

For PostgreSQL 15 (psql), PgBouncer, Redis (redis-cli), HAProxy (nc), nginx (nc, curl),
OpenSSH (ssh), Java (source launcher) and Node.js, started directly with a config under a temp
dir: the idle connections get their finding, attributed to the application; the keepalive
status agrees with ``ss -tinoe`` and with getsockopt (read through pidfd_getfd by the test
itself); the hint names the application's own knob; and applying the values the test reads
from the hint clears the finding on a new connection, in the inferred and the exact
(``--inspect-sockets``) mode of the CLI, and in a running agent's log and metrics.

Path idle timeout 4 s, warn_at 0.5: a connection is judged after 2 s of silence, so each
application costs a few seconds; the agent audits every second.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apps
import netlab
import pytest
import yaml
from agent import Agent, Agents, wait_for

pytestmark = pytest.mark.kernel

RULES = {"idle_timeout": "4s", "warn_at": 0.5, "detection_budget": "20s"}
# The tools that only hold the other end (nc, curl, redis-cli with its fixed keepalive) are
# not under test: a rule ignores them, so the agent's finding counts are the application's.
HELPERS = {"name": "helpers", "match": {"processes": ["nc", "curl", "redis-cli"]}, "ignore": True}
SETTLE = 2.6  # seconds of silence: past warn_at × idle_timeout, with a margin


@pytest.fixture(scope="module")
def lab() -> Iterator[netlab.Lab]:  # one lab for the module: each application its namespace
    reason = netlab.netns_available()
    if reason is not None:
        pytest.skip(reason)
    the_lab = netlab.Lab()
    try:
        yield the_lab
    finally:
        errors = the_lab.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "defaults": RULES, "rules": [HELPERS]}))
    return path


Pair = tuple[str, str]


def _pair(record: dict[str, Any]) -> Pair:
    return apps.plain(record.get("local") or ""), apps.plain(record.get("remote") or "")


def _pairs(sides: list[apps.Side]) -> set[Pair]:
    return {(s.local, s.remote) for s in sides}


def _socket_findings(run: netlab.AuditRun, sides: list[apps.Side]) -> dict[Pair, dict[str, Any]]:
    want = _pairs(sides)
    return {_pair(f): f for f in run.findings() if _pair(f) in want}


def _check_before(app: apps.App, sides: list[apps.Side], run: netlab.AuditRun) -> None:
    """Each idle side flagged, attributed, its keepalive status as ss and getsockopt say."""
    found = _socket_findings(run, sides)
    ss = apps.ss_view(app.ns)
    for side in sides:
        f = found.get((side.local, side.remote))
        assert f is not None, f"{app.name}: no finding for {side}: {run.findings()}"
        assert f["kind"] == app.kind, f
        assert (f["process"], f["pid"]) == (side.process, ss[side.local].pid), f
        view = ss[side.local]
        keepalive = apps.getsockopt(view.pid, view.fd)[0]
        want = "on" if view.keepalive else "off"
        assert f["keepalive"] == want == ("on" if keepalive else "off"), (f, view, keepalive)
        knob = app.knobs.get(side.process, app.knob)
        assert knob in f["hint"], f["hint"]


def _check_applied(app: apps.App, sides: list[apps.Side]) -> None:
    """The hint really took: keepalive on with a cadence inside the idle timeout (getsockopt),
    or, for OpenSSH, heartbeats that keep the path busy (tcp_info's ages, through ss)."""
    ss = apps.ss_view(app.ns)
    for side in sides:
        view = ss[side.local]
        keepalive, idle, intvl, _ = apps.getsockopt(view.pid, view.fd)
        if isinstance(app, apps.OpenSSH):
            assert view.idle_ms < 2000, (side, view)  # below warn_at × idle_timeout
        else:
            assert keepalive and max(idle, intvl) < 4, (side, idle, intvl)


def _agent_saw(agent: Agent, sides: list[apps.Side]) -> None:
    """The agent logged each finding with its owner and the application's hint."""

    def logged() -> bool:
        lines = [r for r in agent.log() if r["msg"].startswith("finding: ")]
        by_pair = {_pair(r): r for r in lines}
        return all(
            by_pair.get((s.local, s.remote), {}).get("process_name") == s.process for s in sides
        )

    try:
        wait_for("the agent's finding lines", logged, timeout=40)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {sides}\n{agent.log_text()[-3000:]}") from None
    for r in agent.log():
        if r["msg"].startswith("finding: ") and _pair(r) in _pairs(sides):
            assert r.get("hint"), r


@pytest.mark.parametrize("name", list(apps.APPS))
def test_application(name: str, lab: netlab.Lab, config: Path, tmp_path: Path) -> None:
    ns = lab.netns()
    app = apps.APPS[name](ns, tmp_path)
    agents = Agents(tmp_path, ns)
    try:
        agent = agents.start(config=config, interval="1s", wait=False)
        sides = app.up()
        time.sleep(SETTLE)
        for mode in ((), ("--inspect-sockets",)):
            run = ns.audit(config, "--fail-on", "never", *mode)
            _check_before(app, sides, run)
        hint = _socket_findings(run, sides[:1])[(sides[0].local, sides[0].remote)]["hint"]
        _agent_saw(agent, sides)
        scrape = agent.scrape()
        assert scrape.total("keepalive_findings", kind=app.kind) >= len(sides)

        tuning = app.parse(hint)
        fixed = app.up(tuning)
        assert not _pairs(fixed) & _pairs(sides)  # new connections
        time.sleep(SETTLE)
        _check_applied(app, fixed)
        for mode in ((), ("--inspect-sockets",)):
            run = ns.audit(config, "--fail-on", "never", *mode)
            left = _socket_findings(run, fixed)
            assert not left, f"{app.name} with {tuning} from {hint!r}: {left}"
        started = time.time()
        scrape = agent.wait_audit(started, timeout=15)
        assert scrape.total("keepalive_findings", kind=app.kind) == 0, scrape.text
        log = agent.log()
        assert not [r for r in log if r["msg"].startswith("finding") and _pair(r) in _pairs(fixed)]
        assert _pairs(sides) <= {_pair(r) for r in log if r["msg"] == "finding cleared"}
    finally:
        agents.close()
        app.close()
