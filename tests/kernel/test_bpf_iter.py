"""The two iterators on real sockets: the socket iterator's values against getsockopt in two
namespaces with different sysctls, the owner iterator against the /proc scan."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import bpfzoo
import netlab
import pytest

from auditd.kernel import netns
from auditd.kernel.bpf.iterators import Iterators
from auditd.kernel.bpf.records import OwnerTable, SocketTable, iter_sock_records
from auditd.kernel.inspect import read_options
from auditd.kernel.owners.scan import find_owners
from auditd.kernel.procfs import read_sysctls
from auditd.model import TcpState

pytestmark = pytest.mark.kernel

# Namespace 1 keeps the compiled defaults; namespace 2 has its own (shared/KERNEL.md: a new
# netns starts at 7200/75/9, not at the host's values).
TUNED = {"net.ipv4.tcp_keepalive_time": 600, "net.ipv4.tcp_keepalive_intvl": 20,
         "net.ipv4.tcp_keepalive_probes": 4}  # fmt: skip


@pytest.fixture(scope="module")
def iters() -> Iterator[Iterators]:
    it = Iterators()
    it.ensure()
    yield it
    it.close()


def _read(iters: Iterators, ns: netlab.Netns) -> SocketTable:
    data = iters.sockets(lambda fn: netns.call_in_netns(ns.path, fn))
    return SocketTable(data, ns.call(read_sysctls))


def test_values_equal_getsockopt_in_two_namespaces(lab: netlab.Lab, iters: Iterators) -> None:
    plain, tuned = lab.netns(), lab.netns()
    for name, value in TUNED.items():
        tuned.set_sysctl(name, value)
    for ns in (plain, tuned):
        zoo = bpfzoo.build(ns)
        table = _read(iters, ns)
        assert len(table) == len(zoo)  # nothing else lives in a fresh namespace
        nsino = os.stat(ns.path).st_ino
        for name, sock in zoo.items():
            inode = os.fstat(sock.fileno()).st_ino
            rec = table.record(inode)
            assert rec is not None, name
            assert rec.netns == nsino
            assert table.options(inode) == read_options(sock)._replace(source="bpf"), name
        assert table.record(_ino(zoo["listener"])).state == TcpState.LISTEN  # type: ignore[union-attr]
    # The sysctl made the difference: same socket kind, different answers.
    assert plain.call(read_sysctls).keepalive_time == 7200


def test_records_carry_cookie_state_family(lab: netlab.Lab, iters: Iterators) -> None:
    ns = lab.netns()
    zoo = bpfzoo.build(ns)
    recs = {
        r.inode: r
        for r in iter_sock_records(iters.sockets(lambda fn: netns.call_in_netns(ns.path, fn)))
    }
    assert recs[_ino(zoo["v6"])].family == socket.AF_INET6
    assert recs[_ino(zoo["off"])].family == socket.AF_INET
    assert recs[_ino(zoo["off"])].state == TcpState.ESTABLISHED
    cookies = {r.cookie for r in recs.values()}
    assert len(cookies) == len(recs) and 0 not in cookies
    # sock_diag's cookie for the same socket (ss prints it as sk:<hex>).
    out = ns.run(["ss", "-tnoeH", "state", "listening"]).stdout
    assert f"sk:{recs[_ino(zoo['listener'])].cookie:x}" in out


def test_owner_iterator_matches_the_proc_scan(lab: netlab.Lab, iters: Iterators) -> None:
    ns = lab.netns()
    zoo = bpfzoo.build(ns)
    # Its stdin is /dev/null: it holds the socket by sleeping, and the lab kills it.
    holder = ns.spawn(["python3", "-c", "import socket, time\ns = socket.socket()\n"
                       "print(s.fileno(), flush=True)\ntime.sleep(60)"])  # fmt: skip
    assert holder.stdout is not None
    holder.stdout.readline()
    inodes = [_ino(s) for s in zoo.values()]
    theirs = [
        int(os.readlink(f"/proc/{holder.pid}/fd/{fd}")[8:-1])
        for fd in os.listdir(f"/proc/{holder.pid}/fd")
        if os.readlink(f"/proc/{holder.pid}/fd/{fd}").startswith("socket:")
    ]
    inodes += theirs
    owners = OwnerTable(iters.owners())
    scan = find_owners(inodes)
    assert scan.complete and set(scan.found) == set(inodes)
    for inode in inodes:
        got = owners.get(inode)
        assert got is not None
        assert (got.pid, got.fd) == (scan.found[inode].pid, scan.fds[inode])
        assert got.comm == scan.found[inode].name
    assert owners.get(theirs[0]).pid == holder.pid  # type: ignore[union-attr]


def _ino(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino
