"""The rows of issue 13's table, staged in network namespaces, seen by the agent and ``watch``.

One agent (``run --audit.netns all``, in the host namespace) and one ``watch --format json
--netns all`` run for the whole module; each test builds its own client namespace A and
server namespace B, waits until both have audited and flagged the client's connection, makes
the kernel abort it, and asserts the reason, the 4-tuple, the namespace name, the owner and
``predicted`` in the agent's log line, its counter, and watch's JSON line. Tracepoints are
global: everything is looked up by the test's own client address and port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from agent import Agent, Agents, wait_for
from netlab import Lab, Netns

pytestmark = pytest.mark.kernel

PID = os.getpid()  # the owner of every client socket: made by this process
RULES = {"version": 1, "defaults": {"idle_timeout": "2s", "warn_at": 0.5,
         "retransmit_threshold": 1, "detection_budget": "1d"}}  # fmt: skip


class Watch:
    """``keepalive-auditd watch --format json`` with its lines collected by a thread."""

    def __init__(self, config: Path) -> None:
        argv = [sys.executable, "-m", "auditd", "watch", "--format", "json", "--netns", "all",
                "--interval", "1s", "--config", str(config)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream: IO[bytes], out: bool) -> None:
        for line in stream:
            if out:
                self.lines.append(json.loads(line))
            else:
                self.stderr.append(line.decode(errors="replace"))

    def abort(self, local: str) -> dict[str, Any] | None:
        return next((d for d in self.lines if d["local"] == local), None)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("events") / "rules.yaml"
    path.write_text(yaml.safe_dump(RULES))
    return path


@pytest.fixture(scope="module")
def agent(config: Path) -> Iterator[Agent]:
    agents = Agents(config.parent, None)
    try:
        yield agents.start("--audit.netns", "all", config=config, host=True, interval="1s")
    finally:
        agents.close()


@pytest.fixture(scope="module")
def watch(config: Path) -> Iterator[Watch]:
    w = Watch(config)
    try:
        wait_for("watch to start", lambda: any("watching" in s for s in w.stderr), 30)
        yield w
    finally:
        w.proc.send_signal(2)  # Ctrl-C: a quiet exit 0
        rc = w.proc.wait(10)
        assert rc == 0, (rc, w.stderr)
        assert not any("Traceback" in s for s in w.stderr), w.stderr


def endpoint(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def flagged(agent: Agent, watch: Watch, local: str, kind: str) -> None:
    """Wait until the agent logged the finding (watch audits at the same pace: one more
    second for it)."""

    def seen() -> bool:
        return any(
            d.get("local") == local and d.get("kind") == kind and "finding" in d["msg"]
            for d in agent.log()
        )

    wait_for(f"a {kind} finding for {local}", seen, 20)
    time.sleep(1.5)


def aborted(agent: Agent, watch: Watch, local: str, timeout: float = 30) -> tuple[dict, dict]:
    def logged() -> dict[str, Any] | None:
        return next((d for d in agent.log() if d.get("local") == local
                     and d["msg"].startswith("connection aborted")), None)  # fmt: skip

    line = wait_for(f"the agent's abort line for {local}", logged, timeout)
    doc = wait_for(f"watch's abort line for {local}", lambda: watch.abort(local), 5)
    return line, doc


def check(line: dict, doc: dict, ns: Netns, local: str, remote: str, reason: str) -> None:
    for got in (line, doc):
        assert got["reason"] == reason, got
        assert (got["local"], got["remote"]) == (local, remote), got
        assert got["netns"] == ns.name, got
        assert got["pid"] == PID, got
        assert got["predicted"] is True, got
        assert got["reported_seconds_before"] > 0, got
    assert doc["process"] == line["process_name"]


def counted(agent: Agent, ns: Netns, reason: str) -> float:
    scrape = agent.scrape()
    return scrape.total("keepalive_connection_aborts_total", netns=ns.name, reason=reason,
                        predicted="true")  # fmt: skip


def pair(lab: Lab, **opts: int) -> tuple[Netns, Netns, socket.socket, socket.socket]:
    a, b = lab.netns(), lab.netns()
    client, server = lab.connect(lab.cable(a, b), **opts)
    return a, b, client, server


def test_keepalive_timeout(lab: Lab, agent: Agent, watch: Watch) -> None:
    a, b, client, _ = pair(lab, SO_KEEPALIVE=1, TCP_KEEPIDLE=2, TCP_KEEPINTVL=1, TCP_KEEPCNT=4)
    local, remote = endpoint(client.getsockname()), endpoint(client.getpeername())
    b.pull_cable()
    flagged(agent, watch, local, "keepalive_probing")
    line, doc = aborted(agent, watch, local)
    check(line, doc, a, local, remote, "keepalive_timeout")
    assert doc["probes"] == 4 and doc["settings"] == "socket" and doc["keepidle"] == 2
    assert doc["retransmits"] == 0
    assert counted(agent, a, "keepalive_timeout") == 1


def _in_flight(client: socket.socket) -> None:
    client.setblocking(False)
    client.send(b"x" * 1000)


def test_retransmit_timeout(lab: Lab, agent: Agent, watch: Watch) -> None:
    a, b = lab.netns(), lab.netns()
    a.set_sysctl("net.ipv4.tcp_retries2", 3)
    client, _ = lab.connect(lab.cable(a, b))
    local, remote = endpoint(client.getsockname()), endpoint(client.getpeername())
    b.pull_cable()
    _in_flight(client)
    flagged(agent, watch, local, "retransmitting")
    line, doc = aborted(agent, watch, local)
    check(line, doc, a, local, remote, "retransmit_timeout")
    assert doc["retransmits"] >= 3 and doc["user_timeout_ms"] == 0
    assert counted(agent, a, "retransmit_timeout") == 1


def test_user_timeout(lab: Lab, agent: Agent, watch: Watch) -> None:
    a, b, client, _ = pair(lab, TCP_USER_TIMEOUT=6000)
    local, remote = endpoint(client.getsockname()), endpoint(client.getpeername())
    b.pull_cable()
    _in_flight(client)
    flagged(agent, watch, local, "retransmitting")
    line, doc = aborted(agent, watch, local)
    check(line, doc, a, local, remote, "user_timeout")
    assert doc["user_timeout_ms"] == 6000 and doc["settings"] == "socket"
    assert counted(agent, a, "user_timeout") == 1


def _recreate(lab: Lab, old: Netns, a: Netns, a_ip: str, b_ip: str) -> Netns:
    """The peer "reboots": its namespace goes with its sockets (their RSTs dropped, as a
    host that loses power sends none), a new one takes its address."""
    old.pull_cable()
    assert not old.close(), "old peer namespace not removed"
    lab.namespaces.remove(old)
    new = lab.netns()
    a.run(["ip", "link", "add", "vethra", "type", "veth", "peer", "name", "vethrb",
           "netns", new.name])  # fmt: skip
    for ns, ifname, ip in ((a, "vethra", a_ip), (new, "vethrb", b_ip)):
        ns.run(["ip", "addr", "add", f"{ip}/30", "dev", ifname])
        ns.run(["ip", "link", "set", ifname, "up"])
    return new


def test_peer_reboot_resets(lab: Lab, agent: Agent, watch: Watch) -> None:
    a, b = lab.netns(), lab.netns()
    cable = lab.cable(a, b)
    client, _ = lab.connect(cable)
    local, remote = endpoint(client.getsockname()), endpoint(client.getpeername())
    flagged(agent, watch, local, "idle_no_keepalive")
    _recreate(lab, b, a, cable.a_ip, cable.b_ip)
    client.send(b"hello")  # the new peer knows no such connection: RST
    line, doc = aborted(agent, watch, local)
    check(line, doc, a, local, remote, "peer_reset")
    assert doc["cookie"] and doc["errno"] == 104
    assert counted(agent, a, "peer_reset") == 1


def test_normal_close_is_no_abort(lab: Lab, agent: Agent, watch: Watch) -> None:
    a, b, client, server = pair(lab)
    local = endpoint(client.getsockname())
    flagged(agent, watch, local, "idle_no_keepalive")
    client.shutdown(socket.SHUT_WR)
    server.recv(10)
    server.close()
    client.recv(10)
    client.close()
    time.sleep(2)  # what an abort would have needed to show up (they come within 0.2 s)
    assert watch.abort(local) is None
    assert not [d for d in agent.log() if d.get("local") == local
                and d["msg"].startswith("connection aborted")]  # fmt: skip
    assert counted(agent, a, "peer_reset") == 0
