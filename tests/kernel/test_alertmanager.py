"""Alertmanager end to end: two agents, a real Prometheus, a real Alertmanager, a webhook.

Network namespaces of the lab: ``mon`` runs Prometheus, Alertmanager and this test's webhook
receiver (a small HTTP server on a socket made inside ``mon``); ``a`` and ``b`` each run an
agent, scraped over a veth from ``mon`` as two targets of one job; ``peer`` is the far end of a
connection from ``a``. In ``a`` the test provokes what the shipped alerts page for:

- a half-open connection: keepalive on (idle 1 s, interval 1 s, many probes) to ``peer``,
  whose cable is then pulled, so probes go unanswered (``keepalive_probing``, critical at 2);
- an idle connection without keepalive (loopback), past the 2 s idle timeout of its rule.

Prometheus evaluates a copy of the shipped alerts.yml whose ``for:`` durations are shortened
(the expressions are checked to be the shipped ones), and Alertmanager must deliver both
alerts to the webhook with the instance, netns, rule and a description naming the fix; then
the test fixes both (the cable back, SO_KEEPALIVE on the idle socket) and the resolved
notifications must arrive. Agent ``b`` has nothing wrong: no finding alert may name it. On
the way, every query of the Grafana dashboard (config/grafana/) runs on this Prometheus,
and its fleet overview counts what the test provoked.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import netlab
import pytest
import yaml
from agent import Agents
from promlab import ALERTS, JOB, PROMETHEUS, PROMTOOL, _output, http_get, promtool, running
from promlab import queries as grafana_queries
from promlab import wait_for as wait_until

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None or shutil.which("prometheus-alertmanager") is None,
        reason="needs prometheus, promtool and prometheus-alertmanager (CI installs them)",
    ),
]

DEADLINE = 60.0  # the whole test, startup included
AGENT_PORT = 9977  # each agent has a namespace of its own: every port is free there
PROBE_RULE, IDLE_RULE = "e2e-probe", "e2e-idle"
PROBE_PORT = 6379  # the peer's listener, matched by PROBE_RULE
HALF_OPEN, IDLE = "KeepaliveConnectionHalfOpen", "KeepaliveIdleConnectionPastPathTimeout"


class Webhook:
    """Alertmanager's webhook receiver: every alert of every notification, in order."""

    def __init__(self, mon: netlab.Netns) -> None:
        self.alerts: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with received._lock:
                    received.alerts.extend(json.loads(body)["alerts"])
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        listener = mon.call(lambda: socket.create_server(("127.0.0.1", 0)))
        self.server = HTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = listener  # made inside mon, where Alertmanager runs
        self.port = int(listener.getsockname()[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def find(self, status: str, alertname: str, rule: str) -> dict[str, Any] | None:
        with self._lock:
            for alert in self.alerts:
                labels = alert["labels"]
                if (alert["status"], labels["alertname"], labels.get("rule")) == (
                    status, alertname, rule,
                ):  # fmt: skip
                    return alert
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def short_alerts(path: Path) -> None:
    """alerts.yml with every ``for:`` at 1 s and the expressions untouched."""
    doc = yaml.safe_load(ALERTS.read_text())
    shipped = {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    again = yaml.safe_load(path.read_text())
    assert {r["alert"]: r["expr"] for g in again["groups"] for r in g["rules"]} == shipped
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, _output(proc)


def rules_yaml(path: Path, idle_port: int) -> Path:
    # Defaults loose enough that nothing but the two provoked connections is a finding (the
    # scrapes' own connections idle up to 1 s between scrapes).
    path.write_text(
        "version: 1\n"
        "defaults: {idle_timeout: 1h, detection_budget: 1d}\n"
        "rules:\n"
        f"  - name: {IDLE_RULE}\n    match: {{remote_ports: [{idle_port}]}}\n"
        "    idle_timeout: 2s\n"
        f"  - name: {PROBE_RULE}\n    match: {{remote_ports: [{PROBE_PORT}]}}\n"
    )
    return path


def configs(tmp: Path, targets: list[str], webhook_port: int) -> tuple[Path, Path]:
    alerts = tmp / "alerts-short-for.yml"
    short_alerts(alerts)
    prom = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(alerts)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": ["127.0.0.1:9093"]}]}]},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
    }
    am = {
        "route": {
            "receiver": "webhook", "group_by": ["alertname", "instance", "netns", "rule", "kind"],
            "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h",
        },
        "receivers": [{"name": "webhook", "webhook_configs": [
            {"url": f"http://127.0.0.1:{webhook_port}/hook", "send_resolved": True}
        ]}],
    }  # fmt: skip
    (tmp / "prometheus.yml").write_text(json.dumps(prom))
    (tmp / "alertmanager.yml").write_text(json.dumps(am))
    return tmp / "prometheus.yml", tmp / "alertmanager.yml"


@contextlib.contextmanager
def monitoring(mon: netlab.Netns, tmp: Path, targets: list[str], hook: Webhook) -> Iterator[Any]:
    assert PROMETHEUS is not None
    prom_yml, am_yml = configs(tmp, targets, hook.port)
    am_argv = mon.exec_argv([
        "prometheus-alertmanager", f"--config.file={am_yml}", f"--storage.path={tmp / 'am'}",
        "--web.listen-address=127.0.0.1:9093", "--cluster.listen-address=",
    ])  # fmt: skip
    prom_argv = mon.exec_argv([
        PROMETHEUS, f"--config.file={prom_yml}", f"--storage.tsdb.path={tmp / 'tsdb'}",
        "--web.listen-address=127.0.0.1:9090", "--rules.alert.resend-delay=1s",
    ])  # fmt: skip
    with running("alertmanager", am_argv, tmp) as am, running("prometheus", prom_argv, tmp) as prom:
        yield am, prom


def restore_cable(ns: netlab.Netns) -> None:
    """Undo ``Netns.pull_cable`` (its nft table, or its iptables rules)."""
    if ns.run(["nft", "delete", "table", "inet", "kaud"], check=False).returncode != 0:
        for chain in ("INPUT", "OUTPUT"):
            ns.run(["iptables", "-F", chain])


def idle_pair(ns: netlab.Netns) -> tuple[socket.socket, int]:
    """A loopback connection in ``ns`` without keepalive, one segment each way, then idle:
    its client end (matched by IDLE_RULE on the listener's port) and that port."""
    listener = ns.listen("127.0.0.1")
    port = int(listener.getsockname()[1])
    client = ns.make_socket()
    client.connect(("127.0.0.1", port))
    server = ns.adopt(listener.accept()[0])
    listener.close()
    client.sendall(b"x")
    assert server.recv(1) == b"x"
    server.sendall(b"y")
    assert client.recv(1) == b"y"
    return client, port


def query(mon: netlab.Netns, expr: str) -> list[dict[str, Any]]:
    """An instant query to the Prometheus in ``mon``; its result vector."""
    url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    reply = json.loads(mon.call(lambda: http_get(url)))
    assert reply["status"] == "success", (expr, reply)
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def targets_up(mon: netlab.Netns) -> dict[str, float]:
    return {r["metric"]["instance"]: float(r["value"][1]) for r in query(mon, f'up{{job="{JOB}"}}')}


def dashboard_now(mon: netlab.Netns) -> dict[str, list[float]]:
    """Every query of the Grafana dashboard run now: panel title -> the values of its
    single-series queries (the stat panels); the others must run too."""
    out = {}
    for title, exprs in grafana_queries().items():
        results = [query(mon, e) for e in exprs]
        if all(len(r) == 1 and not r[0]["metric"] for r in results):
            out[title] = [float(r[0]["value"][1]) for r in results]
    return out


def probing_pair(ns: netlab.Netns, peer: netlab.Netns, addr: str) -> socket.socket:
    """A connection from ``ns`` to PROBE_PORT on ``peer`` probing every second (120 probes
    before the kernel gives up: longer than the test); its client end."""
    listener = peer.listen(addr, PROBE_PORT)
    client = ns.make_socket()
    for level, opt, value in (
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 120),
    ):
        client.setsockopt(level, opt, value)
    client.settimeout(10)
    client.connect((addr, PROBE_PORT))
    peer.adopt(listener.accept()[0])
    listener.close()
    return client


def test_alertmanager_delivers_and_resolves(lab: netlab.Lab, tmp_path: Path) -> None:
    deadline = time.monotonic() + DEADLINE
    mon, a, b, peer = lab.netns(), lab.netns(), lab.netns(), lab.netns()
    to_a, to_b, far = lab.cable(mon, a), lab.cable(mon, b), lab.cable(a, peer)
    idle_client, idle_port = idle_pair(a)
    probe_client = probing_pair(a, peer, far.b_ip)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rules = rules_yaml(tmp_path / "rules.yaml", idle_port)
    agents_a, agents_b = Agents(tmp_path / "a", a), Agents(tmp_path / "b", b)
    hook = Webhook(mon)
    try:
        for agents in (agents_a, agents_b):
            agents.start("--web.listen-address", f":{AGENT_PORT}", config=rules, port=AGENT_PORT)
        instance_a, instance_b = f"{to_a.b_ip}:{AGENT_PORT}", f"{to_b.b_ip}:{AGENT_PORT}"
        with monitoring(mon, tmp_path, [instance_a, instance_b], hook) as procs:
            peer.pull_cable()  # the probes of probe_client go unanswered from now on

            def delivered(status: str, name: str, rule: str) -> dict[str, Any]:
                alert = wait_until(f"{status} {name} at the webhook", lambda: hook.find(
                    status, name, rule), deadline, procs)  # fmt: skip
                assert isinstance(alert, dict)
                return alert

            half_open = delivered("firing", HALF_OPEN, PROBE_RULE)
            idle = delivered("firing", IDLE, IDLE_RULE)
            for alert in (half_open, idle):
                assert alert["labels"]["instance"] == instance_a
                assert alert["labels"]["netns"] == "host"  # the agent's own namespace
                assert alert["labels"]["severity"] == "critical"
            assert half_open["labels"]["kind"] == "keepalive_probing"
            assert (
                "make it notice sooner (TCP_USER_TIMEOUT" in half_open["annotations"]["description"]
            )
            assert "enable keepalive on its sockets" in idle["annotations"]["description"]
            assert "SO_KEEPALIVE with TCP_KEEPIDLE" in idle["annotations"]["description"]
            assert targets_up(mon) == {instance_a: 1.0, instance_b: 1.0}  # two targets, both up
            # The dashboard's fleet overview, on this Prometheus: one host, one namespace.
            now = dashboard_now(mon)
            assert now["Hosts with findings"] == now["Namespaces with findings"] == [1.0]
            assert now["Half-open connections now"] == [1.0]
            assert now["Agents up"] == [2.0, 2.0]

            # The fixes: the path is back (the next probe is answered), and keepalive is on.
            restore_cable(peer)
            idle_client.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
            idle_client.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
            idle_client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            delivered("resolved", HALF_OPEN, PROBE_RULE)
            delivered("resolved", IDLE, IDLE_RULE)

            # Absent findings read 0, not "No data". (Waited for: both sockets now probe every
            # second, and a probe whose answer is in flight is a warning for a moment.)
            def clear() -> bool | None:
                now = dashboard_now(mon)
                return (
                    now["Hosts with findings"] == now["Half-open connections now"] == [0.0] or None
                )

            wait_until("the dashboard's overview at 0", clear, deadline, procs)
            assert probe_client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # alive
        # Finding alerts only: abort events come from tracepoints, global to the kernel, so
        # each agent here also counts (as netns "unknown") the aborts of other tests' sockets.
        finding_alerts = [
            x["labels"] for x in hook.alerts
            if "rule" in x["labels"] and x["labels"]["alertname"] != "KeepaliveConnectionsAborted"
        ]  # fmt: skip
        assert all(labels["instance"] == instance_a for labels in finding_alerts), [
            labels for labels in finding_alerts if labels["instance"] != instance_a
        ]
        assert {labels["rule"] for labels in finding_alerts} == {PROBE_RULE, IDLE_RULE}
        took = DEADLINE - (deadline - time.monotonic())
        print(f"{len(hook.alerts)} alerts delivered and resolved, {took:.1f} s in all")
    finally:
        hook.close()
        agents_a.close()
        agents_b.close()
