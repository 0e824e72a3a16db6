"""The kernel's abort events in the agent and in ``watch``: read, match, count, log.

``AbortPipeline`` turns a batch of tracepoint events into AbortRecords (correlate, match
against the last audit, read the socket's settings while its fd still exists). ``AbortWatch``
runs it in a thread of the agent: it counts every abort by (netns, reason, rule, predicted)
and the events the kernel lost, logs one line per abort (at most ``LOG_RATE`` a second for
predicted and as many for unpredicted ones, the folded ones counted on the next line), and
never lets an error out of its thread: without the privileges or tracepoints it logs one
note and the rest of the agent runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from auditd.abort_records import AbortIndex, AbortRecord, Known, make_record
from auditd.aborts import Correlator
from auditd.errors import AuditdError
from auditd.kernel.events import Batch, EventSource, keepalive_reason, open_event_source
from auditd.kernel.events.sockopts import OptionsReader
from auditd.model import SocketOptions
from auditd.results import AuditResult

READ_TIMEOUT = 0.2  # seconds a read waits: how fast the thread notices it must stop
RETRY = 30.0  # seconds before reopening the events after they failed
LOG_RATE, LOG_BURST = 10.0, 20  # abort log lines a second, and the burst allowed
OPTIONS_BUDGET = 0.05  # seconds per batch spent reading aborted sockets' options


class AbortPipeline:
    def __init__(
        self, keepalive_rst_known: bool = True, options: OptionsReader | None = None
    ) -> None:
        self.index = AbortIndex()
        self.correlator = Correlator(keepalive_rst_known)
        self.options = options or OptionsReader()

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
        return out

    def _options(self, known: Known | None, deadline: float) -> SocketOptions | None:
        if known is None or known.pid is None or known.inode is None:
            return None
        if time.monotonic() > deadline:
            return None
        return self.options.read(known.pid, known.inode)


def wall_offset() -> float:
    return time.time() - time.monotonic()


def open_pipeline(
    opener: Callable[[], EventSource] = open_event_source,
) -> tuple[EventSource, AbortPipeline]:
    source = opener()
    return source, AbortPipeline(keepalive_reason(source.decoder.formats) is not None)


Labels = tuple[str, str, str, str]  # netns, reason, rule, predicted


@dataclass(frozen=True, slots=True)
class AbortState:
    """What a scrape shows; replaced whole."""

    counts: dict[Labels, int] = field(default_factory=dict)
    lost: int = 0
    namespaces: tuple[str, ...] = ()
    error: str | None = None  # why events are off, None while they are read


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
        opener: Callable[[], tuple[EventSource, AbortPipeline]] = open_pipeline,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.log, self.opener, self.clock = log, opener, clock
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
            values = {"counts": s.counts, "lost": s.lost, "namespaces": s.namespaces,
                      "error": s.error, **changes}  # fmt: skip
            self.state = AbortState(**values)  # type: ignore[arg-type]

    def _add(self, key: Labels | None, lost: int = 0) -> None:
        with self._state_lock:
            counts = dict(self.state.counts)
            if key is not None:
                counts[key] = counts.get(key, 0) + 1
            s = self.state
            self.state = AbortState(counts, s.lost + lost, s.namespaces, s.error)

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
            self._set(error=None)
            try:
                self._loop(source, pipeline)
            except Exception as exc:
                self.log.error("abort events failed", extra={"error": f"{exc}", "retry": RETRY})
                self.stop_event.wait(RETRY)
            finally:
                self._pipeline = None
                source.close()

    def _off(self, error: str) -> None:
        self._set(error=error)
        self.log.warning("abort events off, the audits go on", extra={"error": error})

    def _loop(self, source: EventSource, pipeline: AbortPipeline) -> None:
        while not self.stop_event.is_set():
            batch = source.read(READ_TIMEOUT)
            with self._lock:
                records = pipeline.records(batch, wall_offset())
            if batch.lost:
                self._add(None, batch.lost)
            for record in records:
                self._count(record)
                self._log(record)
            for predicted, fold in self.folds.items() if not records else ():
                folded = fold.flush(self.clock())  # a burst is over: how many it folded
                if folded:
                    self.log.warning("connection aborts not logged one by one",
                                     extra={"folded": folded, "predicted": predicted})  # fmt: skip

    def _count(self, record: AbortRecord) -> None:
        self._add((record.netns, record.reason.value, record.rule, str(record.predicted).lower()))

    def _log(self, record: AbortRecord) -> None:
        ok, folded = self.folds[record.predicted].admit(self.clock())
        if not ok:
            return
        fields = log_fields(record)
        if folded:
            fields["folded"] = folded  # aborts since the last line that were not logged
        self.log.warning(f"connection aborted: {record.reason.value}", extra=fields)
