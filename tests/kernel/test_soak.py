"""Soak: the agent audits every second and is scraped every half second while connections
open, idle, probe and die around it; memory, fds and threads stay flat, findings come and go.

Two namespaces joined by a veth: the agent and the clients in ``a`` (keepalive sysctls of
1 s / 1 s / 2 probes), the listener in ``b``. A churn loop keeps about 30 connections of
four kinds alive: idle without keepalive (an ``idle_no_keepalive`` finding after 1.5 s),
keepalive with a live peer (no finding), keepalive with the peer cut by an nft set in ``a``
(``keepalive_probing``, then ETIMEDOUT after ~3 s), and short request/answer ones.

``KEEPALIVE_SOAK_SECONDS`` sets the churn time (default 30, what CI runs; hours by hand).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import netlab
import pytest
from agent import Agents, ProcStats, Scrape, wait_for

SOAK_SECONDS = float(os.environ.get("KEEPALIVE_SOAK_SECONDS", "30"))
WARM_UP = max(5.0, SOAK_SECONDS / 3)
MAX_OPEN = 30
TABLE = "kaudsoak"
RULES = "version: 1\ndefaults:\n  idle_timeout: 3s\n  warn_at: 0.5\n  detection_budget: 1d\n"
LINGER_RST = b"\x01\0\0\0\0\0\0\0"  # SO_LINGER on, 0 s: close sends RST, leaves no orphan

pytestmark = pytest.mark.kernel


@dataclass
class Conn:
    kind: str
    client: socket.socket
    server: socket.socket
    until: float
    port: int


@dataclass
class Churn:
    a: netlab.Netns
    listener: socket.socket
    rng: random.Random = field(default_factory=lambda: random.Random(5))
    open: list[Conn] = field(default_factory=list)
    opened: dict[str, int] = field(default_factory=dict)
    kinds: Iterator[str] = field(
        default_factory=lambda: itertools.cycle(["idle", "keepalive", "cut", "short", "idle"])
    )

    def connect(self, keepalive: bool) -> tuple[socket.socket, socket.socket]:
        client = self.a.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        if keepalive:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        client.settimeout(5)
        client.connect(self.listener.getsockname())
        server, _ = self.listener.accept()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        return client, server

    def step(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.open if c.until <= now]:
            self.close(conn)
        if len(self.open) >= MAX_OPEN:
            return
        kind = next(self.kinds)
        self.opened[kind] = self.opened.get(kind, 0) + 1
        client, server = self.connect(keepalive=kind in ("keepalive", "cut"))
        if kind == "short":
            client.sendall(b"ping")
            server.recv(4)
            server.sendall(b"pong")
            client.recv(4)
            client.close()
            server.close()
            return
        if kind == "cut":  # drop what the peer sends to this port: probes go unanswered
            port = client.getsockname()[1]
            self.a.run(["nft", "add", "element", "inet", TABLE, "cut", f"{{ {port} }}"])
        life = self.rng.uniform(2.0, 7.0)
        self.open.append(Conn(kind, client, server, now + life, client.getsockname()[1]))

    def close(self, conn: Conn) -> None:
        self.open.remove(conn)
        if conn.kind == "cut":
            element = f"{{ {conn.port} }}"
            self.a.run(["nft", "delete", "element", "inet", TABLE, "cut", element], check=False)
        conn.client.close()
        conn.server.close()

    def close_all(self) -> None:
        for conn in list(self.open):
            self.close(conn)


def cut_table() -> str:
    return (
        f"table inet {TABLE} {{\n"
        "  set cut { type inet_service; }\n"
        "  chain input { type filter hook input priority 0; policy accept;"
        " tcp dport @cut drop; }\n"
        "}\n"
    )


@dataclass
class Watch:
    """What the scraper and the sampler saw, with monotonic times."""

    findings: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    stats: list[tuple[float, ProcStats]] = field(default_factory=list)
    scrape_errors: list[str] = field(default_factory=list)


def scrape_loop(port: int, stop: threading.Event, watch: Watch) -> None:
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                scrape = Scrape(r.read().decode())
            kinds = ("idle_no_keepalive", "keepalive_probing", "retransmitting", "close_wait")
            watch.findings.append(
                (time.monotonic(), {k: scrape.total("keepalive_findings", kind=k) for k in kinds})
            )
        except OSError as exc:
            watch.scrape_errors.append(repr(exc))
        stop.wait(0.5)


def median(values: list[int]) -> float:
    return statistics.median(values) if values else 0.0


def test_soak(lab: netlab.Lab, tmp_path: Path) -> None:
    a, b = lab.netns(), lab.netns()
    cable = lab.cable(a, b)
    for name in ("tcp_keepalive_time", "tcp_keepalive_intvl"):
        a.set_sysctl(f"net.ipv4.{name}", 1)
    a.set_sysctl("net.ipv4.tcp_keepalive_probes", 2)
    try:
        a.run(["nft", "-f", "-"], stdin=cut_table())
    except (netlab.LabError, FileNotFoundError) as exc:
        pytest.skip(f"needs nft sets: {exc}")
    config = tmp_path / "rules.yaml"
    config.write_text(RULES)
    agents = Agents(tmp_path, a)
    listener = b.listen(cable.b_ip)
    listener.listen(64)
    churn = Churn(a, listener)
    stop = threading.Event()
    watch = Watch()
    scraper = threading.Thread(target=a.call, args=(lambda: scrape_loop(9977, stop, watch),))
    try:
        agent = agents.start(config=config)
        scraper.start()
        started = time.monotonic()
        next_sample = started
        while time.monotonic() - started < SOAK_SECONDS:
            churn.step()
            if time.monotonic() >= next_sample:
                watch.stats.append((time.monotonic(), agent.stats()))
                next_sample += 1.0
            agent.assert_running()
            time.sleep(0.2)
        churn.close_all()
        settled = time.monotonic()

        def clear() -> bool:
            recent = [f for t, f in watch.findings if t > time.monotonic() - 1.6]
            return bool(recent) and all(not any(f.values()) for f in recent)

        wait_for("every finding to clear", clear, timeout=15)
        for _ in range(5):  # the quiet end: audits and scrapes go on, nothing changes
            watch.stats.append((time.monotonic(), agent.stats()))
            time.sleep(1.0)
    finally:
        stop.set()
        if scraper.ident is not None:
            scraper.join(timeout=10)
        churn.close_all()
        with contextlib.suppress(OSError):
            listener.close()
        agents.close()

    during = [f for t, f in watch.findings if started + 2 < t < settled]
    print(f"soak {SOAK_SECONDS:g} s: opened {churn.opened}, {len(watch.findings)} scrapes")
    assert max(f["idle_no_keepalive"] for f in during) >= 2, "idle findings never appeared"
    assert max(f["keepalive_probing"] for f in during) >= 1, "probing findings never appeared"
    assert len(watch.scrape_errors) <= 1, watch.scrape_errors[:3]
    assert not [x for x in agent.log() if x["level"] == "error"]
    opened = [x for x in agent.log() if x["msg"].startswith("finding: ")]
    cleared = [x for x in agent.log() if x["msg"] == "finding cleared"]
    assert opened and len(cleared) == len(opened), "a finding was logged and never cleared"

    # Flat after the warm-up: the median of the 5 s after it against the quiet end.
    base = [s for t, s in watch.stats if started + WARM_UP <= t < started + WARM_UP + 5]
    end = [s for t, s in watch.stats if t > settled]
    rss_base, rss_end = median([s.rss_kib for s in base]), median([s.rss_kib for s in end])
    fds_base, fds_end = median([s.fds for s in base]), median([s.fds for s in end])
    thr_base, thr_end = median([s.threads for s in base]), median([s.threads for s in end])
    print(f"RSS {rss_base:.0f} -> {rss_end:.0f} KiB, fds {fds_base} -> {fds_end}, "
          f"threads {thr_base} -> {thr_end}")  # fmt: skip
    assert rss_end <= rss_base + max(3072, 0.05 * rss_base), "RSS grew"
    assert fds_end <= fds_base + 1, "fds leaked"
    assert thr_end <= thr_base + 1, "threads leaked"
