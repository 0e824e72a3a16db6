"""Exact mode through the BPF iterators, end to end: the CLI's JSON against getsockopt on
every combination of options in two namespaces with different sysctls; each fallback to
pidfd_getfd reached for real (capabilities dropped with setpriv, BTF hidden in a mount
namespace, a program the verifier refuses, no libbpf); the agent's log on fallback and
recovery."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bpfzoo
import netlab
import pytest

from auditd import logs
from auditd.audit.run import audit_namespace
from auditd.config import load_rules
from auditd.daemon import Daemon, DaemonOptions
from auditd.kernel import Attribution, NamespaceKernel
from auditd.kernel.bpf.exact import BpfAudit, ExactInspector
from auditd.kernel.bpf.iterators import OBJECT_DIR, Iterators
from auditd.kernel.bpf.libbpf import Libbpf
from auditd.kernel.inspect import SocketInspector, read_options
from auditd.kernel.netns import NamespaceRef
from auditd.report import to_table
from auditd.results import AuditResult
from auditd.session import local_sources

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent.parent / "data" / "bpf"
# Flag every connection at once: no keepalive is idle too long after 10 ms, any keepalive
# is too slow for a 100 ms middlebox.
RULES = "version: 1\ndefaults:\n  idle_timeout: 100ms\n  warn_at: 0.1\n"
TUNED = {"net.ipv4.tcp_keepalive_time": 1800, "net.ipv4.tcp_keepalive_intvl": 25,
         "net.ipv4.tcp_keepalive_probes": 3}  # fmt: skip


def _endpoint(addr: tuple[Any, ...]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _cli(ns: netlab.Netns, config: Path, *wrap: str, env_shell: str | None = None) -> Any:
    """The real CLI in ``ns`` in exact mode, run under ``wrap`` (setpriv, unshare ...)."""
    argv = [sys.executable, "-m", "auditd", "audit", "--config", str(config), "--format",
            "json", "--fail-on", "never", "--inspect-sockets"]  # fmt: skip
    if env_shell is not None:  # a shell step before the CLI, inside the wrap
        argv = ["sh", "-c", f'{env_shell} && exec "$@"', "sh", *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(ns.exec_argv([*wrap, *argv]), capture_output=True, text=True,
                          timeout=60, env=env, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def _check_findings(doc: Any, zoo: dict[str, socket.socket], source: str) -> int:
    by_ends = {(f["local"], f["remote"]): f for f in doc["findings"] if f["local"] is not None}
    checked = 0
    for name, sock in zoo.items():
        if "listener" in name:
            continue
        f = by_ends[_endpoint(sock.getsockname()), _endpoint(sock.getpeername())]
        opts = read_options(sock)
        if source == "pidfd" and not opts.keepalive:
            # pidfd_getfd reads only the sockets whose keepalive the timer cannot tell: an
            # idle one without a timer is off, and its settings stay inferred.
            assert f["options_source"] == "inferred", name
            checked += 1
            continue
        got = (f["keepalive"] == "on", f["keepalive_idle_seconds"],
               f["keepalive_interval_seconds"], f["keepalive_count"],
               f["user_timeout_ms"])  # fmt: skip
        assert got == tuple(opts[:5]), name
        assert f["options_source"] == source, name
        assert f["pid"] == os.getpid(), name
        checked += 1
    return checked


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


def test_cli_json_equals_getsockopt_in_two_namespaces(lab: netlab.Lab, config: Path) -> None:
    plain, tuned = lab.netns(), lab.netns()
    for name, value in TUNED.items():
        tuned.set_sysctl(name, value)
    zoos = [(plain, bpfzoo.build(plain)), (tuned, bpfzoo.build(tuned))]
    time.sleep(0.15)
    for ns, zoo in zoos:
        doc, err = _cli(ns, config)
        (ns_doc,) = doc["namespaces"]
        assert ns_doc["inspection"]["method"] == "bpf", err
        assert ns_doc["inspection"]["note"] is None and "not BPF" not in err
        assert (ns_doc["source"], ns_doc["source_note"]) == ("bpf", None)  # the audit pass
        assert _check_findings(doc, zoo, "bpf") == 14
        assert ns_doc["sockets"]["by_keepalive"]["unknown"] == 0
    # the tuned namespace's defaults reached the findings of sockets that set nothing
    doc, _ = _cli(tuned, config)
    local = _endpoint(zoos[1][1]["defaults"].getsockname())
    [f] = [f for f in doc["findings"] if f["local"] == local]
    assert (f["keepalive_idle_seconds"], f["keepalive_interval_seconds"]) == (1800, 25)


def _fallback(lab: netlab.Lab, config: Path, *wrap: str, shell: str | None = None) -> str:
    ns = lab.netns()
    zoo = bpfzoo.build(ns)
    time.sleep(0.15)
    doc, err = _cli(ns, config, *wrap, env_shell=shell)
    (ns_doc,) = doc["namespaces"]
    assert ns_doc["inspection"]["method"] == "pidfd"
    assert _check_findings(doc, zoo, "pidfd") == 14  # exact all the same, by pidfd_getfd
    assert ns_doc["source"] == "sock_diag"  # no audit pass either: the dump counted
    notes = [line for line in err.splitlines() if "not BPF" in line]
    assert len(notes) == 1 and notes[0] == (
        "keepalive-auditd: note: exact options by pidfd_getfd, not BPF: "
        + ns_doc["inspection"]["note"]
    )
    return str(ns_doc["inspection"]["note"])


def test_without_cap_bpf_and_cap_perfmon(lab: netlab.Lab, config: Path) -> None:
    # CAP_SYS_ADMIN would do instead of both: drop it too (setns is done by then).
    drop = "-bpf,-perfmon,-sys_admin"
    note = _fallback(lab, config, "setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}")
    assert note.startswith("BPF: loading sockets.bpf.o: Operation not permitted (libbpf: ")


def test_without_kernel_btf(lab: netlab.Lab, config: Path, tmp_path: Path) -> None:
    empty = tmp_path / "no-btf"
    empty.write_bytes(b"")
    # ip netns exec mounts a fresh /sys: hide the BTF after it, in a mount namespace of our own.
    hide = f"mount --bind {empty} /sys/kernel/btf/vmlinux"
    note = _fallback(lab, config, "unshare", "-m", "--propagation", "private", shell=hide)
    assert note.startswith("BPF: loading sockets.bpf.o: ")
    assert "BTF" in note


@pytest.fixture(scope="module")
def refusing_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped owner iterator, and a socket iterator the verifier refuses in its place."""
    out = tmp_path_factory.mktemp("refused")
    subprocess.run(["clang", "-target", "bpf", "-O2", "-g", f"-I{OBJECT_DIR}", "-c",
                    str(DATA / "refused.bpf.c"), "-o", str(out / "sockets.bpf.o")],
                   check=True)  # fmt: skip
    shutil.copy(Path(OBJECT_DIR) / "owners.bpf.o", out)
    return out


def _audit_with(lab: netlab.Lab, iterators: Iterators) -> tuple[Any, dict[Any, Any]]:
    ns = lab.netns()
    bpfzoo.build(ns)
    time.sleep(0.15)  # idle long enough to be flagged
    st = os.stat(ns.path)
    bpf = BpfAudit(iterators)
    finder = Attribution(bpf=bpf).finder(ns.name)  # owners from the owner iterator if it loads
    ref = NamespaceRef(st.st_dev, st.st_ino, ns.path, ns.name)
    source = NamespaceKernel(ref, owners=finder)
    rules = load_rules_text(RULES)
    report, findings = audit_namespace(
        rules, source, ns.name, inspector=ExactInspector(bpf, SocketInspector())
    )
    return report, {(f.local, f.remote): f for f in findings if f.local}


def load_rules_text(text: str) -> Any:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kaud-bpf-rules-{os.getpid()}.yaml"
    path.write_text(text)
    try:
        return load_rules(str(path))
    finally:
        path.unlink()


def test_a_verifier_refusal_falls_back(lab: netlab.Lab, refusing_dir: Path) -> None:
    report, findings = _audit_with(lab, Iterators(directory=str(refusing_dir)))
    assert report.inspection.method == "pidfd"
    assert "invalid mem access" in report.inspection.note
    assert {f.options_source for f in findings.values()} == {"pidfd", "inferred"}
    assert len(findings) == 14


def test_no_libbpf_falls_back(lab: netlab.Lab) -> None:
    report, findings = _audit_with(lab, Iterators(libbpf=lambda: Libbpf("libbpf-missing.so.1")))
    assert report.inspection.method == "pidfd"
    assert report.inspection.note.startswith("BPF unavailable: cannot load libbpf-missing.so.1")
    assert {f.options_source for f in findings.values()} == {"pidfd", "inferred"}


def test_bpf_audit_and_its_table(lab: netlab.Lab) -> None:
    report, findings = _audit_with(lab, Iterators())
    assert report.inspection.method == "bpf" and report.inspection.note is None
    assert {f.options_source for f in findings.values()} == {"bpf"}
    assert {f.pid for f in findings.values()} == {os.getpid()}  # the owner iterator's
    table = to_table(AuditResult(0.0, 0.0, (report,), tuple(findings.values())))
    assert "  socket inspection (bpf): options read from " in table
    why = [line for line in table.splitlines() if line.startswith("    why: ")]
    assert len(why) == 14
    assert sum(line.endswith("(keepalive 300/30/5, user timeout 0 ms, bpf)") for line in why) == 1
    assert (
        sum(line.endswith("(keepalive 7200/75/9, user timeout 45000 ms, bpf)") for line in why) == 1
    )


def test_agent_logs_fallback_once_and_recovery_once(tmp_path: Path) -> None:
    out = io.StringIO()
    daemon = Daemon(DaemonOptions(None, inspect_sockets=True), local_sources,
                    logs.setup("info", "json", out))  # fmt: skip
    daemon.session.iterators = Iterators(directory=str(tmp_path), retry_seconds=0)
    for _ in range(3):
        assert daemon.audit_once() is not None
    for name in ("sockets.bpf.o", "owners.bpf.o"):
        shutil.copy(Path(OBJECT_DIR) / name, tmp_path / name)
    for _ in range(2):
        result = daemon.audit_once()
        inspection = result.namespaces[0].inspection if result is not None else None
        assert inspection is not None and inspection.method == "bpf"
    events = [json.loads(line)["msg"] for line in out.getvalue().splitlines()]
    assert (
        events.count("BPF iterators unavailable, owners from /proc and options by pidfd_getfd") == 1
    )
    assert events.count("BPF iterators working again") == 1


def test_a_socket_flagged_by_its_exact_options_only_is_attributed(lab: netlab.Lab) -> None:
    """Owners are looked up for the flagged sockets only (the pass needs none): one that only
    its exact options flag (a user timeout shorter than its keepalive) is attributed too."""
    ns = lab.netns()
    listener = ns.listen("127.0.0.1")
    client = ns.make_socket()
    bpfzoo.set_options(client, (1, 300, 30, 5, 1000))
    client.connect(listener.getsockname())
    ns.adopt(listener.accept()[0])
    st = os.stat(ns.path)
    bpf = BpfAudit(Iterators())
    finder = Attribution(bpf=bpf).finder(ns.name)
    source = NamespaceKernel(NamespaceRef(st.st_dev, st.st_ino, ns.path, ns.name), owners=finder)
    report, findings = audit_namespace(
        load_rules_text("version: 1\n"), source, ns.name,
        inspector=ExactInspector(bpf, SocketInspector()),
    )  # fmt: skip
    [f] = [f for f in findings if f.local == _endpoint(client.getsockname())]
    assert (f.kind, f.options_source, f.pid) == ("user_timeout_too_short", "bpf", os.getpid())
    assert report.attribution_wanted == report.attribution_found == 1


class _CountingIterators(Iterators):
    owner_passes = 0

    def owners(self) -> bytes:
        self.owner_passes += 1
        return super().owners()


def test_an_agent_with_warm_owners_runs_no_owner_pass(lab: netlab.Lab) -> None:
    """The agent's later audits re-check remembered owners with a readlink each; the owner
    pass runs only when a flagged socket's owner is not remembered."""
    ns = lab.netns()
    zoo = bpfzoo.build(ns)
    time.sleep(0.15)
    rules = load_rules_text(RULES)
    iterators = _CountingIterators()
    st = os.stat(ns.path)
    ref = NamespaceRef(st.st_dev, st.st_ino, ns.path, ns.name)
    caches: dict[str, Any] = {}

    def one_audit() -> list[Any]:
        nonlocal caches
        attribution = Attribution(caches, bpf=BpfAudit(iterators))
        source = NamespaceKernel(ref, owners=attribution.finder(ns.name))
        _, findings = audit_namespace(rules, source, ns.name)
        caches = attribution.caches
        assert {f.pid for f in findings if f.local} == {os.getpid()}
        return findings

    passes = []
    for _ in range(3):
        one_audit()
        passes.append(iterators.owner_passes)
    assert passes == [1, 1, 1]  # the first audit's pass only
    extra = ns.make_socket()
    extra.connect(zoo["listener"].getsockname())
    ns.adopt(zoo["listener"].accept()[0])
    time.sleep(0.15)
    one_audit()
    assert iterators.owner_passes == 2  # two new flagged sockets: one more pass
