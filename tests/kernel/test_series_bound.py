"""Bounded series on a real agent: 100 empty network namespaces and 1000 rules cost nothing.

The agent runs in the host namespace with ``--audit.netns all``; the namespaces are real
(``ip netns add``, made in one ``ip -batch`` so the test takes seconds). Other tests on this
machine may have namespaces of their own at the same time: their series are counted apart
and left out of the bound, which is about ours and the host's.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import netlab
import pytest
from agent import Agents, Scrape, wait_for

pytestmark = pytest.mark.kernel

EMPTY = 100
RULES = 1000
BOUND = 300  # issue 14: at most 300 series with 100 namespaces and nothing wrong in them
AGENT_SERIES = 20  # README Metrics: build, audit times, 9 error stages, rules, namespaces,
# the abort events' lost, up and source (bpf, perf)
HOST_SERIES = 106  # README Metrics, without conntrack; 107 with it
KEEPALIVE_TIME = "net.ipv4.tcp_keepalive_time"


def make_namespaces(lab: netlab.Lab, n: int) -> list[netlab.Netns]:
    """``n`` empty namespaces named as the lab names them, so its cleanup covers them."""
    names = [f"{netlab.PREFIX}{os.getpid()}-{secrets.token_hex(3)}" for _ in range(n)]
    made = [netlab.Netns(name) for name in names]
    lab.namespaces.extend(made)
    netlab.run(["ip", "-batch", "-"], stdin="".join(f"netns add {m}\n" for m in names))
    return made


def rules_file(path: Path) -> Path:
    # Rules that match nothing here (TEST-NET-1 peers); no detection budget to exceed.
    rules = "".join(
        f"  - name: r{i}\n    match: {{remote_cidrs: [192.0.2.{i % 256}/32], "
        f"remote_ports: [{1 + i}]}}\n"
        for i in range(RULES)
    )
    path.write_text(f"version: 1\ndefaults: {{detection_budget: 30d}}\nrules:\n{rules}")
    return path


def series_by_owner(scrape: Scrape, ours: set[str]) -> dict[str, int]:
    """Series of the agent itself (no netns label), the host, ours, and anybody else's."""
    counts = {"agent": 0, "host": 0, "ours": 0, "foreign": 0}
    for samples in scrape.samples.values():
        for labels in samples:
            netns = dict(labels).get("netns")
            owner = "agent" if netns is None else "host" if netns == "host" else None
            counts[owner or ("ours" if netns in ours else "foreign")] += 1
    return counts


def test_empty_namespaces_and_many_rules_cost_no_series(lab: netlab.Lab, tmp_path: Path) -> None:
    made = make_namespaces(lab, EMPTY)
    tuned = made[0]
    tuned.set_sysctl(KEEPALIVE_TIME, 77 if tuned.sysctl(KEEPALIVE_TIME) != 77 else 78)
    names = {ns.name for ns in made}
    agents = Agents(tmp_path, None)
    try:
        agent = agents.start(
            "--audit.netns", "all", config=rules_file(tmp_path / "rules.yaml"), host=True,
            interval="2s", startup_timeout=60,
        )  # fmt: skip

        def all_audited() -> Scrape | None:
            scrape = agent.try_scrape()
            seen = (
                scrape.label_values("keepalive_sysctl_differs_from_host", "netns") if scrape else ()
            )
            return scrape if scrape and tuned.name in seen else None

        scrape = wait_for("an audit of every namespace", all_audited, timeout=60)
    finally:
        agents.close()
    counts = series_by_owner(scrape, names)
    conntrack = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established").exists()
    print(
        f"series: {counts}, {sum(counts.values())} in all, {EMPTY} empty namespaces, {RULES} rules"
    )
    assert scrape.value("keepalive_namespaces") >= EMPTY + 1
    assert scrape.value("keepalive_config_rules") == RULES
    # The one tuned namespace: its sysctl, that it differs, and its idle detection time.
    assert {
        name: mine
        for name, samples in scrape.samples.items()
        if (mine := {k: v for k, v in samples.items() if ("netns", tuned.name) in k})
    } == {
        "keepalive_sysctl_tcp_keepalive_time_seconds": {
            frozenset({("netns", tuned.name)}): tuned.sysctl(KEEPALIVE_TIME)
        },
        "keepalive_sysctl_differs_from_host": {
            frozenset({("netns", tuned.name), ("sysctl", KEEPALIVE_TIME)}): 1
        },
        "keepalive_dead_peer_detection_seconds": {
            frozenset({("netns", tuned.name), ("case", "idle")}): pytest.approx(
                tuned.sysctl(KEEPALIVE_TIME) + 9 * 75
            )
        },
    }
    assert counts["ours"] == 3  # the other 99 cost nothing
    assert counts["agent"] == AGENT_SERIES
    assert counts["host"] == HOST_SERIES + (1 if conntrack else 0)
    assert counts["agent"] + counts["host"] + counts["ours"] <= BOUND
