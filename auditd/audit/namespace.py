"""Namespace findings: sysctls out of their bounds, dead-peer detection times over budget. Pure.

Both are checked against the rules' ``defaults`` (and the budget of each rule that sets its
own and matched a socket of the namespace); for another namespace than the host, a message
says where the host's values differ (a new netns starts at the compiled defaults).
"""

from __future__ import annotations

from auditd.audit import hints
from auditd.audit.inference import idle_detection_seconds, retries2_timeout
from auditd.audit.matching import DEFAULT_RULE
from auditd.audit.paths import fmt_s
from auditd.config import RuleSet, SysctlBound, Thresholds
from auditd.model import DetectionCase, Finding, FindingKind, Severity, Sysctls


def _expected(bound: SysctlBound) -> str:
    if bound.min is not None and bound.max is not None:
        return str(bound.min) if bound.min == bound.max else f"{bound.min}..{bound.max}"
    if bound.min is not None:
        return f">= {bound.min}"
    return f"<= {bound.max}"


NOT_INHERITED = "this namespace did not inherit the host's tuning"
# The sysctls behind each case of the detection time (see detection_times).
CASE_SYSCTLS = {
    "idle": ("net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_keepalive_intvl",
             "net.ipv4.tcp_keepalive_probes"),
    "in_flight": ("net.ipv4.tcp_retries2", "net.ipv4.tcp_rto_max_ms"),
}  # fmt: skip


def _out_of(bound: SysctlBound, value: int) -> bool:
    return (bound.min is not None and value < bound.min) or (
        bound.max is not None and value > bound.max
    )


def _host_differs(sysctls: Sysctls, host: Sysctls | None, names: tuple[str, ...]) -> str:
    """``tcp_keepalive_time=300, ...``: the host's values of ``names`` where this namespace
    has another (a new netns starts at the compiled defaults, shared/KERNEL.md); "" if none."""
    if host is None:
        return ""
    return ", ".join(
        f"{name.rsplit('.', 1)[-1]}={host.values[name]}"
        for name in names
        if name in host.values and name in sysctls.values
        and host.values[name] != sysctls.values[name]
    )  # fmt: skip


def sysctl_findings(
    rules: RuleSet, sysctls: Sysctls, netns: str, host: Sysctls | None = None
) -> list[Finding]:
    """Sysctls out of their bounds. ``host``: the host namespace's sysctls, given for another
    namespace, so a message says when the host has a different value."""
    out: list[Finding] = []
    for bound in rules.sysctls:
        value = sysctls.get(bound.name)
        if value is None or not _out_of(bound, value):
            continue
        expected = _expected(bound)
        message = f"{bound.name} is {value}, the rules expect {expected}"
        theirs = host.get(bound.name) if host is not None else None
        if theirs is not None and theirs != value:
            why = "" if _out_of(bound, theirs) else f": {NOT_INHERITED}"
            message += f" (the host has {theirs}{why})"
        out.append(
            Finding(
                kind=FindingKind.SYSCTL,
                severity=bound.severity,
                rule=DEFAULT_RULE,
                netns=netns,
                message=message,
                hint=hints.sysctl(bound, value),
                sysctl=bound.name,
                value=value,
                expected=expected,
            )
        )
    return out


def detection_times(sysctls: Sysctls) -> tuple[float, float]:
    """(idle case, in-flight case) dead-peer detection seconds for sockets on the defaults."""
    idle = idle_detection_seconds(
        sysctls.keepalive_time, sysctls.keepalive_intvl, sysctls.keepalive_probes
    )
    return idle, retries2_timeout(sysctls.retries2, sysctls.rto_max_ms)


def budget_findings(
    rules: RuleSet,
    sysctls: Sysctls,
    netns: str,
    matched_rules: frozenset[str] = frozenset(),
    host: Sysctls | None = None,
) -> list[Finding]:
    """The namespace's detection times against the default budget, and against the budget of
    each rule that sets its own and matched a socket in this namespace. ``host`` as in
    ``sysctl_findings``: a message names the host's values where they differ."""
    idle, in_flight = detection_times(sysctls)
    host_times = dict(zip(("idle", "in_flight"), detection_times(host))) if host is not None else {}
    checks: list[tuple[str, Thresholds, Severity | None]] = [(DEFAULT_RULE, rules.defaults, None)]
    for rule in rules.rules:
        if not rule.ignore and "detection_budget" in rule.overrides and rule.name in matched_rules:
            checks.append((rule.name, rule.thresholds, rule.severity))
    out: list[Finding] = []
    for rule_name, thresholds, override in checks:
        budget = thresholds.detection_budget
        for case, seconds, arithmetic in (
            (DetectionCase.IDLE, idle, hints.idle_arithmetic(sysctls)),
            (DetectionCase.IN_FLIGHT, in_flight, hints.in_flight_arithmetic(sysctls)),
        ):
            if seconds <= budget:
                continue
            what = (
                "an idle connection with keepalive"
                if case == "idle"
                else "a connection with data in flight"
            )
            theirs = _host_differs(sysctls, host, CASE_SYSCTLS[case])
            if theirs:
                why = f": {NOT_INHERITED}" if host_times[case] <= budget else ""
                theirs = f"; the host has {theirs} ({fmt_s(host_times[case])}){why}"
            out.append(
                Finding(
                    kind=FindingKind.DETECTION_BUDGET,
                    severity=override or Severity.WARNING,
                    rule=rule_name,
                    netns=netns,
                    message=(
                        f"a dead peer on {what} is noticed after {fmt_s(seconds)} "
                        f"({arithmetic}), over the {fmt_s(budget)} detection budget{theirs}"
                    ),
                    hint=hints.budget(case, budget, sysctls, thresholds.idle_timeout),
                    value=round(seconds, 1),
                    expected=f"<= {budget:g}",
                    case=case,
                )
            )
    return out
