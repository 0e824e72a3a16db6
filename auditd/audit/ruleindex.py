"""Which rules may match a socket, without trying all of them: an index over ports and CIDRs.

Rules are tried in file order and the first whose match holds wins. With thousands of rules
(issue 16: a valid 14,047-rule file) trying each one for every flagged socket is slow, so
each rule is filed under one criterion it *requires*: a remote port, else a local port,
else a remote network, else a local network; rules with none of these are always tried.
A socket's candidates are the rules filed under its ports and under the networks holding
its addresses, merged back into file order. A rule left out requires something the socket
does not have, so it cannot match: the first candidate that matches is the rule the linear
scan would pick (tests/unit/test_ruleindex.py checks this against the linear scan).
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Sequence

from auditd.config import IPNetwork, Rule, RuleSet
from auditd.model import Sock

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class _Networks:
    """Rule indices by network: {(version, prefix length): {network bits: [index, ...]}}."""

    def __init__(self) -> None:
        self.by_prefix: dict[tuple[int, int], dict[int, list[int]]] = {}

    def add(self, network: IPNetwork, index: int) -> None:
        bits = network.max_prefixlen - network.prefixlen
        table = self.by_prefix.setdefault((network.version, network.prefixlen), {})
        table.setdefault(int(network.network_address) >> bits, []).append(index)

    def lookup(self, ip: IPAddress, out: list[list[int]]) -> None:
        # An IPv4 peer of a dual-stack socket shows as ::ffff:a.b.c.d: v4 networks match it
        # too (as evaluate._in_cidrs does).
        candidates: tuple[IPAddress, ...] = (ip,)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates = (ip, ip.ipv4_mapped)
        for address in candidates:
            value, width = int(address), address.max_prefixlen
            for (version, prefix), table in self.by_prefix.items():
                if version == address.version:
                    hit = table.get(value >> (width - prefix))
                    if hit is not None:
                        out.append(hit)


class RuleIndex:
    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self._remote_ports: dict[int, list[int]] = defaultdict(list)
        self._local_ports: dict[int, list[int]] = defaultdict(list)
        self._remote_nets = _Networks()
        self._local_nets = _Networks()
        self._always: list[int] = []
        for index, rule in enumerate(self.rules):
            self._file(rule, index)

    def _file(self, rule: Rule, index: int) -> None:
        match = rule.match
        if match.remote_ports:
            for port in match.remote_ports:
                self._remote_ports[port].append(index)
        elif match.local_ports:
            for port in match.local_ports:
                self._local_ports[port].append(index)
        elif match.remote_cidrs:
            for network in match.remote_cidrs:
                self._remote_nets.add(network, index)
        elif match.local_cidrs:
            for network in match.local_cidrs:
                self._local_nets.add(network, index)
        else:
            self._always.append(index)

    def candidates(self, sock: Sock) -> list[Rule]:
        """The rules that may match ``sock``, in file order."""
        hits: list[list[int]] = []
        for table, port in ((self._remote_ports, sock.dport), (self._local_ports, sock.sport)):
            hit = table.get(port)
            if hit is not None:
                hits.append(hit)
        if self._remote_nets.by_prefix:
            self._remote_nets.lookup(sock.remote_ip, hits)
        if self._local_nets.by_prefix:
            self._local_nets.lookup(sock.local_ip, hits)
        if self._always:
            hits.append(self._always)
        if not hits:
            return []
        order = hits[0] if len(hits) == 1 else sorted(set().union(*hits))
        return [self.rules[i] for i in order]


# The index of the rule set last asked about (an audit asks for one rule set many times; a
# reload brings a new one). Kept with its rules tuple, compared by identity: a RuleSet is
# frozen, and hashing 14,000 rules per socket would cost more than the linear scan.
_last: tuple[tuple[Rule, ...], RuleIndex] | None = None


def index_for(rules: RuleSet) -> RuleIndex:
    global _last
    cached = _last
    if cached is not None and cached[0] is rules.rules:
        return cached[1]
    index = RuleIndex(rules.rules)
    _last = (rules.rules, index)
    return index
