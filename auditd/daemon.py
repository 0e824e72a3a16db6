"""``keepalive-auditd run``: audit in the background, serve the last result, reload on SIGHUP.

Threads: the main thread handles signals, reloads and the systemd watchdog; one worker
audits every interval; the HTTP server answers scrapes from the last rendered exposition,
so a scrape never waits for a dump. Nothing but a signal stops the daemon: every audit
error is logged (once while it repeats), counted by stage, and the next cycle tries again.
The same holds for what an audit could only partly read (sysctls, counters, a dump cut
short, owners it may not look up), a listen address that cannot be bound yet (retried every
``listen_retry`` seconds while the audits go on) and log lines the disk refuses.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from auditd import __version__, logs
from auditd.abort_metrics import AbortCollector
from auditd.config import (
    ConfigError,
    RuleSet,
    WebConfig,
    load_rules,
    load_rules_or_default,
    load_web_config,
)
from auditd.errors import AuditdError, KernelError
from auditd.events import AbortWatch, open_pipeline
from auditd.exporter import ExporterState
from auditd.findlog import FindingLog
from auditd.http import MetricsServer
from auditd.httpserver import MAX_CONNECTIONS
from auditd.kernel.limits import netns_note
from auditd.model import AUDIT_STAGES, Severity, Stage
from auditd.notify import Notifier, watchdog_interval
from auditd.results import DEFAULT_MAX_FINDINGS, AuditResult, inspection_error, kernel_pass_note
from auditd.session import AuditOptions, AuditSession, Namespaces
from auditd.signals import Signals

# How long a thread running Python (the audit, a reload of a large rules file) keeps the GIL
# while another waits for it; CPython's default is 5 ms. A scrape takes the GIL back about
# ten times (once after each system call): during a reload of a 1 MiB file it took 50 ms at
# the median with 5 ms, 12 ms with 1 ms, for 5 % more of the reload's CPU time (issue 16).
SWITCH_INTERVAL = 0.001


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    config_path: str | None  # None: the default path if present, else built-in rules
    interval: float = 30.0
    listen: str = ":9977"
    telemetry_path: str = "/metrics"
    web_config_path: str | None = None  # --web.config.file: TLS and basic auth
    listen_retry: float = 5.0  # most seconds between attempts to bind a busy listen address
    inspect_sockets: bool = False  # --audit.inspect-sockets: exact keepalive options
    max_findings: int = DEFAULT_MAX_FINDINGS  # socket findings described (and logged)
    log_findings_after: float = 300.0  # --log.findings-after: a finding's own line once it lasts
    max_connections: int = MAX_CONNECTIONS  # --web.max-connections
    events_source: str = "auto"  # --events.source: auto, bpf or perf


def summary(result: AuditResult) -> str:
    sockets = sum(ns.sockets for ns in result.namespaces)
    sev = result.severity_counts()
    skipped = f" ({len(result.skipped_namespaces)} skipped)" if result.skipped_namespaces else ""
    return (
        f"audited {sockets} sockets in {len(result.namespaces)} netns{skipped} in "
        f"{result.duration_seconds:.2f}s: {sev[Severity.CRITICAL]} critical, "
        f"{sev[Severity.WARNING]} warning, {sev[Severity.INFO]} info findings"
    )


class Daemon:
    def __init__(
        self,
        options: DaemonOptions,
        sources: Namespaces,
        log: logging.Logger,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options
        self.session = AuditSession(
            sources,
            AuditOptions(options.inspect_sockets, options.max_findings),
            clock=clock,
        )
        self.log = log
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.signals = Signals()
        self.stop_event = threading.Event()  # set by the main loop, never by a signal handler
        self.wake = threading.Event()
        self._reloader: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._unhealthy_logged = False
        self._lock = threading.Lock()
        self.state = ExporterState()
        self.findlog = FindingLog(log, options.log_findings_after)
        self.truncated = False  # the last audit had findings beyond --audit.max-findings
        self.last_cycle = time.monotonic()
        self.audits = 0
        self._failing: dict[str, str] = {}  # stage -> the error last logged for it
        self._config_existed = False
        self._ready_sent = False
        self.server: MetricsServer | None = None
        self.web = WebConfig()
        self._skipped: set[str] = set()  # namespaces skipped by the last audit
        self._inspection_error: str | None = None
        self._bpf_note: str | None = None
        self._kernel_pass_note: str | None = None
        # the kernel's abort events: a thread of its own
        self.aborts = AbortWatch(
            log, functools.partial(open_pipeline, options.events_source),
            on_change=lambda aborts: self._update(aborts=aborts),
        )  # fmt: skip

    # -- state -------------------------------------------------------------------------
    def get_state(self) -> ExporterState:
        return self.state

    def _update(self, **changes: object) -> None:
        with self._lock:
            self.state = replace(self.state, **changes)  # type: ignore[arg-type]

    def _count_error(self, stage: str) -> None:
        with self._lock:
            errors = dict(self.state.errors)
            errors[stage] = errors.get(stage, 0) + 1
            self.state = replace(self.state, errors=errors)

    # -- config ------------------------------------------------------------------------
    def load_initial_config(self) -> RuleSet:
        """Raises ConfigError: at start there is no previous good config to fall back to."""
        rules = load_rules_or_default(self.options.config_path)
        if self.options.web_config_path is not None:
            self.web = load_web_config(self.options.web_config_path)
        self._config_existed = rules.source != "<built-in>"
        self._update(rules=rules, reload_ok=True, reload_success_time=self.clock())
        self.log.info("rules loaded", extra={"source": rules.source, "rules": len(rules.rules)})
        return rules

    def reload(self) -> bool:
        self.notifier.reloading()
        try:
            if self._config_existed:
                path = self.options.config_path or self.state.rules.source
                rules = load_rules(path)
            else:
                rules = load_rules_or_default(self.options.config_path)
            web = self.web
            if self.options.web_config_path is not None:
                web = load_web_config(self.options.web_config_path)
        except ConfigError as exc:
            # Every SIGHUP gets its answer in the log, even the same error twice in a row.
            self._fail(
                Stage.CONFIG, str(exc), "reload failed, keeping the previous rules", once=False
            )
            self._update(reload_ok=False)
            self.notifier.ready(f"reload failed: {exc}")
            return False
        self._config_existed = rules.source != "<built-in>"
        self.web = web
        if self.server is not None:
            self.server.web = web
        self._update(rules=rules, reload_ok=True, reload_success_time=self.clock())
        self.log.info("rules reloaded", extra={"source": rules.source, "rules": len(rules.rules)})
        self.wake.set()
        self.notifier.ready("reloaded")
        return True

    # -- audits ------------------------------------------------------------------------
    def audit_once(self) -> AuditResult | None:
        rules = self.state.rules
        started = self.clock()
        try:
            run = self.session.audit(rules)
        except KernelError as exc:
            self._fail(Stage.DUMP, str(exc))
            return None
        except AuditdError as exc:
            self._fail(Stage.NETNS, str(exc))
            return None
        except Exception as exc:  # a bug must not kill the agent; count it and go on
            self._fail(Stage.INTERNAL, f"{type(exc).__name__}: {exc}")
            return None
        result = run.result
        self._note_bpf(run.bpf)
        served = any(ns.source == "bpf" for ns in result.namespaces)
        self._note_kernel_pass(kernel_pass_note(result.namespaces), served)
        self._settle(run.problems)
        self._count_skipped(result)
        self._note_inspection(inspection_error(result.namespaces))
        self._update(result=result, last_success=started)
        self.aborts.update(result)
        self.audits += 1
        try:
            self._log_changes(result)
            self.notifier.status(summary(result))
        except Exception as exc:  # reporting must not stop the audits either
            self._fail(Stage.INTERNAL, f"{type(exc).__name__}: {exc}")
        return result

    def _note_bpf(self, note: str | None) -> None:
        """The BPF iterators unusable (no CAP_BPF/CAP_PERFMON, no BTF, verifier, lockdown):
        logged once when that starts, once when they load again."""
        if note is not None and note != self._bpf_note:
            self.log.warning(
                "BPF iterators unavailable, owners from /proc and options by pidfd_getfd",
                extra={"error": note},
            )
        elif note is None and self._bpf_note is not None:
            self.log.info("BPF iterators working again")
        self._bpf_note = note

    def _note_kernel_pass(self, note: str | None, served: bool) -> None:
        """The BPF audit pass failing while the other iterators load (a verifier refusing it
        alone, its object unreadable): logged once when that starts, once when it serves."""
        if note is not None and self._kernel_pass_note is None:
            self.log.warning("BPF audit pass unavailable, sockets counted by sock_diag",
                             extra={"error": note})  # fmt: skip
        elif note is None and self._kernel_pass_note is not None and served:
            self.log.info("BPF audit pass working again")
        if note is not None or served:
            self._kernel_pass_note = note

    def _note_inspection(self, error: str | None) -> None:
        """Socket inspection off (no CAP_SYS_PTRACE, old kernel): logged when that starts."""
        if error is not None and error != self._inspection_error:
            self.log.warning("socket inspection off, keepalive inferred", extra={"error": error})
        elif error is None and self._inspection_error is not None:
            self.log.info("socket inspection working again")
        self._inspection_error = error

    def _count_skipped(self, result: AuditResult) -> None:
        """Each namespace skipped (gone or refused) counts as a netns error; it is logged when
        it starts being skipped, not every cycle (containers come and go all day)."""
        skipped = dict(result.skipped_namespaces)
        for name, reason in skipped.items():
            self._count_error(Stage.NETNS)
            if name not in self._skipped:
                fields = {"netns": name, "reason": reason}
                hint = netns_note([(name, reason)])  # refused: what entering it needs
                self.log.info("namespace skipped", extra=fields if hint is None else {
                    **fields, "hint": hint
                })  # fmt: skip
        self._skipped = set(skipped)

    def _fail(
        self, stage: str, message: str, event: str = "audit failed", *, once: bool = True
    ) -> None:
        """Count an error of ``stage``; log it unless it is the one last logged for the stage."""
        self._count_error(stage)
        if not once or self._failing.get(stage) != message:
            self.log.error(event, extra={"stage": stage, "error": message})
        self._failing[stage] = message

    def _settle(self, problems: dict[str, str]) -> None:
        """After an audit that ran: count what it could only partly read (stage -> message),
        log what is new, and say which errors are over."""
        for stage, message in problems.items():
            self._fail(stage, message, "audit incomplete")
        for stage in AUDIT_STAGES:
            last = self._failing.get(stage)
            if last is not None and stage not in problems:
                del self._failing[stage]
                self.log.info("audit recovered", extra={"stage": stage, "after": last})
        dropped = logs.dropped_lines(self.log)
        if dropped != self.state.errors.get("log", 0):
            self._update(errors={**self.state.errors, "log": dropped})

    def _log_changes(self, result: AuditResult) -> None:
        """Log the findings described (``FindingLog``: one line each once they last, a summary
        line per audit for the short-lived ones). Beyond --audit.max-findings the logs follow
        the findings described: when some were only counted, one leaving the list may have
        been pushed out, not cleared, so clears are not logged then, and the crossing of the
        limit is logged once."""
        truncated = result.findings_omitted > 0
        if truncated != self.truncated:
            if truncated:
                self.log.warning(
                    "more findings than --audit.max-findings: the worst are described and "
                    "logged, the rest counted in keepalive_findings",
                    extra={
                        "findings": result.findings_total,
                        "max_findings": self.options.max_findings,
                    },
                )
            else:
                self.log.info("all findings described again", extra={
                    "findings": result.findings_total
                })  # fmt: skip
            self.truncated = truncated
        self.findlog.update(result.findings, self.clock(), clears=not truncated)

    def _audit_thread(self) -> None:
        """The audit worker; if it ever dies, it says so and the health check fails."""
        try:
            self._audit_loop()
        except BaseException as exc:
            self.log.critical(
                "audit loop died: metrics are stale, the health check fails",
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )

    def _audit_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.audit_once()
            except Exception as exc:  # last line of defence: the loop itself must survive
                self._fail(Stage.INTERNAL, f"{type(exc).__name__}: {exc}")
            self.last_cycle = time.monotonic()
            result = self.state.result
            if not self._ready_sent and result is not None:
                self._ready_sent = True  # READY=1 once the first audit has a result
                self.notifier.ready(summary(result))
            self.wake.wait(self.options.interval)
            self.wake.clear()

    def healthy(self) -> bool:
        """The audit loop is alive and finished a cycle recently (a hung dump is not)."""
        if self._worker is not None and not self._worker.is_alive():
            return False
        limit = max(3 * self.options.interval, 60.0)
        return time.monotonic() - self.last_cycle < limit

    def _watchdog(self) -> bool:
        """Ping systemd's watchdog if healthy; say once in the log when the pings stop."""
        if self.healthy():
            if self._unhealthy_logged:
                self.log.info("audit loop healthy again, watchdog pings resume")
            self._unhealthy_logged = False
            return self.notifier.watchdog()
        if not self._unhealthy_logged:
            self.log.error(
                "audit loop unhealthy: no audit finished recently; watchdog pings stop",
                extra={"last_cycle_seconds_ago": round(time.monotonic() - self.last_cycle, 1)},
            )
            self._unhealthy_logged = True
        return False

    # -- lifecycle -----------------------------------------------------------------------
    def install_signals(self) -> None:
        self.signals.install()

    def _start_reload(self) -> None:
        """A reload runs in a thread of its own: a large rules file takes a while to check,
        and the main loop keeps answering signals and the watchdog meanwhile. SIGHUPs that
        come during a reload are served by one more reload after it."""
        if self._reloader is not None and self._reloader.is_alive():
            return
        if not self.signals.take_reload():
            return
        self._reloader = threading.Thread(target=self._reload_thread, name="reload", daemon=True)
        self._reloader.start()

    def _reload_thread(self) -> None:
        try:
            self.reload()
        except Exception as exc:  # a bug in a reload must not end the reloads
            self._fail(Stage.INTERNAL, f"{type(exc).__name__}: {exc}", "reload failed", once=False)

    @property
    def _retry(self) -> float:
        return min(self.options.listen_retry, self.options.interval)

    def _listen(self) -> bool:
        """Try to bind the metrics address; a failure is counted and logged once."""
        assert self.server is not None
        try:
            self.server.start()
        except AuditdError as exc:
            self._fail(
                Stage.HTTP, f"{exc}; retrying every {self._retry:g}s", "cannot serve metrics"
            )
            return False
        self._failing.pop(Stage.HTTP, None)
        self.log.info(
            "listening",
            extra={"address": self.server.address_text, "path": self.options.telemetry_path,
                   "scheme": self.server.scheme, "auth": bool(self.web.users),
                   "version": __version__, "interval": self.options.interval},
        )  # fmt: skip
        return True

    def serve(self) -> None:
        """Runs until SIGTERM/SIGINT. A listen address that cannot be bound (port taken, IP
        not configured yet) does not stop the audits: binding is retried every audit interval,
        at most ``listen_retry`` seconds apart."""
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.server = MetricsServer(
            self.options.listen, self.options.telemetry_path, self.get_state, self.log, self.web,
            max_connections=self.options.max_connections,
        )  # fmt: skip
        self.server.registry.register(AbortCollector(lambda: self.aborts.state))
        self.aborts.start()
        listening = self._listen()
        next_try = time.monotonic() + self._retry
        self._worker = threading.Thread(target=self._audit_thread, name="audit", daemon=True)
        self._worker.start()
        tick = watchdog_interval()
        step = min(tick, 0.25) if tick else 0.25
        last_ping = 0.0
        while not self.signals.stop_requested:
            self.signals.wait(step)
            self._start_reload()
            if not listening and time.monotonic() >= next_try:
                listening = self._listen()
                next_try = time.monotonic() + self._retry
            if tick and time.monotonic() - last_ping >= tick and self._watchdog():
                last_ping = time.monotonic()
        self.stop_event.set()
        self.notifier.stopping()
        self.wake.set()
        self.aborts.stop()
        self.server.stop()
        self.log.info("stopped")
