"""Decoding the iterators' records: a recorded pass (tests/record_bpf.py) against what the
socket API said about the same sockets, and the edge cases on hand-made records."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from helpers import sysctls

from auditd.kernel.bpf.records import (
    OWNER_REC,
    SOCK_REC,
    OwnerRecord,
    OwnerTable,
    RecordError,
    SocketTable,
    iter_sock_records,
)
from auditd.model import SocketOptions, TcpState

DATA = Path(__file__).parent.parent / "data" / "bpf"


@pytest.fixture(scope="module")
def zoo() -> dict[str, Any]:
    return json.loads((DATA / "zoo.json").read_text())  # type: ignore[no-any-return]


def _sysctls(zoo: dict[str, Any]) -> Any:
    s = zoo["sysctls"]
    return sysctls(
        tcp_keepalive_time=s["net.ipv4.tcp_keepalive_time"],
        tcp_keepalive_intvl=s["net.ipv4.tcp_keepalive_intvl"],
        tcp_keepalive_probes=s["net.ipv4.tcp_keepalive_probes"],
    )


def test_recorded_sockets_decode_to_getsockopt(zoo: dict[str, Any]) -> None:
    table = SocketTable((DATA / "zoo.sockets.bin").read_bytes(), _sysctls(zoo))
    assert len(table) == len(zoo["sockets"])
    for name, fact in zoo["sockets"].items():
        rec = table.record(fact["inode"])
        assert rec is not None, name
        assert rec.family == fact["family"]
        assert (rec.state == TcpState.LISTEN) == fact["listening"]
        assert table.options(fact["inode"]) == SocketOptions._make([*fact["options"][:5], "bpf"]), (
            name
        )


def test_raw_fields_are_zero_for_the_sysctl(zoo: dict[str, Any]) -> None:
    recs = {r.inode: r for r in iter_sock_records((DATA / "zoo.sockets.bin").read_bytes())}
    socks = zoo["sockets"]
    plain = recs[socks["defaults"]["inode"]]
    assert (plain.keepalive_time, plain.keepalive_intvl, plain.keepalive_probes) == (0, 0, 0)
    assert plain.keepalive
    tuned = recs[socks["300/30/5"]["inode"]]
    assert tuned.keepalive_time == 300 * tuned.hz and tuned.keepalive_probes == 5
    assert recs[socks["user-timeout"]["inode"]].user_timeout_ms == 45000
    assert not recs[socks["idle-but-off"]["inode"]].keepalive
    assert recs[socks["v6"]["inode"]].family == socket.AF_INET6


def test_recorded_owners(zoo: dict[str, Any]) -> None:
    owners = OwnerTable((DATA / "zoo.owners.bin").read_bytes())
    assert len(owners) == len(zoo["sockets"])
    for fact in zoo["sockets"].values():
        assert owners.get(fact["inode"]) == OwnerRecord(zoo["pid"], fact["fd"], zoo["comm"])
    assert owners.get(1) is None
    wanted = {fact["inode"] for fact in zoo["sockets"].values()}
    assert set(owners.select(wanted | {1})) == wanted


def _sock(ino: int, hz: int = 250, **kw: int) -> bytes:
    f = {"cookie": ino + 1, "netns": 4026531840, "time": 0, "intvl": 0, "uto": 0, "state": 1,
         "probes": 0, "keepopen": 0, "family": 2} | kw  # fmt: skip
    return SOCK_REC.pack(ino + 1, ino, f["netns"], f["time"], f["intvl"], f["uto"], hz,
                         f["state"], f["probes"], f["keepopen"], f["family"])  # fmt: skip


def test_jiffies_divide_by_the_records_hz() -> None:
    s = sysctls(tcp_keepalive_time=7200, tcp_keepalive_intvl=75, tcp_keepalive_probes=9)
    data = _sock(5, hz=1000, time=30_000, intvl=2_500, keepopen=1) + _sock(6, hz=100)
    table = SocketTable(data, s)
    assert table.options(5) == SocketOptions(True, 30, 2, 9, 0, "bpf")  # getsockopt truncates too
    assert table.options(6) == SocketOptions(False, 7200, 75, 9, 0, "bpf")


def test_inode_zero_is_never_found_and_select_takes_only_the_wanted() -> None:
    table = SocketTable(_sock(0) + _sock(7) + _sock(8), sysctls())
    assert len(table) == 3 and table.record(0) is None
    assert set(table.select([0, 7, 9])) == {7}
    assert set(table.select({7, 8})) == {7, 8}


@pytest.mark.parametrize("cut", [1, SOCK_REC.size - 1, SOCK_REC.size + 3])
def test_torn_socket_records(cut: int) -> None:
    with pytest.raises(RecordError, match="not a whole number of records"):
        SocketTable((_sock(1) + _sock(2))[:cut], sysctls())


def test_hz_zero_is_refused() -> None:
    table = SocketTable(_sock(3, hz=0), sysctls())
    with pytest.raises(RecordError, match="HZ 0"):
        table.options(3)


def test_first_owner_wins_and_comm_is_cut_at_nul() -> None:
    data = b"".join(OWNER_REC.pack(ino, pid, fd, comm) for ino, pid, fd, comm in [
        (9, 100, 3, b"nginx\0garbage\0\0\0"), (9, 200, 4, b"worker"), (8, 300, 5, b"\xffx"),
    ])  # fmt: skip
    owners = OwnerTable(data)
    assert owners.get(9) == OwnerRecord(100, 3, "nginx")
    assert owners.get(8) == OwnerRecord(300, 5, "\ufffdx")
    with pytest.raises(RecordError):
        OwnerTable(data[:-1])
