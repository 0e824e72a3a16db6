"""Which rule applies to a socket: the first whose ``match`` holds. Pure.

A rule's criteria are ANDed; a list matches any of its items (config.Match).
"""

from __future__ import annotations

import fnmatch
import ipaddress

from auditd.audit.ruleindex import index_for
from auditd.config import Match, Rule, RuleSet
from auditd.model import ProcessInfo, Sock

DEFAULT_RULE = "default"  # the name findings carry when no rule matched


def _in_cidrs(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, cidrs: tuple[object, ...]) -> bool:
    # An IPv4 peer of a dual-stack socket shows as ::ffff:a.b.c.d; match it against v4 CIDRs.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = (ip, ip.ipv4_mapped)
    else:
        candidates = (ip,)
    return any(
        c.version == net.version and c in net  # type: ignore[attr-defined, operator]
        for net in cidrs
        for c in candidates
    )


def matches(match: Match, sock: Sock, process: ProcessInfo | None) -> bool:
    if match.states and sock.state not in match.states:
        return False
    if match.local_ports and sock.sport not in match.local_ports:
        return False
    if match.remote_ports and sock.dport not in match.remote_ports:
        return False
    if match.local_cidrs and not _in_cidrs(sock.local_ip, match.local_cidrs):
        return False
    if match.remote_cidrs and not _in_cidrs(sock.remote_ip, match.remote_cidrs):
        return False
    if match.processes:
        if process is None:
            return False
        return any(fnmatch.fnmatchcase(process.name, glob) for glob in match.processes)
    return True


def select_rule(rules: RuleSet, sock: Sock, process: ProcessInfo | None) -> Rule | None:
    """The first rule whose match holds, or None (the defaults apply). Only the rules that
    may match are tried (``ruleindex``: by port and network), in file order."""
    for rule in index_for(rules).candidates(sock):
        if matches(rule.match, sock, process):
            return rule
    return None
