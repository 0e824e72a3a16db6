"""Local middleboxes of a namespace: conntrack's flow count and IPVS's services and timeout,
read from fake /proc trees and crafted netlink replies."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest

from auditd.kernel import ipvs, procfs

IP_VS = """\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A600001:01BB rr
  -> 0A000102:1F90      Masq    1      0          0
UDP  0A60000A:0035 rr
TCP  [2001:0db8:0000:0000:0000:0000:0000:0001]:0050 rr
FWM  00000001 rr
TCP  ZZZZ:0050 rr
"""


def test_parse_services() -> None:
    v4 = ipaddress.ip_address("10.96.0.1").packed.ljust(16, b"\0")
    v6 = ipaddress.ip_address("2001:db8::1").packed
    assert ipvs.parse_services(IP_VS) == {(v4, 443), (v6, 80)}
    assert ipvs.parse_services("") == frozenset()


def _reply(mtype: int, attrs: bytes) -> bytes:
    body = ipvs.GENLMSGHDR.pack(1, 1, 0) + attrs
    return ipvs.NLMSGHDR.pack(ipvs.NLMSGHDR.size + len(body), mtype, 0, 1, 0) + body


class FakeGenl:
    """Answers the family lookup with id 0x20 and IPVS_CMD_GET_CONFIG with a TCP timeout."""

    def __init__(self, timeout: int | None) -> None:
        self.timeout = timeout
        self.sent: list[bytes] = []

    def __enter__(self) -> FakeGenl:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def settimeout(self, value: float) -> None:
        pass

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        if len(self.sent) == 1:
            return _reply(0x10, ipvs.attr(ipvs.CTRL_ATTR_FAMILY_ID, struct.pack("=H", 0x20)))
        if self.timeout is None:  # EPERM: no CAP_NET_ADMIN
            err = struct.pack("=i", -1) + bytes(16)
            return ipvs.NLMSGHDR.pack(16 + len(err), ipvs.NLMSG_ERROR, 0, 2, 0) + err
        return _reply(0x20, ipvs.attr(ipvs.IPVS_CMD_ATTR_TIMEOUT_TCP,
                                      struct.pack("=I", self.timeout)))  # fmt: skip


def test_read_tcp_timeout_asks_like_ipvsadm() -> None:
    genl = FakeGenl(600)
    assert ipvs.read_tcp_timeout(lambda: genl) == 600  # type: ignore[arg-type, return-value]
    lookup, get_config = genl.sent
    assert b"IPVS\0" in lookup
    assert struct.unpack_from("=H", get_config, 4)[0] == 0x20  # to the family's id
    assert get_config[16] == ipvs.IPVS_CMD_GET_CONFIG
    assert ipvs.read_tcp_timeout(lambda: FakeGenl(None)) is None  # type: ignore[arg-type, return-value]


def test_attrs_ignore_a_malformed_tail() -> None:
    data = ipvs.attr(4, struct.pack("=I", 900)) + b"\x40\x00\x05"
    assert ipvs.attrs(data) == {4: struct.pack("=I", 900)}


def _tree(root: Path, conntrack: int | None, ip_vs: str | None) -> None:
    sys_net = root / "sys" / "net"
    (sys_net / "ipv4").mkdir(parents=True)
    (sys_net / "ipv4" / "tcp_keepalive_time").write_text("7200\n")
    (sys_net / "netfilter").mkdir()
    (sys_net / "netfilter" / "nf_conntrack_tcp_timeout_established").write_text("300\n")
    if conntrack is not None:
        (sys_net / "netfilter" / "nf_conntrack_count").write_text(f"{conntrack}\n")
    (root / "net").mkdir()
    if ip_vs is not None:
        (root / "net" / "ip_vs").write_text(ip_vs)


def test_read_sysctls_with_conntrack_and_ipvs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ipvs, "read_tcp_timeout", lambda: None)  # cannot read: the default
    _tree(tmp_path, 12, IP_VS)
    s = procfs.read_sysctls(str(tmp_path))
    assert s.conntrack_entries == 12 and s.conntrack_timeout == 300
    assert s.ipvs_tcp_timeout == ipvs.IPVS_DEFAULT_TCP_TIMEOUT == 900 and len(s.ipvs_services) == 2
    assert "net.netfilter.nf_conntrack_count" not in s.values  # state, not a setting


def test_read_sysctls_without_middleboxes(tmp_path: Path) -> None:
    _tree(tmp_path, 0, None)
    s = procfs.read_sysctls(str(tmp_path))
    assert s.conntrack_timeout is None  # conntrack tracks nothing here
    assert (s.ipvs_tcp_timeout, s.ipvs_services) == (None, frozenset())
    _tree(tmp_path / "x", None, None)
    assert procfs.read_sysctls(str(tmp_path / "x")).conntrack_entries is None


def test_read_ipvs_with_services_reads_the_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ipvs, "read_tcp_timeout", lambda: 120)
    (tmp_path / "ip_vs").write_text(IP_VS)
    assert ipvs.read_ipvs(str(tmp_path))[0] == 120
    assert ipvs.read_ipvs(str(tmp_path / "none")) == (None, frozenset())
