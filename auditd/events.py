"""The kernel's abort events in the agent and in ``watch``: read, match, count, log.

``AbortPipeline`` turns a batch into AbortRecords: tracepoint events from perf (correlate,
match against the last audit by 4-tuple, read the socket's settings while its fd still
exists) or whole aborts from BPF (match by socket inode, settings as the kernel read them,
the namespace named from its inode). ``AbortWatch``
runs it in a thread of the agent: it counts every abort by (netns, reason, rule, predicted)
and the events the kernel lost, logs one line per abort (at most ``LOG_RATE`` a second for
predicted and as many for unpredicted ones, the folded ones counted on the next line), and
never lets an error out of its thread: without the privileges or tracepoints it logs one
note and the rest of the agent runs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from auditd.abort_records import UNKNOWN, AbortIndex, AbortRecord, Known, make_record
from auditd.aborts import Correlator, KernelAbort, from_bpf
from auditd.errors import AuditdError
from auditd.kernel.events import Batch, BpfEventSource, EventSource, open_event_source
from auditd.kernel.events.sockopts import OptionsReader
from auditd.kernel.netns import enumerate_namespaces
from auditd.model import SocketOptions
from auditd.results import AuditResult

READ_TIMEOUT = 0.2  # seconds a read waits: how fast the thread notices it must stop
RETRY = 30.0  # seconds before reopening the events after they failed
LOG_RATE, LOG_BURST = 10.0, 20  # abort log lines a second, and the burst allowed
RECENT = 20  # aborts kept for the findings page and API
OPTIONS_BUDGET = 0.05  # seconds per batch spent reading aborted sockets' options
NETNS_REFRESH = 10.0  # seconds between lookups of namespaces no audit named

Source = EventSource | BpfEventSource


class NetnsNames:
    """Namespace inode -> name as the audits name them (``enumerate_namespaces``: host, the
    ``ip netns`` name, pod:, container:, unit:, netns:<inode>), for BPF aborts in namespaces
    the audits do not cover; looked up again at most every NETNS_REFRESH seconds."""

    def __init__(
        self, lookup: Callable[[], dict[int, str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.lookup = lookup or _namespace_names
        self.clock = clock
        self.names: dict[int, str] = {}
        self._at: float | None = None

    def name(self, inode: int) -> str:
        if inode not in self.names and (
            self._at is None or self.clock() - self._at >= NETNS_REFRESH
        ):
            self._at = self.clock()
            with contextlib.suppress(AuditdError):
                self.names = self.lookup()
        return self.names.get(inode, f"netns:{inode}")


def _namespace_names() -> dict[int, str]:
    return {ref.ino: ref.name for ref in enumerate_namespaces()}


class AbortPipeline:
    def __init__(
        self, keepalive_rst_known: bool = True, options: OptionsReader | None = None,
        netns: NetnsNames | None = None,
    ) -> None:  # fmt: skip
        self.index = AbortIndex()
        self.correlator = Correlator(keepalive_rst_known)
        self.options = options or OptionsReader()
        self.netns = netns or NetnsNames()

    def records(self, batch: Batch, wall_offset: float) -> list[AbortRecord]:
        """``wall_offset``: unix time minus CLOCK_MONOTONIC, to date the events. Reading a
        socket's options scans its owner's fds (a proxy may hold 20k): past
        ``OPTIONS_BUDGET`` seconds in one batch the rest get their namespace's settings."""
        out = []
        deadline = time.monotonic() + OPTIONS_BUDGET
        for event in batch.events:
            abort = self.correlator.feed(event)
            if abort is None:
                continue
            when = abort.time_ns / 1e9 + wall_offset
            known = self.index.find(abort.local, abort.remote, when)
            if known is None and not abort.evidence:
                continue  # a connect() that failed, as far as anything shows
            opts = self._options(known, deadline)
            sysctls = self.index.sysctls.get(known.netns) if known is not None else None
            record = make_record(abort, when, known, opts, sysctls)
            if record is not None:
                out.append(record)
        out.extend(r for a in batch.aborts if (r := self._bpf(from_bpf(a), wall_offset)))
        return out

    def _bpf(self, abort: KernelAbort, wall_offset: float) -> AbortRecord | None:
        """An abort BPF read whole: its settings came with it."""
        when = abort.time_ns / 1e9 + wall_offset
        inode = abort.netns_inode or 0
        netns = self.index.netns_names.get(inode) or self.netns.name(inode)
        known = self.index.find(abort.local, abort.remote, when, abort.inode, netns)
        return make_record(abort, when, known, netns=netns)

    def _options(self, known: Known | None, deadline: float) -> SocketOptions | None:
        if known is None or known.pid is None or known.inode is None:
            return None
        if time.monotonic() > deadline:
            return None
        return self.options.read(known.pid, known.inode)


def wall_offset() -> float:
    return time.time() - time.monotonic()


def open_pipeline(
    source: str = "auto", opener: Callable[..., Source] = open_event_source
) -> tuple[Source, AbortPipeline]:
    """``source``: auto (BPF when it loads, else perf), bpf or perf (auditd.kernel.events)."""
    events = opener(source=source)
    return events, AbortPipeline(events.keepalive_rst_known)


def source_line(source: Source) -> str:
    """What is read, said once: ``abort events from bpf`` or ``... from perf (BPF: why)``."""
    why = f" ({source.note})" if source.note else ""
    return f"abort events from {source.name}{why}"


Labels = tuple[str, str, str, str]  # netns, reason, rule, predicted


@dataclass(frozen=True, slots=True)
class AbortState:
    """What a scrape shows; replaced whole."""

    counts: dict[Labels, int] = field(default_factory=dict)
    lost: int = 0
    namespaces: tuple[str, ...] = ()
    error: str | None = None  # why events are off, None while they are read
    source: str | None = None  # "bpf" or "perf" while they are read
    recent: tuple[AbortRecord, ...] = ()  # the last RECENT aborts, newest last


class LogFold:
    """A token bucket: ``admit(now)`` says whether a line may go out and how many were
    folded since the last one that did."""

    def __init__(self, rate: float = LOG_RATE, burst: int = LOG_BURST) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.folded = float(burst), 0
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def admit(self, now: float) -> tuple[bool, int]:
        self._refill(now)
        if self.tokens < 1:
            self.folded += 1
            return False, 0
        self.tokens -= 1
        folded, self.folded = self.folded, 0
        return True, folded

    def flush(self, now: float) -> int:
        """The lines folded and not told yet, if a summary line may go out now (else 0)."""
        if not self.folded:
            return 0
        self._refill(now)
        if self.tokens < 1:
            return 0
        self.tokens -= 1
        folded, self.folded = self.folded, 0
        return folded


def log_fields(record: AbortRecord) -> dict[str, object]:
    fields = {k: v for k, v in asdict(record).items() if v is not None and k != "time"}
    fields["reason"] = record.reason.value
    if "process" in fields:  # LogRecord has its own "process" (our pid)
        fields["process_name"] = fields.pop("process")
    return fields


class AbortWatch:
    """The agent's event thread; ``update`` feeds it each audit, ``state`` the scrapes."""

    def __init__(
        self,
        log: logging.Logger,
        opener: Callable[[], tuple[Source, AbortPipeline]] = open_pipeline,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[AbortState], None] | None = None,
    ) -> None:
        """``on_change(state)`` after each change of ``state``, from the thread that made
        it (the agent renders its scrapes and page again)."""
        self.log, self.opener, self.clock = log, opener, clock
        self.on_change = on_change
        self.state = AbortState()
        self.stop_event = threading.Event()
        # predicted and unpredicted aborts fold apart: a flood of unflagged ones elsewhere
        # does not hide the ones a finding warned of
        self.folds = {True: LogFold(), False: LogFold()}
        self._pipeline: AbortPipeline | None = None
        self._last: AuditResult | None = None
        self._lock = threading.Lock()  # the pipeline's index: audit thread vs event thread
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="abort-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def update(self, result: AuditResult) -> None:
        """After each audit: the connections to match aborts against, the namespaces."""
        with self._lock:
            self._last = result
            if self._pipeline is not None:
                self._pipeline.index.update(result)
            self._set(namespaces=tuple(ns.netns for ns in result.namespaces))

    def _set(self, **changes: object) -> None:
        with self._state_lock:
            s = self.state
            self.state = replace(s, **changes)  # type: ignore[arg-type]
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.state)

    def _add(self, record: AbortRecord | None, lost: int = 0) -> None:
        with self._state_lock:
            s = self.state
            counts, recent = s.counts, s.recent
            if record is not None:
                key = self._labels(record, s.namespaces)
                counts = {**counts, key: counts.get(key, 0) + 1}
                recent = (*recent[-(RECENT - 1) :], record)
            self.state = replace(s, counts=counts, lost=s.lost + lost, recent=recent)
        self._changed()

    @staticmethod
    def _labels(record: AbortRecord, namespaces: tuple[str, ...]) -> Labels:
        """The counter's labels: the namespace of the finding, or one the audits cover, else
        ``unknown`` (BPF names every namespace; the label stays within the audited ones)."""
        netns = record.netns if record.predicted or record.netns in namespaces else UNKNOWN
        return netns, record.reason.value, record.rule, str(record.predicted).lower()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                source, pipeline = self.opener()
            except AuditdError as exc:
                self._off(str(exc))
                return  # privileges and tracepoints do not appear later: one note is enough
            except Exception as exc:  # a bug: say it, leave the agent running
                self._off(f"{type(exc).__name__}: {exc}")
                return
            with self._lock:
                if self._last is not None:
                    pipeline.index.update(self._last)
                self._pipeline = pipeline
            self._set(error=None, source=source.name)
            self.log.info(source_line(source), extra={"source": source.name})
            try:
                self._loop(source, pipeline)
            except Exception as exc:
                self.log.error("abort events failed", extra={"error": f"{exc}", "retry": RETRY})
                self.stop_event.wait(RETRY)
            finally:
                self._pipeline = None
                source.close()

    def _off(self, error: str) -> None:
        self._set(error=error, source=None)
        self.log.warning("abort events off, the audits go on", extra={"error": error})

    def _loop(self, source: Source, pipeline: AbortPipeline) -> None:
        while not self.stop_event.is_set():
            batch = source.read(READ_TIMEOUT)
            with self._lock:
                records = pipeline.records(batch, wall_offset())
            if batch.lost:
                self._add(None, batch.lost)
            for record in records:
                self._add(record)
                self._log(record)
            for predicted, fold in self.folds.items() if not records else ():
                folded = fold.flush(self.clock())  # a burst is over: how many it folded
                if folded:
                    self.log.warning("connection aborts not logged one by one",
                                     extra={"folded": folded, "predicted": predicted})  # fmt: skip

    def _log(self, record: AbortRecord) -> None:
        ok, folded = self.folds[record.predicted].admit(self.clock())
        if not ok:
            return
        fields = log_fields(record)
        if folded:
            fields["folded"] = folded  # aborts since the last line that were not logged
        self.log.warning(f"connection aborted: {record.reason.value}", extra=fields)
