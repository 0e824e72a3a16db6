"""The systemd unit and its env file: systemd accepts them, the sandbox stays tight, flags exist.

``systemd-analyze`` checks the unit offline, without a running systemd: ``verify`` for syntax
and missing executables, ``security --offline`` for the exposure score. The agent itself is
only ever started by a real systemd, so the options that would break it (a private network,
a hidden process tree, capabilities only inside a user namespace) are pinned here too.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from auditd.cli import build_parser
from auditd.config import parse_duration
from auditd.http import parse_listen

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "keepalive-auditd.service"
ENV_FILE = SYSTEMD_DIR / "keepalive-auditd.env"
INSTALLED_SCRIPT = "/usr/local/bin/keepalive-auditd"
MAX_EXPOSURE = 2.5
FLAG = re.compile(r"(?<![\w-])--[a-z][\w.-]*[\w]")
EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)")


def _unit_settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, keys repeated as often as systemd allows."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _words(settings: dict[str, list[str]], key: str) -> set[str]:
    return {word for value in settings.get(key, []) for word in value.split()}


@functools.cache
def _systemd_analyze() -> str | None:
    return shutil.which("systemd-analyze")


@functools.cache
def _systemd_version() -> int:
    """252 from ``systemd 252 (252.38-1~deb12u1)``; 0 when the output is not understood."""
    out = subprocess.run(
        [_need_systemd_analyze(), "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.match(r"systemd (\d+)", out)
    return int(match.group(1)) if match else 0


def _need_systemd_analyze() -> str:
    path = _systemd_analyze()
    if path is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd; .ci/run installs it)")
    return path


def _runnable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's script (verify needs it to exist).

    The file keeps its name: systemd derives the unit name, and so its type, from it.
    """
    script = shutil.which("keepalive-auditd")
    command = script if script else f"{sys.executable} -m auditd"
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_SCRIPT} " in text
    path = tmp_path / UNIT.name
    path.write_text(text.replace(f"ExecStart={INSTALLED_SCRIPT} ", f"ExecStart={command} "))
    return path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


# --- systemd's own checks ----------------------------------------------------------------------


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    unit = _runnable_unit(tmp_path)
    result = _run([_need_systemd_analyze(), "verify", str(unit)], tmp_path)
    # Other units on the machine may draw warnings of their own; only ours count.
    ours = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert result.returncode == 0, result.stderr
    assert ours == []


def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    analyze = _need_systemd_analyze()
    if _systemd_version() < 250:
        pytest.skip(f"systemd {_systemd_version()} has no 'security --offline' (needs >= 250)")
    unit = _runnable_unit(tmp_path)
    # --offline reads the file itself (no manager, no --root needed, any user).
    result = _run([analyze, "security", "--offline=true", "--no-pager", str(unit)], tmp_path)
    assert result.returncode == 0, result.stderr
    match = EXPOSURE.search(result.stdout)
    assert match is not None, result.stdout
    assert match.group(1) == UNIT.name
    exposure = float(match.group(2))
    assert exposure <= MAX_EXPOSURE, result.stdout


def test_seccomp_filter_allows_bpf_after_denying_privileged(tmp_path: Path) -> None:
    """bpf() is in @privileged, which the unit denies: a later SystemCallFilter=bpf allows it
    again (systemd applies the assignments in order), as systemd itself reads the unit."""
    filters = _unit_settings(UNIT.read_text())["SystemCallFilter"]
    assert filters.index("bpf") > filters.index("~@privileged @resources")
    analyze = _need_systemd_analyze()
    if _systemd_version() < 250:
        pytest.skip(f"systemd {_systemd_version()} has no 'security --offline' (needs >= 250)")
    unit = _runnable_unit(tmp_path)
    result = _run([analyze, "security", "--offline=true", "--no-pager", str(unit)], tmp_path)
    assert "@privileged is included (e.g. bpf is allowed)" in result.stdout, result.stdout


# --- the options the agent depends on --------------------------------------------------------


def test_unit_keeps_what_the_agent_needs() -> None:
    s = _unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]  # READY=1 after the first audit
    assert s["NotifyAccess"] == ["main"]
    assert parse_duration(s["WatchdogSec"][0]) >= 60  # the daemon pings at half of it
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    caps = {"CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"}  # /proc/PID/fd of other users
    caps |= {"CAP_BPF", "CAP_PERFMON"}  # the BPF iterators (auditd/kernel/bpf)
    assert _words(s, "AmbientCapabilities") == caps
    assert _words(s, "CapabilityBoundingSet") == caps
    assert {"AF_NETLINK", "AF_INET", "AF_INET6", "AF_UNIX"} <= _words(s, "RestrictAddressFamilies")
    assert s["ExecStart"] == [f"{INSTALLED_SCRIPT} run $KEEPALIVE_AUDITD_OPTS"]
    assert s["EnvironmentFile"] == ["-/etc/default/keepalive-auditd"]
    assert s["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("PrivateNetwork", "the agent audits the host's network namespace"),
        ("PrivateUsers", "capabilities in a user namespace do not reach other users' /proc"),
        ("ProtectProc", "invisible hides other users' /proc/PID: no process attribution"),
        ("ProcSubset", "pid hides /proc/sys and /proc/net"),
        ("IPAddressDeny", "would block Prometheus scrapes; a site-specific drop-in"),
    ],
)
def test_unit_leaves_out_options_that_break_the_agent(key: str, why: str) -> None:
    assert key not in _unit_settings(UNIT.read_text()), why


# --- flags -----------------------------------------------------------------------------------


def _documented_flags() -> set[str]:
    """Flags in the unit's settings (not its comments) and anywhere in the env file."""
    unit_settings = "\n".join(
        line for line in UNIT.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    return set(FLAG.findall(unit_settings)) | set(FLAG.findall(ENV_FILE.read_text()))


def _example_opts() -> list[str]:
    """The value of every ``KEEPALIVE_AUDITD_OPTS=...`` line, commented examples included."""
    found = re.findall(r"^[#\s]*KEEPALIVE_AUDITD_OPTS=(.*)$", ENV_FILE.read_text(), re.M)
    return ["".join(shlex.split(value)) for value in found]  # systemd strips the quotes too


def test_env_file_sets_the_variable_execstart_uses() -> None:
    assert "$KEEPALIVE_AUDITD_OPTS" in UNIT.read_text()
    assert re.search(r"^KEEPALIVE_AUDITD_OPTS=", ENV_FILE.read_text(), re.M)
    assert len(_example_opts()) >= 3  # the setting itself and at least two examples


def test_every_flag_named_is_a_run_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "auditd", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    flags = _documented_flags()
    assert len(flags) >= 6, flags  # the env file documents every run flag
    assert {f for f in flags if f not in result.stdout} == set()


@pytest.mark.parametrize("opts", _example_opts())
def test_env_file_examples_parse(opts: str) -> None:
    # systemd splits the variable at whitespace, no shell quoting: so does str.split().
    args = build_parser().parse_args(["run", *opts.split()])
    assert parse_duration(args.interval) >= 1
    parse_listen(args.listen)
    assert args.telemetry_path.startswith("/")


# --- the netns.conf drop-in for --audit.netns=all ---------------------------------------------


def _netns_drop_in() -> str:
    """The drop-in as the unit's comments spell it out (``#   [Service]`` and what follows)."""
    lines = UNIT.read_text().splitlines()
    start = lines.index("#   [Service]")
    block = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        block.append(line[4:])
    return "\n".join(block) + "\n"


def test_netns_drop_in_lets_the_agent_enter_network_namespaces_only(tmp_path: Path) -> None:
    analyze = _need_systemd_analyze()
    if _systemd_version() < 250:
        pytest.skip(f"systemd {_systemd_version()} has no 'security --offline' (needs >= 250)")
    drop_in = _netns_drop_in()
    assert "CAP_SYS_ADMIN" in drop_in and "RestrictNamespaces=net" in drop_in
    unit = _runnable_unit(tmp_path)
    # A [Service] section may appear twice in one file: systemd merges it as it would a drop-in.
    unit.write_text(unit.read_text() + drop_in)
    result = _run([analyze, "verify", str(unit)], tmp_path)
    assert result.returncode == 0 and UNIT.name not in result.stderr, result.stderr
    result = _run([analyze, "security", "--offline=true", "--no-pager", str(unit)], tmp_path)
    assert "Service may create network namespaces" in result.stdout  # net let through...
    for kind in ("user", "process", "file system", "IPC"):  # ...and nothing else
        assert f"Service cannot create {kind} namespaces" in result.stdout, kind
    assert "Service has administrator privileges" in result.stdout
    match = EXPOSURE.search(result.stdout)
    assert match is not None and float(match.group(2)) <= MAX_EXPOSURE, result.stdout
