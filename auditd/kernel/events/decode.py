"""Pure decoding: perf ring bytes -> samples, a tracepoint's raw sample -> a TraceEvent.

The ring holds ``perf_event_header`` records (include/uapi/linux/perf_event.h): a SAMPLE
(type 9) with ``PERF_SAMPLE_TIME | PERF_SAMPLE_RAW`` is ``u64 time; u32 size; u8 raw[size]``
after the header, and a LOST record (type 2) ``u64 id; u64 lost``. The raw data is the
tracepoint's entry, laid out as its tracefs ``format`` file says, starting with
``common_type``, the tracepoint id. Nothing here does I/O: tests feed recorded bytes.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum

from auditd.kernel.events.tracefs import EventFormat, Field
from auditd.model import format_endpoint

PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
_HEADER = struct.Struct("=IHH")
_SAMPLE = struct.Struct("=QI")
_LOST = struct.Struct("=QQ")
_ORDER = sys.byteorder  # tracepoint fields are native-endian


class Kind(Enum):
    """The tracepoints read, as (system, name)."""

    SET_STATE = ("sock", "inet_sock_set_state")
    ERROR_REPORT = ("sock", "inet_sk_error_report")
    SEND_RESET = ("tcp", "tcp_send_reset")
    RECEIVE_RESET = ("tcp", "tcp_receive_reset")
    RETRANSMIT = ("tcp", "tcp_retransmit_skb")


@dataclass(frozen=True, slots=True)
class TraceEvent:
    kind: Kind
    time_ns: int  # the sample's perf clock (CLOCK_MONOTONIC when the source asks for it)
    local: str  # "10.0.0.1:80" / "[::1]:80", as sock_diag records print
    remote: str
    error: int = 0  # inet_sk_error_report
    oldstate: int = 0  # inet_sock_set_state
    newstate: int = 0
    reason: int = -1  # tcp_send_reset's sk_rst_reason
    cookie: int = 0  # tcp_receive_reset
    state: int = 0  # tcp_send_reset, tcp_retransmit_skb: the socket's state


@dataclass(frozen=True, slots=True)
class Ring:
    """What one drain of a ring gave: (time_ns, raw) samples and events the kernel lost."""

    samples: tuple[tuple[int, bytes], ...]
    lost: int


def parse_ring(data: bytes) -> Ring:
    """Records laid end to end (the ring already unwrapped) -> samples and lost count.
    A truncated or malformed record ends the parse: what came before it is kept."""
    samples: list[tuple[int, bytes]] = []
    lost, pos, end = 0, 0, len(data)
    while pos + _HEADER.size <= end:
        kind, _, size = _HEADER.unpack_from(data, pos)
        if size < _HEADER.size or pos + size > end:
            break
        body = pos + _HEADER.size
        if kind == PERF_RECORD_SAMPLE and size >= _HEADER.size + _SAMPLE.size:
            time_ns, raw_size = _SAMPLE.unpack_from(data, body)
            start = body + _SAMPLE.size
            if start + raw_size <= pos + size:
                samples.append((time_ns, bytes(data[start : start + raw_size])))
        elif kind == PERF_RECORD_LOST and size >= _HEADER.size + _LOST.size:
            lost += _LOST.unpack_from(data, body)[1]
        pos += size
    return Ring(tuple(samples), lost)


def _int(raw: bytes, f: Field | None) -> int:
    if f is None or f.offset + f.size > len(raw):
        return 0
    return int.from_bytes(raw[f.offset : f.offset + f.size], _ORDER, signed=f.signed)


def _bytes(raw: bytes, f: Field | None) -> bytes:
    return b"" if f is None else raw[f.offset : f.offset + f.size]


class Decoder:
    """Raw samples -> TraceEvents, by the formats of the tracepoints that were opened."""

    def __init__(self, formats: Mapping[Kind, EventFormat]) -> None:
        self.formats = dict(formats)
        self._by_id = {fmt.id: (kind, fmt) for kind, fmt in formats.items()}

    def decode(self, time_ns: int, raw: bytes) -> TraceEvent | None:
        """None for a sample of another tracepoint or too short to be one."""
        if len(raw) < 2:
            return None
        found = self._by_id.get(int.from_bytes(raw[:2], _ORDER))
        if found is None:
            return None
        kind, fmt = found
        ends = _sockaddrs(raw, fmt) if kind is Kind.SEND_RESET else _endpoints(raw, fmt)
        if ends is None:
            return None
        f = fmt.fields
        return TraceEvent(
            kind, time_ns, *ends,
            error=_int(raw, f.get("error")),
            oldstate=_int(raw, f.get("oldstate")),
            newstate=_int(raw, f.get("newstate")),
            reason=_int(raw, f.get("reason")) if "reason" in f else -1,
            cookie=_int(raw, f.get("sock_cookie")),
            state=_int(raw, f.get("state")),
        )  # fmt: skip


def _endpoints(raw: bytes, fmt: EventFormat) -> tuple[str, str] | None:
    """``family``, ``sport``/``dport`` (host order) and ``saddr``/``daddr`` or ``_v6``."""
    f = fmt.fields
    family = _int(raw, f.get("family"))
    suffix = "" if family == socket.AF_INET else "_v6" if family == socket.AF_INET6 else None
    if suffix is None or "sport" not in f:
        return None
    src, dst = _bytes(raw, f.get("saddr" + suffix)), _bytes(raw, f.get("daddr" + suffix))
    need = 4 if family == socket.AF_INET else 16
    if len(src) < need or len(dst) < need:
        return None
    return (
        format_endpoint(family, src, _int(raw, f["sport"])),
        format_endpoint(family, dst, _int(raw, f.get("dport"))),
    )


def _sockaddr(data: bytes) -> str | None:
    """A ``struct sockaddr_in`` or ``sockaddr_in6`` (port in network order) -> endpoint."""
    if len(data) < 8:
        return None
    family = int.from_bytes(data[:2], _ORDER)
    port = int.from_bytes(data[2:4], "big")
    if family == socket.AF_INET:
        return format_endpoint(family, data[4:8], port)
    if family == socket.AF_INET6 and len(data) >= 24:
        return format_endpoint(family, data[8:24], port)
    return None


def _sockaddrs(raw: bytes, fmt: EventFormat) -> tuple[str, str] | None:
    """tcp_send_reset stores both ends as sockaddrs (TP_STORE_ADDR_PORTS), local first."""
    src = _sockaddr(_bytes(raw, fmt.fields.get("saddr")))
    dst = _sockaddr(_bytes(raw, fmt.fields.get("daddr")))
    return None if src is None or dst is None else (src, dst)


def events(decoder: Decoder, ring: Ring) -> Iterator[TraceEvent]:
    for time_ns, raw in ring.samples:
        event = decoder.decode(time_ns, raw)
        if event is not None:
            yield event
