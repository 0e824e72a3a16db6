"""inference: what the kernel's numbers mean, checked against arithmetic done by hand.

Every expected value below is worked out in the comment next to it from the kernel
behaviour in shared/KERNEL.md (tcp_model_timeout, tcp_keepalive_timer, tcp_probe_timer).
"""

from __future__ import annotations

import pytest
from helpers import make_sock, sysctls

from auditd.audit.inference import (
    KeepaliveParams,
    abort_in,
    backoff_schedule_abort_in,
    idle_detection_seconds,
    ilog2,
    keepalive_params,
    keepalive_status,
    path_idle_ms,
    probes_before_abort,
    probing_abort_in,
    recv_idle_ms,
    retransmit_abort_in,
    retries2_timeout,
    socket_params,
    user_timeout_detection,
    zero_window_abort_in,
)
from auditd.model import Keepalive, SocketOptions, TcpState, TimerKind

# --- the retries2 model --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retries2", "rto_max_ms", "expected"),
    [
        # thresh = ilog2(120000 / 200) = ilog2(600) = 9; N <= 9: ((2 << N) - 1) * 0.2 s
        (0, 120000, 0.2),  # (2 - 1) * 0.2
        (3, 120000, 3.0),  # (16 - 1) * 0.2
        (5, 120000, 12.6),  # (64 - 1) * 0.2
        (8, 120000, 102.2),  # (512 - 1) * 0.2: the RFC 1122 minimum of 100 s
        (9, 120000, 204.6),  # (1024 - 1) * 0.2
        # N > 9: 204.6 + (N - 9) * 120
        (10, 120000, 324.6),
        (15, 120000, 924.6),  # the default: 204.6 + 6 * 120
        # tcp_rto_max_ms = 60000: thresh = ilog2(60000 / 200) = ilog2(300) = 8
        (8, 60000, 102.2),  # (512 - 1) * 0.2, below the cap
        (9, 60000, 162.2),  # 102.2 + 1 * 60
        (15, 60000, 522.2),  # 102.2 + 7 * 60
        # tcp_rto_max_ms = 1000 (its minimum): thresh = ilog2(5) = 2; 1.4 + (15 - 2) * 1
        (15, 1000, 14.4),
    ],
)
def test_retries2_timeout(retries2: int, rto_max_ms: int, expected: float) -> None:
    assert retries2_timeout(retries2, rto_max_ms) == pytest.approx(expected)


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (1, 0), (2, 1), (300, 8), (600, 9)])
def test_ilog2(value: int, expected: int) -> None:
    assert ilog2(value) == expected


@pytest.mark.parametrize(
    ("idle", "intvl", "cnt", "expected"),
    [
        (7200, 75, 9, 7875),  # the defaults: 7200 + 9 * 75
        (600, 30, 5, 750),
        (60, 10, 0, 60),
    ],
)
def test_idle_detection_seconds(idle: float, intvl: float, cnt: int, expected: float) -> None:
    assert idle_detection_seconds(idle, intvl, cnt) == expected


# --- keepalive status from the reported timer --------------------------------------------

TIMERS = [0, 1, 2, 3, 4, 5, 255]
KEEPALIVE_STATES = {TcpState.ESTABLISHED, TcpState.CLOSE_WAIT}


def _expected_status(state: TcpState, timer: int) -> str:
    if state not in KEEPALIVE_STATES:
        return Keepalive.UNKNOWN  # FIN_WAIT2's sk_timer is the fin timeout, others have none
    return {0: Keepalive.OFF, 2: Keepalive.ON}.get(timer, Keepalive.UNKNOWN)


@pytest.mark.parametrize("state", list(TcpState))
@pytest.mark.parametrize("timer", TIMERS)
def test_keepalive_status_every_timer_and_state(state: TcpState, timer: int) -> None:
    sock = make_sock(state=state, timer=timer, retrans=1 if timer in (1, 2, 4) else 0)
    assert keepalive_status(sock) == _expected_status(state, timer)


@pytest.mark.parametrize(
    ("state", "timer", "expected"),
    [
        (TcpState.ESTABLISHED, TimerKind.KEEPALIVE, "on"),
        (TcpState.ESTABLISHED, TimerKind.NONE, "off"),
        (TcpState.ESTABLISHED, TimerKind.RETRANSMIT, "unknown"),  # hides the keepalive timer
        (TcpState.ESTABLISHED, TimerKind.ZERO_WINDOW_PROBE, "unknown"),
        (TcpState.ESTABLISHED, TimerKind.DELAYED_ACK, "unknown"),
        (TcpState.CLOSE_WAIT, TimerKind.KEEPALIVE, "on"),
        (TcpState.CLOSE_WAIT, TimerKind.NONE, "off"),
        (TcpState.FIN_WAIT2, TimerKind.KEEPALIVE, "unknown"),
        (TcpState.SYN_SENT, TimerKind.NONE, "unknown"),
    ],
)
def test_keepalive_status_spelled_out(state: TcpState, timer: TimerKind, expected: str) -> None:
    assert keepalive_status(make_sock(state=state, timer=timer)) == expected


# --- idle ages -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_sent", "data_recv", "ack_recv", "recv_idle", "path_idle"),
    [
        (100, 200, 300, 200, 100),  # we sent data most recently
        (500, 200, 300, 200, 200),  # data received most recently
        (500, 900, 40, 40, 40),  # an ACK received (e.g. an answered keepalive probe)
        (7, 7, 7, 7, 7),
    ],
)
def test_idle_ages(
    data_sent: int, data_recv: int, ack_recv: int, recv_idle: int, path_idle: int
) -> None:
    sock = make_sock(
        last_data_sent_ms=data_sent, last_data_recv_ms=data_recv, last_ack_recv_ms=ack_recv
    )
    assert recv_idle_ms(sock) == recv_idle
    assert path_idle_ms(sock) == path_idle


# --- effective keepalive parameters --------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # No keepalive timer: only the namespace values are known.
        ({"timer": 0}, KeepaliveParams(7200.0, 75.0, 9, "sysctl")),
        ({"timer": 1, "retrans": 2}, KeepaliveParams(7200.0, 75.0, 9, "sysctl")),
        # Timer 2 in FIN_WAIT2 is the fin timeout, not keepalive.
        ({"timer": 2, "state": TcpState.FIN_WAIT2, "expires_ms": 9_000_000},
         KeepaliveParams(7200.0, 75.0, 9, "sysctl")),
        # No probe out: bound = recv idle + expiry = 100 s + 7000 s = 7100 s <= 7200: sysctl.
        ({"timer": 2, "last_data_recv_ms": 100_000, "last_ack_recv_ms": 100_000,
          "expires_ms": 7_000_000},
         KeepaliveParams(7200.0, 75.0, 9, "sysctl", 7100.0)),
        # Exactly the sysctl: not above it, still the sysctl.
        ({"timer": 2, "last_data_recv_ms": 200_000, "last_ack_recv_ms": 200_000,
          "expires_ms": 7_000_000},
         KeepaliveParams(7200.0, 75.0, 9, "sysctl", 7200.0)),
        # recv idle = min(50 s data, 40 s ack) = 40 s; 40 + 7500 = 7540 > 7200: the timer.
        ({"timer": 2, "last_data_recv_ms": 50_000, "last_ack_recv_ms": 40_000,
          "last_data_sent_ms": 1_000, "expires_ms": 7_500_000},
         KeepaliveParams(7540.0, 75.0, 9, "timer", 7540.0)),
        # Probing: the timer re-arms every keepintvl; 90 s left > 75 s proves a longer interval.
        ({"timer": 2, "retrans": 2, "expires_ms": 90_000},
         KeepaliveParams(7200.0, 90.0, 9, "timer")),
        ({"timer": 2, "retrans": 2, "expires_ms": 30_000},
         KeepaliveParams(7200.0, 75.0, 9, "sysctl")),
    ],
)  # fmt: skip
def test_keepalive_params(overrides: dict[str, int], expected: KeepaliveParams) -> None:
    assert keepalive_params(make_sock(**overrides), sysctls()) == expected


def test_keepalive_params_follow_the_namespace_sysctls() -> None:
    s = sysctls(tcp_keepalive_time=300, tcp_keepalive_intvl=10, tcp_keepalive_probes=3)
    params = keepalive_params(make_sock(timer=0), s)
    assert (params.idle, params.intvl, params.cnt) == (300, 10, 3)
    assert params.detection == 330  # 300 + 3 * 10
    # A lower bound above 300 s proves the socket waits longer than the namespace says:
    # 0.5 s since the last segment + 599.5 s left = 600 s.
    sock = make_sock(timer=2, last_data_recv_ms=500, last_ack_recv_ms=500, expires_ms=599_500)
    params = keepalive_params(sock, s)
    assert (params.source, params.idle, params.idle_lower_bound) == ("timer", 600.0, 600.0)
    assert params.detection == 630  # 600 + 3 * 10


# --- when the kernel gives up ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("probes_out", "cnt", "intvl", "expires_ms", "expected"),
    [
        # 1 of 3 out, next fire in 0.5 s sends probe 2, then probe 3 after 1 s, and the fire
        # 1 s later finds 3 >= 3 and aborts: 0.5 + 2 * 1 = 2.5 s.
        (1, 3, 1, 500, 2.5),
        # Every probe out: the pending fire aborts.
        (3, 3, 1, 500, 0.5),
        (5, 3, 1, 500, 0.5),  # keepcnt lowered below the probes already out
        # Defaults, first probe just sent: 75 s + 8 more intervals of 75 s = 675 s.
        (1, 9, 75, 75_000, 675.0),
    ],
)
def test_probing_abort_in(
    probes_out: int, cnt: int, intvl: float, expires_ms: int, expected: float
) -> None:
    sock = make_sock(timer=2, retrans=probes_out, expires_ms=expires_ms)
    params = KeepaliveParams(7200.0, intvl, cnt, "sysctl")
    assert probing_abort_in(sock, params) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("retransmits", "rto_us", "backoff", "expires_ms", "timeout", "rto_max_ms", "expected"),
    [
        # base = 0.8 s / 2**2 = 0.2 s. Fires (s after the first send): 0.2, 0.6, then the
        # pending one at 1.4; now = 1.4 - 0.3 = 1.1. Next fire 1.4 + 1.6 = 3.0 >= 3.0 aborts:
        # 3.0 - 1.1 = 1.9 s.
        (2, 800_000, 2, 300, 3.0, 120000, 1.9),
        # Defaults (timeout 924.6 s), 5 retransmits: base 6.4 / 32 = 0.2; fires at
        # 0.2 * (2**k - 1): pending at 12.6, now = 11.6. Then 25.4, 51.0, 102.2, 204.6,
        # then +120 s each: 324.6 ... 924.6, which aborts: 924.6 - 11.6 = 913.0 s.
        (5, 6_400_000, 5, 1000, 924.6, 120000, 913.0),
        # RTT-based base above the minimum: 0.6 / 2 = 0.3 s. Fires 0.3, 0.9 (pending),
        # 2.1, 4.5; now = 0.9 - 0.6 = 0.3; the first fire >= 3.0 is 4.5: 4.2 s. (Why the
        # kernel's retries2=3 connection died after 6.7 s rather than 3 s.)
        (1, 600_000, 1, 600, 3.0, 120000, 4.2),
        # tcp_rto_max_ms 1000, retries2 5: timeout 7 * 0.2 + 3 * 1 = 4.4 s. base =
        # max(1.0 / 8, 0.2) = 0.2; RTOs 0.2, 0.4, 0.8, 1.0, 1.0 ...; 3 sent by 1.4, pending
        # fire at 2.4, now = 1.4; fires 3.4, 4.4: 4.4 - 1.4 = 3.0 s.
        (3, 1_000_000, 3, 1000, 4.4, 1000, 3.0),
        # Past the timeout already (sent by 3.0, pending fire at 6.2): that fire aborts, in
        # exactly the 2.0 s left on the timer.
        (4, 3_200_000, 4, 2000, 3.0, 120000, 2.0),
    ],
)
def test_backoff_schedule_abort_in(
    retransmits: int,
    rto_us: int,
    backoff: int,
    expires_ms: int,
    timeout: float,
    rto_max_ms: int,
    expected: float,
) -> None:
    got = backoff_schedule_abort_in(retransmits, rto_us, backoff, expires_ms, timeout, rto_max_ms)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("retries2", [3, 5, 8, 15])
def test_backoff_schedule_agrees_with_the_model_at_every_retransmit(retries2: int) -> None:
    """With RTO 0.2 s the abort comes exactly at the model's timeout after the first send."""
    timeout = retries2_timeout(retries2)
    for k in range(1, retries2 + 1):
        rto_us = min(200_000 << k, 120_000_000)
        sent = sum(min(0.2 * 2**i, 120.0) for i in range(k))  # when the k-th retransmit left
        got = backoff_schedule_abort_in(k, rto_us, k, rto_us // 1000, timeout, 120000)
        assert got == pytest.approx(timeout - sent), k


def test_retransmit_abort_in_uses_the_namespace_model() -> None:
    # tcp_retries2 = 3: timeout 3.0 s; same numbers as the first backoff example: 1.9 s.
    sock = make_sock(timer=1, retrans=2, rto_us=800_000, backoff=2, expires_ms=300)
    assert retransmit_abort_in(sock, sysctls(tcp_retries2=3)) == pytest.approx(1.9)
    assert abort_in(sock, sysctls(tcp_retries2=3)) == pytest.approx(1.9)


@pytest.mark.parametrize(
    ("probes_out", "rto_us", "backoff", "expires_ms", "retries2", "expected"),
    [
        # 2 probes out of tcp_retries2 = 15: 13 more re-arms. Each probe re-arms for
        # 0.2 s << backoff, the backoff growing with it: pending 0.8 s (0.2 << 2), then
        # 1.6, 3.2, 6.4, 12.8, 25.6, 51.2, 102.4 (7 re-arms, 203.2 s) and 6 at the 120 s cap:
        # 0.8 + 203.2 + 720 = 924.0 s.
        (2, 200_000, 2, 800, 15, 924.0),
        # The window stayed closed while the peer answered (probes_out reset, backoff at 10),
        # then the peer died: every interval is at the 120 s cap. 120 + 14 * 120 = 1800 s.
        (1, 200_000, 10, 120_000, 15, 1800.0),
        # tcp_retries2 = 3, 3 probes out: the pending fire aborts.
        (3, 200_000, 3, 1600, 3, 1.6),
        # No backoff yet (tcpi_rto 0.5 s): 1 of 3 out, re-arms 1.0, 2.0: 0.5 + 3.0 = 3.5 s.
        (1, 500_000, 0, 500, 3, 3.5),
    ],
)
def test_zero_window_abort_in(
    probes_out: int, rto_us: int, backoff: int, expires_ms: int, retries2: int, expected: float
) -> None:
    sock = make_sock(
        timer=4, retrans=probes_out, rto_us=rto_us, backoff=backoff, expires_ms=expires_ms
    )
    s = sysctls(tcp_retries2=retries2)
    assert zero_window_abort_in(sock, s) == pytest.approx(expected)
    assert abort_in(sock, s) == pytest.approx(expected)


def test_abort_in_dispatches_keepalive_probing() -> None:
    sock = make_sock(timer=2, retrans=1, expires_ms=75_000)
    assert abort_in(sock, sysctls()) == pytest.approx(675.0)  # 75 + 8 * 75


@pytest.mark.parametrize(
    "overrides",
    [
        {"timer": 0},
        {"timer": 2, "retrans": 0, "expires_ms": 7_000_000},  # keepalive armed, nothing out
        {"timer": 1, "retrans": 0, "expires_ms": 200},  # first RTO not fired yet
        {"timer": 4, "retrans": 0, "expires_ms": 200},  # zero window, probes answered
        {"timer": 3, "state": TcpState.TIME_WAIT, "expires_ms": 30_000},
        {"timer": 5, "expires_ms": 40},
        {"timer": 2, "retrans": 3, "state": TcpState.FIN_WAIT2},  # fin timeout, not keepalive
    ],
)
def test_abort_in_none_when_nothing_is_pending(overrides: dict[str, int]) -> None:
    assert abort_in(make_sock(**overrides), sysctls()) is None


# --- the socket's own options (socket inspection) ----------------------------------------------


@pytest.mark.parametrize(
    ("user_timeout", "probes", "detection"),
    [
        # tcp_keepalive_timer with TCP_USER_TIMEOUT: abort at the first firing with a probe out
        # and the user timeout passed since the last segment received; firings at idle + k * 30.
        (45, 1, 630),  # the incident: 45 s < 600: the firing after the first probe aborts
        (600, 1, 630),
        (630, 1, 630),
        (631, 2, 660),
        (700, 4, 720),  # ceil(100 / 30) = 4
        (750, 5, 750),  # = idle + cnt * intvl: as keepcnt would
        (1000, 14, 1020),  # keepcnt is ignored: more probes than 5
    ],
)
def test_user_timeout_detection(user_timeout: float, probes: int, detection: float) -> None:
    assert probes_before_abort(600, 30, user_timeout) == probes
    assert user_timeout_detection(600, 30, user_timeout) == detection


def test_socket_params_are_exact() -> None:
    params = socket_params(SocketOptions(True, 600, 30, 5, 45_000))
    assert params == KeepaliveParams(600.0, 30.0, 5, "socket", 600.0, 45.0)
    assert params.detection == 630  # not 600 + 5 * 30 = 750
    assert socket_params(SocketOptions(True, 600, 30, 5, 0)).detection == 750
    sock = make_sock(timer=TimerKind.KEEPALIVE, expires_ms=1000, last_data_recv_ms=0)
    assert keepalive_params(sock, sysctls(), SocketOptions(True, 60, 5, 3)).source == "socket"


@pytest.mark.parametrize(
    ("state", "timer", "keepalive", "expected"),
    [
        (TcpState.ESTABLISHED, TimerKind.RETRANSMIT, True, Keepalive.ON),  # hidden, read
        (TcpState.ESTABLISHED, TimerKind.NONE, False, Keepalive.OFF),
        (TcpState.FIN_WAIT1, TimerKind.RETRANSMIT, False, Keepalive.OFF),  # any state
        (TcpState.SYN_SENT, TimerKind.RETRANSMIT, True, Keepalive.ON),
    ],
)
def test_keepalive_status_from_so_keepalive(
    state: int, timer: int, keepalive: bool, expected: str
) -> None:
    sock = make_sock(state=state, timer=timer)
    assert keepalive_status(sock, SocketOptions(keepalive, 7200, 75, 9)) == expected


@pytest.mark.parametrize(
    ("user_timeout_ms", "expected"),
    [
        # 1 probe out, silent for 600 s, next firing in 30 s: heard = 630 s then.
        (0, 30 + 4 * 30),  # keepcnt 5: 4 more firings after this one
        (45_000, 30),  # 630 >= 45: this firing aborts
        (700_000, 30 + 3 * 30),  # firings at 630, 660, 690, 720: the 4th passes 700
    ],
)
def test_probing_abort_with_user_timeout(user_timeout_ms: int, expected: float) -> None:
    sock = make_sock(timer=TimerKind.KEEPALIVE, retrans=1, expires_ms=30_000,
                     last_data_recv_ms=600_000, last_ack_recv_ms=600_000)  # fmt: skip
    options = SocketOptions(True, 600, 30, 5, user_timeout_ms)
    assert probing_abort_in(sock, socket_params(options)) == expected
    assert abort_in(sock, sysctls(), options) == expected


def test_retransmit_abort_with_user_timeout() -> None:
    # 3 retransmits, RTO 1.6 s = 0.2 s << backoff 3: sent at 0.2 + 0.4 + 0.8 = 1.4 s, pending
    # expiry at 3.0 s, 0.8 s from now: 2.2 s since the first loss.
    sock = make_sock(timer=TimerKind.RETRANSMIT, retrans=3, backoff=3, rto_us=1_600_000,
                     expires_ms=800)  # fmt: skip
    assert retransmit_abort_in(sock, sysctls(), 10.0) == pytest.approx(7.8)
    assert retransmit_abort_in(sock, sysctls(), 2.5) == pytest.approx(0.8)  # the pending expiry
    options = SocketOptions(False, 7200, 75, 9, 10_000)
    assert abort_in(sock, sysctls(), options) == pytest.approx(7.8)
    assert abort_in(sock, sysctls()) == retransmit_abort_in(sock, sysctls())
