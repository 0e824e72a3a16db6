"""The kernel's abort events: tracepoints read through perf_event_open, filtered in the kernel.

Which tracepoints and why (shared/KERNEL.md, "Tracepoints of a connection's end", seen on 6.18):

- ``sock:inet_sk_error_report`` is where every abort ends (``tcp_done_with_error`` in
  net/ipv4/tcp_input.c): ETIMEDOUT for keepalive, retransmission and user timeouts, an ICMP
  error (EHOSTUNREACH, ENETUNREACH, EHOSTDOWN) that ended a retransmission train, ECONNRESET
  for a reset. Kept in the kernel: those errors only.
- ``tcp:tcp_send_reset`` with reason TCP_KEEPALIVE_TIMEOUT (Linux 6.10+): the keepalive timer
  gave up, as opposed to the retransmission timer.
- ``sock:inet_sock_set_state`` from ESTABLISHED, FIN_WAIT1 or CLOSE_WAIT straight to CLOSE, only
  on kernels without RST reasons: there it tells an established connection's abort from a
  connect() that failed in SYN_SENT (with them, the RST or the retransmissions do).
- ``tcp:tcp_receive_reset``: the peer sent the RST (carries ``sock_cookie``).
- ``tcp:tcp_retransmit_skb`` (SYN retransmissions left out): counts the retransmissions.

Events carry the 4-tuple, never the namespace; the task of a timer-driven event is whatever
ran. ``EventSource.read`` gives decoded events and the count the kernel lost.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass

from auditd.errors import KernelError
from auditd.kernel.events.decode import Decoder, Kind, TraceEvent, events, parse_ring
from auditd.kernel.events.perf import PerfSource, Probe
from auditd.kernel.events.tracefs import EventFormat, read_format, tracefs_root

__all__ = [
    "Batch",
    "EventSource",
    "Kind",
    "TraceEvent",
    "keepalive_reason",
    "open_event_source",
    "probes",
]

# errno values (include/uapi/asm-generic/errno.h) an abort reports.
ABORT_ERRORS = (errno.ETIMEDOUT, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH,
                errno.EHOSTDOWN)  # fmt: skip
IPPROTO_TCP = 6
# include/net/tcp_states.h
TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_CLOSE, TCP_CLOSE_WAIT, TCP_SYN_SENT = 1, 4, 7, 8, 2
KEEPALIVE_RST = "TCP_KEEPALIVE_TIMEOUT"  # include/net/rstreason.h, SK_RST_REASON_*


def _any(field: str, values: tuple[int, ...]) -> str:
    return "(" + " || ".join(f"{field} == {v}" for v in values) + ")"


def keepalive_reason(formats: Mapping[Kind, EventFormat]) -> int | None:
    """The number of TCP_KEEPALIVE_TIMEOUT in tcp_send_reset's reasons (Linux 6.10+), or None."""
    reset = formats.get(Kind.SEND_RESET)
    return reset.symbols.get("reason", {}).get(KEEPALIVE_RST) if reset else None


def probes(formats: Mapping[Kind, EventFormat]) -> list[Probe]:
    """The tracepoints to open, each with its kernel filter; pure. With the keepalive RST
    reason (Linux 6.10+) an abort shows itself in its RST or retransmissions
    (auditd.aborts.Correlator), and inet_sock_set_state is left out: every reset this host
    sends itself (SO_LINGER 0, ``ss -K``, a benchmark closing 200k sockets) would pass its
    filter. Without the reason, tcp_send_reset is left out and the state change is read."""
    filters = {
        Kind.ERROR_REPORT: f"protocol == {IPPROTO_TCP} && " + _any("error", ABORT_ERRORS),
        Kind.RECEIVE_RESET: "",
        Kind.RETRANSMIT: f"state != {TCP_SYN_SENT}",
    }
    keepalive = keepalive_reason(formats)
    if keepalive is not None:
        filters[Kind.SEND_RESET] = f"reason == {keepalive}"
    else:
        filters[Kind.SET_STATE] = (
            f"protocol == {IPPROTO_TCP} && newstate == {TCP_CLOSE} && "
            + _any("oldstate", (TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_CLOSE_WAIT))
        )
    return [Probe(formats[kind].id, text) for kind, text in filters.items() if kind in formats]


@dataclass(frozen=True, slots=True)
class Batch:
    events: tuple[TraceEvent, ...]  # per CPU in the order they happened, CPUs one after another
    lost: int


REQUIRED = (Kind.ERROR_REPORT, Kind.SET_STATE)


def _time(event: TraceEvent) -> int:
    return event.time_ns


class EventSource:
    """The opened tracepoints; ``read`` blocks at most ``timeout`` seconds."""

    def __init__(self, formats: Mapping[Kind, EventFormat]) -> None:
        self.decoder = Decoder(formats)
        self.perf = PerfSource(probes(formats))

    def read(self, timeout: float) -> Batch:
        self.perf.wait(timeout)
        out: list[TraceEvent] = []
        lost = 0
        for data in self.perf.drain():
            ring = parse_ring(data)
            lost += ring.lost
            out.extend(events(self.decoder, ring))
        # One CPU's ring is in order; across CPUs, the times (one CLOCK_MONOTONIC) order them:
        # a connection's retransmissions may have run on the other CPU than its abort.
        out.sort(key=_time)
        return Batch(tuple(out), lost)

    def close(self) -> None:
        self.perf.close()


def read_formats(root: str | None = None) -> dict[Kind, EventFormat]:
    """Formats of the tracepoints this kernel has; raises KernelError without the required."""
    root = root or tracefs_root()
    formats: dict[Kind, EventFormat] = {}
    for kind in Kind:
        try:
            formats[kind] = read_format(root, *kind.value)
        except KernelError:
            if kind in REQUIRED:
                raise
    return formats


def open_event_source(root: str | None = None) -> EventSource:
    """Raises KernelError (one line, saying what is missing) when events cannot be read."""
    return EventSource(read_formats(root))
