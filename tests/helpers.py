"""Shared test helpers: socket records, rule sets, a fake KernelSource, netlink builders.

Plain functions on purpose (tests/conftest.py belongs to another suite): import them with
``from helpers import make_sock``; pytest puts this directory on ``sys.path``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from auditd import model
from auditd.config import Match, Rule, RuleSet, Thresholds
from auditd.kernel import OwnerScan
from auditd.kernel.sockdiag import (
    DIAG_MSG,
    INET_DIAG_INFO,
    NLMSGHDR,
    RTATTR,
    SOCK_DIAG_BY_FAMILY,
    TCP_INFO,
    DumpStats,
)
from auditd.model import Counters, ProcessInfo, Sock, Sysctls, TcpState, TimerKind

DATA = Path(__file__).parent / "data"

# A connection that just exchanged data: no timer, every age 0, tcp_info present.
_SOCK_DEFAULTS: dict[str, Any] = {
    "family": socket.AF_INET,
    "state": TcpState.ESTABLISHED,
    "timer": TimerKind.NONE,
    "retrans": 0,
    "sport": 40000,
    "dport": 5432,
    "src": "10.0.0.1",
    "dst": "10.0.0.2",
    "expires_ms": 0,
    "rqueue": 0,
    "wqueue": 0,
    "uid": 0,
    "inode": 1000,
    "has_info": True,
    "ca_retransmits": 0,
    "probes": 0,
    "backoff": 0,
    "rto_us": 200_000,
    "unacked": 0,
    "last_data_sent_ms": 0,
    "last_data_recv_ms": 0,
    "last_ack_recv_ms": 0,
    "rtt_us": 100,
    "total_retrans": 0,
}


def _addr(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else ipaddress.ip_address(value).packed


def make_sock(*, idle_s: float | None = None, **overrides: Any) -> Sock:
    """A Sock with plain defaults through ``auditd.model.make_sock`` (host-order ports,
    addresses as text like ``"10.0.0.1"`` or ``"::1"``, or packed).

    ``idle_s`` sets all three ``last_*`` ages (in seconds) unless given one by one;
    ``family`` follows the address unless given.
    """
    unknown = set(overrides) - set(_SOCK_DEFAULTS)
    if unknown:
        raise TypeError(f"make_sock: unknown fields {sorted(unknown)}")
    fields = {**_SOCK_DEFAULTS, **overrides}
    if idle_s is not None:
        ms = round(idle_s * 1000)
        for name in ("last_data_sent_ms", "last_data_recv_ms", "last_ack_recv_ms"):
            if name not in overrides:
                fields[name] = ms
    if "family" not in overrides and len(_addr(fields["src"])) == 16:
        fields["family"] = socket.AF_INET6
    return model.make_sock(**fields)


def rule(name: str, *, match: Match | None = None, base: Thresholds | None = None,
         severity: Any = None, ignore: bool = False, **thresholds: Any) -> Rule:  # fmt: skip
    """A Rule as config.parse_rules builds it: defaults merged in, overrides recorded."""
    merged = Thresholds(**{**_thresholds_dict(base or Thresholds()), **thresholds})
    return Rule(
        name=name,
        match=match or Match(),
        thresholds=merged,
        severity=severity,
        ignore=ignore,
        overrides=frozenset(thresholds),
    )


def _thresholds_dict(t: Thresholds) -> dict[str, Any]:
    return {
        "idle_timeout": t.idle_timeout,
        "warn_at": t.warn_at,
        "detection_budget": t.detection_budget,
        "close_wait_after": t.close_wait_after,
        "retransmit_threshold": t.retransmit_threshold,
    }


def ruleset(
    *rules: Rule, defaults: Thresholds | None = None, sysctls: Iterable[Any] = ()
) -> RuleSet:
    return RuleSet(defaults=defaults or Thresholds(), sysctls=tuple(sysctls), rules=tuple(rules))


DEFAULT_SYSCTLS = Sysctls(
    {
        "net.ipv4.tcp_keepalive_time": 7200,
        "net.ipv4.tcp_keepalive_intvl": 75,
        "net.ipv4.tcp_keepalive_probes": 9,
        "net.ipv4.tcp_retries2": 15,
    }
)


def sysctls(**values: int) -> Sysctls:
    """Sysctls from short names: ``sysctls(tcp_retries2=8)``; the rest are kernel defaults."""
    merged = dict(DEFAULT_SYSCTLS.values)
    for short, value in values.items():
        prefix = "net.netfilter." if short.startswith("nf_") else "net.ipv4."
        merged[prefix + short] = value
    return Sysctls(merged)


class FakeKernel:
    """A KernelSource over plain data."""

    def __init__(
        self,
        socks: Iterable[Sock] = (),
        owners: dict[int, ProcessInfo] | None = None,
        sysctls: Sysctls = DEFAULT_SYSCTLS,
        counters: Counters | None = None,
        inode: int | None = 4026531840,
    ) -> None:
        self.socks = list(socks)
        self.owner_map = owners or {}
        self._sysctls = sysctls
        self._counters = counters or Counters(1, 2, 3, 4)
        self.inode = inode
        self.owner_queries: list[list[int]] = []

    def netns_inode(self) -> int | None:
        return self.inode

    def sysctls(self) -> Sysctls:
        return self._sysctls

    def counters(self) -> Counters:
        return self._counters

    def sockets(self, stats: DumpStats) -> Iterator[Sock]:
        for sock in self.socks:
            stats.messages += 1
            yield sock
        stats.done += 2

    def enter(self) -> None:
        return None  # no kernel namespace behind a fake: BPF cannot read it

    def describe(self) -> str:
        return type(self).__name__

    def owners(self, inodes: Collection[int], deadline: float | None = None) -> OwnerScan:
        self.owner_queries.append(sorted(inodes))
        return OwnerScan({i: self.owner_map[i] for i in inodes if i in self.owner_map})


# --- netlink messages, built by hand for the crafted decode cases ----------------------------


def nlmsg(
    mtype: int, payload: bytes, flags: int = 0x2, seq: int = 1, length: int | None = None
) -> bytes:
    """One netlink message padded to 4 bytes; ``length`` overrides the header's length field."""
    size = NLMSGHDR.size + len(payload)
    msg = NLMSGHDR.pack(size if length is None else length, mtype, flags, seq, 0) + payload
    return msg + bytes(-len(msg) % 4)


def rtattr(atype: int, payload: bytes, length: int | None = None) -> bytes:
    size = RTATTR.size + len(payload)
    attr = RTATTR.pack(size if length is None else length, atype) + payload
    return attr + bytes(-len(attr) % 4)


def diag_msg(
    family: int = socket.AF_INET,
    state: int = TcpState.ESTABLISHED,
    timer: int = 0,
    retrans: int = 0,
    sport: int = 40000,
    dport: int = 443,
    src: str = "192.0.2.1",
    dst: str = "198.51.100.7",
    expires: int = 0,
    rqueue: int = 0,
    wqueue: int = 0,
    uid: int = 1000,
    inode: int = 4242,
) -> bytes:
    """struct inet_diag_msg: ports big-endian inside a native struct, addresses in 16 bytes."""
    return DIAG_MSG.pack(
        family, state, timer, retrans,
        struct.unpack("=H", struct.pack(">H", sport))[0],
        struct.unpack("=H", struct.pack(">H", dport))[0],
        _addr(src).ljust(16, b"\0"), _addr(dst).ljust(16, b"\0"),
        0, 0, expires, rqueue, wqueue, uid, inode,
    )  # fmt: skip


# Field order of the 104-byte head of struct tcp_info (include/uapi/linux/tcp.h).
TCP_INFO_FIELDS = (
    "state", "ca_state", "retransmits", "probes", "backoff", "options", "wscale", "flags",
    "rto", "ato", "snd_mss", "rcv_mss", "unacked", "sacked", "lost", "retrans", "fackets",
    "last_data_sent", "last_ack_sent", "last_data_recv", "last_ack_recv", "pmtu",
    "rcv_ssthresh", "rtt", "rttvar", "snd_ssthresh", "snd_cwnd", "advmss", "reordering",
    "rcv_rtt", "rcv_space", "total_retrans",
)  # fmt: skip


def tcp_info(**values: int) -> bytes:
    unknown = set(values) - set(TCP_INFO_FIELDS)
    if unknown:
        raise TypeError(f"tcp_info: unknown fields {sorted(unknown)}")
    return TCP_INFO.pack(*(values.get(name, 0) for name in TCP_INFO_FIELDS))


def diag_message(info: bytes | None = None, extra_attrs: bytes = b"", flags: int = 0x2,
                 **fields: Any) -> bytes:  # fmt: skip
    attrs = extra_attrs + (rtattr(INET_DIAG_INFO, info) if info is not None else b"")
    return nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(**fields) + attrs, flags=flags)


# --- recorded dumps ------------------------------------------------------------------------


# The recorded form of a socket: what it means, not how Sock stores it (host-order ports,
# addresses as packed hex), so a change of the record layout does not invalidate the recordings.
SOCK_JSON_FIELDS = (
    "family", "state", "timer", "retrans", "sport", "dport", "src", "dst", "expires_ms",
    "rqueue", "wqueue", "uid", "inode", "has_info", "ca_retransmits", "probes", "backoff",
    "rto_us", "unacked", "last_data_sent_ms", "last_data_recv_ms", "last_ack_recv_ms", "rtt_us",
    "total_retrans",
)  # fmt: skip


def sock_to_json(sock: Sock) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in SOCK_JSON_FIELDS:
        if name == "src":
            out[name] = sock.local_ip.packed.hex()
        elif name == "dst":
            out[name] = sock.remote_ip.packed.hex()
        else:
            value = getattr(sock, name)
            out[name] = value if isinstance(value, bool) else int(value)
    return out


def sock_from_json(data: dict[str, Any]) -> Sock:
    fields = {k: data[k] for k in SOCK_JSON_FIELDS}
    fields["src"], fields["dst"] = bytes.fromhex(data["src"]), bytes.fromhex(data["dst"])
    return model.make_sock(**fields)


def dump_files(name: str) -> list[Path]:
    return sorted(DATA.glob(f"{name}.*.bin"))


def load_datagrams(name: str) -> list[bytes]:
    return [path.read_bytes() for path in dump_files(name)]


def load_expected(name: str) -> dict[str, Any]:
    with open(DATA / f"{name}.json", encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def save_dump(
    name: str, datagrams: list[bytes], expected: dict[str, Any], data_dir: Path = DATA
) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    for old in data_dir.glob(f"{name}.*.bin"):
        old.unlink()
    for i, chunk in enumerate(datagrams):
        (data_dir / f"{name}.{i:02d}.bin").write_bytes(chunk)
    with open(data_dir / f"{name}.json", "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


def fd_inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def fake_process(
    root: Path,
    pid: int,
    fds: dict[int, str],
    comm: str | None = None,
    cmdline: bytes | None = None,
    cgroup: str | None = None,
) -> Path:
    """``root/PID`` of a fake /proc: ``fd/`` links to ``fds`` targets (``socket:[INODE]``),
    and the ``comm``, ``cmdline`` and ``cgroup`` files given. The one builder of the tests'
    process trees."""
    base = root / str(pid)
    (base / "fd").mkdir(parents=True)
    for name, text in (("comm", None if comm is None else comm + "\n"), ("cmdline", cmdline),
                       ("cgroup", cgroup)):  # fmt: skip
        if isinstance(text, bytes):
            (base / name).write_bytes(text)
        elif text is not None:
            (base / name).write_text(text)
    for fd, target in fds.items():
        os.symlink(target, base / "fd" / str(fd))
    return base
