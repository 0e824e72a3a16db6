"""A real ``keepalive-auditd run`` process for the fault, soak and endpoint tests.

The agent runs in a network namespace of the ``lab`` when one can be made (it then sees the
test's sockets only and has every port free), else in the host's on a free port. It is
scraped from a thread inside that namespace. ``Agent.stats`` reads its RSS, open fds and
threads from /proc, for the leak checks.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import netlab
from prometheus_client.parser import text_string_to_metric_families

STARTUP_TIMEOUT = 30.0


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 15.0, step: float = 0.1) -> Any:
    """``probe()`` every ``step`` seconds until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scrape:
    """One parsed exposition: sample name -> {label set: value}."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value

    def total(self, name: str, **labels: str) -> float:
        """Sum over the samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for k, v in self.samples.get(name, {}).items() if want <= k)

    def value(self, name: str, **labels: str) -> float:
        return self.samples[name][frozenset(labels.items())]

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(k)[label] for k in self.samples.get(name, {})}

    def errors(self, stage: str) -> float:
        return self.total("keepalive_audit_errors_total", stage=stage)

    @property
    def last_success(self) -> float | None:
        """Start of the last successful audit; None before the first one."""
        got = self.samples.get("keepalive_audit_last_success_timestamp_seconds", {})
        return next(iter(got.values()), None)


@dataclass(frozen=True)
class ProcStats:
    rss_kib: int
    fds: int
    threads: int


def proc_stats(pid: int) -> ProcStats:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return ProcStats(rss, fds, threads)


def basic_auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    netns: netlab.Netns | None
    scheme: str = "http"
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/metrics"

    def call(self, fn: Callable[[], Any]) -> Any:
        return fn() if self.netns is None else self.netns.call(fn)

    def get(
        self,
        url: str | None = None,
        headers: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None,
        timeout: float = 5.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); HTTP errors are answers too, not exceptions."""
        request = urllib.request.Request(url or self.url, headers=headers or {})

        def fetch() -> tuple[int, dict[str, str], bytes]:
            try:
                with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
                    return r.status, dict(r.headers), r.read()
            except urllib.error.HTTPError as exc:
                with exc:
                    return exc.code, dict(exc.headers), exc.read()

        result: tuple[int, dict[str, str], bytes] = self.call(fetch)
        return result

    def scrape(self, **kwargs: Any) -> Scrape:
        status, _, body = self.get(**kwargs)
        assert status == 200, (status, body[:200])
        return Scrape(body.decode())

    def try_scrape(self, **kwargs: Any) -> Scrape | None:
        self.assert_running()
        try:
            return self.scrape(**kwargs)
        except OSError:
            return None

    def wait_audit(self, after: float, timeout: float = 15.0, **kwargs: Any) -> Scrape:
        def probe() -> Scrape | None:
            got = self.try_scrape(**kwargs)
            return got if got is not None and (got.last_success or 0) > after else None

        result: Scrape = wait_for(f"an audit started after {after:.3f}", probe, timeout)
        return result

    def assert_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log_text()}")

    # What promlab.wait_for asks of the processes it watches (Prometheus, Alertmanager).
    name = "agent"

    def check_alive(self) -> None:
        self.assert_running()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log(self) -> list[dict[str, Any]]:
        """The JSON log lines so far; every line must be JSON (a traceback would not be)."""
        return [json.loads(line) for line in self.log_text().splitlines()]

    def stats(self) -> ProcStats:
        return proc_stats(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=10)


@dataclass
class Agents:
    """Starts agents for one test and kills whatever still runs at the end.

    An agent runs in ``netns`` (a namespace of the lab: its audits see the test's sockets
    only, and it has every port free) unless started with ``host=True``, or when namespaces
    cannot be made (``netns`` None)."""

    tmp: Path
    netns: netlab.Netns | None
    running: list[Agent] = field(default_factory=list)
    startup_timeout: float = STARTUP_TIMEOUT

    def start(
        self,
        *args: str,
        config: Path | None = None,
        interval: str = "1s",
        port: int | None = None,
        wait: bool = True,
        stderr: IO[bytes] | None = None,
        scheme: str = "http",
        scrape_kwargs: dict[str, Any] | None = None,
        host: bool = False,
        env: dict[str, str] | None = None,
        startup_timeout: float | None = None,
    ) -> Agent:
        netns = None if host else self.netns
        if port is None:
            port = 9977 if netns is not None else free_port()  # a new netns has every port free
        if config is None:
            config = self.tmp / "rules.yaml"
            if not config.exists():
                config.write_text("version: 1\ndefaults:\n  detection_budget: 1d\n")
        argv = [
            sys.executable, "-m", "auditd", "run",
            "--web.listen-address", f"127.0.0.1:{port}",
            "--audit.interval", interval,
            "--config.file", str(config),
            "--log.format", "json",
            "--log.findings-after", "0s",  # a line per finding at once; a test may say otherwise
            *args,
        ]  # fmt: skip
        if netns is not None:
            argv = netns.exec_argv(argv)  # ip netns exec execs: the pid is the agent's
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCH"))}
        environ.update(env or {})
        log_path = self.tmp / f"agent-{len(self.running)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr if stderr is not None else log,
                env=environ,
            )
        agent = Agent(proc, port, log_path, netns, scheme)
        self.running.append(agent)
        if wait:
            timeout = startup_timeout if startup_timeout is not None else self.startup_timeout
            agent.wait_audit(0.0, timeout, **(scrape_kwargs or {}))
        return agent

    def __enter__(self) -> Agents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for agent in self.running:
            if agent.proc.poll() is None:
                agent.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.proc.wait(timeout=5)


def agents_fixture(request: Any, tmp_path: Path) -> Any:
    """Body of an ``agents`` fixture: a lab namespace where namespaces can be made."""
    netns = None
    if _netns_ok():
        lab: netlab.Lab = request.getfixturevalue("lab")  # torn down after the agents
        netns = lab.netns()
    started = Agents(tmp_path, netns)
    try:
        yield started
    finally:
        started.close()


@functools.cache
def _netns_ok() -> bool:
    return os.geteuid() == 0 and netlab.netns_available() is None
