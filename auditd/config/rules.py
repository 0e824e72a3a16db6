"""The YAML rules file: its schema, checked into ``RuleSet`` with precise errors.

An error names the file, the line and the key path, e.g.
``rules.yaml:7: rules[0].idle_timeout: expected a duration like "350s", got "fast"``.
Every scalar is converted and checked against the schema documented in
``config/rules.yaml`` (the node toolkit is ``config.nodes``). Nothing but ``ConfigError``
escapes ``parse_rules`` and ``load_rules``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

from yaml.nodes import MappingNode, Node

from auditd.config.errors import show
from auditd.config.files import FileMissing, read_config_text
from auditd.config.nodes import (
    Entries,
    Invalid,
    boolean,
    describe,
    duration,
    fraction,
    integer,
    mapping,
    parse_document,
    scalar,
    sequence,
    string,
)
from auditd.config.ruleset import IPNetwork, Match, Rule, RuleSet, SysctlBound, Thresholds
from auditd.config.ruleset import builtin_rules as builtin_rules
from auditd.model import SYSCTL_NAMES, Severity, TcpState

DEFAULT_CONFIG_PATH = "/etc/keepalive-auditd/rules.yaml"

# The sysctls a ``sysctls:`` bound may name: those the agent reads (they decide how fast a
# dead peer is noticed).
KNOWN_SYSCTLS = SYSCTL_NAMES

# Findings of sockets that no rule matches carry this rule name (audit.matching.DEFAULT_RULE);
# a user rule of the same name would be indistinguishable from them in output and metrics.
RESERVED_RULE_NAMES = ("default",)


def load_rules(path: str) -> RuleSet:
    """Parse the rules file at ``path``; raises ConfigError if it cannot be read or used."""
    return parse_rules(read_config_text(path), path)


def load_rules_or_default(path: str | None) -> RuleSet:
    """The rules at ``path``; with None, DEFAULT_CONFIG_PATH if it exists, else the builtins."""
    if path is not None:
        return load_rules(path)
    try:
        return load_rules(DEFAULT_CONFIG_PATH)
    except FileMissing:
        return builtin_rules()


def parse_rules(text: str, source: str) -> RuleSet:
    """Parse the text of a rules file; ``source`` names it in errors and in the RuleSet."""
    return parse_document(text, source, lambda root: _ruleset(root, source), RuleSet(source=source))


# --- the schema ------------------------------------------------------------------------------

_TOP_KEYS = ("version", "defaults", "sysctls", "rules")
_THRESHOLD_KEYS = tuple(f.name for f in dataclasses.fields(Thresholds))
_RULE_KEYS = ("name", "match", *_THRESHOLD_KEYS, "severity", "ignore")
_MATCH_KEYS = tuple(f.name for f in dataclasses.fields(Match))
_BOUND_KEYS = ("min", "max", "severity")
_SYSCTL_MAX = 2**63 - 1  # the widest sysctl the kernel has (unsigned long)

# "close-wait", "CLOSE_WAIT" and "closewait" all name TcpState.CLOSE_WAIT, as do ss's "fin-wait-1".
_STATES = {s.name.replace("_", ""): s for s in TcpState if s is not TcpState.UNKNOWN}


def _ruleset(root: Node, source: str) -> RuleSet:
    if not isinstance(root, MappingNode):
        raise Invalid(
            root,
            "(top level)",
            f'expected a mapping starting with "version: 1", got {describe(root)}',
        )
    entries = mapping(root, "", _TOP_KEYS)
    if "version" not in entries:
        raise Invalid(root, "version", 'required key missing; start the file with "version: 1"')
    version = scalar(entries["version"][1], "version", "1")
    if isinstance(version, bool) or not isinstance(version, int) or version != 1:
        raise Invalid(entries["version"][1], "version", f"expected 1, got {show(version)}")
    defaults = Thresholds()
    if "defaults" in entries:
        values = _thresholds(
            mapping(entries["defaults"][1], "defaults", _THRESHOLD_KEYS), "defaults"
        )
        defaults = dataclasses.replace(defaults, **values)
    sysctls = _sysctls(entries["sysctls"][1]) if "sysctls" in entries else ()
    rules = _rules(entries["rules"][1], defaults) if "rules" in entries else ()
    return RuleSet(defaults=defaults, sysctls=sysctls, rules=rules, source=source)


def _sysctls(node: Node) -> tuple[SysctlBound, ...]:
    bounds = []
    for name, (_, value) in mapping(node, "sysctls", KNOWN_SYSCTLS, noun="sysctl").items():
        path = f"sysctls.{name}"
        entries = mapping(value, path, _BOUND_KEYS, null_ok=False)
        low, high = (
            integer(entries[k][1], f"{path}.{k}", 0, _SYSCTL_MAX) if k in entries else None
            for k in ("min", "max")
        )
        if low is None and high is None:
            raise Invalid(value, path, "needs at least one of min, max")
        if low is not None and high is not None and low > high:
            what = f"min {low} is greater than max {high}"
            raise Invalid(entries["min"][1], f"{path}.min", what)
        severity = Severity.WARNING
        if "severity" in entries:
            severity = _severity(entries["severity"][1], f"{path}.severity")
        bounds.append(SysctlBound(name=name, min=low, max=high, severity=severity))
    return tuple(bounds)


def _rules(node: Node, defaults: Thresholds) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    first_use: dict[str, str] = {}  # rule name -> key path of the rule that has it
    # Rules that set the same thresholds share one Thresholds (14,000 rules, a few distinct).
    merged: dict[tuple[tuple[str, Any], ...], Thresholds] = {(): defaults}
    for index, item in enumerate(sequence(node, "rules", empty_ok=True)):
        path = f"rules[{index}]"
        entries = mapping(item, path, _RULE_KEYS, null_ok=False)
        if "name" not in entries:
            raise Invalid(item, f"{path}.name", "required key missing")
        name_node = entries["name"][1]
        name = string(name_node, f"{path}.name", "a rule name")
        if name in RESERVED_RULE_NAMES:
            what = f"{show(name)} is reserved for sockets that no rule matches; choose another"
            raise Invalid(name_node, f"{path}.name", what)
        if name in first_use:
            what = f"duplicate rule name {show(name)}, already used by {first_use[name]}"
            raise Invalid(name_node, f"{path}.name", what)
        first_use[name] = path
        rules.append(_rule(name, entries, path, merged))
    return tuple(rules)


def _rule(
    name: str, entries: Entries, path: str, merged: dict[tuple[tuple[str, Any], ...], Thresholds]
) -> Rule:
    match = _match(entries["match"][1], f"{path}.match") if "match" in entries else _ANY
    severity = None
    if "severity" in entries:
        severity = _severity(entries["severity"][1], f"{path}.severity")
    ignore = boolean(entries["ignore"][1], f"{path}.ignore") if "ignore" in entries else False
    overrides = _thresholds(entries, path)
    key = tuple(overrides.items())
    thresholds = merged.get(key)
    if thresholds is None:
        thresholds = merged[key] = dataclasses.replace(merged[()], **overrides)
    return Rule(
        name=name,
        match=match,
        thresholds=thresholds,
        severity=severity,
        ignore=ignore,
        overrides=frozenset(overrides),
    )


_ANY = Match()
_NO_PORTS: frozenset[int] = frozenset()


def _match(node: Node, path: str) -> Match:
    entries = mapping(node, path, _MATCH_KEYS)
    if not entries:
        return _ANY

    def items(key: str) -> list[tuple[Node, str]]:
        nodes = sequence(entries[key][1], f"{path}.{key}", empty_ok=False)
        return [(item, f"{path}.{key}[{i}]") for i, item in enumerate(nodes)]

    def ports(key: str) -> frozenset[int]:
        if key not in entries:
            return _NO_PORTS
        return frozenset(integer(n, p, 0, 65535) for n, p in items(key))

    return Match(
        local_ports=ports("local_ports"),
        remote_ports=ports("remote_ports"),
        local_cidrs=tuple(_cidr(n, p) for n, p in items("local_cidrs"))
        if "local_cidrs" in entries
        else (),
        remote_cidrs=tuple(_cidr(n, p) for n, p in items("remote_cidrs"))
        if "remote_cidrs" in entries
        else (),
        processes=tuple(string(n, p, "a process name glob") for n, p in items("processes"))
        if "processes" in entries
        else (),
        states=frozenset(_state(n, p) for n, p in items("states"))
        if "states" in entries
        else frozenset(),
    )


def _thresholds(entries: Entries, path: str) -> dict[str, Any]:
    """The threshold keys present in ``entries``, converted and checked.

    ``Any``: the values are floats and one int, for ``dataclasses.replace(thresholds, **values)``.
    """
    values: dict[str, Any] = {}
    for key in _THRESHOLD_KEYS:
        if key in entries:
            node, key_path = entries[key][1], f"{path}.{key}"
            if key == "warn_at":
                values[key] = fraction(node, key_path)
            elif key == "retransmit_threshold":
                values[key] = integer(node, key_path, 1, None)
            else:  # the durations; only close_wait_after may be 0 (flag any CLOSE_WAIT)
                values[key] = duration(node, key_path, zero_ok=key == "close_wait_after")
    return values


def _severity(node: Node, path: str) -> Severity:
    expected = "one of: " + ", ".join(s.label for s in Severity)
    try:
        return Severity.parse(string(node, path, expected))
    except ValueError:
        raise Invalid(node, path, f"expected {expected}, got {describe(node)}") from None


def _cidr(node: Node, path: str) -> IPNetwork:
    text = string(node, path, 'an IP network like "10.0.0.0/8"')
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise Invalid(
            node,
            path,
            f'expected an IP network like "10.0.0.0/8" or "fd00::/8", got {describe(node)}',
        ) from None


def _state(node: Node, path: str) -> TcpState:
    expected = "a TCP state, one of: " + ", ".join(s.label for s in _STATES.values())
    text = string(node, path, expected)
    state = _STATES.get(text.strip().upper().replace("-", "").replace("_", ""))
    if state is None:
        raise Invalid(node, path, f"expected {expected}, got {describe(node)}")
    return state
