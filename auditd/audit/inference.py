"""What the kernel's numbers mean for one socket: pure functions over plain data.

Sources: net/ipv4/inet_diag.c (which timer is reported), net/ipv4/tcp_timer.c
(tcp_keepalive_timer, tcp_model_timeout, retransmits_timed_out, tcp_probe_timer). The kernel
facts are collected in shared/KERNEL.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from auditd.model import Keepalive, Sock, SocketOptions, Sysctls, TcpState, TimerKind

TCP_RTO_MIN_MS = 200  # include/net/tcp.h; the base of the retries2 model

# States in which sk_timer is the keepalive timer. In FIN_WAIT2 (orphaned) the same timer
# runs the tcp_fin_timeout countdown, so a timer 2 there says nothing about keepalive.
KEEPALIVE_STATES = frozenset({TcpState.ESTABLISHED, TcpState.CLOSE_WAIT})


def ilog2(value: int) -> int:
    return value.bit_length() - 1 if value > 0 else 0


def retries2_timeout(
    retries2: int, rto_max_ms: int = 120000, rto_base_ms: int = TCP_RTO_MIN_MS
) -> float:
    """Seconds until the kernel gives up on unacknowledged data (tcp_model_timeout).

    Exponential backoff from the base RTO up to ``rto_max``, then linear. A lower bound: the
    check only runs when an RTO fires. 15 -> 924.6 s, 8 -> 102.2 s, 5 -> 12.6 s, 3 -> 3.0 s.
    """
    thresh = ilog2(rto_max_ms // rto_base_ms)
    if retries2 <= thresh:
        return ((2 << retries2) - 1) * rto_base_ms / 1000
    return (((2 << thresh) - 1) * rto_base_ms + (retries2 - thresh) * rto_max_ms) / 1000


def idle_detection_seconds(keepidle: float, keepintvl: float, keepcnt: int) -> float:
    """Seconds from the last segment received to ETIMEDOUT on an idle connection with keepalive."""
    return keepidle + keepcnt * keepintvl


def user_timeout_detection(idle: float, intvl: float, user_timeout: float) -> float:
    """Seconds from the last segment received to the abort of an idle connection whose
    keepalive runs with TCP_USER_TIMEOUT set (``user_timeout`` > 0, seconds).

    tcp_keepalive_timer then ignores keepcnt: it aborts the first time it fires with a probe
    out and at least the user timeout since the last segment received. The first probe goes
    at ``idle``, the timer fires again every ``intvl``: the abort comes at ``idle + k × intvl``
    for the smallest k >= 1 that reaches the user timeout (k = 1: one lost probe aborts).
    """
    return idle + probes_before_abort(idle, intvl, user_timeout) * intvl


def probes_before_abort(idle: float, intvl: float, user_timeout: float) -> int:
    """How many unanswered probes a connection with TCP_USER_TIMEOUT survives (see above)."""
    if intvl <= 0:
        return 1
    return max(1, math.ceil((user_timeout - idle) / intvl - 1e-9))


def keepalive_status(sock: Sock, options: SocketOptions | None = None) -> Keepalive:
    """``on``/``off``/``unknown`` from the reported timer, or SO_KEEPALIVE itself when the
    socket's ``options`` were read (then never unknown, in any state).

    inet_diag reports the retransmit timer first, then the zero-window probe, then sk_timer:
    while data is unacknowledged the keepalive timer is hidden, so that is *unknown*.
    """
    if options is not None:
        return Keepalive.ON if options.keepalive else Keepalive.OFF
    if sock.state not in KEEPALIVE_STATES:
        return Keepalive.UNKNOWN
    timer = sock.timer
    if timer == TimerKind.KEEPALIVE:
        return Keepalive.ON
    if timer == TimerKind.NONE:
        return Keepalive.OFF
    return Keepalive.UNKNOWN


def recv_idle_ms(sock: Sock) -> int:
    """Milliseconds since the last segment received: what tcp_keepalive_timer measures."""
    return min(sock.last_data_recv_ms, sock.last_ack_recv_ms)


def path_idle_ms(sock: Sock) -> int:
    """Milliseconds since any segment in either direction, as far as tcp_info tells.

    tcpi_last_ack_sent is always 0, so a pure ACK we sent is invisible; data sent is not.
    """
    return min(sock.last_data_recv_ms, sock.last_ack_recv_ms, sock.last_data_sent_ms)


@dataclass(frozen=True, slots=True)
class KeepaliveParams:
    """Effective keepalive of one socket as far as can be seen from outside it."""

    idle: float  # seconds to the first probe
    intvl: float
    cnt: int
    source: str  # "sysctl" (presumed namespace default), "timer" (lower bound), "socket"
    # From the visible timer, when there is one; the exact TCP_KEEPIDLE for source "socket".
    idle_lower_bound: float | None = None
    user_timeout: float = 0.0  # TCP_USER_TIMEOUT in seconds (source "socket"); 0: not set

    @property
    def detection(self) -> float:
        if self.user_timeout > 0:
            return user_timeout_detection(self.idle, self.intvl, self.user_timeout)
        return idle_detection_seconds(self.idle, self.intvl, self.cnt)


def socket_params(options: SocketOptions) -> KeepaliveParams:
    """The socket's own values, read with getsockopt: exact."""
    return KeepaliveParams(
        float(options.idle),
        float(options.intvl),
        options.cnt,
        "socket",
        float(options.idle),
        options.user_timeout_ms / 1000,
    )


def keepalive_params(
    sock: Sock, sysctls: Sysctls, options: SocketOptions | None = None
) -> KeepaliveParams:
    """The socket's ``options`` when they were read; else the namespace sysctls, unless the
    visible timer proves the socket waits longer.

    With no probe out, the timer was armed for ``keepidle`` after a segment received at or
    before the last one, so ``keepidle >= idle since last receive + expiry``. sock_diag does
    not show TCP_KEEPIDLE itself; a bound above the sysctl proves an override.
    """
    if options is not None:
        return socket_params(options)
    idle = float(sysctls.keepalive_time)
    intvl = float(sysctls.keepalive_intvl)
    cnt = sysctls.keepalive_probes
    if sock.timer != TimerKind.KEEPALIVE or sock.state not in KEEPALIVE_STATES:
        return KeepaliveParams(idle, intvl, cnt, "sysctl")
    if sock.retrans == 0:
        bound = (recv_idle_ms(sock) + sock.expires_ms) / 1000
        if bound > idle:
            return KeepaliveParams(bound, intvl, cnt, "timer", bound)
        return KeepaliveParams(idle, intvl, cnt, "sysctl", bound)
    # Probing: the timer re-arms every keepintvl, so the expiry bounds the interval.
    bound_intvl = sock.expires_ms / 1000
    if bound_intvl > intvl:
        return KeepaliveParams(idle, bound_intvl, cnt, "timer")
    return KeepaliveParams(idle, intvl, cnt, "sysctl")


def probe_cadence(idle: float, intvl: float) -> float:
    """The longest a healthy idle connection with keepalive stays silent: max(idle, intvl).

    tcp_keepalive_timer (net/ipv4/tcp_timer.c) re-arms the timer for keepintvl after it sends
    a probe (``elapsed = keepalive_intvl_when(tp)`` after tcp_write_wakeup), answered or not.
    When it next fires, the peer's ACK came keepintvl ago: with keepintvl >= keepidle the next
    probe goes at once, so the path is silent for keepintvl between probes; with keepintvl <
    keepidle the timer re-arms for the rest of keepidle. Seen: idle 10 s with interval 75 s
    left the path idle 23.5 s with the next probe 51 s away (shared/KERNEL.md).
    """
    return max(idle, intvl)


class Silence(NamedTuple):
    """How long keepalive lets the path go silent, and why: what a fix must change."""

    seconds: float  # exact with the socket's options; else the namespace's, or a lower bound
    cause: str  # a hints.SlowCause value: "default", "own_idle", "own_intvl", "own"
    which: str  # "idle" or "intvl": the value that sets the silence; "" when unknown
    exact: bool  # from the socket's own options (getsockopt)


# Rounding of the timer's figures: jiffies and the ms of tcp_info against whole seconds.
_SAME = 1.0


def _which(idle: float, intvl: float) -> str:
    return "idle" if idle >= intvl else "intvl"


def keepalive_silence(
    sock: Sock, sysctls: Sysctls, options: SocketOptions | None = None
) -> Silence | None:
    """The silence keepalive leaves on the idle path of a socket with keepalive on; None when
    sock_diag shows no keepalive timer (busy: unknown) and the options were not read.

    With the options it is exact: ``probe_cadence``; a value equal to the namespace's is
    reported as the default (getsockopt cannot tell the socket's own value from it). Without
    them, the visible timer gives ``recv idle + expiry``, the delay it was armed for since
    the last segment received (keepidle, or keepintvl after a probe): a lower bound of the
    silence. When that matches the namespace's keepidle or keepintvl, the socket is presumed
    on the namespace's values and the silence is their cadence; above both, the socket set its
    own; below, it may be either (a timer armed before the last segment received shows less).
    """
    time_, intvl = float(sysctls.keepalive_time), float(sysctls.keepalive_intvl)
    if options is not None:
        which = _which(options.idle, options.intvl)
        own = options.idle if which == "idle" else options.intvl
        default = time_ if which == "idle" else intvl
        cause = "default" if own == default else f"own_{which}"
        return Silence(probe_cadence(options.idle, options.intvl), cause, which, True)
    if sock.timer != TimerKind.KEEPALIVE or sock.state not in KEEPALIVE_STATES:
        return None
    defaults = probe_cadence(time_, intvl)
    bound = (recv_idle_ms(sock) + sock.expires_ms) / 1000
    if sock.retrans > 0:  # probing: the timer re-arms every keepintvl, the expiry bounds it
        bound = sock.expires_ms / 1000
    if abs(bound - time_) <= _SAME or abs(bound - intvl) <= _SAME:
        return Silence(defaults, "default", _which(time_, intvl), False)
    if bound > defaults:
        return Silence(bound, "own", "", False)
    return Silence(bound, "default", "", False)


def probing_abort_in(sock: Sock, params: KeepaliveParams) -> float:
    """Seconds until keepalive gives up on a socket with probes out.

    tcp_keepalive_timer aborts when it fires with ``probes_out >= keepcnt``; otherwise it
    sends one more probe and re-arms for keepintvl. With TCP_USER_TIMEOUT it aborts instead
    at the first firing with the user timeout passed since the last segment received.
    """
    expires = sock.expires_ms / 1000
    if params.user_timeout > 0:
        heard = recv_idle_ms(sock) / 1000 + expires  # silence when the timer next fires
        firings = max(math.ceil((params.user_timeout - heard) / params.intvl - 1e-9), 0)
        return expires + firings * params.intvl if params.intvl > 0 else expires
    remaining = max(params.cnt - sock.retrans, 0)
    return expires + remaining * params.intvl


def backoff_schedule_abort_in(
    retransmits: int, rto_us: int, backoff: int, expires_ms: int, timeout: float, rto_max_ms: int
) -> float:
    """Seconds until the retransmit timer fires at or past ``timeout`` since the first loss.

    The RTO doubles at each expiry up to ``rto_max``; the kernel checks the timeout
    (retransmits_timed_out) each time the timer fires. Elapsed time since the first
    transmission is rebuilt from the current RTO and backoff: a lower bound, like the model.
    """
    fire, now, rto = _backoff(retransmits, rto_us, backoff, expires_ms, rto_max_ms)
    step = retransmits + 1
    while fire < timeout and step < 10_000:
        fire += rto(step)
        step += 1
    return max(fire - now, 0.0)


def _backoff(
    retransmits: int, rto_us: int, backoff: int, expires_ms: int, rto_max_ms: int
) -> tuple[float, float, Callable[[int], float]]:
    """(pending expiry, now, rto(i)) in seconds since the first transmission of the oldest
    unacknowledged segment, rebuilt from the current RTO and backoff."""
    rto_max = rto_max_ms / 1000
    base = max(rto_us / 1_000_000 / (1 << min(backoff, 30)), TCP_RTO_MIN_MS / 1000)

    def rto(i: int) -> float:
        return min(base * (1 << min(i, 30)), rto_max)

    sent = sum(rto(i) for i in range(min(retransmits, 10_000)))  # when the last retransmit left
    fire = sent + rto(retransmits)  # the pending expiry
    return fire, fire - expires_ms / 1000, rto


def retransmit_abort_in(sock: Sock, sysctls: Sysctls, user_timeout: float = 0.0) -> float:
    """Seconds until the kernel aborts a socket with data in flight (retries2 model).

    With TCP_USER_TIMEOUT (seconds) the user timeout replaces the model, and the kernel clamps
    each RTO to the time left (tcp_clamp_rto_to_user_timeout): the abort comes when the
    user timeout has passed since the first loss, or at the pending expiry if that is later.
    """
    if user_timeout > 0:
        _, now, _ = _backoff(sock.retrans, sock.rto_us, sock.backoff, sock.expires_ms,
                             sysctls.rto_max_ms)  # fmt: skip
        return max(user_timeout - now, sock.expires_ms / 1000)
    timeout = retries2_timeout(sysctls.retries2, sysctls.rto_max_ms)
    return backoff_schedule_abort_in(
        sock.retrans, sock.rto_us, sock.backoff, sock.expires_ms, timeout, sysctls.rto_max_ms
    )


def zero_window_abort_in(sock: Sock, sysctls: Sysctls) -> float:
    """Zero-window probing (timer 4) is bounded by a probe *count*: tcp_retries2."""
    remaining = max(sysctls.retries2 - sock.retrans, 0)
    rto_max = sysctls.rto_max_ms / 1000
    # Each probe re-arms for min(max(icsk_rto, TCP_RTO_MIN) << icsk_backoff, rto_max)
    # (tcp_send_probe0, tcp_probe0_when) and bumps the backoff; tcpi_rto is the unshifted base.
    base = max(sock.rto_us / 1_000_000, TCP_RTO_MIN_MS / 1000)
    interval = min(base * (1 << min(sock.backoff, 30)), rto_max)
    total = sock.expires_ms / 1000
    for _ in range(remaining):
        interval = min(interval * 2, rto_max)
        total += interval
    return total


def abort_in(sock: Sock, sysctls: Sysctls, options: SocketOptions | None = None) -> float | None:
    """When the kernel will give up on this socket, if it is already trying; else None.
    ``options``: the socket's own keepalive values and user timeout, when they were read."""
    if sock.timer == TimerKind.KEEPALIVE and sock.retrans > 0 and sock.state in KEEPALIVE_STATES:
        return probing_abort_in(sock, keepalive_params(sock, sysctls, options))
    if sock.timer == TimerKind.RETRANSMIT and sock.retrans > 0:
        user_timeout = options.user_timeout_ms / 1000 if options is not None else 0.0
        return retransmit_abort_in(sock, sysctls, user_timeout)
    if sock.timer == TimerKind.ZERO_WINDOW_PROBE and sock.retrans > 0:
        return zero_window_abort_in(sock, sysctls)
    return None


def user_timeout_too_short(options: SocketOptions) -> bool:
    """TCP_USER_TIMEOUT set below keepidle + keepcnt × keepintvl on a socket with keepalive:
    fewer unanswered probes than keepcnt abort it (tcp_keepalive_timer, shared/KERNEL.md)."""
    return (
        options.keepalive
        and options.user_timeout_ms > 0
        and options.user_timeout_ms < (options.idle + options.cnt * options.intvl) * 1000
    )
