"""``keepalive-auditd run`` as a real process: scrapes, signals, sd_notify, bad flags.

Each daemon is ``python -m auditd run`` with a 1 s interval and JSON logs written to a file.
It runs in a fresh network namespace of the ``lab`` where namespaces can be made (it audits
the namespace it runs in, so it sees this test's sockets only; it is scraped from a thread
that entered that namespace), else in the host's; one test compares it with the host's own
sysctls. The ``daemons`` fixture kills whatever is still running before the lab goes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netlab
import pytest
from agent import Agent, Agents, Scrape, wait_for

from auditd import logs, notify

STARTUP_TIMEOUT = 20.0  # first scrape with an audit in it; generous for a loaded CI box
SYSCTLS = {
    "keepalive_sysctl_tcp_keepalive_time_seconds": "net/ipv4/tcp_keepalive_time",
    "keepalive_sysctl_tcp_keepalive_intvl_seconds": "net/ipv4/tcp_keepalive_intvl",
    "keepalive_sysctl_tcp_keepalive_probes": "net/ipv4/tcp_keepalive_probes",
    "keepalive_sysctl_tcp_retries2": "net/ipv4/tcp_retries2",
}
RULES_V1 = "version: 1\nrules:\n  - name: alpha\n    match: {remote_ports: [5432]}\n"


# --- helpers -------------------------------------------------------------------------------


@functools.cache
def netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return netlab.netns_available()


@pytest.fixture
def daemons(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Agents]:
    netns = None
    if netns_unavailable() is None:
        # Set up before this fixture finishes, so torn down after it: daemons die first.
        lab: netlab.Lab = request.getfixturevalue("lab")
        netns = lab.netns()
    started = Agents(tmp_path, netns, startup_timeout=STARTUP_TIMEOUT)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES_V1)
    return path


# --- what the kernel says ------------------------------------------------------------------


def test_sysctls_match_the_host_kernel(daemons: Agents, rules_file: Path) -> None:
    # The first audit of a host full of other tests' sockets can take a while.
    scrape = daemons.start(config=rules_file, host=True, startup_timeout=60).scrape()
    for metric, path in SYSCTLS.items():
        kernel = int(Path("/proc/sys", path).read_text())
        assert scrape.value(metric, netns="host") == kernel, metric
    assert scrape.label_values("keepalive_tcp_connections", "netns") == {"host"}


@pytest.mark.kernel
def test_sysctls_of_the_namespace_it_runs_in(daemons: Agents, rules_file: Path) -> None:
    ns = daemons.netns
    assert ns is not None
    values = {
        "net.ipv4.tcp_keepalive_time": 77,
        "net.ipv4.tcp_keepalive_intvl": 11,
        "net.ipv4.tcp_keepalive_probes": 4,
        "net.ipv4.tcp_retries2": 6,
    }
    for name, value in values.items():
        ns.set_sysctl(name, value)
    scrape = daemons.start(config=rules_file).scrape()
    for metric, path in SYSCTLS.items():
        assert scrape.value(metric, netns="host") == values[path.replace("/", ".")], metric
    detection = scrape.value("keepalive_dead_peer_detection_seconds", netns="host", case="idle")
    assert detection == 77 + 4 * 11


def test_last_success_advances(daemons: Agents, rules_file: Path) -> None:
    daemon = daemons.start(config=rules_file)
    first = daemon.scrape().last_success
    assert first is not None
    second = daemon.wait_audit(first, 10.0).last_success
    assert second is not None
    assert first < second <= time.time()
    assert 0.5 < second - first < 5, "audits should be about --audit.interval (1 s) apart"


def established_off(scrape: Scrape) -> float:
    return scrape.value("keepalive_tcp_connections", netns="host", state="established",
                        keepalive="off")  # fmt: skip


def connect(netns: netlab.Netns | None) -> tuple[socket.socket, socket.socket]:
    """A loopback TCP connection without keepalive in ``netns`` (None: the host's)."""
    if netns is None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = socket.create_connection(listener.getsockname())
            return client, listener.accept()[0]
    listener = netns.listen("127.0.0.1")
    client = netns.make_socket()
    client.connect(listener.getsockname())
    server = netns.adopt(listener.accept()[0])
    listener.close()
    return client, server


def test_a_loopback_connection_is_counted(daemons: Agents, rules_file: Path) -> None:
    """+2 established/off (both ends) for a connection without keepalive.

    A scrape of ours in flight during a dump is counted too (and in the host namespace,
    whatever else runs there), so exactly +2 may take a few tries; one try that shows it
    proves the count.
    """
    daemon = daemons.start(config=rules_file)
    deltas = []
    for _ in range(5):
        before = established_off(daemon.wait_audit(time.time(), 10.0))
        client, server = connect(daemons.netns)
        with client, server:
            during = established_off(daemon.wait_audit(time.time(), 10.0))
        deltas.append(during - before)
        if during - before == 2:
            break
    assert deltas[-1] == 2, f"established/off deltas, before -> with the connection: {deltas}"


# --- a finding in a network namespace ------------------------------------------------------


def finding_lines(daemon: Agent, local: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(opened, cleared) log lines of idle_no_keepalive findings on ``local``."""
    ours = [
        line
        for line in daemon.log()
        if line.get("kind") == "idle_no_keepalive" and line.get("local") == local
    ]
    opened = [line for line in ours if line["msg"].startswith("finding:")]
    cleared = [line for line in ours if line["msg"] == "finding cleared"]
    return opened, cleared


@pytest.mark.kernel
def test_idle_connection_finding_in_a_netns(daemons: Agents, tmp_path: Path) -> None:
    ns = daemons.netns
    assert ns is not None
    config = tmp_path / "short.yaml"
    config.write_text("version: 1\ndefaults:\n  idle_timeout: 2s\n  detection_budget: 1d\n")
    daemon = daemons.start(config=config)
    client, server = connect(ns)
    ends = {
        name: "{}:{}".format(*s.getsockname())
        for name, s in (("client", client), ("server", server))
    }

    def critical() -> float | None:
        scrape = daemon.try_scrape()
        if scrape is None:
            return None
        return scrape.total(
            "keepalive_findings", netns="host", kind="idle_no_keepalive", severity="critical"
        )

    # Both ends of the connection are idle without keepalive: two findings.
    wait_for("2 critical idle_no_keepalive findings", lambda: critical() == 2, timeout=15)
    # They stay open for more audits and are logged once, when they opened, not every cycle.
    daemon.wait_audit(time.time() + 1, 10.0)
    for name, local in ends.items():
        opened, cleared = finding_lines(daemon, local)
        assert len(opened) == 1, f"{name}: {opened}"
        assert not cleared, name
        assert opened[0]["level"] == "warning"
        assert opened[0]["netns"] == "host"
        assert opened[0]["rule"] == "default"
        assert opened[0]["hint"]

    client.close()
    server.close()
    wait_for("the findings to clear", lambda: critical() == 0)
    for name, local in ends.items():

        def closed_lines(local: str = local) -> list[dict[str, Any]]:
            return finding_lines(daemon, local)[1]

        wait_for(f"'finding cleared' for the {name}", closed_lines)
        opened, closed = finding_lines(daemon, local)
        assert (len(opened), len(closed)) == (1, 1), name
        assert closed[0]["level"] == "info"


# --- reload on SIGHUP ----------------------------------------------------------------------


def test_sighup_reload(daemons: Agents, rules_file: Path) -> None:
    daemon = daemons.start(config=rules_file)
    before = daemon.scrape()
    assert before.value("keepalive_config_rules") == 1
    loaded_at = before.value("keepalive_config_last_reload_success_timestamp_seconds")

    rules_file.write_text(RULES_V1 + "  - name: beta\n    match: {remote_ports: [6379]}\n")
    daemon.proc.send_signal(signal.SIGHUP)

    def reloaded() -> Scrape | None:
        got = daemon.try_scrape()
        return got if got is not None and got.value("keepalive_config_rules") == 2 else None

    after = wait_for("2 rules in keepalive_config_rules", reloaded)
    assert after.value("keepalive_config_last_reload_successful") == 1
    assert after.value("keepalive_config_last_reload_success_timestamp_seconds") > loaded_at
    assert [line["rules"] for line in daemon.log() if line["msg"] == "rules reloaded"] == [2]

    # Two bad files in turn: the daemon keeps the rules of the good one and says where it broke.
    bad_files = [
        ("version: 1\nrules:\n  - name: gamma\n    idle_timeout: fast\n", 4, "idle_timeout"),
        ("version: 1\nrules:\n  - name: gamma\n    match: {remote_ports: [1, 2}\n", 4, "YAML"),
    ]
    for count, (text, line, what) in enumerate(bad_files, start=1):
        rules_file.write_text(text)
        daemon.proc.send_signal(signal.SIGHUP)

        def failed(count: int = count) -> Scrape | None:
            got = daemon.try_scrape()
            errors = got.value("keepalive_audit_errors_total", stage="config") if got else 0
            return got if errors == count else None

        scrape = wait_for(f"config error {count}", failed)
        assert scrape.value("keepalive_config_last_reload_successful") == 0
        reloaded_at = scrape.value("keepalive_config_last_reload_success_timestamp_seconds")
        assert reloaded_at == after.value("keepalive_config_last_reload_success_timestamp_seconds")
        assert scrape.value("keepalive_config_rules") == 2
        errors = [entry for entry in daemon.log() if entry["level"] == "error"]
        assert len(errors) == count
        assert errors[-1]["msg"] == "reload failed, keeping the previous rules"
        assert errors[-1]["error"].startswith(f"{rules_file}:{line}: "), errors[-1]
        assert what in errors[-1]["error"]
    # Still auditing, on the old rules.
    later = daemon.wait_audit(time.time(), 10.0)
    assert later.value("keepalive_config_rules") == 2
    assert daemon.proc.poll() is None

    rules_file.write_text(RULES_V1)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(
        "a good reload after the bad ones",
        lambda: (s := daemon.try_scrape()) and s.value("keepalive_config_last_reload_successful"),
    )


# --- stopping ------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(daemons: Agents, rules_file: Path, sig: signal.Signals) -> None:
    daemon = daemons.start(config=rules_file)
    started = time.monotonic()
    rc = daemon.stop(sig)
    seconds = time.monotonic() - started
    print(f"{sig.name}: exit {rc} after {seconds:.3f} s")
    assert rc == 0
    assert seconds < 2, f"{sig.name} took {seconds:.2f} s (the aim is under 1 s)"
    assert daemon.log()[-1]["msg"] == "stopped"


# --- systemd notify ------------------------------------------------------------------------


class NotifyListener:
    """Collects sd_notify datagrams as (monotonic arrival, {key: value})."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def seen(self, key: str, since: float = 0.0) -> list[dict[str, str]]:
        return [m for t, m in list(self.messages) if key in m and t >= since]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_sd_notify(daemons: Agents, rules_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "notify"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    listener = NotifyListener(path)
    try:
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
        daemon = daemons.start(config=rules_file, env=env, wait=False)

        ready = wait_for("READY=1", lambda: listener.seen("READY"), STARTUP_TIMEOUT)[0]
        assert ready["READY"] == "1"
        assert re.match(r"audited \d+ sockets in 1 netns in ", ready["STATUS"]), ready
        assert daemon.scrape().last_success is not None  # READY came after the first audit

        since = time.monotonic()
        time.sleep(2.2)
        pings = listener.seen("WATCHDOG", since)
        assert all(m == {"WATCHDOG": "1"} for m in pings)
        assert 3 <= len(pings) <= 7, f"{len(pings)} pings in 2.2 s at half of 1 s"

        since = time.monotonic()
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for("READY=1 after the reload", lambda: listener.seen("READY", since))
        # Only pings and the audit worker's STATUS= lines may come in between.
        around = [
            m for t, m in listener.messages if t >= since and ("RELOADING" in m or "READY" in m)
        ]
        reloading, again = around
        assert reloading["RELOADING"] == "1"
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 <= now_usec - int(reloading["MONOTONIC_USEC"]) < 5_000_000
        assert again == {"READY": "1", "STATUS": "reloaded"}

        since = time.monotonic()
        rc = daemon.stop()
        assert rc == 0
        time.sleep(0.2)  # the datagram was sent before exit; let the reader pick it up
        assert listener.seen("STOPPING", since) == [{"STOPPING": "1"}]
        keys = {k for _, m in listener.messages for k in m}
        assert keys <= {"READY", "STATUS", "WATCHDOG", "RELOADING", "MONOTONIC_USEC", "STOPPING"}
    finally:
        listener.close()


# --- bad flags -----------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "auditd", "run", "--log.format", "json", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)


def test_bad_interval(rules_file: Path) -> None:
    proc = run_cli("--audit.interval", "fast", "--config.file", str(rules_file))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("keepalive-auditd: --audit.interval: ")


def test_bad_listen_address(rules_file: Path) -> None:
    proc = run_cli("--web.listen-address", "127.0.0.1:notaport", "--config.file", str(rules_file))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("keepalive-auditd: --web.listen-address: ")
    assert "notaport" in proc.stderr


# A listen address that is taken no longer stops the daemon: tests/process/test_faults.py.


# --- units ---------------------------------------------------------------------------------


def log_record(msg: str = "rules loaded", **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("keepalive-auditd", logging.INFO, __file__, 1, msg, None, None)
    rec.__dict__.update(extra)
    return rec


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("plain", "plain"),
        ("/etc/rules.yaml", "/etc/rules.yaml"),
        (42, "42"),
        ("two words", '"two words"'),
        ('say "hi"', r'"say \"hi\""'),
        ("a=b", '"a=b"'),
        ("back\\slash", r'"back\\slash"'),
        ("line1\nline2", r'"line1\nline2"'),
        ("tab\tx", '"tab\\tx"'),  # control characters are escaped, not passed through
        ("cr\rx", '"cr\\rx"'),
        ("bell\x07", '"bell\\x07"'),
        ("", '""'),
        (None, '""'),
    ],
)
def test_logfmt_quoting(value: object, shown: str) -> None:
    line = logs.LogfmtFormatter().format(log_record(field=value))
    assert "\n" not in line
    assert re.fullmatch(r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z .*", line)
    assert line.endswith(f' level=info msg="rules loaded" field={shown}')


def test_json_log_line() -> None:
    line = logs.JsonFormatter().format(log_record("x\ny", path=Path("/a b"), n=3))
    doc = json.loads(line)
    assert "\n" not in line
    assert (doc["level"], doc["msg"], doc["path"], doc["n"]) == ("info", "x\ny", "/a b", 3)


@pytest.mark.parametrize(
    ("environ", "seconds"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "1000000"}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-1000000"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], seconds: float | None) -> None:
    assert notify.watchdog_interval(environ) == seconds


def test_notifier_datagrams(tmp_path: Path) -> None:
    assert not notify.Notifier("").send("READY=1")  # not under systemd: a no-op
    assert notify.Notifier("@kaud-test").address == "\0kaud-test"  # abstract namespace
    path = str(tmp_path / "n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        notifier = notify.Notifier(path)
        assert notifier.ready("audited 3 sockets")
        assert notifier.watchdog()
        assert sock.recv(4096) == b"READY=1\nSTATUS=audited 3 sockets"
        assert sock.recv(4096) == b"WATCHDOG=1"
        notifier.close()
    assert not notify.Notifier(str(tmp_path / "gone")).stopping()  # send failed: False, no raise


def test_finding_logged_once_then_on_escalation_then_cleared() -> None:
    """One line when a finding appears, one when its severity changes, one when it clears."""
    import io
    import json as _json

    from auditd.daemon import Daemon, DaemonOptions
    from auditd.model import Finding, FindingKind, Severity
    from auditd.results import AuditResult

    stream = io.StringIO()
    log = logs.setup("info", "json", stream)
    daemon = Daemon(DaemonOptions(None, log_findings_after=0), lambda _: [], log)

    def result(*severities: Severity) -> AuditResult:
        found = tuple(
            Finding(
                kind=FindingKind.IDLE_NO_KEEPALIVE,
                severity=sev,
                rule="default",
                netns="host",
                message="idle",
                hint="enable keepalive",
                local="10.0.0.1:1",
                remote="10.0.0.2:2",
                pid=7,
                process="psql",
            )
            for sev in severities
        )
        return AuditResult(0.0, 0.0, (), found)

    for step in (result(Severity.WARNING), result(Severity.WARNING),
                 result(Severity.CRITICAL), result()):  # fmt: skip
        daemon._log_changes(step)
    lines = [_json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["msg"] for line in lines] == [
        "finding: idle",
        "finding now critical: idle",
        "finding cleared",
    ]
    assert lines[1]["was"] == "warning" and lines[1]["process_name"] == "psql"


def test_owner_caches_survive_across_cycles() -> None:
    """Each cycle builds fresh kernel sources; the session hands each namespace its cache."""
    import io

    from auditd.daemon import Daemon, DaemonOptions
    from auditd.kernel import Attribution, LocalKernel

    names = [["host", "ns1"], ["host"]]
    built: list[dict[str, LocalKernel]] = []

    def sources(owners: Attribution) -> list[tuple[str, Any]]:
        built.append({n: LocalKernel(owners=owners.finder(n)) for n in names[0]})
        return list(built[-1].items())

    daemon = Daemon(DaemonOptions(None), sources, logs.setup("info", "json", io.StringIO()))
    daemon.audit_once()
    daemon.audit_once()
    first, second = built
    assert first["host"].finder.cache is second["host"].finder.cache is not None
    assert first["ns1"].finder.cache is second["ns1"].finder.cache
    names[0] = ["host"]
    daemon.audit_once()
    assert set(daemon.session.owner_caches) == {"host"}  # a namespace gone takes its cache along


def test_findings_beyond_the_limit_are_counted_and_not_logged() -> None:
    """--audit.max-findings: the worst are logged, the crossing of the limit once, every
    finding counted in the metrics, and no clears while findings are left out."""
    import io
    import json as _json

    from helpers import FakeKernel, make_sock
    from prometheus_client import generate_latest

    from auditd.daemon import Daemon, DaemonOptions
    from auditd.exporter import make_registry

    idle = [make_sock(inode=10 + i, sport=20000 + i, dport=80, idle_s=400 + i) for i in range(50)]
    socks = [idle]
    stream = io.StringIO()
    daemon = Daemon(
        DaemonOptions(None, max_findings=3, log_findings_after=0),
        lambda _: [("host", FakeKernel(socks[0]))],
        logs.setup("info", "json", stream),
    )
    critical = 'kind="idle_no_keepalive",netns="host",rule="default",severity="critical"'
    seen = []
    for step in (idle, idle[:-1], idle[:2]):  # all; the worst one closed; 48 closed
        socks[0] = step
        assert daemon.audit_once() is not None
        text = generate_latest(make_registry(lambda: daemon.state)).decode()
        seen.append(re.findall(rf"keepalive_findings{{{critical}}} (\S+)", text))
    assert seen == [["50.0"], ["49.0"], ["2.0"]]  # every finding counted, 3 described
    lines = [_json.loads(line) for line in stream.getvalue().splitlines()]
    events = [(line["msg"].split(":")[0], line.get("local")) for line in lines]
    assert events == [
        ("more findings than --audit.max-findings", None),
        ("finding", "10.0.0.1:20049"),  # the longest idle first
        ("finding", "10.0.0.1:20048"),
        ("finding", "10.0.0.1:20047"),
        ("finding", None),  # detection_budget: namespace findings are always described
        ("finding", None),
        ("finding", "10.0.0.1:20046"),  # moved up when 20049 closed; that clear is not logged
        ("all findings described again", None),
        ("finding", "10.0.0.1:20001"),
        ("finding", "10.0.0.1:20000"),
        ("finding cleared", "10.0.0.1:20048"),
        ("finding cleared", "10.0.0.1:20047"),
        ("finding cleared", "10.0.0.1:20046"),
    ]
    assert lines[0]["findings"] == 50 + 2  # and the two detection_budget findings


def test_owner_scan_runs_in_a_child_for_the_first_audit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first audit (cold caches) scans /proc in a child process; the next ones re-check
    the owners they know and scan in-process."""
    import io

    from auditd.daemon import Daemon, DaemonOptions
    from auditd.kernel.bpf.iterators import Iterators
    from auditd.kernel.owners.prescan import FdPrescan
    from auditd.session import local_sources

    children: list[FdPrescan | None] = []
    start = FdPrescan.start

    def counted(*args: Any, **kwargs: Any) -> FdPrescan | None:
        children.append(start(*args, **kwargs))
        return children[-1]

    monkeypatch.setattr(FdPrescan, "start", counted)

    with socket.socket() as srv, socket.socket() as client:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # 7200 s: too slow
        client.connect(srv.getsockname())
        server_end, _ = srv.accept()
        rules = tmp_path / "rules.yaml"
        port = srv.getsockname()[1]  # a 2 s idle timeout for ours only, critical so that
        rules.write_text(  # the host's other sockets never push it out of the findings listed
            f"version: 1\nrules:\n  - name: ours\n    match: {{remote_ports: [{port}]}}\n"
            "    idle_timeout: 2s\n    warn_at: 0.5\n    severity: critical\n"
        )
        with server_end:
            daemon = Daemon(DaemonOptions(str(rules)), local_sources,
                            logs.setup("info", "json", io.StringIO()))  # fmt: skip
            # Without BPF: with the owner iterator loaded no child is started at all.
            daemon.session.iterators = Iterators(directory="/nonexistent")
            daemon.load_initial_config()
            time.sleep(1.2)  # too slow once the path has been idle warn_at × idle_timeout
            first = daemon.audit_once()
            assert first is not None and len(children) == 1 and children[0] is not None
            local = f"127.0.0.1:{client.getsockname()[1]}"
            [ours] = [f for f in first.findings if f.local == local]
            assert (ours.kind, ours.pid) == ("keepalive_too_slow", os.getpid())
            second = daemon.audit_once()
            assert second is not None and len(children) == 1
            [ours] = [f for f in second.findings if f.local == local]
            assert ours.pid == os.getpid()
