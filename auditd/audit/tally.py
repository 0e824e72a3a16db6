"""The per-socket pass over a dump: counts, the idle histogram, and the pre-filter. Pure.

The pre-filter decides which sockets may get a finding under the loosest thresholds of the
rules (``loosest``): only those are judged (``verdicts.judge``), attributed and described.
It is defined once, here: ``Tally`` runs it on every socket of a dump (200k on a busy
host, so ESTABLISHED sockets are decided inline, on whole milliseconds), and
``could_flag`` is that same pass over one socket. The thresholds are turned into whole
milliseconds exactly (``_first_ms``), so the integer comparisons decide as the verdicts'
``ms / 1000 >= seconds`` do: a socket exactly at a threshold is kept.
"""

from __future__ import annotations

import bisect
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from operator import itemgetter

from auditd.audit.inference import (
    KEEPALIVE_STATES,
    keepalive_status,
    path_idle_ms,
    probe_cadence,
    recv_idle_ms,
    user_timeout_too_short,
)
from auditd.config import RuleSet, Thresholds
from auditd.model import Keepalive, Sock, SocketOptions, TcpState, TimerKind, state_label

# Upper bounds (seconds) of the idle-age histogram: around the middlebox idle timeouts
# (ALB 60, Azure 240, AWS 350, GCP firewall 600, IPVS 900, GCP NAT 1200) and the 7200 s default.
IDLE_BUCKETS = (10.0, 60.0, 240.0, 350.0, 600.0, 900.0, 1200.0, 3600.0, 7200.0)
_IDLE_BOUNDS_MS = [int(b * 1000) for b in IDLE_BUCKETS]

_ON, _OFF, _UNKNOWN = range(3)  # indexes of Keepalive.ALL
_KA_INDEX = {ka: i for i, ka in enumerate(Keepalive.ALL)}
# The fields the pass reads, in this order, picked by one C call per socket.
_FIELDS = ("state", "timer", "retrans", "expires_ms", "last_data_sent_ms", "last_data_recv_ms",
           "last_ack_recv_ms")  # fmt: skip
_pick = itemgetter(*(Sock._fields.index(name) for name in _FIELDS))
_SPORT, _DPORT = Sock._fields.index("sport_raw"), Sock._fields.index("dport_raw")


def loosest(rules: RuleSet, cap: float | None = None) -> Thresholds:
    """The thresholds that flag the most: a socket not flagged by these is flagged by no rule.

    ``cap``: the tightest local middlebox timeout of the namespace (``paths.middlebox_cap``),
    which replaces every rule's idle_timeout that is longer, as in ``verdicts.judge``.
    """
    return _loosest_of([rules.defaults, *(r.thresholds for r in rules.rules if not r.ignore)], cap)


def _loosest_of(every: list[Thresholds], cap: float | None) -> Thresholds:
    if len(every) == 1 and (cap is None or cap >= every[0].idle_timeout):
        return every[0]
    if cap is not None:
        every = [replace(t, idle_timeout=cap) if cap < t.idle_timeout else t for t in every]
    idle_timeout = min(t.idle_timeout for t in every)
    warn_after = min(t.warn_at * t.idle_timeout for t in every)
    warn_at = warn_after / max(idle_timeout, 1e-9)
    # The pass multiplies back: rounding must not put the loosest warning after a rule's.
    while warn_at * idle_timeout > warn_after:
        warn_at = math.nextafter(warn_at, 0.0)
    return Thresholds(
        idle_timeout=idle_timeout,
        warn_at=warn_at,
        detection_budget=min(t.detection_budget for t in every),
        close_wait_after=min(t.close_wait_after for t in every),
        retransmit_threshold=min(t.retransmit_threshold for t in every),
    )


@dataclass(frozen=True, slots=True)
class ByPort:
    """``loosest`` split by the ports rules require, so that one tight rule for one port
    does not make every socket of the host a candidate (a 0.2 s idle timeout for port 5001
    once had all 200k sockets judged, 0.86 s). A rule with ``remote_ports`` can only match a
    socket whose remote port is one of them (else, with ``local_ports``, its local port):
    ``general`` is the loosest of the defaults and the rules without a port, ``remote`` and
    ``local`` the loosest of the rules filed under each port (host order). A socket that
    ``general`` drops is kept when the thresholds of its remote or local port keep it."""

    general: Thresholds
    remote: dict[int, Thresholds]
    local: dict[int, Thresholds]


# by_port's last answers, per rule set (by identity: a RuleSet is frozen, and a reload brings
# a new one), defaults and cap: an audit of every namespace asks each time, and a file of
# 14,047 port rules takes 0.1-0.3 s to split.
_by_port_cache: dict[tuple[int, Thresholds, float | None], tuple[RuleSet, ByPort]] = {}


def by_port(rules: RuleSet, cap: float | None = None) -> ByPort:
    key = (id(rules.rules), rules.defaults, cap)
    hit = _by_port_cache.get(key)
    if hit is not None and hit[0].rules is rules.rules:
        return hit[1]
    if len(_by_port_cache) >= 16:
        _by_port_cache.clear()
    split = _by_port(rules, cap)
    _by_port_cache[key] = (rules, split)
    return split


def _by_port(rules: RuleSet, cap: float | None) -> ByPort:
    general = [rules.defaults]
    remote: dict[int, list[Thresholds]] = {}
    local: dict[int, list[Thresholds]] = {}
    for r in rules.rules:
        if r.ignore:
            continue
        match = r.match
        if match.remote_ports or match.local_ports:
            table = remote if match.remote_ports else local
            for port in match.remote_ports or match.local_ports:
                table.setdefault(port, []).append(r.thresholds)
        else:
            general.append(r.thresholds)
    return ByPort(
        _loosest_of(general, cap),
        {port: _loosest_of(every, cap) for port, every in remote.items()},
        {port: _loosest_of(every, cap) for port, every in local.items()},
    )


def _first_ms(holds: Callable[[float], bool], seconds: float) -> int:
    """The fewest whole milliseconds ``ms`` for which ``holds(ms / 1000)``, near ``seconds``
    (the predicate is monotonic): the float comparison the verdicts make, made an integer."""
    ms = max(0, math.floor(seconds * 1000) - 2)
    while not holds(ms / 1000):
        ms += 1
    return ms


def _raw_port(port: int) -> int:
    """A host-order port as ``Sock.sport_raw``/``dport_raw`` hold it."""
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


class _Limits:
    """The pre-filter's thresholds in whole milliseconds, and the pre-filter on one socket."""

    def __init__(self, limits: Thresholds, defaults_silence: float = math.inf) -> None:
        self.limits = limits
        warn = limits.warn_at * limits.idle_timeout
        timeout, close_wait = limits.idle_timeout, limits.close_wait_after
        # Idle this long, a socket may be flagged: without keepalive, or with one too slow.
        self.warn_ms = _first_ms(lambda s: s >= warn, warn)
        # keepalive_too_slow (audit.cadence) needs the path idle past the warning and a
        # silence past the idle timeout: proven by the timer (the next probe this far after
        # the last segment received), or presumed from the namespace's keepalive values.
        self.probe_ms = _first_ms(lambda s: s >= timeout, timeout) - 1
        self.slow_defaults = defaults_silence >= timeout
        self.close_wait_ms = _first_ms(lambda s: s >= close_wait, close_wait)
        self.retransmits = limits.retransmit_threshold

    def _within(self, other: _Limits) -> bool:
        """Every socket this pre-filter keeps, ``other`` keeps too (each threshold is
        monotonic: a lower one keeps more)."""
        return (
            self.warn_ms >= other.warn_ms
            and self.probe_ms >= other.probe_ms
            and (other.slow_defaults or not self.slow_defaults)
            and self.close_wait_ms >= other.close_wait_ms
            and self.retransmits >= other.retransmits
        )

    def _keeps(self, sock: Sock) -> bool:
        """The pass's pre-filter on one socket, not inlined (``could_flag`` runs the pass)."""
        if sock.state != TcpState.ESTABLISHED:
            return self._keeps_other(sock)
        heard = recv_idle_ms(sock)
        idle = path_idle_ms(sock)
        timer = sock.timer
        if timer == TimerKind.NONE:
            return idle >= self.warn_ms
        if timer == TimerKind.KEEPALIVE:
            return sock.retrans > 0 or (idle >= self.warn_ms and (
                self.slow_defaults or heard + sock.expires_ms >= self.probe_ms))  # fmt: skip
        if timer == TimerKind.RETRANSMIT or timer == TimerKind.ZERO_WINDOW_PROBE:
            return sock.retrans >= self.retransmits
        return False

    def _keeps_other(self, sock: Sock) -> bool:
        """The pre-filter outside ESTABLISHED: only CLOSE_WAIT has findings (its timer is
        still the keepalive timer; in FIN_WAIT2 it counts down tcp_fin_timeout)."""
        if sock.state != TcpState.CLOSE_WAIT:
            return False
        heard = recv_idle_ms(sock)
        if heard >= self.close_wait_ms:
            return True
        timer = sock.timer
        if timer == TimerKind.RETRANSMIT or timer == TimerKind.ZERO_WINDOW_PROBE:
            return sock.retrans >= self.retransmits
        if timer == TimerKind.KEEPALIVE:
            return sock.retrans > 0 or (path_idle_ms(sock) >= self.warn_ms and (
                self.slow_defaults or heard + sock.expires_ms >= self.probe_ms))  # fmt: skip
        return False


_PortLimits = tuple[_Limits, dict[int, _Limits], dict[int, _Limits]]
# The pass's thresholds by port, per ``by_port`` answer (by identity) and silence.
_port_limits_cache: dict[tuple[int, float], tuple[ByPort, _PortLimits]] = {}


def _port_limits(ports: ByPort, defaults_silence: float) -> _PortLimits:
    """(general, by raw remote port, by raw local port): the ports' only where they keep more
    than the general ones; equal thresholds share one ``_Limits``."""
    key = (id(ports), defaults_silence)
    hit = _port_limits_cache.get(key)
    if hit is not None and hit[0] is ports:
        return hit[1]
    general = _Limits(ports.general, defaults_silence)
    made: dict[Thresholds, _Limits] = {}
    remote: dict[int, _Limits] = {}
    local: dict[int, _Limits] = {}
    for table, into in ((ports.remote, remote), (ports.local, local)):
        for port, t in table.items():
            sub = made.get(t)
            if sub is None:
                sub = made[t] = _Limits(t, defaults_silence)
            if not sub._within(general):
                into[_raw_port(port)] = sub
    if len(_port_limits_cache) >= 16:
        _port_limits_cache.clear()
    _port_limits_cache[key] = (ports, (general, remote, local))
    return general, remote, local


class Tally(_Limits):
    """Counts every socket by state and keepalive status, the idle ages of ESTABLISHED ones,
    and hands the sockets the pre-filter keeps on."""

    def __init__(
        self,
        limits: Thresholds,
        defaults_silence: float = math.inf,
        ports: ByPort | None = None,
    ) -> None:
        """``defaults_silence``: the cadence of the namespace's keepalive sysctls
        (``inference.probe_cadence``), the silence presumed for a socket on them.
        ``ports``: the same thresholds split by the ports rules require (``by_port``); the
        pass then keeps fewer sockets, never one that ``limits`` alone would drop and some
        rule flags. The thresholds of ``_Limits`` stay those of ``limits``, the loosest of
        all (what a kernel pass is given)."""
        super().__init__(limits, defaults_silence)
        self.counts = [0] * (64 * 3)  # state * 3 + keepalive index
        self.hist = [[0] * (len(IDLE_BUCKETS) + 1) for _ in Keepalive.ALL]
        self.idle_ms_sum = [0, 0, 0]
        self.total = 0
        # The pass's own thresholds: the general ones, and by raw port those of the rules
        # that require it, where they keep more than the general ones.
        self._general: _Limits = self
        self._remote: dict[int, _Limits] = {}
        self._local: dict[int, _Limits] = {}
        if ports is not None:
            self._general, self._remote, self._local = _port_limits(ports, defaults_silence)

    def run(
        self,
        socks: Iterable[Sock],
        keep: Callable[[Sock], None],
        visit: Callable[[Sock], None] | None,
    ) -> None:
        """Accounts for every socket and hands the ones that may be flagged to ``keep``;
        ``visit`` (rarely needed) sees every socket."""
        counts, hist, sums = self.counts, self.hist, self.idle_ms_sum
        g = self._general
        warn_ms, retransmits = g.warn_ms, g.retransmits
        probe_ms, slow_defaults = g.probe_ms, g.slow_defaults
        bounds, where, pick = _IDLE_BOUNDS_MS, bisect.bisect_left, _pick
        status, ka_index, other = keepalive_status, _KA_INDEX, g._keeps_other
        remote, local = self._remote, self._local
        ported, sport, dport = bool(remote or local), _SPORT, _DPORT
        total = 0
        for sock in socks:
            total += 1
            state, timer, retrans, expires, sent, received, acked = pick(sock)
            if state == 1:  # ESTABLISHED; keepalive_status and path_idle_ms, inlined
                heard = received if received < acked else acked
                idle = heard if heard < sent else sent
                if timer == 0:
                    k, keep_it = _OFF, idle >= warn_ms
                elif timer == 2:
                    k, keep_it = _ON, retrans > 0 or (idle >= warn_ms and (
                        slow_defaults or heard + expires >= probe_ms))  # fmt: skip
                else:
                    k, keep_it = _UNKNOWN, (timer == 1 or timer == 4) and retrans >= retransmits
                counts[3 + k] += 1
                hist[k][where(bounds, idle)] += 1
                sums[k] += idle
                if keep_it or (ported and (sock[dport] in remote or sock[sport] in local) and (
                        self._keeps_ported(sock))):  # fmt: skip
                    keep(sock)
            else:
                counts[(state & 63) * 3 + ka_index[status(sock)]] += 1
                if other(sock) or (ported and self._keeps_ported(sock)):
                    keep(sock)
            if visit is not None:
                visit(sock)
        self.total += total

    def keeps(self, sock: Sock) -> bool:
        """The pass's pre-filter (by port, when ``ports`` were given) on one socket, for
        sockets counted elsewhere: a kernel pass that ran the loosest thresholds alone."""
        return self._general._keeps(sock) or (
            bool(self._remote or self._local) and self._keeps_ported(sock)
        )

    def _keeps_ported(self, sock: Sock) -> bool:
        """The pre-filter under the thresholds of the rules filed under the socket's ports."""
        sub = self._remote.get(sock.dport_raw)
        if sub is not None and sub._keeps(sock):
            return True
        sub = self._local.get(sock.sport_raw)
        return sub is not None and sub._keeps(sock)

    def reclassify(self, sock: Sock, was: Keepalive, now: Keepalive) -> None:
        """Moves a socket counted as ``was`` to keepalive status ``now`` (socket inspection)."""
        if was == now:
            return
        old, new = _KA_INDEX[was], _KA_INDEX[now]
        row = (sock.state & 63) * 3
        self.counts[row + old] -= 1
        self.counts[row + new] += 1
        if sock.state == TcpState.ESTABLISHED:
            idle = path_idle_ms(sock)
            bucket = bisect.bisect_left(_IDLE_BOUNDS_MS, idle)
            self.hist[old][bucket] -= 1
            self.hist[new][bucket] += 1
            self.idle_ms_sum[old] -= idle
            self.idle_ms_sum[new] += idle

    def connections(self) -> dict[tuple[str, str], int]:
        return {
            (state_label(i // 3), Keepalive.ALL[i % 3]): n for i, n in enumerate(self.counts) if n
        }

    def absorb(
        self,
        counts: Sequence[int],
        hist: Sequence[Sequence[int]],
        idle_ms_sum: Sequence[int],
        total: int,
    ) -> None:
        """Adds what a kernel pass counted (``auditd.kernel.bpf`` audit pass) as ``run``
        would have counted the same sockets: ``counts`` by state * 3 + status index for the
        first states, ``hist`` and ``idle_ms_sum`` per status, ``total`` sockets."""
        for i, n in enumerate(counts):
            self.counts[i] += n
        for row, more in zip(self.hist, hist):
            for b, n in enumerate(more):
                row[b] += n
        for k, ms in enumerate(idle_ms_sum):
            self.idle_ms_sum[k] += ms
        self.total += total

    def kernel_limits(self) -> tuple[int, int, int, int, bool]:
        """(warn_ms, probe_ms, close_wait_ms, retransmits, slow_defaults): the pre-filter's
        integer thresholds, for a pass that runs it elsewhere (the kernel)."""
        return (self.warn_ms, max(self.probe_ms, 0), self.close_wait_ms,
                math.ceil(self.retransmits), self.slow_defaults)  # fmt: skip


def could_flag(sock: Sock, t: Thresholds, options: SocketOptions | None = None) -> bool:
    """True if some socket finding may apply under thresholds ``t`` (see ``loosest``): the
    pre-filter of ``Tally`` on this one socket, or, when the socket's own ``options`` were
    read, the pre-filter of the inspection path."""
    if options is not None:
        return _could_flag_exact(sock, t, options)
    kept: list[Sock] = []
    Tally(t).run((sock,), kept.append, None)
    return bool(kept)


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
