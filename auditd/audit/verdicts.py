"""Per-socket verdicts: which findings apply to one socket, and their text. Pure.

``judge`` decides only; each verdict renders its message and hint when asked, so a host
with 150k idle sockets costs 150k decisions, not 150k messages. Each finding kind has its
own small function over a shared ``Case`` (the socket, its rule's thresholds, its path
timeout); ``render`` turns a verdict into a Finding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple

from auditd.audit import cadence, hints
from auditd.audit.inference import (
    KEEPALIVE_STATES,
    Silence,
    abort_in,
    keepalive_params,
    keepalive_status,
    path_idle_ms,
    recv_idle_ms,
    user_timeout_too_short,
)
from auditd.audit.matching import DEFAULT_RULE, select_rule
from auditd.audit.paths import fmt_s, middlebox_timeout
from auditd.config import Rule, RuleSet, Thresholds
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

# A finding's text, built only for the findings that are reported: (message, hint, seconds
# until the kernel aborts the connection or None).
Render = Callable[[], tuple[str, str, "float | None"]]
Text = tuple[str, str, "float | None"]


class Verdict(NamedTuple):
    """One finding that applies to a socket, its text not built yet (``render``)."""

    kind: FindingKind
    severity: Severity
    render: Render


@dataclass(frozen=True, slots=True)
class Case:
    """One socket under its rule: what every verdict of ``judge`` looks at."""

    rule: Rule | None
    t: Thresholds  # the rule's thresholds, idle_timeout capped by a local middlebox
    sock: Sock
    sysctls: Sysctls
    options: SocketOptions | None  # the socket's own settings, when they were read
    keepalive: str  # Keepalive status
    middlebox: str  # what sets the path timeout when not the rule ("" if the rule)
    process: str | None  # the owner's name

    def severity(self, default: Severity) -> Severity:
        """``default``, unless the rule overrides every severity of its findings."""
        rule = self.rule
        return rule.severity if rule is not None and rule.severity is not None else default

    def app(self) -> hints.AppKnob | None:
        return hints.recognise(self.process, self.sock.dport)


def idle_severity(idle: float, warn_after: float, timeout: float) -> Severity | None:
    """idle_no_keepalive for ``idle`` seconds of path idle: a warning from ``warn_after``
    (warn_at × idle_timeout), critical from the idle timeout itself, else None."""
    if idle < warn_after:
        return None
    return Severity.CRITICAL if idle >= timeout else Severity.WARNING


def _too_slow(c: Case) -> Verdict | None:
    """keepalive_too_slow: the path idle long enough to matter, and keepalive's silence past
    the idle timeout (auditd.audit.cadence)."""
    silence = cadence.too_slow(c.t, c.sock, c.sysctls, c.options)
    if silence is None:
        return None
    render = partial(_too_slow_text, c, silence)
    return Verdict(FindingKind.KEEPALIVE_TOO_SLOW, c.severity(Severity.WARNING), render)


def _too_slow_text(c: Case, silence: Silence) -> Text:
    return (
        cadence.message(silence, c.t, c.sock, c.sysctls, c.middlebox, c.options),
        hints.too_slow(c.t, c.app(), hints.SlowCause(silence.cause)),
        None,
    )


def _retransmitting(c: Case) -> Verdict | None:
    """retransmitting: the retransmit or zero-window probe timer fired too often."""
    sock = c.sock
    if sock.retrans < c.t.retransmit_threshold or sock.state not in KEEPALIVE_STATES:
        return None
    worse = sock.retrans >= 2 * c.t.retransmit_threshold
    severity = c.severity(Severity.CRITICAL if worse else Severity.WARNING)
    return Verdict(FindingKind.RETRANSMITTING, severity, partial(_retransmitting_text, c))


def _retransmitting_text(c: Case) -> Text:
    sock, options, sysctls = c.sock, c.options, c.sysctls
    left = abort_in(sock, sysctls, options)
    what = "retransmissions" if sock.timer == TimerKind.RETRANSMIT else "zero-window probes"
    limit = (
        f"TCP_USER_TIMEOUT={options.user_timeout_ms} ms"
        if options is not None and options.user_timeout_ms and sock.timer == 1
        else f"tcp_retries2={sysctls.retries2}"
    )
    return (
        f"{sock.retrans} unanswered {what} with {sock.unacked} segment(s) unacknowledged: the "
        f"peer is unreachable; the kernel gives up in about {fmt_s(left or 0)} ({limit})",
        hints.in_flight(c.t, sysctls.retries2, sysctls.rto_max_ms, c.app()),
        left,
    )


def _probing(c: Case) -> Verdict:
    """keepalive_probing: probes out and unanswered, half-open right now."""
    severity = c.severity(Severity.CRITICAL if c.sock.retrans >= 2 else Severity.WARNING)
    return Verdict(FindingKind.KEEPALIVE_PROBING, severity, partial(_probing_text, c))


def _probing_text(c: Case) -> Text:
    sock = c.sock
    params = keepalive_params(sock, c.sysctls, c.options)
    left = abort_in(sock, c.sysctls, c.options)
    schedule = f"{params.cnt} probes every {fmt_s(params.intvl)}"
    if params.user_timeout > 0:
        schedule = f"TCP_USER_TIMEOUT {fmt_s(params.user_timeout)}, probes every " + fmt_s(
            params.intvl
        )
    return (
        f"{sock.retrans} keepalive probe(s) unanswered after "
        f"{fmt_s(recv_idle_ms(sock) / 1000)} of silence: the peer is gone and the "
        f"connection is half-open now; the kernel aborts it in about "
        f"{fmt_s(left or 0)} ({schedule})",
        hints.probing(),
        left,
    )


def _idle(c: Case) -> Verdict | None:
    """idle_no_keepalive: ESTABLISHED without keepalive, idle towards the path timeout."""
    t = c.t
    idle = path_idle_ms(c.sock) / 1000
    severity = idle_severity(idle, t.warn_at * t.idle_timeout, t.idle_timeout)
    if severity is None:
        return None
    render = partial(_idle_text, c, idle, severity == Severity.CRITICAL)
    return Verdict(FindingKind.IDLE_NO_KEEPALIVE, c.severity(severity), render)


def _idle_text(c: Case, idle: float, critical: bool) -> Text:
    t, middlebox = c.t, c.middlebox
    dropper = "a middlebox on the path" if not middlebox else middlebox.split(" (", 1)[0]
    verdict = (
        f"{dropper} has probably dropped it already, unless the peer sends keepalive "
        f"probes (incoming probes leave no trace in this side's tcp_info)"
        if critical
        else f"it is {idle / t.idle_timeout:.0%} of the way to being dropped"
    )
    source = f": {middlebox}" if middlebox else ""
    return (
        f"idle for {fmt_s(idle)} without keepalive (path idle timeout "
        f"{fmt_s(t.idle_timeout)}{source}): {verdict}; a dead peer would never be noticed",
        hints.no_keepalive(t, c.app()),
        None,
    )


def _user_timeout(c: Case, options: SocketOptions) -> Verdict:
    """user_timeout_too_short: TCP_USER_TIMEOUT aborts before keepcnt probes are lost."""
    render = partial(_user_timeout_text, c, options)
    return Verdict(FindingKind.USER_TIMEOUT_TOO_SHORT, c.severity(Severity.WARNING), render)


def _user_timeout_text(c: Case, opts: SocketOptions) -> Text:
    survives = hints.user_timeout_probes(opts)
    after = opts.idle + survives * opts.intvl
    return (
        f"TCP_USER_TIMEOUT {fmt_s(opts.user_timeout_ms / 1000)} is shorter than "
        f"keepidle {opts.idle} + keepcnt {opts.cnt} × keepintvl {opts.intvl} = "
        f"{fmt_s(opts.idle + opts.cnt * opts.intvl)}: the kernel aborts the "
        f"connection after {survives} unanswered keepalive probe(s) ({fmt_s(after)} "
        f"of silence), not {opts.cnt}; one probe lost on the way (a local queue "
        f"overflowing when many sockets probe in the same tick) kills a healthy "
        f"connection",
        hints.user_timeout(opts, c.app()),
        None,
    )


def _close_wait(c: Case) -> Verdict | None:
    """close_wait: the peer closed long ago and the local application never did."""
    age = recv_idle_ms(c.sock) / 1000
    if age < c.t.close_wait_after:
        return None
    return Verdict(FindingKind.CLOSE_WAIT, c.severity(Severity.WARNING), partial(
        _close_wait_text, c, age
    ))  # fmt: skip


def _close_wait_text(c: Case, age: float) -> Text:
    return (
        f"in CLOSE_WAIT for {fmt_s(age)}: the peer closed (its process exited or "
        f"closed the connection) and the local application never closed its side",
        hints.close_wait(c.process),
        None,
    )


def _timer_verdicts(c: Case) -> list[Verdict | None]:
    """The verdicts the reported timer and keepalive status lead to (one branch applies)."""
    sock = c.sock
    on = c.keepalive == Keepalive.ON and sock.state in KEEPALIVE_STATES
    if sock.timer in (TimerKind.RETRANSMIT, TimerKind.ZERO_WINDOW_PROBE):
        # With the exact options, too slow is judged as for an idle socket (cadence.too_slow).
        return [_retransmitting(c), _too_slow(c) if c.options is not None and on else None]
    if on and sock.timer == TimerKind.KEEPALIVE and sock.retrans > 0:
        return [_probing(c)]
    if on:  # (in FIN_WAIT2 timer 2 counts down tcp_fin_timeout: not keepalive)
        return [_too_slow(c)]
    if (
        c.keepalive == Keepalive.OFF
        and sock.state == TcpState.ESTABLISHED
        and sock.timer != TimerKind.KEEPALIVE
    ):
        return [_idle(c)]
    return []


def judge(
    rules: RuleSet,
    sock: Sock,
    process: ProcessInfo | None,
    sysctls: Sysctls,
    options: SocketOptions | None = None,
) -> tuple[Rule | None, list[Verdict]]:
    """The rule that applies to one socket (None: the defaults) and the findings it gets.

    ``options``: the socket's own keepalive settings when they were read (socket inspection):
    then the keepalive status, the first-probe delay and the abort estimates are exact, and a
    user timeout too short for the probes is a finding of its own.
    """
    rule = select_rule(rules, sock, process)
    if rule is not None and rule.ignore:
        return rule, []
    t = rule.thresholds if rule is not None else rules.defaults
    timeout, middlebox = middlebox_timeout(t, sysctls, sock)
    if timeout != t.idle_timeout:
        t = replace(t, idle_timeout=timeout)
    name = process.name if process is not None else None
    ka = keepalive_status(sock, options)
    c = Case(rule, t, sock, sysctls, options, ka, middlebox, name)
    out = _timer_verdicts(c)
    if options is not None and sock.state in KEEPALIVE_STATES and user_timeout_too_short(options):
        out.append(_user_timeout(c, options))
    if sock.state == TcpState.CLOSE_WAIT:
        out.append(_close_wait(c))
    return rule, [v for v in out if v is not None]


def socket_findings(
    rules: RuleSet,
    sock: Sock,
    process: ProcessInfo | None,
    sysctls: Sysctls,
    netns: str,
    options: SocketOptions | None = None,
) -> list[Finding]:
    """Findings for one socket under the first matching rule (or the defaults), rendered."""
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
