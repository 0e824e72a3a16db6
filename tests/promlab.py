"""The Prometheus side's harness: promtool, real Prometheus and Alertmanager processes, the
fleet configs, the dashboard's queries. Shared by process/test_prometheus.py,
process/test_grafana.py and kernel/test_alertmanager.py."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "config" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
EXAMPLE_CONFIG = PROM_DIR / "prometheus.yml"

JOB = "keepalive-auditd"
POLL = 0.25

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="needs promtool (Debian package prometheus; CI installs it)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="needs prometheus and promtool (Debian package prometheus; CI installs it)",
)
needs_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the agent reads sock_diag and /proc: Linux only"
)

T = TypeVar("T")


# -- helpers ---------------------------------------------------------------------------------
def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def parse_duration(text: str) -> float:
    """A Prometheus duration (``15s``, ``1m30s``) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


class Process:
    """A child process whose output goes to a file, stopped by ``stop`` (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path) -> None:
        self.name = name
        self.log = log
        self._out = log.open("wb")
        self.popen = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT
        )

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            pytest.fail(f"{self.name} exited with {code}:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        self._out.flush()
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self._out.close()


@contextlib.contextmanager
def running(name: str, argv: list[str], workdir: Path) -> Iterator[Process]:
    proc = Process(name, argv, workdir / f"{name}.log", ROOT)
    try:
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def temp_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kaud-prom-", ignore_cleanup_errors=True) as d:
        yield Path(d)


# No proxy from the environment: every request here goes to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 2.0) -> bytes:
    with _OPENER.open(url, timeout=timeout) as resp:
        body: bytes = resp.read()
        return body


class Watched(Protocol):
    """A process ``wait_for`` watches: a ``Process`` here, an agent of tests/agent.py."""

    name: str

    def check_alive(self) -> None: ...

    def tail(self, lines: int = 40) -> str: ...


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    deadline: float,
    procs: tuple[Watched, ...] = (),
) -> T:
    """Calls ``probe`` until it returns something other than None, or fails at ``deadline``
    (a ``time.monotonic()`` value). HTTP errors count as "not yet"; a dead process fails now."""
    last: object = None
    while True:
        for proc in procs:
            proc.check_alive()
        try:
            result = probe()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            result, last = None, exc
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            logs = "\n".join(f"--- {p.name} log:\n{p.tail()}" for p in procs)
            pytest.fail(f"timed out waiting for {what} (last: {last!r})\n{logs}")
        time.sleep(POLL)


FEDERATE = PROM_DIR / "federate.yml"
REMOTE_WRITE = PROM_DIR / "remote-write.yml"


def fleet_metrics() -> tuple[set[str], set[str]]:
    """The metric names (or patterns) federate.yml and remote-write.yml pass on."""
    fed = yaml.safe_load(FEDERATE.read_text())["scrape_configs"][0]["params"]["match[]"]
    names = re.fullmatch(r'\{job="keepalive-auditd",__name__=~"([^"]+)"\}', fed[0])
    assert names is not None, fed[0]
    relabel = yaml.safe_load(REMOTE_WRITE.read_text())["remote_write"][0]["write_relabel_configs"]
    kept = re.fullmatch(r"keepalive-auditd;\((.+)\)", relabel[0]["regex"])
    assert kept is not None, relabel[0]["regex"]
    return set(names.group(1).split("|")) | {"up"}, set(kept.group(1).split("|"))


GRAFANA = ROOT / "config" / "grafana"
DASHBOARD = GRAFANA / "keepalive-auditd-fleet.json"
VARIABLES = {"$job": "keepalive-auditd", "$instance": ".+", "$__rate_interval": "1m"}


def load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in doc["panels"] if p["type"] != "row"]


def queries(doc: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """Panel title -> its queries, with the variables replaced by sample values."""
    out = {}
    for panel in panels(doc if doc is not None else load(DASHBOARD)):
        exprs = []
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            exprs.append(expr)
        out[panel["title"]] = exprs
    return out
