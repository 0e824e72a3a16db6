"""The kernel audit pass (audit.bpf.c) against the sock_diag path on the same real sockets:
each record's fields against sock_diag's dump, the aggregates against Tally's, the sockets
handed over against the pre-filter's, in both modes (see tests/bpfmix.py for the mix)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import bpfmix
import netlab
import pytest

from auditd import logs
from auditd.audit.inference import keepalive_status, probe_cadence
from auditd.audit.kernelpass import pass_params
from auditd.audit.run import KERNEL_PASS_NEEDS_EVERY_SOCKET, _may_need_options, audit_namespace
from auditd.audit.tally import Tally, could_flag, loosest
from auditd.config import RuleSet, parse_rules
from auditd.daemon import Daemon, DaemonOptions
from auditd.kernel import Attribution, NamespaceKernel, netns, sockdiag
from auditd.kernel.bpf.exact import BpfAudit, BpfKernelAudit, ExactInspector
from auditd.kernel.bpf.iterators import OBJECT_DIR, Iterators
from auditd.kernel.bpf.libbpf import read_iter
from auditd.kernel.bpf.records import (
    REC_EXTRA,
    REC_KEPT,
    REC_READ,
    AuditOutput,
    SocketTable,
    decode_audit,
)
from auditd.kernel.inspect import SocketInspector, read_options
from auditd.kernel.netns import NamespaceRef
from auditd.kernel.procfs import read_sysctls
from auditd.kernel.sources import KernelAudit
from auditd.model import Finding, Sock, Sysctls, TcpState
from auditd.results import NamespaceReport, kernel_pass_note
from auditd.session import local_sources

pytestmark = pytest.mark.kernel

DATA = Path(__file__).parent.parent / "data" / "bpf"
AGE_FIELDS = ("expires_ms", "last_data_sent_ms", "last_data_recv_ms", "last_ack_recv_ms")
JIFFY_MS = 8  # two jiffies at HZ=250: the pass and the dumps round "now" apart


@pytest.fixture(scope="module")
def iters() -> Iterator[Iterators]:
    it = Iterators()
    it.ensure()
    yield it
    it.close()


def _dump(ns: netlab.Netns) -> dict[int, Sock]:
    stats = sockdiag.DumpStats()
    return {s.inode: s for s in ns.call(lambda: list(sockdiag.dump(stats))) if s.inode}


def _tally(sysctls: Sysctls) -> Tally:
    return Tally(loosest(bpfmix.RULES), probe_cadence(sysctls.keepalive_time,
                                                       sysctls.keepalive_intvl))  # fmt: skip


def _pass(iters: Iterators, ns: netlab.Netns, sysctls: Sysctls, exact: bool) -> AuditOutput:
    params = pass_params(_tally(sysctls), sysctls, exact).general.pack()
    data = iters.audit_pass(
        os.stat(ns.path).st_ino, params, lambda fn: netns.call_in_netns(ns.path, fn)
    )
    return decode_audit(data)


def _between(value: int, a: int, b: int, tol: int) -> bool:
    return min(a, b) - tol <= value <= max(a, b) + tol


@pytest.mark.parametrize("exact", [False, True], ids=["inferred", "exact"])
def test_records_and_aggregates_equal_sock_diag(
    lab: netlab.Lab, iters: Iterators, exact: bool
) -> None:
    mix = bpfmix.build(lab)
    ns = mix.a
    sysctls = ns.call(read_sysctls)
    before = _dump(ns)
    out = _pass(iters, ns, sysctls, exact)
    after = _dump(ns)
    assert before.keys() == after.keys()
    by_inode = {os.fstat(s.fileno()).st_ino: s for s in mix.socks.values()}
    cookies = SocketTable(
        iters.sockets(lambda fn: netns.call_in_netns(ns.path, fn)), sysctls
    )  # fmt: skip

    # Every record: each field as sock_diag reports it (ages between the two dumps').
    assert out.records, "the mix has sockets the pre-filter keeps"
    for rec in out.records:
        sock = rec.sock
        b, a = before[sock.inode], after[sock.inode]
        for name in Sock._fields:
            got, lo, hi = getattr(sock, name), getattr(b, name), getattr(a, name)
            if isinstance(got, bytes):
                assert got == lo == hi, (name, sock.local, sock.remote)
                continue
            tol = JIFFY_MS if name in AGE_FIELDS else 0
            assert _between(got, lo, hi, tol), (name, got, lo, hi, sock.local, sock.remote)
        cookie = cookies.record(sock.inode)
        assert cookie is not None and rec.cookie == cookie.cookie
        own = read_options(by_inode[sock.inode])
        assert rec.options(sysctls) == own._replace(source="bpf")

    # What sock_diag's path counts and keeps over the same sockets.
    tally, kept = _tally(sysctls), list[Sock]()
    tally.run(after.values(), kept.append, None)
    handed = {r.sock.inode: r for r in out.records}
    assert {i for i, r in handed.items() if r.flags & REC_KEPT} == {s.inode for s in kept}
    kept_inodes = {s.inode for s in kept}
    if exact:  # run._inspect: read what the timer cannot settle, flag by the options
        extra = set()
        for sock in after.values():
            if sock.inode in kept_inodes or _may_need_options(sock):
                options = read_options(by_inode[sock.inode])
                tally.reclassify(sock, keepalive_status(sock), keepalive_status(sock, options))
                assert handed.get(sock.inode) is None or handed[sock.inode].flags & REC_READ
                if sock.inode not in kept_inodes and could_flag(sock, tally.limits, options):
                    extra.add(sock.inode)
        assert {i for i, r in handed.items() if r.flags & REC_EXTRA} == extra
    else:
        assert not any(r.flags & (REC_EXTRA | REC_READ) for r in out.records)
    agg = out.aggregates
    assert agg.total == tally.total == len(after)
    assert list(agg.counts) == tally.counts[: len(agg.counts)]
    assert not any(tally.counts[len(agg.counts) :])
    assert [list(h) for h in agg.hist] == tally.hist
    # Idle sums: between those of the dumps before and after the pass.
    first = _tally(sysctls)
    first.run(before.values(), lambda s: None, None)
    if exact:
        for sock in before.values():
            if sock.inode in kept_inodes or _may_need_options(sock):
                options = read_options(by_inode[sock.inode])
                first.reclassify(sock, keepalive_status(sock), keepalive_status(sock, options))
    n = sum(map(sum, tally.hist))
    for got, lo, hi in zip(agg.idle_ms_sum, first.idle_ms_sum, tally.idle_ms_sum):
        assert _between(got, lo, hi, JIFFY_MS * n)
    assert agg.unconfigured == 0
    # The mix has what it promises.
    states = {s.state for s in after.values()}
    assert {TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.FIN_WAIT2} <= states
    assert any(s.timer == 1 and s.retrans > 0 for s in after.values())  # in flight, blackholed
    assert any(s.timer == 2 and s.retrans > 0 for s in after.values())  # probing
    assert any(s.rqueue > 0 for s in after.values())
    assert any(s.family == socket.AF_INET6 for s in after.values())


def test_no_parameters_no_counts(lab: netlab.Lab, iters: Iterators) -> None:
    """A pass of a namespace without parameters counts nothing and says so."""
    mix = bpfmix.build(lab)
    _, link = iters._ensure_audit()
    data = read_iter(netns.call_in_netns(mix.a.path, link.iter_fd))
    agg = decode_audit(data).aggregates
    assert agg.total == 0 and agg.handed == 0 and agg.unconfigured == len(_dump(mix.a))


def _audit(
    ns: netlab.Netns,
    exact: bool,
    kernel: KernelAudit | None,
    rules: RuleSet = bpfmix.RULES,
    iterators: Iterators | None = None,
) -> tuple[NamespaceReport, list[Finding]]:
    st = os.stat(ns.path)
    bpf = BpfAudit(iterators or Iterators())
    finder = Attribution(bpf=bpf).finder(ns.name)
    source = NamespaceKernel(NamespaceRef(st.st_dev, st.st_ino, ns.path, ns.name), owners=finder)
    inspector = ExactInspector(bpf, SocketInspector()) if exact else None
    return audit_namespace(rules, source, ns.name, inspector=inspector, kernel=kernel)


def _facts(findings: list[Finding]) -> set[tuple[object, ...]]:
    return {
        (f.kind, f.severity, f.rule, f.local, f.remote, f.keepalive, f.pid, f.options_source,
         f.keepalive_idle_seconds, f.user_timeout_ms)
        for f in findings
    }  # fmt: skip


@pytest.mark.parametrize("exact", [False, True], ids=["inferred", "exact"])
def test_report_by_the_kernel_pass_equals_sock_diag(
    lab: netlab.Lab, iters: Iterators, exact: bool
) -> None:
    mix = bpfmix.build(lab)
    started = time.monotonic()
    by_bpf, found_bpf = _audit(mix.a, exact, BpfKernelAudit(iters))
    by_diag, found_diag = _audit(mix.a, exact, None)
    apart = time.monotonic() - started  # the most any age grew from one audit to the next
    assert (by_bpf.source, by_bpf.source_note) == ("bpf", None)
    assert (by_diag.source, by_diag.source_note) == ("sock_diag", None)
    assert by_bpf.sockets == by_diag.sockets
    assert by_bpf.connections == by_diag.connections
    assert by_bpf.idle_histogram == by_diag.idle_histogram
    assert by_bpf.finding_counts == by_diag.finding_counts
    assert by_bpf.finding_counts, "the mix has findings"
    for k, seconds in by_bpf.idle_sum.items():
        n = sum(by_bpf.idle_histogram[k])
        assert by_diag.idle_sum[k] - n * apart - 0.01 <= seconds <= by_diag.idle_sum[k] + 0.01
    assert _facts(found_bpf) == _facts(found_diag)
    kinds = {f.kind for f in found_bpf}
    assert {"idle_no_keepalive", "close_wait", "retransmitting", "keepalive_probing"} <= kinds
    if exact:
        assert by_bpf.inspection is not None and by_bpf.inspection.method == "bpf"
        assert {f.options_source for f in found_bpf if f.local} == {"bpf"}
    else:
        assert by_bpf.inspection is None
        assert {f.options_source for f in found_bpf if f.local} == {"inferred"}


def test_rules_with_their_own_budget_get_the_dump(lab: netlab.Lab, iters: Iterators) -> None:
    mix = bpfmix.build(lab)
    rules = parse_rules(
        "version: 1\ndefaults: {idle_timeout: 4s, warn_at: 0.25, close_wait_after: 1s}\n"
        "rules:\n  - name: tight\n    match: {remote_ports: [1]}\n"
        "    detection_budget: 60s\n",
        "test",
    )
    report, _ = _audit(mix.a, False, BpfKernelAudit(iters), rules)
    assert report.source == "sock_diag"
    assert report.source_note == KERNEL_PASS_NEEDS_EVERY_SOCKET
    assert kernel_pass_note([report]) is None  # asked for by the rules: no note


def test_a_pass_that_fails_falls_back_to_the_dump(lab: netlab.Lab, tmp_path: Path) -> None:
    mix = bpfmix.build(lab)
    for name in os.listdir(OBJECT_DIR):
        if name.endswith(".bpf.o"):
            shutil.copy(os.path.join(OBJECT_DIR, name), tmp_path / name)
    (tmp_path / "audit.bpf.o").write_bytes(b"not an ELF object")
    broken = Iterators(directory=str(tmp_path))
    try:
        report, findings = _audit(mix.a, False, BpfKernelAudit(broken))
    finally:
        broken.close()
    assert report.source == "sock_diag"
    assert report.source_note is not None and "audit.bpf.o" in report.source_note
    assert kernel_pass_note([report]) == (
        f"sockets counted by sock_diag, not the BPF audit pass: {report.source_note}"
    )
    by_diag, _ = _audit(mix.a, False, None)
    assert report.finding_counts == by_diag.finding_counts and findings


@pytest.mark.parametrize("exact", [False, True], ids=["inferred", "exact"])
def test_thresholds_by_port_in_the_kernel(lab: netlab.Lab, iters: Iterators, exact: bool) -> None:
    """A tight rule for one remote port: the kernel keeps what it may flag there and what
    the general thresholds keep elsewhere, and the report is the dump's."""
    mix = bpfmix.build(lab)
    port = mix.socks["rqueue"].getpeername()[1]
    rules = parse_rules(
        "version: 1\ndefaults: {idle_timeout: 1h}\nrules:\n  - name: tight\n"
        f"    match: {{remote_ports: [{port}]}}\n    idle_timeout: 2s\n",
        "test",
    )
    by_bpf, found_bpf = _audit(mix.a, exact, BpfKernelAudit(iters), rules)
    by_diag, found_diag = _audit(mix.a, exact, None, rules)
    assert by_bpf.source == "bpf"
    assert by_bpf.finding_counts == by_diag.finding_counts
    assert by_bpf.connections == by_diag.connections
    assert _facts(found_bpf) == _facts(found_diag)
    idle = {(f.rule, f.remote) for f in found_bpf if f.kind == "idle_no_keepalive"}
    assert idle == {("tight", f"127.0.0.1:{port}")}  # nothing else idle for an hour


def test_a_verifier_refusal_of_the_pass_keeps_the_other_iterators(
    lab: netlab.Lab, tmp_path: Path
) -> None:
    """The verifier refuses the audit pass alone: the dump counts, and exact mode still
    reads every socket's options by the socket iterator."""
    subprocess.run(["clang", "-target", "bpf", "-O2", "-g", f"-I{OBJECT_DIR}",
                    "-Drefused=keepalive_audit", "-c", str(DATA / "refused.bpf.c"), "-o",
                    str(tmp_path / "audit.bpf.o")], check=True)  # fmt: skip
    for name in ("sockets.bpf.o", "owners.bpf.o"):
        shutil.copy(os.path.join(OBJECT_DIR, name), tmp_path / name)
    mix = bpfmix.build(lab)
    refusing = Iterators(directory=str(tmp_path))
    try:
        report, findings = _audit(mix.a, True, BpfKernelAudit(refusing), iterators=refusing)
    finally:
        refusing.close()
    assert report.source == "sock_diag"
    assert report.source_note is not None and "loading audit.bpf.o" in report.source_note
    assert "invalid mem access" in report.source_note  # the verifier's own words
    assert report.inspection is not None and report.inspection.method == "bpf"
    assert {f.options_source for f in findings if f.local} == {"bpf"}


def test_agent_logs_a_failing_pass_once_and_its_recovery_once(tmp_path: Path) -> None:
    out = io.StringIO()
    daemon = Daemon(DaemonOptions(None), local_sources, logs.setup("info", "json", out))
    for name in ("sockets.bpf.o", "owners.bpf.o"):  # no audit.bpf.o: the pass cannot load
        shutil.copy(os.path.join(OBJECT_DIR, name), tmp_path / name)
    daemon.session.iterators = Iterators(directory=str(tmp_path), retry_seconds=0)
    for _ in range(3):
        result = daemon.audit_once()
        assert result is not None and result.namespaces[0].source == "sock_diag"
    shutil.copy(os.path.join(OBJECT_DIR, "audit.bpf.o"), tmp_path / "audit.bpf.o")
    for _ in range(2):
        result = daemon.audit_once()
        assert result is not None and result.namespaces[0].source == "bpf"
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    failed = [
        e for e in events if e["msg"] == "BPF audit pass unavailable, sockets counted by sock_diag"
    ]
    assert len(failed) == 1 and "audit.bpf.o" in failed[0]["error"]
    assert [e["msg"] for e in events].count("BPF audit pass working again") == 1
    assert not any(e["msg"].startswith("BPF iterators unavailable") for e in events)


def test_parameters_keyed_by_another_inode_are_a_failure(lab: netlab.Lab, iters: Iterators) -> None:
    """A source that names the wrong namespace inode: the pass counts nothing under its
    parameters, and the audit says so and dumps instead of reporting zero sockets."""
    mix = bpfmix.build(lab)
    st = os.stat(mix.a.path)

    class Misnamed(NamespaceKernel):
        def netns_inode(self) -> int | None:
            return st.st_ino + 1

    source = Misnamed(NamespaceRef(st.st_dev, st.st_ino, mix.a.path, mix.a.name))
    report, _ = audit_namespace(bpfmix.RULES, source, mix.a.name, kernel=BpfKernelAudit(iters))
    assert report.source == "sock_diag"
    assert report.source_note is not None and "no parameters for" in report.source_note
    assert report.sockets == len(_dump(mix.a))
