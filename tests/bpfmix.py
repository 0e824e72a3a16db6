"""A mix of real sockets for comparing the kernel audit pass with the sock_diag path.

In namespace ``a`` (with a veth cable to ``b``, whose packets are dropped after the
connections are up): the keepalive zoo of tests/bpfzoo.py (off, on, custom, user timeout,
listeners, IPv6), a CLOSE_WAIT end (and its FIN_WAIT2 peer), a TIME_WAIT minisocket, unread
data in a receive queue, a fresh connection, data in flight to the blackholed peer
(retransmitting) and keepalive probing it (probes out). ``RULES``' thresholds are far from
every socket's age when ``build`` returns, so a pass and a dump a few ms apart decide alike.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import bpfzoo
import netlab

from auditd.config import RuleSet, Thresholds

# Idle sockets are about SETTLE seconds old when build returns: past the warning (1 s),
# short of the idle timeout (4 s); CLOSE_WAIT past close_wait_after (1 s).
RULES = RuleSet(
    defaults=Thresholds(
        idle_timeout=4.0, warn_at=0.25, close_wait_after=1.0, retransmit_threshold=2
    )
)
SETTLE = 2.2


@dataclass
class Mix:
    a: netlab.Netns
    b: netlab.Netns
    socks: dict[str, socket.socket]


def build(lab: netlab.Lab) -> Mix:
    a, b = lab.netns(), lab.netns()
    cable = lab.cable(a, b)
    socks = dict(bpfzoo.build(a))
    listener = a.listen("127.0.0.1")
    # CLOSE_WAIT: the client closes, the accepted end does not (the client sits in FIN_WAIT2).
    cw_client = a.make_socket()
    cw_client.connect(listener.getsockname())
    socks["close_wait"] = a.adopt(listener.accept()[0])
    cw_client.shutdown(socket.SHUT_WR)
    socks["fin_wait2"] = cw_client
    # TIME_WAIT: both ends close, the client first.
    tw = a.make_socket()
    tw.connect(listener.getsockname())
    tw_server = listener.accept()[0]
    tw.close()
    tw_server.close()
    # Unread data: the client never reads what the server sent.
    rq_client = a.make_socket()
    rq_client.connect(listener.getsockname())
    rq_server = a.adopt(listener.accept()[0])
    rq_server.sendall(b"x" * 3000)
    socks["rqueue"], socks["rqueue/child"] = rq_client, rq_server
    fresh_client = a.make_socket()
    fresh_client.connect(listener.getsockname())
    fresh_server = a.adopt(listener.accept()[0])
    socks["fresh"], socks["fresh/child"] = fresh_client, fresh_server
    # Across the cable: then the cable is pulled on b's side.
    inflight, _ = lab.connect(cable)
    probing, _ = lab.connect(cable, SO_KEEPALIVE=1, TCP_KEEPIDLE=1, TCP_KEEPINTVL=1,
                             TCP_KEEPCNT=20)  # fmt: skip
    socks["inflight"], socks["probing"] = inflight, probing
    b.pull_cable()
    inflight.setblocking(False)
    inflight.send(b"y" * 5000)
    time.sleep(SETTLE)
    fresh_client.sendall(b"ping")
    fresh_server.recv(16)
    fresh_server.sendall(b"pong")
    fresh_client.recv(16)
    time.sleep(0.05)
    return Mix(a, b, socks)
