"""Rules over sockets and sysctls -> findings. Pure: no I/O, deterministic.

``could_flag`` is the cheap pre-filter run on every socket of a dump; only the sockets it
keeps get process attribution and a full ``socket_findings`` evaluation.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

from auditd.audit import cadence, hints
from auditd.audit.inference import (
    KEEPALIVE_STATES,
    abort_in,
    idle_detection_seconds,
    keepalive_params,
    keepalive_status,
    path_idle_ms,
    probe_cadence,
    recv_idle_ms,
    retries2_timeout,
)
from auditd.audit.ruleindex import index_for
from auditd.config import Match, Rule, RuleSet, SysctlBound, Thresholds
from auditd.model import (
    Finding,
    FindingKind,
    Keepalive,
    ProcessInfo,
    Severity,
    Sock,
    SocketOptions,
    Sysctls,
    TcpState,
    TimerKind,
    state_label,
)

DEFAULT_RULE = "default"


def loosest(rules: RuleSet, cap: float | None = None) -> Thresholds:
    """The thresholds that flag the most: a socket not flagged by these is flagged by no rule.

    ``cap``: the tightest local middlebox timeout of the namespace (``middlebox_cap``), which
    replaces every rule's idle_timeout that is longer, as in ``socket_findings``.
    """
    every = [rules.defaults, *(r.thresholds for r in rules.rules if not r.ignore)]
    if cap is not None:
        every = [replace(t, idle_timeout=cap) if cap < t.idle_timeout else t for t in every]
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


def could_flag(sock: Sock, t: Thresholds, options: SocketOptions | None = None) -> bool:
    """True if some socket finding may apply under thresholds ``t`` (see ``loosest``), and
    under the socket's own ``options`` when they were read."""
    if options is not None:
        return _could_flag_exact(sock, t, options)
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
        # keepalive_too_slow needs the path idle past warn_at × idle_timeout (cadence.py); the
        # silence itself may come from the namespace's keepintvl, which is judged there.
        return sock.retrans > 0 or path_idle_ms(sock) / 1000 >= t.warn_at * t.idle_timeout
    if timer == TimerKind.NONE and state == TcpState.ESTABLISHED:
        return path_idle_ms(sock) / 1000 >= t.warn_at * t.idle_timeout
    return False


def _could_flag_exact(sock: Sock, t: Thresholds, options: SocketOptions) -> bool:
    """could_flag with SO_KEEPALIVE and TCP_KEEPIDLE known: on the opt-in inspection path."""
    state = sock.state
    if state not in KEEPALIVE_STATES:
        return False
    if state == TcpState.CLOSE_WAIT and recv_idle_ms(sock) / 1000 >= t.close_wait_after:
        return True
    timer = sock.timer
    if options.keepalive:
        if user_timeout_too_short(options):
            return True
        if (
            probe_cadence(options.idle, options.intvl) > t.idle_timeout
            and path_idle_ms(sock) / 1000 >= t.warn_at * t.idle_timeout
        ):
            return True
        if timer == TimerKind.KEEPALIVE:
            return sock.retrans > 0
    elif state == TcpState.ESTABLISHED and timer not in (TimerKind.RETRANSMIT,
                                                         TimerKind.ZERO_WINDOW_PROBE):  # fmt: skip
        return path_idle_ms(sock) / 1000 >= t.warn_at * t.idle_timeout
    if timer == TimerKind.RETRANSMIT or timer == TimerKind.ZERO_WINDOW_PROBE:
        return sock.retrans >= t.retransmit_threshold
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
    """The first rule whose match holds, or None (the defaults apply). Only the rules that
    may match are tried (``ruleindex``: by port and network), in file order."""
    for rule in index_for(rules).candidates(sock):
        if matches(rule.match, sock, process):
            return rule
    return None


def _sev(default: Severity, rule: Rule | None) -> Severity:
    return rule.severity if rule is not None and rule.severity is not None else default


def _fmt_s(seconds: float) -> str:
    r = round(seconds, 1)
    return f"{int(r)} s" if r == int(r) else f"{r} s"


def middlebox_timeout(t: Thresholds, sysctls: Sysctls, sock: Sock) -> tuple[float, str]:
    """The idle timeout of the socket's path and what sets it: the rule's ``idle_timeout``,
    or the namespace's own conntrack or IPVS when tighter (local middleboxes: an entry idle
    past its timeout is dropped, and the next segment of the connection with it)."""
    timeout, what = t.idle_timeout, ""
    ct = sysctls.conntrack_timeout
    if ct is not None and ct < timeout:
        timeout = float(ct)
        what = (
            f"this namespace's conntrack (net.netfilter.nf_conntrack_tcp_timeout_established="
            f"{ct}; the rule's idle_timeout is {_fmt_s(t.idle_timeout)})"
        )
    ipvs = sysctls.ipvs_tcp_timeout
    if ipvs is not None and ipvs < timeout and _through_ipvs(sock, sysctls):
        timeout = float(ipvs)
        what = (
            f"this namespace's IPVS (TCP timeout {ipvs} s for the virtual service; the rule's "
            f"idle_timeout is {_fmt_s(t.idle_timeout)})"
        )
    return timeout, what


def _through_ipvs(sock: Sock, sysctls: Sysctls) -> bool:
    """The socket talks to an IPVS virtual service of its namespace (a client of the VIP), or
    is one (a local real server answers with the VIP as its address)."""
    services = sysctls.ipvs_services
    return (sock.dst16, sock.dport) in services or (sock.src16, sock.sport) in services


def middlebox_cap(sysctls: Sysctls) -> float | None:
    """The tightest local middlebox timeout that may apply to some socket of the namespace."""
    caps = [c for c in (sysctls.conntrack_timeout,) if c is not None]
    if sysctls.ipvs_tcp_timeout is not None and sysctls.ipvs_services:
        caps.append(sysctls.ipvs_tcp_timeout)
    return float(min(caps)) if caps else None


def user_timeout_too_short(options: SocketOptions) -> bool:
    """TCP_USER_TIMEOUT set below keepidle + keepcnt × keepintvl on a socket with keepalive:
    fewer unanswered probes than keepcnt abort it (tcp_keepalive_timer, shared/KERNEL.md)."""
    return (
        options.keepalive
        and options.user_timeout_ms > 0
        and options.user_timeout_ms < (options.idle + options.cnt * options.intvl) * 1000
    )


# A finding's text, built only for the findings that are reported: (message, hint, seconds
# until the kernel aborts the connection or None).
Render = Callable[[], tuple[str, str, "float | None"]]


class Verdict(NamedTuple):
    """One finding that applies to a socket, its text not built yet (``render``)."""

    kind: str
    severity: Severity
    render: Render


def judge(
    rules: RuleSet,
    sock: Sock,
    process: ProcessInfo | None,
    sysctls: Sysctls,
    options: SocketOptions | None = None,
) -> tuple[Rule | None, list[Verdict]]:
    """The rule that applies to one socket (None: the defaults) and the findings it gets.

    Decides only: each verdict builds its message and hint when rendered, so a host with
    150k idle sockets costs 150k decisions, not 150k messages (``socket_findings`` renders).
    ``options``: the socket's own keepalive settings when they were read (socket inspection):
    then the keepalive status, the first-probe delay and the abort estimates are exact, and a
    user timeout too short for the probes is a finding of its own.
    """
    rule = select_rule(rules, sock, process)
    if rule is not None and rule.ignore:
        return rule, []
    t = rule.thresholds if rule is not None else rules.defaults
    ka = keepalive_status(sock, options)
    timeout, middlebox = middlebox_timeout(t, sysctls, sock)
    if timeout != t.idle_timeout:
        t = replace(t, idle_timeout=timeout)
    keepalive_state = sock.state in KEEPALIVE_STATES
    name = process.name if process is not None else None
    out: list[Verdict] = []

    def app() -> hints.AppKnob | None:
        return hints.recognise(name, sock.dport)

    def too_slow() -> None:
        """keepalive_too_slow: the path idle long enough to matter, and keepalive's silence
        past the idle timeout (auditd.audit.cadence)."""
        silence = cadence.too_slow(t, sock, sysctls, options)
        if silence is None:
            return

        def render() -> tuple[str, str, float | None]:
            return (
                cadence.message(silence, t, sock, sysctls, middlebox, options),
                hints.too_slow(t, app(), hints.SlowCause(silence.cause)),
                None,
            )

        out.append(Verdict(FindingKind.KEEPALIVE_TOO_SLOW, _sev(Severity.WARNING, rule), render))

    if sock.timer in (TimerKind.RETRANSMIT, TimerKind.ZERO_WINDOW_PROBE):
        if sock.retrans >= t.retransmit_threshold and keepalive_state:

            def retransmitting() -> tuple[str, str, float | None]:
                left = abort_in(sock, sysctls, options)
                what = (
                    "retransmissions"
                    if sock.timer == TimerKind.RETRANSMIT
                    else "zero-window probes"
                )
                limit = (
                    f"TCP_USER_TIMEOUT={options.user_timeout_ms} ms"
                    if options is not None and options.user_timeout_ms and sock.timer == 1
                    else f"tcp_retries2={sysctls.retries2}"
                )
                return (
                    f"{sock.retrans} unanswered {what} with {sock.unacked} segment(s) "
                    f"unacknowledged: the peer is unreachable; the kernel gives up in about "
                    f"{_fmt_s(left or 0)} ({limit})",
                    hints.in_flight(t, sysctls.retries2, sysctls.rto_max_ms, app()),
                    left,
                )

            worse = sock.retrans >= 2 * t.retransmit_threshold
            sev = _sev(Severity.CRITICAL if worse else Severity.WARNING, rule)
            out.append(Verdict(FindingKind.RETRANSMITTING, sev, retransmitting))
        if options is not None and ka == Keepalive.ON and keepalive_state:
            too_slow()  # exact options: judged like an idle socket (cadence.too_slow)
    elif (
        ka == Keepalive.ON
        and keepalive_state  # in FIN_WAIT2 timer 2 counts down tcp_fin_timeout
        and sock.timer == TimerKind.KEEPALIVE
        and sock.retrans > 0
    ):

        def probing() -> tuple[str, str, float | None]:
            params = keepalive_params(sock, sysctls, options)
            left = abort_in(sock, sysctls, options)
            schedule = f"{params.cnt} probes every {_fmt_s(params.intvl)}"
            if params.user_timeout > 0:
                schedule = f"TCP_USER_TIMEOUT {_fmt_s(params.user_timeout)}, probes every " + (
                    _fmt_s(params.intvl)
                )
            return (
                f"{sock.retrans} keepalive probe(s) unanswered after "
                f"{_fmt_s(recv_idle_ms(sock) / 1000)} of silence: the peer is gone and the "
                f"connection is half-open now; the kernel aborts it in about "
                f"{_fmt_s(left or 0)} ({schedule})",
                hints.probing(),
                left,
            )

        sev = _sev(Severity.CRITICAL if sock.retrans >= 2 else Severity.WARNING, rule)
        out.append(Verdict(FindingKind.KEEPALIVE_PROBING, sev, probing))
    elif ka == Keepalive.ON and keepalive_state:
        too_slow()
    elif (
        ka == Keepalive.OFF
        and sock.state == TcpState.ESTABLISHED
        and sock.timer != TimerKind.KEEPALIVE
        and (path_idle := path_idle_ms(sock) / 1000) >= t.warn_at * t.idle_timeout
    ):
        critical = path_idle >= t.idle_timeout

        def idle() -> tuple[str, str, float | None]:
            dropper = "a middlebox on the path" if not middlebox else middlebox.split(" (", 1)[0]
            verdict = (
                f"{dropper} has probably dropped it already, unless the peer sends keepalive "
                f"probes (incoming probes leave no trace in this side's tcp_info)"
                if critical
                else f"it is {path_idle / t.idle_timeout:.0%} of the way to being dropped"
            )
            source = f": {middlebox}" if middlebox else ""
            return (
                f"idle for {_fmt_s(path_idle)} without keepalive (path idle timeout "
                f"{_fmt_s(t.idle_timeout)}{source}): {verdict}; a dead peer would never be "
                f"noticed",
                hints.no_keepalive(t, app()),
                None,
            )

        sev = _sev(Severity.CRITICAL if critical else Severity.WARNING, rule)
        out.append(Verdict(FindingKind.IDLE_NO_KEEPALIVE, sev, idle))

    if options is not None and keepalive_state and user_timeout_too_short(options):
        opts = options

        def user_timeout() -> tuple[str, str, float | None]:
            survives = hints.user_timeout_probes(opts)
            after = opts.idle + survives * opts.intvl
            return (
                f"TCP_USER_TIMEOUT {_fmt_s(opts.user_timeout_ms / 1000)} is shorter than "
                f"keepidle {opts.idle} + keepcnt {opts.cnt} × keepintvl {opts.intvl} = "
                f"{_fmt_s(opts.idle + opts.cnt * opts.intvl)}: the kernel aborts the "
                f"connection after {survives} unanswered keepalive probe(s) ({_fmt_s(after)} "
                f"of silence), not {opts.cnt}; one probe lost on the way (a local queue "
                f"overflowing when many sockets probe in the same tick) kills a healthy "
                f"connection",
                hints.user_timeout(opts, app()),
                None,
            )

        sev = _sev(Severity.WARNING, rule)
        out.append(Verdict(FindingKind.USER_TIMEOUT_TOO_SHORT, sev, user_timeout))

    if sock.state == TcpState.CLOSE_WAIT:
        age = recv_idle_ms(sock) / 1000
        if age >= t.close_wait_after:

            def close_wait() -> tuple[str, str, float | None]:
                return (
                    f"in CLOSE_WAIT for {_fmt_s(age)}: the peer closed (its process exited or "
                    f"closed the connection) and the local application never closed its side",
                    hints.close_wait(name),
                    None,
                )

            out.append(Verdict(FindingKind.CLOSE_WAIT, _sev(Severity.WARNING, rule), close_wait))
    return rule, out


def socket_findings(
    rules: RuleSet,
    sock: Sock,
    process: ProcessInfo | None,
    sysctls: Sysctls,
    netns: str,
    options: SocketOptions | None = None,
) -> list[Finding]:
    """Findings for one socket under the first matching rule (or the defaults), rendered
    (``judge`` decides, see there)."""
    rule, verdicts = judge(rules, sock, process, sysctls, options)
    return [render(v, rule, sock, process, netns, options, sysctls) for v in verdicts]


def render(
    verdict: Verdict,
    rule: Rule | None,
    sock: Sock,
    process: ProcessInfo | None,
    netns: str,
    options: SocketOptions | None = None,
    sysctls: Sysctls | None = None,
) -> Finding:
    """The finding of one verdict of ``judge``, with its text and the socket's figures, and
    the keepalive settings the verdict used (read, or inferred from ``sysctls``)."""
    message, hint, left = verdict.render()
    timer = sock.timer
    params = None if sysctls is None else keepalive_params(sock, sysctls, options)
    return Finding(
        kind=verdict.kind,
        severity=verdict.severity,
        rule=rule.name if rule is not None else DEFAULT_RULE,
        netns=netns,
        message=message,
        hint=hint,
        state=state_label(sock.state),
        local=sock.local,
        remote=sock.remote,
        idle_seconds=round(path_idle_ms(sock) / 1000, 3),
        keepalive=keepalive_status(sock, options),
        probes=sock.retrans if timer in (TimerKind.KEEPALIVE, TimerKind.ZERO_WINDOW_PROBE) else 0,
        retransmits=sock.retrans if timer == TimerKind.RETRANSMIT else 0,
        abort_in_seconds=None if left is None else round(left, 1),
        pid=process.pid if process is not None else None,
        process=process.name if process is not None else None,
        cmdline=(process.cmdline or None) if process is not None else None,
        unit=process.unit if process is not None else None,
        container=process.container if process is not None else None,
        inode=sock.inode or None,
        keepalive_idle_seconds=None if params is None else params.idle,
        keepalive_interval_seconds=None if params is None else params.intvl,
        keepalive_count=None if params is None else params.cnt,
        user_timeout_ms=None if params is None else round(params.user_timeout * 1000),
        options_source="inferred" if options is None else options.source,
        uid=process.uid if process is not None else None,
        user=process.user if process is not None else None,
        started_at=process.started_at if process is not None else None,
    )


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
            theirs = _host_differs(sysctls, host, CASE_SYSCTLS[case])
            if theirs:
                why = f": {NOT_INHERITED}" if host_times[case] <= budget else ""
                theirs = f"; the host has {theirs} ({_fmt_s(host_times[case])}){why}"
            out.append(
                Finding(
                    kind=FindingKind.DETECTION_BUDGET,
                    severity=override or Severity.WARNING,
                    rule=rule_name,
                    netns=netns,
                    message=(
                        f"a dead peer on {what} is noticed after {_fmt_s(seconds)} "
                        f"({arithmetic}), over the {_fmt_s(budget)} detection budget{theirs}"
                    ),
                    hint=hints.budget(case, budget, sysctls, thresholds.idle_timeout),
                    value=round(seconds, 1),
                    expected=f"<= {budget:g}",
                    case=case,
                )
            )
    return out
