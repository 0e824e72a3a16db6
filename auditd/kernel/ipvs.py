"""The namespace's IPVS, a local middlebox: its TCP virtual services and TCP idle timeout.

kube-proxy in IPVS mode and Docker swarm balance through IPVS, whose connection entries
expire after the TCP timeout (900 s by default, ip_vs_proto_tcp.c; ``ipvsadm --set``), like
any middlebox's idle timeout. The virtual services are listed in ``/proc/net/ip_vs`` (only
there when the ip_vs module is loaded); the timeout is not in procfs, it is read the way
``ipvsadm -L --timeout`` does: generic netlink family ``IPVS``, command IPVS_CMD_GET_CONFIG
(include/uapi/linux/ip_vs.h; needs CAP_NET_ADMIN). The family is looked up only when the
services file exists: a lookup of an absent family could load the module.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable

IPVS_DEFAULT_TCP_TIMEOUT = 900  # seconds, net/netfilter/ipvs/ip_vs_proto_tcp.c

# include/uapi/linux/netlink.h, genetlink.h, ip_vs.h
NETLINK_GENERIC = 16
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
IPVS_GENL_NAME = b"IPVS"
IPVS_GENL_VERSION = 1
IPVS_CMD_GET_CONFIG = 13
IPVS_CMD_ATTR_TIMEOUT_TCP = 4

NLMSGHDR = struct.Struct("=IHHII")
GENLMSGHDR = struct.Struct("=BBH")
NLATTR = struct.Struct("=HH")

Services = frozenset[tuple[bytes, int]]


def parse_services(text: str) -> Services:
    """TCP virtual services of ``/proc/net/ip_vs`` as (16-byte address, port).

    ``TCP  0A600001:0050 rr`` (IPv4 in hex, network order) or ``TCP  [2001:db8::1]:0050 rr``;
    real servers (``  -> ...``), other protocols and firewall-mark services are left out.
    """
    found: set[tuple[bytes, int]] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "TCP":
            continue
        addr, _, port = fields[1].rpartition(":")
        try:
            if addr.startswith("["):
                packed = ipaddress.IPv6Address(addr.strip("[]")).packed
            else:
                packed = bytes.fromhex(addr)
                if len(packed) != 4:
                    continue
            found.add((packed.ljust(16, b"\0"), int(port, 16)))
        except ValueError:
            continue
    return frozenset(found)


def read_services(net_dir: str) -> Services:
    try:
        with open(os.path.join(net_dir, "ip_vs"), encoding="ascii", errors="replace") as f:
            return parse_services(f.read())
    except OSError:
        return frozenset()


def attrs(data: bytes) -> dict[int, bytes]:
    """Netlink attributes (type -> payload) of ``data``; a malformed tail is ignored."""
    out: dict[int, bytes] = {}
    off = 0
    while off + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, off)
        if length < NLATTR.size or off + length > len(data):
            break
        out[kind & 0x3FFF] = data[off + NLATTR.size : off + length]  # without NLA_F_NESTED
        off += (length + 3) & ~3
    return out


def attr(kind: int, payload: bytes) -> bytes:
    raw = NLATTR.pack(NLATTR.size + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def request(family: int, cmd: int, version: int, payload: bytes = b"", seq: int = 1) -> bytes:
    body = GENLMSGHDR.pack(cmd, version, 0) + payload
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), family, NLM_F_REQUEST, seq, 0) + body


def reply_attrs(msg: bytes) -> dict[int, bytes]:
    """The attributes of a generic netlink reply; raises OSError for an NLMSG_ERROR."""
    if len(msg) < NLMSGHDR.size:
        raise OSError(errno.EBADMSG, "short netlink reply")
    length, mtype, _, _, _ = NLMSGHDR.unpack_from(msg)
    if mtype == NLMSG_ERROR:
        code = struct.unpack_from("=i", msg, NLMSGHDR.size)[0] if len(msg) >= 20 else -1
        raise OSError(-code, os.strerror(-code))
    return attrs(msg[NLMSGHDR.size + GENLMSGHDR.size : length])


def _genl_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)


def read_tcp_timeout(factory: Callable[[], socket.socket] = _genl_socket) -> int | None:
    """The IPVS TCP timeout of the calling thread's namespace, or None if it cannot be read."""
    try:
        with factory() as sock:
            sock.settimeout(2.0)
            name = attr(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME + b"\0")
            sock.send(request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, name))
            family = struct.unpack_from("=H", reply_attrs(sock.recv(65536))[CTRL_ATTR_FAMILY_ID])
            sock.send(request(family[0], IPVS_CMD_GET_CONFIG, IPVS_GENL_VERSION, seq=2))
            timeout = reply_attrs(sock.recv(65536))[IPVS_CMD_ATTR_TIMEOUT_TCP]
            return int(struct.unpack_from("=I", timeout)[0])
    except (OSError, KeyError, struct.error):
        return None


def read_ipvs(net_dir: str) -> tuple[int | None, Services]:
    """(TCP timeout, TCP virtual services) of the calling thread's namespace; (None, empty)
    without IPVS. A timeout that cannot be read (no CAP_NET_ADMIN) is taken as the default."""
    services = read_services(net_dir)
    if not services:
        return None, services
    timeout = read_tcp_timeout()
    return (timeout if timeout else IPVS_DEFAULT_TCP_TIMEOUT), services
