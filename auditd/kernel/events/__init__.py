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

``open_event_source`` prefers the BPF program (auditd.kernel.events.bpfabort: whole aborts,
read from the socket, with its namespace, cookie and settings) and falls back to these
tracepoints through perf when it does not load; the source says which it is (``name``) and,
for perf, why BPF was not used (``note``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from auditd.errors import BpfUnavailable, KernelError
from auditd.kernel.events.bpfabort import BpfAbort, BpfSource
from auditd.kernel.events.decode import Decoder, Kind, TraceEvent, events, parse_ring
from auditd.kernel.events.perf import PerfSource, Probe
from auditd.kernel.events.tracefs import EventFormat, read_format, tracefs_root

__all__ = [
    "SOURCES",
    "Batch",
    "BpfAbort",
    "BpfEventSource",
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
    events: tuple[TraceEvent, ...]  # in the order they happened (perf)
    lost: int
    aborts: tuple[BpfAbort, ...] = ()  # whole aborts (BPF)


REQUIRED = (Kind.ERROR_REPORT, Kind.SET_STATE)


def _order(event: TraceEvent) -> tuple[int, bool]:
    return event.time_ns, event.kind is Kind.ERROR_REPORT


class EventSource:
    """The opened tracepoints; ``read`` blocks at most ``timeout`` seconds."""

    name = "perf"

    def __init__(self, formats: Mapping[Kind, EventFormat], note: str | None = None) -> None:
        self.decoder = Decoder(formats)
        self.perf = PerfSource(probes(formats))
        self.note = note  # why the BPF source is not used, if it was tried
        rings = len(self.perf.rings)
        self._counted, self._samples, self._missing = [0] * rings, [0] * rings, [0] * rings

    @property
    def keepalive_rst_known(self) -> bool:
        return keepalive_reason(self.decoder.formats) is not None

    def read(self, timeout: float) -> Batch:
        """``lost`` counts the kernel's PERF_RECORD_LOST and the samples it counted for an
        event by the previous read that never reached that event's ring (issue 13, see
        auditd.kernel.events.perf): a sample counted then has had a whole wait to arrive."""
        self.perf.wait(timeout)
        counts = self.perf.counts()
        out: list[TraceEvent] = []
        lost = 0
        for i, data in enumerate(self.perf.drain()):
            ring = parse_ring(data)
            lost += ring.lost
            self._samples[i] += len(ring.samples)
            missing = self._counted[i] - self._samples[i]
            if missing > self._missing[i]:
                lost += missing - self._missing[i]
                self._missing[i] = missing
            out.extend(events(self.decoder, ring))
        self._counted = counts
        # Each ring is in order; across rings and CPUs, the times (one CLOCK_MONOTONIC) order
        # them (a connection's retransmissions may have run on the other CPU than its abort),
        # and an error report goes after what has the same time: it ends the abort.
        out.sort(key=_order)
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


class BpfEventSource:
    """The BPF program's aborts as Batches, like EventSource's events."""

    name = "bpf"
    note: str | None = None
    keepalive_rst_known = True  # the program tells the keepalive timer's RST (6.10+) itself

    def __init__(self, bpf: BpfSource) -> None:
        self.bpf = bpf

    def read(self, timeout: float) -> Batch:
        aborts, lost = self.bpf.read(timeout)
        return Batch((), lost, tuple(aborts))

    def close(self) -> None:
        self.bpf.close()


SOURCES = ("auto", "bpf", "perf")  # --events.source / watch --source


def open_event_source(
    root: str | None = None, source: str = "auto", bpf: Callable[[], BpfSource] = BpfSource
) -> EventSource | BpfEventSource:
    """The BPF source when it loads (``auto``, ``bpf``), else the tracepoints through perf
    (``auto``, ``perf``). Raises KernelError (one line, saying what is missing) when events
    cannot be read; with ``bpf``, BpfUnavailable when the program does not load."""
    note = None
    if source != "perf":
        try:
            return BpfEventSource(bpf())
        except BpfUnavailable as exc:
            if source == "bpf":
                raise
            note = str(exc)
    return EventSource(read_formats(root), note)
