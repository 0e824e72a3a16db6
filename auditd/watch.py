"""``keepalive-auditd watch``: each connection the kernel aborts, one line as it happens.

Events are read from the moment it starts; an audit of the chosen namespaces runs at
start and every ``--interval`` to know which connections were flagged, whose they are and
what rule they fall under (the agent does the same with its own audits). Ctrl-C ends it
quietly with exit 0; so does a closed pipe (``watch | head``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any

from auditd.abort_records import AbortRecord, record_dict
from auditd.config import load_rules_or_default
from auditd.events import READ_TIMEOUT, AbortPipeline, open_pipeline, source_line, wall_offset
from auditd.report import rfc3339
from auditd.session import AuditSession

COLUMNS = ("TIME", "NETNS", "LOCAL", "REMOTE", "REASON", "OWNER", "RULE", "PREDICTED")


def _owner(r: AbortRecord) -> str:
    if r.pid is None:
        return "-"
    where = f",{(r.container and 'container:' + r.container) or r.unit or ''}".rstrip(",")
    return f"pid={r.pid},{r.process or '?'}{where}"


def record_line(r: AbortRecord) -> str:
    predicted = "no"
    if r.predicted:
        predicted = f"yes,{r.finding},{r.reported_seconds_before or 0:.0f}s before"
    count = f" retrans={r.retransmits}" if r.retransmits else ""
    probes = f" probes={r.probes}" if r.probes is not None else ""
    return (
        f"{rfc3339(r.time)} {r.netns} {r.local} {r.remote} {r.reason.value} {_owner(r)} "
        f"{r.rule} {predicted}{probes}{count}"
    )


class _Auditor(threading.Thread):
    """Audits every ``interval`` seconds and hands each result to the pipeline."""

    def __init__(self, args: argparse.Namespace, pipeline: AbortPipeline, lock: Any) -> None:
        super().__init__(name="watch-audit", daemon=True)
        self.args, self.pipeline, self.lock = args, pipeline, lock
        self.ready = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        # Owners as ``audit`` finds them (the BPF iterators when they load, else the /proc/*/fd
        # scan), with the owner caches of one session across the audits.
        session = AuditSession(self.args.sources)
        while not self.stop.is_set():
            try:
                self._audit(session)
            except Exception as exc:  # the events go on with the last audit
                self.args.say(f"note: audit failed, matching against the last one: {exc}")
            if not self.ready.is_set():
                self.ready.set()
                self.args.say(f"watching connection aborts (audits every {self.args.interval:g}s)")
            self.stop.wait(self.args.interval)

    def _audit(self, session: AuditSession) -> None:
        result = session.audit(load_rules_or_default(self.args.config)).result
        with self.lock:
            self.pipeline.index.update(result)


def cmd_watch(args: argparse.Namespace) -> int:
    source, pipeline = open_pipeline(args.source)  # KernelError: one line, exit 3 (cli.main)
    args.say(source_line(source))
    lock = threading.Lock()
    auditor = _Auditor(args, pipeline, lock)
    auditor.start()
    table = args.format == "table"
    try:
        if table:
            sys.stdout.write("  ".join(COLUMNS) + "\n")
            sys.stdout.flush()
        while True:
            batch = source.read(READ_TIMEOUT)
            with lock:
                records = pipeline.records(batch, wall_offset())
            if batch.lost:
                args.say(f"note: {batch.lost} events lost in the kernel: aborts may be missing")
            for r in records:
                line = record_line(r) if table else json.dumps(record_dict(r), sort_keys=True)
                sys.stdout.write(line + "\n")
            if records:
                sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    finally:
        auditor.stop.set()
        source.close()
