"""Rules over sockets and sysctls -> findings. Pure: no I/O, deterministic.

``could_flag`` is the cheap pre-filter run on every socket of a dump; only the sockets it
keeps get process attribution and a full ``socket_findings`` evaluation.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math

from auditd.audit import hints
from auditd.audit.inference import (
    KEEPALIVE_STATES,
    abort_in,
    idle_detection_seconds,
    keepalive_params,
    keepalive_status,
    path_idle_ms,
    recv_idle_ms,
    retries2_timeout,
)
from auditd.config import Match, Rule, RuleSet, SysctlBound, Thresholds
from auditd.model import (
    Finding,
    FindingKind,
    Keepalive,
    ProcessInfo,
    Severity,
    Sock,
    Sysctls,
    TcpState,
    TimerKind,
    state_label,
)

DEFAULT_RULE = "default"


def loosest(rules: RuleSet) -> Thresholds:
    """The thresholds that flag the most: a socket not flagged by these is flagged by no rule."""
    every = [rules.defaults, *(r.thresholds for r in rules.rules if not r.ignore)]
    idle_timeout = min(t.idle_timeout for t in every)
    warn_after = min(t.warn_at * t.idle_timeout for t in every)
    warn_at = warn_after / max(idle_timeout, 1e-9)
    # could_flag multiplies back: rounding must not put the loosest warning after a rule's.
    while warn_at * idle_timeout > warn_after:
        warn_at = math.nextafter(warn_at, 0.0)
    return Thresholds(
        idle_timeout=idle_timeout,
        warn_at=warn_at,
        detection_budget=min(t.detection_budget for t in every),
        close_wait_after=min(t.close_wait_after for t in every),
        retransmit_threshold=min(t.retransmit_threshold for t in every),
    )


def could_flag(sock: Sock, t: Thresholds) -> bool:
    """True if some socket finding may apply under thresholds ``t`` (see ``loosest``)."""
    state = sock.state
    if state not in KEEPALIVE_STATES:
        return False
    # Each comparison is written as in socket_findings (ms / 1000 against seconds): the
    # same float rounding, so a socket exactly at a threshold is kept.
    if state == TcpState.CLOSE_WAIT and recv_idle_ms(sock) / 1000 >= t.close_wait_after:
        return True
    timer = sock.timer
    if timer == TimerKind.RETRANSMIT or timer == TimerKind.ZERO_WINDOW_PROBE:
        return sock.retrans >= t.retransmit_threshold
    if timer == TimerKind.KEEPALIVE:
        return sock.retrans > 0 or (recv_idle_ms(sock) + sock.expires_ms) / 1000 > t.idle_timeout
    if timer == TimerKind.NONE and state == TcpState.ESTABLISHED:
        return path_idle_ms(sock) / 1000 >= t.warn_at * t.idle_timeout
    return False


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
    """The first rule whose match holds, or None (the defaults apply)."""
    for rule in rules.rules:
        if matches(rule.match, sock, process):
            return rule
    return None


def _sev(default: Severity, rule: Rule | None) -> Severity:
    return rule.severity if rule is not None and rule.severity is not None else default


def _fmt_s(seconds: float) -> str:
    r = round(seconds, 1)
    return f"{int(r)} s" if r == int(r) else f"{r} s"


def socket_findings(
    rules: RuleSet,
    sock: Sock,
    process: ProcessInfo | None,
    sysctls: Sysctls,
    netns: str,
) -> list[Finding]:
    """Findings for one socket under the first matching rule (or the defaults)."""
    rule = select_rule(rules, sock, process)
    if rule is not None and rule.ignore:
        return []
    t = rule.thresholds if rule is not None else rules.defaults
    rule_name = rule.name if rule is not None else DEFAULT_RULE
    ka = keepalive_status(sock)
    path_idle = path_idle_ms(sock) / 1000
    probes = sock.retrans if sock.timer in (TimerKind.KEEPALIVE, TimerKind.ZERO_WINDOW_PROBE) else 0
    label = state_label(sock.state)
    local, remote = sock.local, sock.remote

    def make(
        kind: str, sev: Severity, message: str, hint: str, left: float | None = None
    ) -> Finding:
        return Finding(
            kind=kind,
            severity=_sev(sev, rule),
            rule=rule_name,
            netns=netns,
            message=message,
            hint=hint,
            state=label,
            local=local,
            remote=remote,
            idle_seconds=round(path_idle, 3),
            keepalive=ka,
            probes=probes,
            retransmits=sock.retrans if sock.timer == TimerKind.RETRANSMIT else 0,
            abort_in_seconds=None if left is None else round(left, 1),
            pid=process.pid if process is not None else None,
            process=process.name if process is not None else None,
            inode=sock.inode or None,
        )

    out: list[Finding] = []
    app = process.name if process is not None else None

    if sock.timer in (TimerKind.RETRANSMIT, TimerKind.ZERO_WINDOW_PROBE):
        if sock.retrans >= t.retransmit_threshold and sock.state in KEEPALIVE_STATES:
            left = abort_in(sock, sysctls)
            what = "retransmissions" if sock.timer == TimerKind.RETRANSMIT else "zero-window probes"
            worse = sock.retrans >= 2 * t.retransmit_threshold
            out.append(make(
                FindingKind.RETRANSMITTING,
                Severity.CRITICAL if worse else Severity.WARNING,
                f"{sock.retrans} unanswered {what} with {sock.unacked} segment(s) "
                f"unacknowledged: the peer is unreachable; the kernel gives up in about "
                f"{_fmt_s(left or 0)} (tcp_retries2={sysctls.retries2})",
                hints.in_flight(t, sysctls.retries2, sysctls.rto_max_ms, app),
                left,
            ))  # fmt: skip
    elif ka == Keepalive.ON and sock.retrans > 0:
        params = keepalive_params(sock, sysctls)
        left = abort_in(sock, sysctls)
        out.append(make(
            FindingKind.KEEPALIVE_PROBING,
            Severity.CRITICAL if sock.retrans >= 2 else Severity.WARNING,
            f"{sock.retrans} keepalive probe(s) unanswered after "
            f"{_fmt_s(recv_idle_ms(sock) / 1000)} of silence: the peer is gone and the "
            f"connection is half-open now; the kernel aborts it in about "
            f"{_fmt_s(left or 0)} ({params.cnt} probes every {_fmt_s(params.intvl)})",
            hints.probing(),
            left,
        ))  # fmt: skip
    elif ka == Keepalive.ON:
        params = keepalive_params(sock, sysctls)
        bound = params.idle_lower_bound
        if bound is not None and bound > t.idle_timeout:
            whose = (
                f" (the namespace default tcp_keepalive_time={sysctls.keepalive_time})"
                if params.source == "sysctl"
                else " (longer than the namespace default: the socket sets its own "
                "TCP_KEEPIDLE, or enabled keepalive after its last segment)"
            )
            out.append(make(
                FindingKind.KEEPALIVE_TOO_SLOW,
                Severity.WARNING,
                f"keepalive is on but its first probe comes at least {_fmt_s(bound)} after the "
                f"last segment received, later than the {_fmt_s(t.idle_timeout)} idle timeout "
                f"of the path{whose}",
                hints.too_slow(t, app),
            ))  # fmt: skip
    elif (
        ka == Keepalive.OFF
        and sock.state == TcpState.ESTABLISHED
        and path_idle >= t.warn_at * t.idle_timeout
    ):
        critical = path_idle >= t.idle_timeout
        verdict = (
            "a middlebox on the path has probably dropped it already"
            if critical
            else f"it is {path_idle / t.idle_timeout:.0%} of the way to being dropped"
        )
        out.append(make(
            FindingKind.IDLE_NO_KEEPALIVE,
            Severity.CRITICAL if critical else Severity.WARNING,
            f"idle for {_fmt_s(path_idle)} without keepalive (path idle timeout "
            f"{_fmt_s(t.idle_timeout)}): {verdict}; a dead peer would never be noticed",
            hints.no_keepalive(t, app),
        ))  # fmt: skip

    if sock.state == TcpState.CLOSE_WAIT:
        age = recv_idle_ms(sock) / 1000
        if age >= t.close_wait_after:
            out.append(make(
                FindingKind.CLOSE_WAIT,
                Severity.WARNING,
                f"in CLOSE_WAIT for {_fmt_s(age)}: the peer closed (its process exited or "
                f"closed the connection) and the local application never closed its side",
                hints.close_wait(app),
            ))  # fmt: skip
    return out


def _expected(bound: SysctlBound) -> str:
    if bound.min is not None and bound.max is not None:
        return str(bound.min) if bound.min == bound.max else f"{bound.min}..{bound.max}"
    if bound.min is not None:
        return f">= {bound.min}"
    return f"<= {bound.max}"


def sysctl_findings(rules: RuleSet, sysctls: Sysctls, netns: str) -> list[Finding]:
    out: list[Finding] = []
    for bound in rules.sysctls:
        value = sysctls.get(bound.name)
        if value is None:
            continue
        low = bound.min is not None and value < bound.min
        high = bound.max is not None and value > bound.max
        if not (low or high):
            continue
        expected = _expected(bound)
        out.append(
            Finding(
                kind=FindingKind.SYSCTL,
                severity=bound.severity,
                rule=DEFAULT_RULE,
                netns=netns,
                message=f"{bound.name} is {value}, the rules expect {expected}",
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
    rules: RuleSet, sysctls: Sysctls, netns: str, matched_rules: frozenset[str] = frozenset()
) -> list[Finding]:
    """The namespace's detection times against the default budget, and against the budget of
    each rule that sets its own and matched a socket in this namespace."""
    idle, in_flight = detection_times(sysctls)
    checks: list[tuple[str, float, Severity | None]] = [
        (DEFAULT_RULE, rules.defaults.detection_budget, None)
    ]
    for rule in rules.rules:
        if not rule.ignore and "detection_budget" in rule.overrides and rule.name in matched_rules:
            checks.append((rule.name, rule.thresholds.detection_budget, rule.severity))
    out: list[Finding] = []
    for rule_name, budget, override in checks:
        for case, seconds, arithmetic in (
            ("idle", idle, hints.idle_arithmetic(sysctls)),
            ("in_flight", in_flight, hints.in_flight_arithmetic(sysctls)),
        ):
            if seconds <= budget:
                continue
            what = (
                "an idle connection with keepalive"
                if case == "idle"
                else "a connection with data in flight"
            )
            out.append(
                Finding(
                    kind=FindingKind.DETECTION_BUDGET,
                    severity=override or Severity.WARNING,
                    rule=rule_name,
                    netns=netns,
                    message=(
                        f"a dead peer on {what} is noticed after {_fmt_s(seconds)} "
                        f"({arithmetic}), over the {_fmt_s(budget)} detection budget"
                    ),
                    hint=hints.budget(case, budget, sysctls),
                    value=round(seconds, 1),
                    expected=f"<= {budget:g}",
                    case=case,
                )
            )
    return out
