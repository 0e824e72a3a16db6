"""Abort events without a kernel: recorded rings and formats, the reason table, the index,
the agent's counting, log folding and metrics. The live rows are in test_events_live.py."""

from __future__ import annotations

import errno
import json
import logging
import struct
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from auditd.abort_metrics import AbortCollector
from auditd.abort_records import UNKNOWN, AbortIndex, make_record
from auditd.aborts import Correlator, KernelAbort, Reason, classify
from auditd.errors import KernelError
from auditd.events import AbortPipeline, AbortState, AbortWatch, LogFold
from auditd.kernel.events import Batch, Kind, TraceEvent, probes
from auditd.kernel.events.decode import Decoder, events, parse_ring
from auditd.kernel.events.perf import attr_bytes, parse_cpu_list
from auditd.kernel.events.tracefs import EventFormat, parse_format
from auditd.model import Finding, FindingKind, Severity, SocketOptions
from auditd.results import AuditResult

DATA = Path(__file__).parent.parent / "data" / "events"


def formats() -> dict[Kind, EventFormat]:
    out = {}
    for kind in Kind:
        system, name = kind.value
        out[kind] = parse_format(system, (DATA / f"{system}.{name}.format").read_text())
    return out


def recorded() -> list[TraceEvent]:
    decoder, data = Decoder(formats()), (DATA / "rings.bin").read_bytes()
    got: list[TraceEvent] = []
    pos = 0
    while pos < len(data):
        (size,) = struct.unpack_from("=I", data, pos)
        got.extend(events(decoder, parse_ring(data[pos + 4 : pos + 4 + size])))
        pos += 4 + size
    return got


# --- formats and filters ------------------------------------------------------------------


def test_formats_give_offsets_ids_and_symbols() -> None:
    f = formats()
    report = f[Kind.ERROR_REPORT]
    assert report.name == "inet_sk_error_report" and report.id > 0
    assert (report.fields["error"].offset, report.fields["error"].size) == (8, 4)
    assert report.fields["error"].signed and not report.fields["sport"].signed
    assert f[Kind.SET_STATE].fields["saddr_v6"].size == 16
    assert f[Kind.SEND_RESET].fields["saddr"].size == 28  # a sockaddr_in6, not an address
    assert f[Kind.SEND_RESET].symbols["reason"]["TCP_KEEPALIVE_TIMEOUT"] == 15
    assert f[Kind.RECEIVE_RESET].fields["sock_cookie"].offset == 64


@pytest.mark.parametrize("text", ["", "name: x\n", "ID: 3\n", "garbage\x00"])
def test_a_broken_format_file_is_an_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_format("tcp", text)


def test_filters_keep_only_aborts() -> None:
    f = formats()
    by_id = {p.id: p.filter for p in probes(f)}
    assert by_id[f[Kind.ERROR_REPORT].id] == (
        "protocol == 6 && (error == 110 || error == 104 || error == 113 || error == 101 "
        "|| error == 112)"
    )
    assert by_id[f[Kind.SEND_RESET].id] == "reason == 15"
    assert by_id[f[Kind.RETRANSMIT].id] == "state != 2"
    # With RST reasons every abort shows itself without the state change, which every local
    # reset (SO_LINGER 0, ss -K) would pass.
    assert f[Kind.SET_STATE].id not in by_id


def test_without_reset_reasons_the_state_change_replaces_send_reset() -> None:
    f = formats()
    old = f[Kind.SEND_RESET]
    f[Kind.SEND_RESET] = EventFormat(old.system, old.name, old.id, old.fields, {})
    by_id = {p.id: p.filter for p in probes(f)}
    assert old.id not in by_id
    assert by_id[f[Kind.SET_STATE].id] == (
        "protocol == 6 && newstate == 7 && (oldstate == 1 || oldstate == 4 || oldstate == 8)"
    )


def test_attr_and_cpu_list() -> None:
    attr = attr_bytes(2286, 4096)
    assert len(attr) == 128
    assert struct.unpack_from("=IIQQQ", attr) == (2, 128, 2286, 1, (1 << 2) | (1 << 10))
    assert parse_cpu_list("0-3,8\n") == [0, 1, 2, 3, 8] and parse_cpu_list("0") == [0]


# --- rings ----------------------------------------------------------------------------------


def _record(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHH", kind, 0, 8 + len(body)) + body


def test_ring_samples_lost_records_and_truncation() -> None:
    raw = b"\x07\x00" + b"abcdef"
    sample = _record(9, struct.pack("=QI", 123, len(raw)) + raw + b"\0\0\0\0")
    lost = _record(2, struct.pack("=QQ", 1, 42))
    ring = parse_ring(sample + lost + sample[:10])
    assert ring.samples == ((123, raw),) and ring.lost == 42
    assert parse_ring(struct.pack("=IHH", 9, 0, 2)) == parse_ring(b"")  # size < header


def test_unknown_or_short_samples_decode_to_nothing() -> None:
    decoder = Decoder(formats())
    assert decoder.decode(0, b"\xff\xff" + bytes(100)) is None
    assert decoder.decode(0, b"\x01") is None
    report = formats()[Kind.ERROR_REPORT]
    assert decoder.decode(0, report.id.to_bytes(2, "little") + bytes(10)) is None  # no family


def _replay() -> dict[tuple[str, str], KernelAbort]:
    correlator = Correlator()
    aborts = (correlator.feed(e) for e in recorded())
    return {(a.local, a.remote): a for a in aborts if a is not None}


def test_recorded_aborts_decode_to_what_was_staged() -> None:
    cases = json.loads((DATA / "expected.json").read_text())["cases"]
    aborts = _replay()
    for case in cases:
        abort = aborts.get((case["local"], case["remote"]))
        if case["reason"] is None:
            assert abort is None, case  # a normal close is no abort
            continue
        assert abort is not None, case
        record = make_record(abort, 0.0, None)
        assert record is not None and record.reason.value == case["reason"], (case, abort)
        # tcp_send_reset and tcp_retransmit_skb carry the state; a received RST does not
        assert record.state == ("unknown" if case["reason"] == "peer_reset" else "established")
        if case["reason"] == "retransmit_timeout":
            assert abort.retransmits >= 3
        if case["reason"] == "peer_reset":
            assert abort.cookie


def test_the_local_reset_of_the_recorded_server_is_not_an_abort() -> None:
    """The server closed with SO_LINGER 0: ECONNRESET on its side without an RST received."""
    cases = json.loads((DATA / "expected.json").read_text())["cases"]
    servers = {(c["remote"], c["local"]) for c in cases}
    resets = [e for e in recorded() if e.kind is Kind.ERROR_REPORT and e.error == 104]
    assert len(resets) >= 2  # the client's and the server's own
    assert not servers & set(_replay())


# --- reasons --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "keepalive_rst", "peer_rst", "user_timeout", "reason"),
    [
        (errno.ETIMEDOUT, True, False, None, Reason.KEEPALIVE_TIMEOUT),
        (errno.ETIMEDOUT, True, False, 0, Reason.KEEPALIVE_TIMEOUT),
        (errno.ETIMEDOUT, True, False, 45000, Reason.USER_TIMEOUT),
        (errno.ETIMEDOUT, False, False, None, Reason.RETRANSMIT_TIMEOUT),
        (errno.ETIMEDOUT, False, False, 3000, Reason.USER_TIMEOUT),
        (errno.ECONNRESET, False, True, None, Reason.PEER_RESET),
        (errno.ECONNRESET, False, False, None, None),  # tcp_disconnect, SO_LINGER 0
        (errno.EHOSTUNREACH, False, False, None, Reason.UNREACHABLE),
        (errno.ENETUNREACH, False, False, 3000, Reason.UNREACHABLE),
        (errno.EHOSTDOWN, False, False, None, Reason.UNREACHABLE),
        (errno.ECONNREFUSED, False, True, None, None),
        (errno.ECONNABORTED, False, False, None, None),  # ss -K
    ],
)
def test_reason_table(
    error: int, keepalive_rst: bool, peer_rst: bool, user_timeout: int | None, reason: Reason
) -> None:
    assert classify(error, keepalive_rst, peer_rst, user_timeout) == reason


def ev(kind: Kind, t: int = 0, local: str = "10.0.0.1:1", **kw: int) -> TraceEvent:
    return TraceEvent(kind, t, local, "10.0.0.2:2", **kw)


def test_correlator_needs_a_sign_of_an_established_connection() -> None:
    c = Correlator()
    for error in (110, 113):  # SYN_SENT: connect() timed out, no route; or all else lost
        abort = c.feed(ev(Kind.ERROR_REPORT, error=error))
        assert abort is not None and not abort.evidence
    c.feed(ev(Kind.RECEIVE_RESET, 0, cookie=5))
    assert c.feed(ev(Kind.ERROR_REPORT, 3_000_000_000, error=104)) is None  # stale RST
    for _ in range(3):
        c.feed(ev(Kind.RETRANSMIT, state=8))
    abort = c.feed(ev(Kind.ERROR_REPORT, 6, error=110))
    assert abort is not None and abort.retransmits == 3 and abort.state == 8
    assert abort.keepalive_rst is False and abort.evidence
    c.feed(ev(Kind.SEND_RESET, 7, state=1, reason=15))
    abort = c.feed(ev(Kind.ERROR_REPORT, 8, error=110))
    assert abort is not None and abort.keepalive_rst and abort.state == 1 and not abort.retransmits
    c.feed(ev(Kind.RECEIVE_RESET, 9, cookie=77))
    abort = c.feed(ev(Kind.ERROR_REPORT, 10, error=104))
    assert abort is not None and abort.peer_rst and abort.cookie == 77


def test_correlator_memory_is_bounded() -> None:
    c = Correlator(max_pending=10, max_tuples=10)
    for i in range(100):
        c.feed(ev(Kind.RECEIVE_RESET, local=f"10.0.0.1:{i}", cookie=i))
        c.feed(ev(Kind.RETRANSMIT, local=f"10.0.0.1:{i}"))
    assert len(c._pending) == 10 and len(c._retransmits) == 10
    c.feed(ev(Kind.RECEIVE_RESET, 3_000_000_000, "10.0.0.9:1", cookie=1))
    assert list(c._pending) == [("10.0.0.9:1", "10.0.0.2:2")]  # the stale ones expired


def test_before_reset_reasons_the_state_change_proves_it() -> None:
    c = Correlator(keepalive_rst_known=False)
    assert c.feed(ev(Kind.ERROR_REPORT, error=110)) is None  # no state change: SYN_SENT
    c.feed(ev(Kind.SET_STATE, oldstate=1, newstate=7))
    abort = c.feed(ev(Kind.ERROR_REPORT, error=110))
    assert abort is not None and abort.keepalive_rst is None and abort.state == 1
    record = make_record(abort, 1.0, None)  # no retransmission seen: the keepalive timer
    assert record is not None and record.reason is Reason.KEEPALIVE_TIMEOUT


# --- the index and records ------------------------------------------------------------------


def finding(local: str = "10.0.0.1:1", kind: str = "keepalive_probing") -> Finding:
    return Finding(FindingKind(kind), Severity.WARNING, "db", "kaud-x", "m", "h", local=local,
                   remote="10.0.0.2:2", pid=7, process="psql", inode=99, probes=1)  # fmt: skip


def result(at: float, *findings: Finding) -> AuditResult:
    return AuditResult(at, 0.5, (), findings)


def test_index_keeps_the_first_report_and_the_gone_until_the_next_audit_ends() -> None:
    index = AbortIndex()
    index.update(result(100.0, finding()))
    index.update(result(130.0, finding()))
    known = index.find("10.0.0.1:1", "10.0.0.2:2", 140.0)
    assert known is not None and known.first_reported == 100.0 and known.netns == "kaud-x"
    index.update(result(160.0))  # gone: maybe the abort emptied it
    assert index.find("10.0.0.1:1", "10.0.0.2:2", 160.4) is not None
    assert index.find("10.0.0.1:1", "10.0.0.2:2", 161.0) is None
    index.update(result(190.0))
    assert index.find("10.0.0.1:1", "10.0.0.2:2", 150.0) is None
    index.update(result(220.0, finding()))  # flagged again: a new first report
    assert index.known[("10.0.0.1:1", "10.0.0.2:2")].first_reported == 220.0


def test_namespace_findings_are_not_connections() -> None:
    index = AbortIndex()
    index.update(
        result(1.0, Finding(FindingKind.SYSCTL, Severity.WARNING, "default", "host", "m", "h"))
    )
    assert index.known == {}


def _abort(error: int = 110, keepalive_rst: bool = True) -> KernelAbort:
    return KernelAbort(5, "10.0.0.1:1", "10.0.0.2:2", error, 1, keepalive_rst, False, None, 0)


def test_record_of_a_predicted_abort_with_the_sockets_options() -> None:
    index = AbortIndex()
    index.update(result(100.0, finding()))
    known = index.find("10.0.0.1:1", "10.0.0.2:2", 112.5)
    record = make_record(_abort(), 112.5, known, SocketOptions(True, 10, 5, 3, 0))
    assert record is not None
    assert (record.reason, record.predicted, record.rule, record.netns) == (
        Reason.KEEPALIVE_TIMEOUT, True, "db", "kaud-x")  # fmt: skip
    assert (record.pid, record.process, record.probes) == (7, "psql", 3)
    assert record.reported_seconds_before == 12.5 and record.settings == "socket"
    timed = make_record(_abort(), 112.5, known, SocketOptions(True, 10, 5, 3, 20000))
    assert timed is not None and timed.reason is Reason.USER_TIMEOUT


def test_record_of_an_unknown_connection() -> None:
    record = make_record(_abort(keepalive_rst=False), 1.0, None)
    assert record is not None and record.reason is Reason.RETRANSMIT_TIMEOUT
    assert (record.netns, record.rule, record.predicted, record.pid) == (
        UNKNOWN, UNKNOWN, False, None)  # fmt: skip
    assert make_record(_abort(error=103), 1.0, None) is None


# --- the agent's side -----------------------------------------------------------------------


def test_log_fold_lets_a_burst_through_then_counts() -> None:
    fold = LogFold(rate=1.0, burst=3)
    got = [fold.admit(100.0) for _ in range(5)]
    assert got == [(True, 0)] * 3 + [(False, 0)] * 2
    assert fold.admit(101.0) == (True, 2)
    assert fold.admit(101.0) == (False, 0)
    assert fold.flush(101.0) == 0  # no token yet
    assert fold.flush(102.5) == 1 and fold.flush(103.0) == 0  # told once


def test_collector_exports_the_counts_and_zeros_for_the_host_and_unknown() -> None:
    state = AbortState(
        counts={("kaud-x", "peer_reset", "db", "true"): 2}, lost=5,
        namespaces=("host", "kaud-x"),
    )  # fmt: skip
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AbortCollector(lambda: state))
    text = generate_latest(registry).decode()
    assert ('keepalive_connection_aborts_total{netns="kaud-x",predicted="true",'
            'reason="peer_reset",rule="db"} 2.0') in text  # fmt: skip
    assert ('keepalive_connection_aborts_total{netns="host",predicted="false",'
            'reason="unreachable",rule="unknown"} 0.0') in text  # fmt: skip
    assert ('keepalive_connection_aborts_total{netns="host",predicted="true",'
            'reason="unreachable",rule="default"} 0.0') in text  # fmt: skip
    assert 'netns="unknown",predicted="true"' not in text
    assert "keepalive_events_lost_total 5.0" in text and "keepalive_events_up 1.0" in text
    series = [line for line in text.splitlines() if line.startswith("keepalive_connection")]
    # the one count; per reason: host predicted and not, unknown not
    assert len(series) == 1 + 3 * len(Reason)
    off = AbortState(error="perf_event_open refused")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AbortCollector(lambda: off))
    text = generate_latest(registry).decode()
    assert "keepalive_events_up 0.0" in text
    assert len([li for li in text.splitlines() if li.startswith("keepalive_connection")]) == 5


class FakeSource:
    name, note, keepalive_rst_known = "perf", None, True

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.closed = batches, False

    def read(self, timeout: float) -> Batch:
        if self.batches:
            return self.batches.pop(0)
        time.sleep(min(timeout, 0.01))
        return Batch((), 0)

    def close(self) -> None:
        self.closed = True


class NoOptions:
    def read(self, pid: int, inode: int) -> SocketOptions | None:
        return None


def _abort_events(local: str) -> tuple[TraceEvent, ...]:
    return (ev(Kind.RECEIVE_RESET, 1, local, cookie=9), ev(Kind.SET_STATE, 2, local, oldstate=1),
            ev(Kind.ERROR_REPORT, 3, local, error=104))  # fmt: skip


def _logger() -> tuple[logging.Logger, list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    log = logging.getLogger(f"test-events-{id(records)}")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    log.addHandler(handler)
    log.propagate = False
    return log, records


def test_agent_thread_counts_logs_and_stops_fast() -> None:
    source = FakeSource(
        [Batch(_abort_events("10.0.0.1:1"), 3), Batch(_abort_events("10.0.0.1:5"), 0)]
    )
    pipeline = AbortPipeline(options=NoOptions())  # type: ignore[arg-type]
    log, lines = _logger()
    watch = AbortWatch(log, opener=lambda: (source, pipeline))  # type: ignore[arg-type, return-value]
    watch.update(result(0.0, finding()))
    watch.start()
    deadline = time.monotonic() + 5
    while sum(watch.state.counts.values()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    watch.stop()
    assert time.monotonic() - started < 1.0 and source.closed
    assert watch.state.counts == {
        ("kaud-x", "peer_reset", "db", "true"): 1, (UNKNOWN, "peer_reset", UNKNOWN, "false"): 1,
    }  # fmt: skip
    assert watch.state.lost == 3
    aborted = [r for r in lines if r.getMessage() == "connection aborted: peer_reset"]
    assert [r.local for r in aborted] == ["10.0.0.1:1", "10.0.0.1:5"]  # type: ignore[attr-defined]
    assert aborted[0].process_name == "psql"  # type: ignore[attr-defined]


def test_without_events_the_agent_says_so_once() -> None:
    def refuse() -> None:
        raise KernelError("perf_event_open refused (needs CAP_PERFMON)")

    log, lines = _logger()
    watch = AbortWatch(log, opener=refuse)  # type: ignore[arg-type]
    watch.start()
    watch.stop()
    assert watch._thread is not None and not watch._thread.is_alive()
    assert watch.state.error == "perf_event_open refused (needs CAP_PERFMON)"
    assert [r.getMessage() for r in lines] == ["abort events off, the audits go on"]


def test_a_failing_source_is_logged_and_does_not_escape() -> None:
    class Broken(FakeSource):
        def read(self, timeout: float) -> Batch:
            raise OSError(errno.EIO, "boom")

    log, lines = _logger()
    source = Broken([])
    watch = AbortWatch(log, opener=lambda: (source, AbortPipeline(options=NoOptions())))  # type: ignore[arg-type, return-value]
    watch.start()
    deadline = time.monotonic() + 5
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    watch.stop()
    assert lines[0].getMessage() == "abort events failed" and source.closed
    assert threading.active_count() >= 1


def test_a_flood_of_unpredicted_aborts_does_not_hide_a_predicted_one() -> None:
    flood = tuple(e for i in range(60) for e in _abort_events(f"10.9.9.9:{i + 10}"))
    source = FakeSource([Batch((*flood, *_abort_events("10.0.0.1:1")), 0)])
    log, lines = _logger()
    pipeline = AbortPipeline(options=NoOptions())  # type: ignore[arg-type]
    watch = AbortWatch(log, opener=lambda: (source, pipeline))  # type: ignore[arg-type, return-value]
    watch.update(result(0.0, finding()))
    watch.start()
    deadline = time.monotonic() + 5
    while sum(watch.state.counts.values()) < 61 and time.monotonic() < deadline:
        time.sleep(0.01)
    watch.stop()
    logged = [getattr(r, "local", None) for r in lines]
    assert "10.0.0.1:1" in logged  # the predicted one, after the unpredicted burst
    assert len([x for x in logged if x and x.startswith("10.9.9.9:")]) == 20  # the burst
    assert watch.state.counts[(UNKNOWN, "peer_reset", UNKNOWN, "false")] == 60


def test_an_abort_without_evidence_counts_only_for_a_connection_an_audit_saw() -> None:
    """A connect() that timed out looks like an abort whose retransmissions were lost."""
    pipeline = AbortPipeline(options=NoOptions())  # type: ignore[arg-type]
    pipeline.index.update(result(0.0, finding()))
    batch = Batch((ev(Kind.ERROR_REPORT, 1, "10.0.0.1:1", error=110),
                   ev(Kind.ERROR_REPORT, 2, "10.0.0.1:9", error=110)), 0)  # fmt: skip
    records = pipeline.records(batch, 0.0)
    assert [(r.local, r.predicted, r.reason) for r in records] == [
        ("10.0.0.1:1", True, Reason.RETRANSMIT_TIMEOUT)
    ]
