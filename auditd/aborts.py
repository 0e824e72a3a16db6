"""From tracepoint events to aborts: which connection the kernel gave up on, and why. Pure.

``Correlator`` folds the events of one abort (they run on one CPU in one context, so they
arrive in order: shared/KERNEL.md) into a ``KernelAbort``: the optional RST reason or
received RST and the state change to CLOSE are remembered per 4-tuple until the error report
that ends every abort (``tcp_done_with_error``) commits them. An error report without the
state change is a connect() that failed in SYN_SENT; ECONNRESET without a received RST is a
local reset (``tcp_disconnect``, SO_LINGER 0): neither is an abort of the kernel's.
``classify`` names the reason from what was seen and the socket's settings.
"""

from __future__ import annotations

import errno
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from auditd.kernel.events import BpfAbort, Kind, TraceEvent
from auditd.model import SocketOptions


class Reason(str, Enum):
    """Exact ``reason`` strings (JSON, logs, the metric label)."""

    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    RETRANSMIT_TIMEOUT = "retransmit_timeout"
    USER_TIMEOUT = "user_timeout"
    PEER_RESET = "peer_reset"
    UNREACHABLE = "unreachable"


UNREACHABLE_ERRORS = frozenset((errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN))


def classify(
    error: int, keepalive_rst: bool | None, peer_rst: bool, user_timeout_ms: int | None
) -> Reason | None:
    """The reason of an abort, or None when it is not one the kernel decided.

    ``keepalive_rst``: the keepalive timer sent its RST (None: the kernel cannot say, before
    6.10; the caller passes "no retransmission seen" instead). With TCP_USER_TIMEOUT set,
    both timers give up on it instead of their own bounds (tcp_keepalive_timer,
    tcp_write_timeout in net/ipv4/tcp_timer.c): that is ``user_timeout``.
    """
    if error == errno.ECONNRESET:
        return Reason.PEER_RESET if peer_rst else None
    if error in UNREACHABLE_ERRORS:
        return Reason.UNREACHABLE
    if error != errno.ETIMEDOUT:
        return None
    if user_timeout_ms:
        return Reason.USER_TIMEOUT
    return Reason.KEEPALIVE_TIMEOUT if keepalive_rst else Reason.RETRANSMIT_TIMEOUT


@dataclass(frozen=True, slots=True)
class KernelAbort:
    """One abort as the kernel's events tell it: no namespace, no owner yet."""

    time_ns: int  # CLOCK_MONOTONIC of the error report
    local: str
    remote: str
    error: int
    state: int  # the TCP state the connection left for CLOSE
    keepalive_rst: bool | None
    peer_rst: bool
    cookie: int | None  # sock_cookie of the received RST (= sock_diag's idiag_cookie)
    retransmits: int  # tcp_retransmit_skb events seen for it
    # False: nothing before the error report showed an established connection (its RST or
    # retransmissions lost in a flood, or a connect() that failed): keep it only for a
    # connection an audit saw established
    evidence: bool = True
    # Read from the socket by the BPF source (None from the perf path's events):
    netns_inode: int | None = None
    inode: int | None = None  # the socket's, while its application holds the fd
    probes: int | None = None  # icsk_probes_out at the abort
    options: SocketOptions | None = None  # its keepalive settings (source "kernel")


def from_bpf(rec: BpfAbort) -> KernelAbort:
    """A BPF record: the whole abort, the state it left known (the program keeps only
    established states, so there is always evidence)."""
    return KernelAbort(
        rec.time_ns, rec.local, rec.remote, rec.error, rec.oldstate, rec.keepalive_rst,
        rec.peer_rst, rec.cookie, rec.retransmits, True, rec.netns_inode, rec.inode,
        rec.probes, rec.options,
    )  # fmt: skip


@dataclass(slots=True)
class _Pending:
    time_ns: int
    keepalive_rst: bool = False
    cookie: int | None = None
    state: int = 0  # the state it was in, when an event says
    closed: bool = False  # inet_sock_set_state to CLOSE seen (kernels without RST reasons)


# The events of one abort come within microseconds; a half-seen one older than this is stale.
WINDOW_NS = 2_000_000_000

Key = tuple[str, str]


class Correlator:
    """Feed it TraceEvents in order; it returns a KernelAbort when one completes.

    An established connection's abort shows itself before its error report: the keepalive
    timer's RST, the peer's RST, or data retransmitted (SYN retransmissions are filtered out
    in the kernel). A connect() that timed out or found no route in SYN_SENT has none of
    them: it comes out with ``evidence`` False, for the caller to keep only if an audit saw
    the connection established (a flood can also push its retransmissions out of memory).
    Kernels before 6.10 name no RST reason: there the state change to CLOSE from an
    established state (``keepalive_rst_known`` False) is required instead.

    Memory is bounded: at most ``max_tuples`` connections with retransmissions counted (the
    most recent: a retransmission flood elsewhere can push one out, then its abort needs an
    audit to have seen it) and ``max_pending`` half-seen aborts, each kept for ``WINDOW_NS``.
    """

    def __init__(
        self, keepalive_rst_known: bool = True, max_pending: int = 1024, max_tuples: int = 2048
    ) -> None:
        self.keepalive_rst_known = keepalive_rst_known
        self.max_pending, self.max_tuples = max_pending, max_tuples
        self._pending: OrderedDict[Key, _Pending] = OrderedDict()
        self._retransmits: OrderedDict[Key, tuple[int, int]] = OrderedDict()  # count, state

    def _entry(self, key: Key, time_ns: int) -> _Pending:
        entry = self._pending.get(key)
        if entry is None or time_ns - entry.time_ns > WINDOW_NS:
            self._pending.pop(key, None)
            entry = self._pending[key] = _Pending(time_ns)
            self._expire(time_ns)
        return entry

    def _expire(self, now_ns: int) -> None:
        """Forget half-seen aborts past the window (oldest first: insertion order), and the
        oldest beyond ``max_pending``: refused connects elsewhere leave RSTs behind."""
        pending = self._pending
        while pending:
            oldest = next(iter(pending.values()))
            if now_ns - oldest.time_ns <= WINDOW_NS and len(pending) <= self.max_pending:
                break
            pending.popitem(last=False)

    def feed(self, event: TraceEvent) -> KernelAbort | None:
        key = (event.local, event.remote)
        if event.kind is Kind.RETRANSMIT:
            count, _ = self._retransmits.pop(key, (0, 0))
            self._retransmits[key] = (count + 1, event.state)
            if len(self._retransmits) > self.max_tuples:
                self._retransmits.popitem(last=False)
        elif event.kind is Kind.SEND_RESET:
            entry = self._entry(key, event.time_ns)
            entry.keepalive_rst, entry.state = True, entry.state or event.state
        elif event.kind is Kind.RECEIVE_RESET:
            self._entry(key, event.time_ns).cookie = event.cookie
        elif event.kind is Kind.SET_STATE:
            entry = self._entry(key, event.time_ns)
            entry.state, entry.closed = event.oldstate, True
        elif event.kind is Kind.ERROR_REPORT:
            return self._commit(key, event)
        return None

    def _commit(self, key: Key, event: TraceEvent) -> KernelAbort | None:
        entry = self._pending.pop(key, None)
        if entry is None or event.time_ns - entry.time_ns > WINDOW_NS:
            entry = _Pending(event.time_ns)
        retransmits, retransmit_state = self._retransmits.pop(key, (0, 0))
        peer_rst = entry.cookie is not None
        if event.error == errno.ECONNRESET and not peer_rst:
            return None  # a reset this host sent (tcp_disconnect, SO_LINGER 0)
        keepalive_rst: bool | None = entry.keepalive_rst
        if not self.keepalive_rst_known:
            if not entry.closed:
                return None
            keepalive_rst = None
        return KernelAbort(
            event.time_ns, event.local, event.remote, event.error,
            entry.state or retransmit_state, keepalive_rst, peer_rst, entry.cookie, retransmits,
            entry.closed or bool(entry.keepalive_rst or peer_rst or retransmits),
        )  # fmt: skip
