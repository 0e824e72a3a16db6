"""The kernel audit pass (audit.bpf.c) against the sock_diag path on the same real sockets:
each record's fields against sock_diag's dump, the aggregates against Tally's, the sockets
handed over against the pre-filter's, in both modes (see tests/bpfmix.py for the mix)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import bpfmix
import netlab
import pytest

from auditd.audit.inference import keepalive_status, probe_cadence
from auditd.audit.kernelpass import pass_params
from auditd.audit.run import _may_need_options
from auditd.audit.tally import Tally, could_flag, loosest
from auditd.kernel import netns, sockdiag
from auditd.kernel.bpf.iterators import Iterators
from auditd.kernel.bpf.libbpf import read_iter
from auditd.kernel.bpf.records import (
    REC_EXTRA,
    REC_KEPT,
    REC_READ,
    AuditOutput,
    SocketTable,
    decode_audit,
)
from auditd.kernel.inspect import read_options
from auditd.kernel.procfs import read_sysctls
from auditd.model import Sock, Sysctls, TcpState

pytestmark = pytest.mark.kernel

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
    params = pass_params(_tally(sysctls), sysctls, exact).pack()
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
    tally, kept = _tally(sysctls), []
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
