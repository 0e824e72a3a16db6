"""The rule index picks exactly the rule the linear first-match scan picks (hypothesis)."""

from __future__ import annotations

import ipaddress
from typing import Any

from helpers import make_sock, rule
from hypothesis import given, settings
from hypothesis import strategies as st

from auditd.audit.matching import matches, select_rule
from auditd.audit.ruleindex import RuleIndex
from auditd.config import Match, Rule, RuleSet
from auditd.model import ProcessInfo, Sock, TcpState

PORTS = st.sampled_from([22, 80, 443, 5432, 6379, 40000, 40001])
NETWORKS = st.sampled_from(
    ["10.0.0.0/8", "10.0.0.0/24", "10.0.0.2/32", "192.168.1.0/24", "0.0.0.0/0", "::/0",
     "fd00::/8", "fd00::2/128", "::ffff:10.0.0.0/104", "2001:db8::/32"]
).map(ipaddress.ip_network)  # fmt: skip
ADDRESSES = st.sampled_from(
    ["10.0.0.1", "10.0.0.2", "10.1.2.3", "192.168.1.7", "fd00::1", "fd00::2", "2001:db8::9",
     "::ffff:10.0.0.2", "::1", "127.0.0.1"]
)  # fmt: skip
STATES = st.sampled_from([TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.SYN_SENT])


def _sets(elements: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(()), st.lists(elements, min_size=1, max_size=3))


@st.composite
def matches_(draw: st.DrawFn) -> Match:
    return Match(
        local_ports=frozenset(draw(_sets(PORTS))),
        remote_ports=frozenset(draw(_sets(PORTS))),
        local_cidrs=tuple(draw(_sets(NETWORKS))),
        remote_cidrs=tuple(draw(_sets(NETWORKS))),
        processes=tuple(draw(_sets(st.sampled_from(["postgres", "nginx*", "p*"])))),
        states=frozenset(draw(_sets(STATES))),
    )


@st.composite
def sockets(draw: st.DrawFn) -> Sock:
    src, dst = draw(ADDRESSES), draw(ADDRESSES)
    if (":" in src) != (":" in dst):  # one family per socket
        dst = src
    return make_sock(src=src, dst=dst, sport=draw(PORTS), dport=draw(PORTS), state=draw(STATES))


def linear(rules: tuple[Rule, ...], sock: Sock, process: ProcessInfo | None) -> Rule | None:
    return next((r for r in rules if matches(r.match, sock, process)), None)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(matches_(), max_size=25),
    st.lists(sockets(), min_size=1, max_size=8),
    st.sampled_from([None, "postgres", "nginx-worker", "redis"]),
)
def test_the_index_picks_the_rule_the_linear_scan_picks(
    criteria: list[Match], socks: list[Sock], process_name: str | None
) -> None:
    rules = tuple(rule(f"r{i}", match=m) for i, m in enumerate(criteria))
    ruleset = RuleSet(rules=rules)
    process = None if process_name is None else ProcessInfo(pid=1, name=process_name)
    for sock in socks:
        assert select_rule(ruleset, sock, process) is linear(rules, sock, process)
        # and the candidates keep file order, with every matching rule among them
        got = RuleIndex(rules).candidates(sock)
        assert got == sorted(got, key=rules.index)
        assert {r.name for r in rules if matches(r.match, sock, process)} <= {r.name for r in got}


def test_thousands_of_port_rules_try_few_candidates() -> None:
    ports = [rule(f"r{i}", match=Match(remote_ports=frozenset({i + 1}))) for i in range(14000)]
    ten = Match(remote_cidrs=(ipaddress.ip_network("10.0.0.0/8"),))
    rules = (*ports, rule("anything-on-10", match=ten))
    sock = make_sock(dport=5432)
    index = RuleIndex(rules)
    assert [r.name for r in index.candidates(sock)] == ["r5431", "anything-on-10"]
    assert select_rule(RuleSet(rules=rules), sock, None) is rules[5431]
