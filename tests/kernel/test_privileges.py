"""Least privilege: the real CLI and agent as user ``nobody`` with exactly the ambient
capabilities a feature needs (``setpriv``, util-linux), in a network namespace of the lab.

| feature                                 | needs                                               |
|-----------------------------------------|-----------------------------------------------------|
| audit the own namespace                 | nothing beyond reading /proc                        |
| attribute another user's socket         | CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE (both)       |
| audit other namespaces (--netns all)    | CAP_SYS_ADMIN (setns)                               |
| BPF iterators (owners, exact options)   | CAP_BPF and CAP_PERFMON (both)                      |

Without a capability the audit still runs and says once, on stderr (CLI) or in the log and
``keepalive_audit_errors_total`` (agent), what it could not do and which capability is missing.

The interpreter must be reachable by ``nobody``; where it lives under a private directory
(pyenv under /root), it is bind-mounted at a public path inside a private mount namespace.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netlab
import pytest
from agent import Scrape, wait_for

import auditd

NOBODY = 65534
REPO = Path(auditd.__file__).resolve().parent.parent
CAPS = {"dac": "dac_read_search", "ptrace": "sys_ptrace", "admin": "sys_admin", "bpf": "bpf",
        "perfmon": "perfmon"}  # fmt: skip
NOTE = "keepalive-auditd: note: process attribution limited: cannot read other users' /proc/PID/fd"

pytestmark = pytest.mark.kernel


@functools.cache
def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to drop to nobody"
    for tool in ("setpriv", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian package util-linux)"
    if sys.prefix != sys.base_prefix and not _public(Path(sys.executable)):
        return "a virtualenv that user nobody cannot reach"
    return None


def _public(path: Path) -> bool:
    """Every directory on the way is searchable by others, and the file readable."""
    path = path.resolve()
    for part in [*path.parents, path]:
        mode = part.stat().st_mode
        if not mode & (stat.S_IXOTH if part != path else stat.S_IROTH):
            return False
    return True


@pytest.fixture(scope="module")
def mountpoint() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kaud-py-"))
    path.chmod(0o755)
    yield path
    path.rmdir()


def nobody_argv(mountpoint: Path, caps: list[str], argv: list[str]) -> list[str]:
    """``python -m auditd ARGV`` as nobody with ``caps`` as its only (ambient) capabilities."""
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason)
    names = ",".join(f"+{CAPS[c]}" for c in caps)
    drop = f"-all,{names}" if names else "-all"
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
               f"--inh-caps={drop}", f"--ambient-caps={drop}"]  # fmt: skip
    env = ["env", f"PYTHONPATH={REPO}", "PYTHONDONTWRITEBYTECODE=1"]
    if _public(Path(sys.executable)) and _public(REPO / "auditd" / "__init__.py"):
        return [*env, *setpriv, sys.executable, "-m", "auditd", *argv]
    # Bind the interpreter's prefix where nobody can reach it, in a mount namespace of its own.
    prefix = Path(sys.base_prefix)
    python = mountpoint / Path(sys.executable).resolve().relative_to(prefix.resolve())
    env.append(f"LD_LIBRARY_PATH={mountpoint / 'lib'}")  # libpython next to the binary
    script = 'mount --bind "$0" "$1" && shift && exec "$@"'  # $0: prefix, $1: mountpoint
    unshare = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    return [*unshare, str(prefix), str(mountpoint), *env, *setpriv, str(python), "-m", "auditd",
            *argv]  # fmt: skip


@pytest.fixture
def ns(lab: netlab.Lab) -> netlab.Netns:
    return lab.netns()


@pytest.fixture
def idle_pair(ns: netlab.Netns) -> tuple[str, str]:
    """A loopback connection inside ``ns`` held by this (root) process, idle past 1 s."""
    listener = ns.listen("127.0.0.1")
    client = ns.make_socket()
    client.connect(listener.getsockname())
    server = ns.adopt(listener.accept()[0])
    time.sleep(1.2)
    return tuple("{}:{}".format(*s.getsockname()) for s in (client, server))  # type: ignore[return-value]


@pytest.fixture
def rules() -> Iterator[Path]:
    """A rules file nobody can read (pytest's tmp_path is private to root)."""
    with tempfile.TemporaryDirectory(prefix="kaud-rules-") as tmp:
        Path(tmp).chmod(0o755)
        path = Path(tmp) / "rules.yaml"
        path.write_text("version: 1\ndefaults:\n  idle_timeout: 1s\n  detection_budget: 1d\n")
        path.chmod(0o644)
        yield path


def audit_as_nobody(
    ns: netlab.Netns, mountpoint: Path, caps: list[str], *args: str
) -> tuple[int, dict[str, Any] | None, str]:
    argv = nobody_argv(mountpoint, caps, ["audit", "--format", "json", *args])
    proc = ns.run(argv, check=False, timeout=60)
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        doc = None
    return proc.returncode, doc, proc.stderr


TRACEFS = ["sh", "-c", 'mount -t tracefs nodev /sys/kernel/tracing && exec "$@"', "sh"]


@pytest.mark.parametrize(
    ("caps", "missing"),
    [
        ([], "CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE"),
        (["dac"], "CAP_SYS_PTRACE"),
        (["ptrace"], "CAP_DAC_READ_SEARCH"),
        (["dac", "ptrace"], None),
    ],
    ids=["none", "dac_read_search", "sys_ptrace", "both"],
)
def test_attribution_needs_both_capabilities(
    ns: netlab.Netns,
    mountpoint: Path,
    rules: Path,
    idle_pair: tuple[str, str],
    caps: list[str],
    missing: str | None,
) -> None:
    rc, doc, stderr = audit_as_nobody(ns, mountpoint, caps, "--config", str(rules),
                                      "--fail-on", "never")  # fmt: skip
    assert rc == 0 and doc is not None, stderr
    # The own namespace is audited in full whatever the capabilities.
    [host] = doc["namespaces"]
    assert host["sockets"]["total"] == 2
    assert host["sysctls"]["net.ipv4.tcp_keepalive_time"] == 7200
    assert host["counters"]["keepalive_probes"] is not None
    ours = [f for f in doc["findings"] if f["local"] in idle_pair]
    assert len(ours) == 2 and {f["kind"] for f in ours} == {"idle_no_keepalive"}
    if missing is None:
        assert {f["pid"] for f in ours} == {os.getpid()}
        assert stderr == ""
    else:
        assert {f["pid"] for f in ours} == {None}
        assert stderr == f"{NOTE} (missing {missing})\n"


@pytest.mark.parametrize(
    ("caps", "method"),
    [(["bpf"], "pidfd"), (["perfmon"], "pidfd"), (["bpf", "perfmon"], "bpf")],
    ids=["bpf", "perfmon", "both"],
)
def test_bpf_needs_cap_bpf_and_cap_perfmon(
    ns: netlab.Netns,
    mountpoint: Path,
    rules: Path,
    idle_pair: tuple[str, str],
    caps: list[str],
    method: str,
) -> None:
    """With both, exact options and owners of another user's sockets come from the BPF
    iterators, without CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH; with one, neither works."""
    rc, doc, stderr = audit_as_nobody(ns, mountpoint, caps, "--config", str(rules),
                                      "--fail-on", "never", "--inspect-sockets")  # fmt: skip
    assert rc == 0 and doc is not None, stderr
    [host] = doc["namespaces"]
    assert host["inspection"]["method"] == method
    ours = [f for f in doc["findings"] if f["local"] in idle_pair]
    assert len(ours) == 2
    if method == "bpf":
        assert {f["pid"] for f in ours} == {os.getpid()}
        assert {f["options_source"] for f in ours} == {"bpf"}
        assert stderr == ""
    else:
        assert {f["pid"] for f in ours} == {None}
        assert (
            "exact options by pidfd_getfd, not BPF: BPF: loading sockets.bpf.o: Operation "
            "not permitted" in stderr
        )


def test_netns_all_needs_cap_sys_admin(lab: netlab.Lab, ns: netlab.Netns, mountpoint: Path) -> None:
    """Other namespaces are skipped with a note without CAP_SYS_ADMIN, audited with it."""
    lab.netns()  # one more namespace to find in /run/netns
    help_text = subprocess.run([sys.executable, "-m", "auditd", "audit", "--help"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    if "--netns" not in help_text:
        pytest.skip("no --netns in this build")
    rc, doc, stderr = audit_as_nobody(ns, mountpoint, [], "--netns", "all", "--fail-on", "never")
    assert rc == 0 and doc is not None, stderr
    assert [n["netns"] for n in doc["namespaces"]] == ["host"]
    assert doc["skipped_namespaces"]
    assert "needs CAP_SYS_ADMIN (missing CAP_SYS_ADMIN)" in stderr
    rc, doc, stderr = audit_as_nobody(ns, mountpoint, ["admin"], "--netns", "all",
                                      "--fail-on", "never")  # fmt: skip
    assert rc == 0 and doc is not None, stderr
    assert len(doc["namespaces"]) > 1
    assert "CAP_SYS_ADMIN" not in stderr


def test_agent_as_nobody_with_and_without_the_capabilities(
    ns: netlab.Netns, mountpoint: Path, rules: Path, idle_pair: tuple[str, str], tmp_path: Path
) -> None:
    """The agent as the systemd unit runs it (a non-root user with CAP_DAC_READ_SEARCH and
    CAP_SYS_PTRACE ambient), then with none: attribution errors counted, logged once."""
    results = {}
    for caps, port in ((["dac", "ptrace"], 9977), ([], 9978)):
        argv = nobody_argv(mountpoint, caps, [
            "run", "--config.file", str(rules), "--audit.interval", "1s",
            "--web.listen-address", f"127.0.0.1:{port}", "--log.format", "json",
        ])  # fmt: skip
        log_path = tmp_path / f"agent-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(ns.exec_argv(argv), stdout=log, stderr=log)
        try:

            def scrape(port: int = port) -> Scrape | None:
                def fetch() -> str:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                        return str(r.read().decode())

                try:
                    got = Scrape(ns.call(fetch))
                except OSError:
                    return None
                return got if got.total("keepalive_findings", kind="idle_no_keepalive") else None

            wait_for("an audit with the findings", scrape, timeout=30)
            time.sleep(2.2)  # two more audits
            results[port] = (scrape(), [json.loads(x) for x in log_path.read_text().splitlines()])
        finally:
            proc.terminate()
            assert proc.wait(timeout=10) == 0
    with_caps, without = results[9977], results[9978]
    assert with_caps[0] is not None and with_caps[0].errors("attribution") == 0
    assert not [x for x in with_caps[1] if x["level"] == "error"]
    assert without[0] is not None and without[0].errors("attribution") >= 3
    errors = [x for x in without[1] if x["level"] == "error"]
    assert len(errors) == 1, errors  # once, not once per audit
    assert errors[0]["stage"] == "attribution"
    assert "missing CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE" in errors[0]["error"]


TRACEFS = ["sh", "-c", 'mount -t tracefs nodev /sys/kernel/tracing && exec "$@"', "sh"]


@pytest.mark.parametrize(
    ("caps", "missing", "source"),
    [([], "cannot read tracefs", None), (["dac"], "perf_event_open refused", None),
     (["dac", "perfmon"], None, "perf"), (["perfmon", "bpf"], None, "bpf")],
)  # fmt: skip
def test_abort_events_need_perfmon_and_tracefs_access(
    ns: netlab.Netns, mountpoint: Path, rules: Path, tmp_path: Path,
    caps: list[str], missing: str | None, source: str | None,
) -> None:  # fmt: skip
    """Without CAP_PERFMON (or the tracefs formats) the agent says so once and audits on;
    ``watch`` exits 3 with the same one line. With CAP_BPF and CAP_PERFMON it reads the BPF
    program's aborts; without CAP_BPF it falls back to the tracepoints through perf, saying
    why once. ``ip netns exec`` mounts a sysfs of its own, without tracefs: root mounts it
    there first."""
    argv = [*TRACEFS, *nobody_argv(mountpoint, caps, [
        "run", "--config.file", str(rules), "--audit.interval", "1s",
        "--web.listen-address", "127.0.0.1:9977", "--log.format", "json",
    ])]  # fmt: skip
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(ns.exec_argv(argv), stdout=log, stderr=log)
    try:

        def scrape() -> Scrape | None:
            def fetch() -> str:
                with urllib.request.urlopen("http://127.0.0.1:9977/metrics", timeout=5) as r:
                    return str(r.read().decode())

            try:
                got = Scrape(ns.call(fetch))
            except OSError:
                return None
            return got if got.last_success else None

        wait_for("an audit", scrape, timeout=30)
        time.sleep(2.2)  # two more audits
        got = scrape()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    off = [x for x in lines if x["msg"] == "abort events off, the audits go on"]
    assert got is not None and got.value("keepalive_events_up") == (0 if missing else 1)
    said = [x for x in lines if x["msg"].startswith("abort events from")]
    for name in ("bpf", "perf"):
        assert got.total("keepalive_events_source", source=name) == (name == source)
    if missing is None:
        assert off == [] and [x["source"] for x in said] == [source], said
        if source == "perf":  # why not BPF, once: the capability it lacked
            assert "BPF: loading aborts.bpf.o: Operation not permitted" in said[0]["msg"], said
        return
    assert said == []
    assert len(off) == 1 and missing in off[0]["error"], off
    assert not [x for x in lines if x["level"] == "error"]
    watch = ns.run([*TRACEFS, *nobody_argv(mountpoint, caps, ["watch"])], check=False, timeout=30)
    assert watch.returncode == 3 and watch.stdout == ""
    assert watch.stderr.count("\n") == 1 and missing in watch.stderr, watch.stderr


def test_processes_hidden_by_hidepid_are_a_noted_limit(
    ns: netlab.Netns, mountpoint: Path, rules: Path, idle_pair: tuple[str, str]
) -> None:
    """/proc mounted hidepid=2: another user's processes are not denied but absent, so the
    audit found no owner, counted nothing and said ``"complete": true`` (issue 16)."""
    argv = nobody_argv(mountpoint, [], ["audit", "--format", "json", "--config", str(rules),
                                        "--fail-on", "never"])  # fmt: skip
    remount = 'mount -t proc -o hidepid=2 proc /proc && exec "$@"'
    hidden = ["unshare", "--mount", "--propagation", "private", "sh", "-c", remount, "sh", *argv]
    proc = ns.run(hidden, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    [host] = doc["namespaces"]
    ours = [f for f in doc["findings"] if f["local"] in idle_pair]
    assert len(ours) == 2 and {f["pid"] for f in ours} == {None}
    assert host["attribution"]["found"] == 0 and host["attribution"]["complete"] is False
    [note] = proc.stderr.splitlines()
    assert note.startswith("keepalive-auditd: note: process attribution limited: /proc is ")
    assert "hidepid=" in note and "hidden (missing CAP_SYS_PTRACE)" in note
