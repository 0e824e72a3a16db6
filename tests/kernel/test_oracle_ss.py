"""``sockdiag.dump`` against two oracles on live loopback sockets: ``ss`` and pyroute2.

The sockets live in a fresh network namespace, so the dump holds exactly the ones made here
(a busy host namespace would only add noise and time) and comparisons go by inode. Kinds of
socket: idle, SO_KEEPALIVE (timer 2), unread data (rqueue), half-closed (FIN_WAIT2 and
CLOSE_WAIT), and a zero-window sender (wqueue, persist timer 4). Unacknowledged data with a
retransmit timer cannot be held still on loopback and is left to test_scenarios.py.

Between two dumps the oracle reads once; a comparison is made only when both dumps agree
on every field that is not an age or an expiry, and those are checked to lie between them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from netlab import Lab, Netns, tcp_pair

from auditd.kernel import sockdiag
from auditd.model import Sock, TcpState, TimerKind

pytestmark = pytest.mark.kernel

# misc/ss.c: sstate_name[] and tmr_name[] (ss prints no timer for 0).
SS_STATE = {
    TcpState.ESTABLISHED: "ESTAB",
    TcpState.SYN_SENT: "SYN-SENT",
    TcpState.SYN_RECV: "SYN-RECV",
    TcpState.FIN_WAIT1: "FIN-WAIT-1",
    TcpState.FIN_WAIT2: "FIN-WAIT-2",
    TcpState.TIME_WAIT: "TIME-WAIT",
    TcpState.CLOSE_WAIT: "CLOSE-WAIT",
    TcpState.LAST_ACK: "LAST-ACK",
    TcpState.CLOSING: "CLOSING",
}
SS_TIMER = {
    TimerKind.RETRANSMIT: "on",
    TimerKind.KEEPALIVE: "keepalive",
    TimerKind.TIME_WAIT: "timewait",
    TimerKind.ZERO_WINDOW_PROBE: "persist",
}
# Fields that must not change between the two dumps for a comparison to count.
STABLE = (
    "state",
    "timer",
    "retrans",
    "rqueue",
    "wqueue",
    "rto_us",
    "backoff",
    "unacked",
    "ca_retransmits",
    "total_retrans",
)
AGES = {
    "last_data_sent_ms": "lastsnd",
    "last_data_recv_ms": "lastrcv",
    "last_ack_recv_ms": "lastack",
}


# --- the ss side ---------------------------------------------------------------------------


@dataclass
class SsSock:
    state: str
    rqueue: int
    wqueue: int
    local: str
    remote: str
    timer: tuple[str, str, int] | None  # (name, expiry as printed, retrans)
    info: dict[str, str]  # key:value tokens of the -i line


_TIMER = re.compile(r"timer:\((\w+),([^,]*),(\d+)\)")
_INODE = re.compile(r"\bino:(\d+)\b")


def parse_ss(text: str) -> dict[int, SsSock]:
    """``ss -tinoeH``: a line per socket, then a tab-indented line of tcp_info."""
    out: dict[int, SsSock] = {}
    current: SsSock | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line[0].isspace():
            assert current is not None, f"info line before any socket: {line!r}"
            for token in line.split():
                key, sep, value = token.partition(":")
                if sep and not value.startswith("("):
                    current.info[key] = value
            continue
        fields = line.split()
        timer = _TIMER.search(line)
        inode = _INODE.search(line)
        assert inode is not None, f"no ino: in {line!r}"
        current = SsSock(
            state=fields[0],
            rqueue=int(fields[1]),
            wqueue=int(fields[2]),
            local=fields[3],
            remote=fields[4],
            timer=(timer[1], timer[2], int(timer[3])) if timer else None,
            info={},
        )
        out[int(inode[1])] = current
    return out


_SS_MS = re.compile(r"^(?:(\d+)min)?(?:(\d+)(sec|\.))?(?:(\d+)ms)?$")


def ss_ms(text: str) -> tuple[int, int]:
    """ss's print_ms_timer back to (milliseconds, resolution): "1.232ms", "12sec", "115min".

    It drops seconds above 9 minutes and milliseconds above 9 seconds (or with minutes).
    """
    m = _SS_MS.match(text)
    assert m is not None and text, f"unexpected ss timer {text!r}"
    minutes, secs, msecs = int(m[1] or 0), int(m[2] or 0), int(m[4] or 0)
    if minutes > 9:
        resolution = 60_000
    elif minutes or secs > 9:
        resolution = 1000
    else:
        resolution = 1
    return (minutes * 60 + secs) * 1000 + msecs, resolution


# --- the lab -------------------------------------------------------------------------------


@dataclass
class Loopback:
    ns: Netns
    kinds: dict[int, str]  # inode -> what the socket is for


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


@pytest.fixture(params=["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def loopback(lab: Lab, request: pytest.FixtureRequest) -> Loopback:
    addr: str = request.param
    ns = lab.netns()
    kinds: dict[int, str] = {}

    def pair(kind: str, **opts: int) -> tuple[socket.socket, socket.socket]:
        try:
            client, server = tcp_pair(ns, ns, addr, **opts)
        except OSError as exc:
            pytest.skip(f"no {addr} loopback here: {exc}")
        kinds[_inode(client)] = f"{kind} client"
        kinds[_inode(server)] = f"{kind} server"
        return client, server

    pair("idle")
    pair("keepalive", SO_KEEPALIVE=1)
    _, server = pair("unread")
    server.sendall(b"hello")  # the client never reads: rqueue 5
    client, _ = pair("half-closed")
    client.shutdown(socket.SHUT_WR)  # client FIN_WAIT2, server CLOSE_WAIT
    client, _ = pair("zero-window")
    client.setblocking(False)
    try:  # fill the peer's receive buffer: wqueue, then the persist timer
        while True:
            client.send(b"x" * 65536)
    except BlockingIOError:
        pass
    # Segments the full receiver dropped are retransmitted first (timer 1, for a second or
    # two); only then does the sender settle into zero-window probing.
    deadline = time.monotonic() + 10
    while dump(ns)[_inode(client)].timer != TimerKind.ZERO_WINDOW_PROBE:
        assert time.monotonic() < deadline, "the zero-window sender never reached persist"
        time.sleep(0.1)
    return Loopback(ns, kinds)


def dump(ns: Netns) -> dict[int, Sock]:
    def run() -> dict[int, Sock]:
        stats = sockdiag.DumpStats()
        socks = {s.inode: s for s in sockdiag.dump(stats)}
        assert (stats.skipped, stats.truncated, stats.interrupted) == (0, False, False)
        return socks

    return ns.call(run)


def sandwich(
    lb: Loopback, oracle: Callable[[], dict[int, Any]], timeout: float = 8
) -> tuple[dict[int, Sock], Any, dict[int, Sock]]:
    """(dump, oracle, dump) once the dumps agree on every STABLE field of our sockets.

    A fresh zero-window sender takes a second or so to settle into persist probing.
    """
    deadline = time.monotonic() + timeout
    while True:
        before = dump(lb.ns)
        seen = oracle()
        after = dump(lb.ns)
        assert set(before) == set(lb.kinds), "the dump holds other sockets than ours"
        moved = [
            (lb.kinds[i], f)
            for i in lb.kinds
            for f in STABLE
            if getattr(before[i], f) != getattr(after.get(i, before[i]), f) or i not in after
        ]
        if not moved:
            return before, seen, after
        if time.monotonic() > deadline:
            pytest.fail(f"sockets never held still for a comparison: {moved}")
        time.sleep(0.3)


# --- the tests -----------------------------------------------------------------------------


def test_dump_matches_ss(loopback: Loopback) -> None:
    def ss() -> dict[int, SsSock]:
        return parse_ss(loopback.ns.run(["ss", "-tinoeH"]).stdout)

    before, seen, after = sandwich(loopback, ss)
    assert set(seen) == set(loopback.kinds)
    timers = set()
    for inode, kind in loopback.kinds.items():
        d, s, later = before[inode], seen[inode], after[inode]
        ctx = f"{kind} (inode {inode})"
        assert SS_STATE[TcpState(d.state)] == s.state, ctx
        assert (d.local, d.remote) == (s.local, s.remote), ctx
        assert (d.rqueue, d.wqueue) == (s.rqueue, s.wqueue), ctx
        if d.timer == TimerKind.NONE:
            assert s.timer is None, ctx
        else:
            assert s.timer is not None, ctx
            name, expiry, retrans = s.timer
            assert (SS_TIMER[TimerKind(d.timer)], d.retrans) == (name, retrans), ctx
            timers.add(name)
            if d.timer == TimerKind.KEEPALIVE:  # never re-armed while idle: ages in between
                printed, resolution = ss_ms(expiry)
                assert later.expires_ms - resolution < printed <= d.expires_ms, ctx
        # tcp_info, which ss prints with -i
        info = s.info
        assert d.has_info, ctx
        assert float(info["rto"]) == pytest.approx(d.rto_us / 1000), ctx
        assert int(info.get("backoff", 0)) == d.backoff, ctx
        assert int(info.get("unacked", 0)) == d.unacked, ctx
        assert info.get("retrans", "0/0") == f"{d.ca_retransmits}/{d.total_retrans}", ctx
        if d.timer in (TimerKind.NONE, TimerKind.KEEPALIVE):  # idle: the ages only grow
            for field, key in AGES.items():
                assert getattr(d, field) <= int(info[key]) <= getattr(later, field), (ctx, key)
    assert timers == {"keepalive", "persist"}
    assert {s.state for s in seen.values()} == {"ESTAB", "FIN-WAIT-2", "CLOSE-WAIT"}
    unread = next(i for i, k in loopback.kinds.items() if k == "unread client")
    assert before[unread].rqueue == 5


def test_dump_matches_pyroute2(loopback: Loopback) -> None:
    pyroute2 = pytest.importorskip("pyroute2")

    def diag() -> dict[int, dict[str, Any]]:
        def query() -> dict[int, dict[str, Any]]:
            out = {}
            with pyroute2.DiagSocket() as ds:
                ds.bind()
                for fam in (socket.AF_INET, socket.AF_INET6):
                    for msg in ds.get_sock_stats(family=fam, states=0xFFF):
                        out[msg["idiag_inode"]] = msg
            return out

        return loopback.ns.call(query)

    before, seen, after = sandwich(loopback, diag)
    for inode, kind in loopback.kinds.items():
        d, p, later = before[inode], seen[inode], after[inode]
        ctx = f"{kind} (inode {inode})"
        assert (d.family, d.state, d.timer, d.retrans) == (
            p["idiag_family"],
            p["idiag_state"],
            p["idiag_timer"],
            p["idiag_retrans"],
        ), ctx
        assert (d.sport, d.dport) == (p["idiag_sport"], p["idiag_dport"]), ctx
        assert (d.local_ip, d.remote_ip) == (
            ipaddress.ip_address(p["idiag_src"]),
            ipaddress.ip_address(p["idiag_dst"]),
        ), ctx
        assert (d.rqueue, d.wqueue, d.uid) == (
            p["idiag_rqueue"],
            p["idiag_wqueue"],
            p["idiag_uid"],
        ), ctx
        if d.timer == TimerKind.KEEPALIVE:
            assert later.expires_ms <= p["idiag_expires"] <= d.expires_ms, ctx
