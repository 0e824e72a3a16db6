"""The rules as the audit uses them: frozen dataclasses, built by ``config.rules``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from auditd.model import Severity

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

BUILTIN_SOURCE = "<built-in>"


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The tunables of ``defaults:``; a rule overrides any of them."""

    idle_timeout: float = 350.0  # seconds
    warn_at: float = 0.5  # fraction of idle_timeout
    detection_budget: float = 900.0  # seconds
    close_wait_after: float = 60.0  # seconds
    retransmit_threshold: int = 3


@dataclass(frozen=True, slots=True)
class SysctlBound:
    name: str  # dotted, e.g. "net.ipv4.tcp_keepalive_time"
    min: int | None = None
    max: int | None = None
    severity: Severity = Severity.WARNING


@dataclass(frozen=True, slots=True)
class Match:
    """Criteria of a rule; an empty criterion matches anything; all given criteria must hold."""

    local_ports: frozenset[int] = frozenset()
    remote_ports: frozenset[int] = frozenset()
    local_cidrs: tuple[IPNetwork, ...] = ()
    remote_cidrs: tuple[IPNetwork, ...] = ()
    processes: tuple[str, ...] = ()  # fnmatch globs on the process name
    states: frozenset[int] = frozenset()  # TcpState values


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    match: Match = field(default_factory=Match)
    thresholds: Thresholds = field(default_factory=Thresholds)  # defaults merged in
    severity: Severity | None = None  # overrides the severity of this rule's findings
    ignore: bool = False
    overrides: frozenset[str] = frozenset()  # threshold names the rule set itself


@dataclass(frozen=True, slots=True)
class RuleSet:
    defaults: Thresholds = field(default_factory=Thresholds)
    sysctls: tuple[SysctlBound, ...] = ()
    rules: tuple[Rule, ...] = ()
    source: str = BUILTIN_SOURCE

    @property
    def uses_processes(self) -> bool:
        return any(rule.match.processes for rule in self.rules)


def builtin_rules() -> RuleSet:
    """What the agent uses when no rules file exists: the documented defaults, no rules."""
    return RuleSet()
