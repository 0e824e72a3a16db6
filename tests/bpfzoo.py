"""Sockets with every combination of keepalive options, made inside a lab namespace.

What the BPF tests compare against getsockopt: keepalive off; on with the namespace
defaults; 300/30/5; TCP_USER_TIMEOUT 45000 alone; TCP_KEEPIDLE set with keepalive off;
TCP_KEEPCNT only; a listener with keepalive and its own idle, whose accepted children inherit
them; IPv6. Every socket is tracked by the namespace for cleanup.
"""

from __future__ import annotations

import socket

import netlab

SOL_TCP = socket.IPPROTO_TCP
# name -> (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT); None: unset
CLIENTS: dict[str, tuple[int, int | None, int | None, int | None, int | None]] = {
    "off": (0, None, None, None, None),
    "defaults": (1, None, None, None, None),
    "300/30/5": (1, 300, 30, 5, None),
    "user-timeout": (0, None, None, None, 45000),
    "idle-but-off": (0, 600, None, None, None),
    "cnt-only": (1, None, None, 3, None),
}


Options = tuple[int, int | None, int | None, int | None, int | None]


def set_options(sock: socket.socket, opts: Options) -> None:
    keepalive, *tcp = opts
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, keepalive)
    names = (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT, socket.TCP_USER_TIMEOUT)
    for name, value in zip(names, tcp):
        if value is not None:
            sock.setsockopt(SOL_TCP, name, value)


def build(ns: netlab.Netns) -> dict[str, socket.socket]:
    """The zoo: name -> socket (clients by CLIENTS name, ``<name>/child`` their accepted
    ends, ``listener``, ``v6``, ``v6/child``, ``v6/listener``)."""
    zoo: dict[str, socket.socket] = {}
    listener = ns.listen("127.0.0.1")
    set_options(listener, (1, 120, None, None, None))
    zoo["listener"] = listener
    for name, opts in CLIENTS.items():
        client = ns.make_socket()
        set_options(client, opts)
        client.connect(listener.getsockname())
        zoo[name] = client
        zoo[name + "/child"] = ns.adopt(listener.accept()[0])
    v6l = ns.listen("::1")
    v6 = ns.make_socket(socket.AF_INET6)
    set_options(v6, (1, 100, 10, 2, 5000))
    v6.connect(v6l.getsockname()[:2])
    zoo["v6"] = v6
    zoo["v6/listener"] = v6l
    zoo["v6/child"] = ns.adopt(v6l.accept()[0])
    return zoo
