"""The command line: exit codes, one-line errors, output formats.

A few runs of ``python -m auditd`` as a subprocess (the real entry point, the real kernel),
the rest in-process through ``cli.main(argv, sources=...)`` with a fake KernelSource.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import FakeKernel, make_sock, sysctls

from auditd import __version__, cli
from auditd.errors import KernelError
from auditd.kernel import Attribution, DumpStats, OwnerScan
from auditd.model import Sock, TcpState
from auditd.session import Namespaces, local_sources

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
version: 1
defaults:
  idle_timeout: 350s
rules:
  - name: pg
    match: {remote_ports: [5432]}
    idle_timeout: 300s
"""
BAD = """\
version: 1
defaults:
  idle_timeout: fast
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "auditd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    return path


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    return path


# --- subprocess: the real entry point -----------------------------------------------------


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"keepalive-auditd {__version__}\n"


def test_check_config_good_and_bad(good: Path, bad: Path) -> None:
    ok = run("check-config", str(good))
    assert (ok.returncode, ok.stderr) == (0, "")
    assert ok.stdout == f"{good}: ok (1 rules, 0 sysctl bounds)\n"

    err = run("check-config", str(bad))
    assert err.returncode == 2 and err.stdout == ""
    lines = err.stderr.splitlines()
    assert len(lines) == 1, err.stderr
    assert lines[0].startswith(f"keepalive-auditd: {bad}:3: defaults.idle_timeout: ")
    assert '"fast"' in lines[0]


@pytest.mark.parametrize("argv", [["--bogus"], ["audit", "--bogus"], ["audit", "--format", "xml"]])
def test_bad_usage_is_one_line_and_exit_2(argv: list[str]) -> None:
    proc = run(*argv)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("keepalive-auditd")


def test_audit_json_on_the_real_kernel(good: Path) -> None:
    # A connection of this test, held open across the audit: its two ends are counted.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()):
            server, _ = listener.accept()
            with server:
                proc = run("audit", "--config", str(good), "--format", "json", "--fail-on",
                           "never")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema_version"] == 1
    assert doc["namespaces"][0]["netns"] == "host"
    assert doc["namespaces"][0]["sockets"]["by_state"]["established"] >= 2


def test_audit_with_a_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    proc = run("audit", "--config", str(missing))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(missing) in lines[0] and "cannot read" in lines[0]


# --- in-process, with fake namespaces -------------------------------------------------------

IDLE_PG = make_sock(inode=1, idle_s=1000, dport=5432)  # critical: idle, no keepalive
CLOSE_WAIT = make_sock(inode=2, state=TcpState.CLOSE_WAIT, idle_s=120)  # warning
TUNED = sysctls(tcp_keepalive_time=300, tcp_keepalive_intvl=10, tcp_keepalive_probes=3,
                tcp_retries2=8)  # no budget findings  # fmt: skip


def fake(*socks: Sock) -> Namespaces:
    return lambda _: [("host", FakeKernel(socks, sysctls=TUNED))]


class BrokenKernel(FakeKernel):
    def sockets(self, stats: DumpStats) -> Iterator[Sock]:
        raise KernelError("sock_diag dump failed: Operation not permitted (errno 1)")


@pytest.mark.parametrize(
    ("socks", "fail_on", "code"),
    [
        ((IDLE_PG,), "critical", 1),
        ((IDLE_PG,), "never", 0),
        ((CLOSE_WAIT,), "critical", 0),
        ((CLOSE_WAIT,), "warning", 1),
        ((CLOSE_WAIT,), "info", 1),
        ((), "info", 0),
    ],
)
def test_audit_exit_codes(
    good: Path, capsys: pytest.CaptureFixture[str], socks: tuple[Sock, ...], fail_on: str,
    code: int,
) -> None:  # fmt: skip
    argv = ["audit", "--config", str(good), "--format", "json", "--fail-on", fail_on]
    assert cli.main(argv, sources=fake(*socks)) == code
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["findings"]) == len(socks)


def test_audit_default_fail_on_is_critical(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["audit", "--config", str(good)], sources=fake(IDLE_PG)) == 1
    out = capsys.readouterr().out
    assert out.startswith("netns host: 1 TCP sockets")
    assert "critical  idle_no_keepalive  pg" in out  # the rule of port 5432


def test_audit_kernel_error_is_exit_3(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken: Namespaces = lambda _: [("host", BrokenKernel())]  # noqa: E731
    assert cli.main(["audit", "--config", str(good)], sources=broken) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "keepalive-auditd: sock_diag dump failed: Operation not permitted (errno 1)\n"
    )


def test_explain(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sources: Namespaces = lambda _: [("host", FakeKernel([]))]  # noqa: E731
    assert cli.main(["explain", "--config", str(good)], sources=sources) == 0
    out = capsys.readouterr().out
    assert "= 7875 s" in out and "= 924.6 s" in out
    assert f"rules ({good}):" in out and "  pg: idle_timeout 300 s" in out


def test_check_config_in_process(bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", str(REPO / "config" / "rules.yaml")]) == 0
    assert capsys.readouterr().out.endswith(": ok (2 rules, 2 sysctl bounds)\n")
    assert cli.main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:3:" in err


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: keepalive-auditd" in capsys.readouterr().err


def test_local_sources_is_the_host_namespace() -> None:
    assert [name for name, _ in local_sources(Attribution())] == ["host"]


# --- --max-findings ---------------------------------------------------------------------------


def test_max_findings_lists_the_worst_and_counts_the_rest(
    good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Idle 320 s under the 350 s default: warnings.
    warn = [make_sock(inode=100 + i, sport=30000 + i, dport=80, idle_s=320) for i in range(5)]
    socks = (CLOSE_WAIT, *warn, IDLE_PG)
    argv = ["audit", "--config", str(good), "--format", "json", "--max-findings", "2"]
    # --fail-on looks at every finding: the critical one is described, the warnings counted.
    assert cli.main([*argv, "--fail-on", "warning"], sources=fake(*socks)) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [f["kind"] for f in doc["findings"]] == ["idle_no_keepalive", "idle_no_keepalive"]
    assert [f["severity"] for f in doc["findings"]] == ["critical", "warning"]
    assert (doc["findings_total"], doc["findings_omitted"]) == (7, 5)
    assert doc["namespaces"][0]["finding_counts"] == [
        {"kind": "close_wait", "severity": "warning", "rule": "pg", "count": 1},
        {"kind": "idle_no_keepalive", "severity": "critical", "rule": "pg", "count": 1},
        {"kind": "idle_no_keepalive", "severity": "warning", "rule": "default", "count": 5},
    ]
    assert cli.main(["audit", "--config", str(good), "--max-findings", "1"], sources=fake(*socks))
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == ("7 findings: 1 critical, 6 warning, 0 info; the worst 1 listed, 6 more "
                    "counted only (--max-findings)")  # fmt: skip
    assert cli.main([*argv[:-2], "--max-findings", "0"], sources=fake(*socks)) == 1
    doc = json.loads(capsys.readouterr().out)
    assert (len(doc["findings"]), doc["findings_omitted"]) == (7, 0)


@pytest.mark.parametrize("value", ["-1", "many", "1.5", ""])
def test_max_findings_bad_value_is_one_line(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["audit", "--max-findings", value], sources=fake())
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--max-findings" in err[0], err


class CutShort(FakeKernel):
    def owners(self, inodes, deadline=None):  # type: ignore[no-untyped-def]
        return OwnerScan({}, complete=False)


def test_a_scan_cut_short_says_so_in_the_table_and_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Owners missing in silence (issue 11): the footer and a note name the cut."""
    good = tmp_path / "rules.yaml"
    good.write_text("version: 1\n")
    sources: Namespaces = lambda _: [("host", CutShort([IDLE_PG], sysctls=TUNED))]  # noqa: E731
    assert cli.main(["audit", "--config", str(good), "--fail-on", "never"], sources=sources) == 0
    out, err = capsys.readouterr()
    line = (
        "owner scan cut short by its time budget (host): 1 of 1 sockets described have no process"
    )
    assert line in out.splitlines()[-1]
    assert f"note: {line}" in err
