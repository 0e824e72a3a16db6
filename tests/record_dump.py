"""Re-record the sock_diag dumps that tests/replay/test_sockdiag_decode.py replays.

    sudo python tests/record_dump.py            # writes tests/data/loopback.*
    sudo python tests/record_dump.py --out DIR  # somewhere else, to compare
    sudo python tests/record_dump.py --here     # in the current namespace (not for commits:
                                                # the dump then holds the host's sockets)

Needs root: it moves itself into a fresh network namespace (unshare CLONE_NEWNET, loopback
up), so the dump holds only the sockets it opens and nothing of the host. There it opens
known loopback connections, saves the raw datagrams of ``sockdiag.fetch_raw()`` as
``loopback.NN.bin``, and writes ``loopback.json`` with

- ``records``: what ``sockdiag.decode`` made of the datagrams when they were recorded;
- ``stats``: the DumpStats of decoding them;
- ``facts``: what the script knows about each socket from the socket API alone (inode,
  addresses, ports, state, bytes queued, keepalive), independent of the decoder.

Before writing, the facts are checked against the decoder and against pyroute2's
DiagSocket (a second, independent decoder of a fresh dump); any mismatch aborts.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from helpers import DATA, fd_inode, save_dump, sock_to_json

from auditd.kernel import sockdiag
from auditd.model import TcpState, TimerKind

NAME = "loopback"
CLONE_NEWNET = 0x40000000
QUEUED = 1000  # bytes sent to a socket that never reads them
KEEPIDLE = 600


def enter_fresh_netns() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        sys.exit(f"record_dump: unshare(CLONE_NEWNET) failed: {os.strerror(err)} (run as root)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def pair(
    family: int, host: str, client_opts: tuple[tuple[int, int, int], ...] = ()
) -> tuple[socket.socket, socket.socket, socket.socket]:
    """(listener, client, accepted) connected over loopback."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen()
    client = socket.socket(family, socket.SOCK_STREAM)
    for level, opt, value in client_opts:
        client.setsockopt(level, opt, value)
    client.connect(listener.getsockname()[:2])
    accepted, _ = listener.accept()
    return listener, client, accepted


def fact(name: str, sock: socket.socket, state: TcpState, **extra: Any) -> dict[str, Any]:
    local = sock.getsockname()
    try:
        remote = sock.getpeername()
    except OSError:  # after the peer's FIN the name is still there; be safe anyway
        remote = (None, None)
    return {
        "name": name,
        "inode": fd_inode(sock),
        "family": sock.family,
        "state": int(state),
        "local_addr": local[0],
        "sport": local[1],
        "remote_addr": remote[0],
        "dport": remote[1],
        **extra,
    }


def open_sockets() -> tuple[list[socket.socket], list[dict[str, Any]]]:
    keep: list[socket.socket] = []
    facts: list[dict[str, Any]] = []
    est = TcpState.ESTABLISHED

    lst, cli, acc = pair(socket.AF_INET, "127.0.0.1")
    keep += [lst, cli, acc]
    facts += [fact("v4_client", cli, est, timer=0), fact("v4_server", acc, est, timer=0)]

    lst, cli, acc = pair(socket.AF_INET6, "::1")
    keep += [lst, cli, acc]
    facts += [fact("v6_client", cli, est, timer=0), fact("v6_server", acc, est, timer=0)]

    opts = (
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPIDLE),
    )
    lst, cli, acc = pair(socket.AF_INET, "127.0.0.1", opts)
    keep += [lst, cli, acc]
    facts += [
        fact("v4_keepalive_client", cli, est, timer=int(TimerKind.KEEPALIVE)),
        fact("v4_keepalive_server", acc, est, timer=0),
    ]

    lst, cli, acc = pair(socket.AF_INET, "127.0.0.1")
    cli.sendall(b"q" * QUEUED)
    keep += [lst, cli, acc]
    facts += [fact("v4_unread_server", acc, est, rqueue=QUEUED)]

    # A dual-stack listener accepting IPv4: the accepted socket is AF_INET6, ::ffff:127.0.0.1.
    lst = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    lst.bind(("::", 0))
    lst.listen()
    cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    cli.connect(("127.0.0.1", lst.getsockname()[1]))
    acc, _ = lst.accept()
    keep += [lst, cli, acc]
    facts += [fact("mapped_server", acc, est)]

    # The peer closes, we do not: CLOSE_WAIT here, FIN_WAIT2 there.
    lst, cli, acc = pair(socket.AF_INET, "127.0.0.1")
    facts += [fact("close_wait_server", acc, TcpState.CLOSE_WAIT)]
    facts += [fact("fin_wait2_client", cli, TcpState.FIN_WAIT2)]
    cli.shutdown(socket.SHUT_WR)
    keep += [lst, cli, acc]

    time.sleep(0.2)  # let the FIN and the queued data land
    return keep, facts


def check_facts(records: list[dict[str, Any]], facts: list[dict[str, Any]], who: str) -> None:
    by_inode = {r["inode"]: r for r in records}
    for f in facts:
        r = by_inode.get(f["inode"])
        if r is None:
            sys.exit(f"record_dump: {who}: socket {f['name']} (inode {f['inode']}) not in the dump")
        for key in ("family", "state", "sport", "dport", "timer", "rqueue"):
            if key in f and r[key] != f[key]:
                sys.exit(f"record_dump: {who}: {f['name']}.{key} is {r[key]}, expected {f[key]}")


def pyroute2_records() -> list[dict[str, Any]]:
    from pyroute2 import DiagSocket

    out = []
    states = sum(1 << s for s in sockdiag.DEFAULT_STATES)
    with DiagSocket() as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for m in ds.get_sock_stats(family=family, states=states, extensions=2):
                out.append(
                    {
                        "family": m["idiag_family"],
                        "state": m["idiag_state"],
                        "timer": m["idiag_timer"],
                        "sport": m["idiag_sport"],
                        "dport": m["idiag_dport"],
                        "rqueue": m["idiag_rqueue"],
                        "inode": m["idiag_inode"],
                    }
                )
    return out


def main() -> None:
    if "--here" not in sys.argv:
        enter_fresh_netns()
    keep, facts = open_sockets()
    datagrams = sockdiag.fetch_raw()
    stats = sockdiag.DumpStats()
    records = [sock_to_json(s) for chunk in datagrams for s in sockdiag.decode(chunk, stats)]
    check_facts(records, facts, "sockdiag.decode")
    check_facts(pyroute2_records(), facts, "pyroute2")
    expected = {
        "records": records,
        "facts": facts,
        "stats": {
            "messages": stats.messages,
            "skipped": stats.skipped,
            "truncated": stats.truncated,
            "interrupted": stats.interrupted,
            "done": stats.done,
        },
        "kernel": os.uname().release,
        "queued": QUEUED,
        "keepidle": KEEPIDLE,
    }
    out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else DATA
    save_dump(NAME, datagrams, expected, out)
    for s in keep:
        s.close()
    print(f"record_dump: {len(records)} sockets in {len(datagrams)} datagrams -> {out}/{NAME}.*")


if __name__ == "__main__":
    main()
