"""The Prometheus side: shipped alert rules, the agent's exposition, and a real server end to end.

- ``promtool check rules`` / ``test rules`` / ``check config`` on ``config/prometheus/``;
- ``promtool check metrics`` (the node_exporter habit: lint a real exposition) on ``/metrics``
  of the agent started as a real process;
- a real Prometheus (scrape and evaluation every 1s, the shipped alerts.yml unmodified) scraping
  a real agent while this process holds an idle loopback connection without keepalive, until
  the finding shows up in queries and its alert fires.

Skipped, with the reason, where promtool or prometheus is not installed (CI installs both, see
.ci/run). All traffic stays on 127.0.0.1; both processes and the temporary directories are
removed even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent import Agent, Agents, free_port
from agent import wait_for as agent_wait_for
from promlab import (
    ALERTS,
    ALERTS_TEST,
    EXAMPLE_CONFIG,
    FEDERATE,
    JOB,
    PROMETHEUS,
    REMOTE_WRITE,
    _output,
    fleet_metrics,
    http_get,
    needs_linux,
    needs_prometheus,
    needs_promtool,
    parse_duration,
    promtool,
    running,
    temp_dir,
    wait_for,
)

from auditd import __version__

# The alert the end-to-end test waits for; its `for:` must fit in DEADLINE (checked below).
E2E_ALERT = "KeepaliveIdleConnectionPastPathTimeout"
E2E_RULE = "e2e"
DEADLINE = 60.0  # seconds for the whole end-to-end test, Prometheus startup included


def write_rules(path: Path, extra: str = "") -> None:
    # idle_timeout 2s: an idle connection without keepalive turns critical within seconds.
    path.write_text(f"version: 1\ndefaults: {{idle_timeout: 2s, warn_at: 0.5}}\n{extra}")


def exposition_when(what: str, pattern: str, agent: Agent, timeout: float) -> str:
    """The agent's /metrics as soon as a line matches ``pattern``."""

    def probe() -> str | None:
        scrape = agent.try_scrape()
        return scrape.text if scrape is not None and re.search(pattern, scrape.text, re.M) else None

    body: str = agent_wait_for(what, probe, timeout)
    return body


@contextlib.contextmanager
def idle_connection() -> Iterator[int]:
    """An established loopback connection without SO_KEEPALIVE, left idle; yields the port of
    its listening side (the local port of the accepted socket)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = int(server.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            accepted, _ = server.accept()
            with accepted:
                client.sendall(b"x")  # one segment each way, then silence
                assert accepted.recv(1) == b"x"
                accepted.sendall(b"y")
                assert client.recv(1) == b"y"
                yield port


# -- the shipped rules and config --------------------------------------------------------------
@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    proc = promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, _output(proc)
    assert "SUCCESS" in proc.stdout, _output(proc)


@needs_promtool
def test_alert_rules_unit_tests() -> None:
    proc = promtool("test", "rules", str(ALERTS_TEST))
    assert proc.returncode == 0, _output(proc)


@needs_promtool
def test_example_prometheus_config_is_valid() -> None:
    proc = promtool("check", "config", str(EXAMPLE_CONFIG))
    assert proc.returncode == 0, _output(proc)
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == [JOB]
    assert (EXAMPLE_CONFIG.parent / config["rule_files"][0]).resolve() == ALERTS


@needs_promtool
@pytest.mark.parametrize("path", [FEDERATE, REMOTE_WRITE], ids=lambda p: p.name)
def test_fleet_configs_are_valid(path: Path) -> None:
    proc = promtool("check", "config", str(path))
    assert proc.returncode == 0, _output(proc)


def test_federation_and_remote_write_pass_on_the_same_metrics_all_real() -> None:
    federated, written = fleet_metrics()
    assert federated == written
    from exposition import exposed

    real = set(exposed()) | {"up"}
    patterns = [re.compile(name) for name in federated]
    assert all(any(p.fullmatch(name) for name in real) for p in patterns), federated
    # The bounded families go; the detail stays on the site servers.
    assert "keepalive_findings" in federated
    assert not any(p.fullmatch("keepalive_connection_idle_seconds") for p in patterns)
    assert not any(p.fullmatch("keepalive_tcp_connections") for p in patterns)


def _alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert [g["name"] for g in groups] == [JOB]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_every_alert_is_routable_and_explained() -> None:
    for name, rule in _alerts().items():
        assert rule.get("labels", {}).get("severity") in ("critical", "warning"), name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = [
        c for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for c in t["alert_rule_test"]
    ]
    for name in _alerts():
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no case where it is quiet"


def test_findings_series_of_the_unit_tests_appear_only_on_demand() -> None:
    # The agent never exports a finding series at 0 outside the host's rule default, so the
    # unit tests must not lean on one: absent (`_`) or stale instead.
    series = [
        s for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for s in t["input_series"]
    ]
    findings = [s for s in series if s["series"].startswith("keepalive_findings{")]
    assert len(findings) > 10
    zeros = [s for s in findings if re.search(r"(^|\s)0(x\d+)?(\s|$)", s["values"])]
    assert zeros == []
    assert sum("stale" in s["values"] for s in findings) >= 5


def test_end_to_end_alert_fires_in_time() -> None:
    rule = _alerts()[E2E_ALERT]
    assert 'kind="idle_no_keepalive"' in rule["expr"] and 'severity="critical"' in rule["expr"]
    assert parse_duration(rule.get("for", "0s")) <= 30


# -- the agent's exposition ------------------------------------------------------------------
@needs_promtool
@needs_linux
def test_exposition_passes_promtool_check_metrics() -> None:
    deadline = time.monotonic() + 30
    with temp_dir() as tmp, idle_connection():
        rules = tmp / "rules.yaml"
        write_rules(rules)
        with Agents(tmp, None) as agents:
            agent = agents.start(config=rules, host=True)
            # Lint an exposition with a finding in it, not only the zeros of the first audit.
            body = exposition_when(
                "a critical idle_no_keepalive finding",
                r'^keepalive_findings\{kind="idle_no_keepalive",.*severity="critical"\} [1-9]',
                agent, deadline - time.monotonic(),
            )  # fmt: skip
    assert re.search(r"^keepalive_audit_last_success_timestamp_seconds \S+$", body, re.M)
    assert "keepalive_connection_idle_seconds_bucket{" in body
    proc = promtool("check", "metrics", stdin=body)
    assert proc.returncode == 0, _output(proc)
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", _output(proc)


# -- a real Prometheus -----------------------------------------------------------------------
class PromAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def _get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        reply = json.loads(http_get(f"{self.base}{path}{query}"))
        assert reply["status"] == "success", reply
        return reply["data"]

    def ready(self) -> bool | None:
        try:
            http_get(f"{self.base}/-/ready")
        except urllib.error.HTTPError:  # 503 while the TSDB opens
            return None
        return True

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._get("/api/v1/query", query=expr)["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return alerts


def prometheus_config(path: Path, agent_port: int) -> None:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],  # the shipped file, unmodified
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{agent_port}"]}]}
        ],
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    proc = promtool("check", "config", str(path))
    assert proc.returncode == 0, _output(proc)


@needs_prometheus
@needs_linux
def test_real_prometheus_scrapes_agent_and_fires_alert() -> None:
    assert PROMETHEUS is not None
    deadline = time.monotonic() + DEADLINE
    with temp_dir() as tmp, idle_connection() as listen_port:
        # A rule for the accepted side of our connection (local port = the listener's), so the
        # assertions below concern this connection, not whatever else idles on the host.
        rules = tmp / "rules.yaml"
        write_rules(
            rules, f"rules:\n  - name: {E2E_RULE}\n    match: {{local_ports: [{listen_port}]}}\n"
        )
        agent_port, prom_port = free_port(), free_port()
        prometheus_config(tmp / "prometheus.yml", agent_port)
        prom_argv = [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ]
        with Agents(tmp, None) as agents, running("prometheus", prom_argv, tmp) as prom:
            agent = agents.start(config=rules, port=agent_port, host=True)
            procs = (agent, prom)
            api = PromAPI(prom_port)
            wait_for("Prometheus to be ready", api.ready, deadline, procs)

            def finding() -> float | None:
                series = api.query(
                    f'keepalive_findings{{job="{JOB}",kind="idle_no_keepalive",'
                    f'severity="critical",rule="{E2E_RULE}"}}'
                )
                value = float(series[0]["value"][1]) if series else 0.0
                return value if value >= 1 else None

            assert wait_for("the critical idle_no_keepalive finding", finding, deadline, procs) == 1

            def scalar(expr: str) -> tuple[dict[str, str], float]:
                series = api.query(expr)
                assert len(series) == 1, f"{expr}: {series}"
                return series[0]["metric"], float(series[0]["value"][1])

            keepalive_time = int(Path("/proc/sys/net/ipv4/tcp_keepalive_time").read_text())
            sysctl = f'keepalive_sysctl_tcp_keepalive_time_seconds{{job="{JOB}",netns="host"}}'
            assert scalar(sysctl)[1] == keepalive_time
            labels, value = scalar(f'keepalive_build_info{{job="{JOB}"}}')
            assert (labels["version"], value) == (__version__, 1)
            assert scalar(f'up{{job="{JOB}"}}')[1] == 1

            def firing() -> dict[str, Any] | None:
                for alert in api.alerts():
                    labels = alert["labels"]
                    if (labels["alertname"], labels.get("rule")) == (E2E_ALERT, E2E_RULE):
                        return alert if alert["state"] == "firing" else None
                return None

            alert = wait_for(f"{E2E_ALERT} to fire", firing, deadline, procs)
            assert alert["labels"]["severity"] == "critical"
            assert alert["labels"]["netns"] == "host"
            assert alert["labels"]["instance"] == f"127.0.0.1:{agent_port}"
            assert "without keepalive" in alert["annotations"]["summary"]
