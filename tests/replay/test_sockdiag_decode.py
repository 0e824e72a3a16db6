"""sockdiag: recorded kernel dumps replayed through decode and dump, crafted messages, requests.

The recorded dumps under tests/data/ come from tests/record_dump.py (a fresh network namespace
with known loopback connections); re-record them with ``python tests/record_dump.py``.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import Any

import pytest
from helpers import (
    diag_message,
    dump_files,
    fd_inode,
    load_datagrams,
    load_expected,
    nlmsg,
    rtattr,
    sock_from_json,
    sock_to_json,
    tcp_info,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from auditd.errors import KernelError
from auditd.kernel import sockdiag
from auditd.kernel.sockdiag import (
    DEFAULT_STATES,
    INET_DIAG_INFO,
    NLM_F_DUMP_INTR,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_NOOP,
    SOCK_DIAG_BY_FAMILY,
    DumpStats,
    build_request,
    decode,
)
from auditd.model import Sock, TcpState, TimerKind

RECORDED = "loopback"


def decode_all(chunks: list[bytes], stats: DumpStats | None = None) -> list[Sock]:
    stats = stats if stats is not None else DumpStats()
    return [sock for chunk in chunks for sock in decode(chunk, stats)]


def one(chunk: bytes) -> tuple[list[Sock], DumpStats]:
    stats = DumpStats()
    return list(decode(chunk, stats)), stats


# --- recorded dumps ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded() -> tuple[list[bytes], dict[str, Any]]:
    if not dump_files(RECORDED):
        pytest.fail("tests/data/loopback.*.bin missing: run python tests/record_dump.py")
    return load_datagrams(RECORDED), load_expected(RECORDED)


def test_recorded_dump_decodes_to_the_recorded_records(
    recorded: tuple[list[bytes], dict[str, Any]],
) -> None:
    chunks, expected = recorded
    stats = DumpStats()
    assert decode_all(chunks, stats) == [sock_from_json(r) for r in expected["records"]]
    assert {
        "messages": stats.messages,
        "skipped": stats.skipped,
        "truncated": stats.truncated,
        "interrupted": stats.interrupted,
        "done": stats.done,
    } == expected["stats"]
    assert stats.done == 2  # one NLMSG_DONE per family


def test_recorded_dump_matches_what_the_socket_api_said(
    recorded: tuple[list[bytes], dict[str, Any]],
) -> None:
    """The facts were taken from getsockname/fstat, not from the decoder."""
    chunks, expected = recorded
    by_inode = {s.inode: s for s in decode_all(chunks)}
    for fact in expected["facts"]:
        sock = by_inode[fact["inode"]]
        assert sock.family == fact["family"], fact["name"]
        assert sock.state == fact["state"], fact["name"]
        assert (sock.sport, sock.dport) == (fact["sport"], fact["dport"]), fact["name"]
        assert sock.local_ip == ipaddress.ip_address(fact["local_addr"]), fact["name"]
        assert sock.remote_ip == ipaddress.ip_address(fact["remote_addr"]), fact["name"]
        assert sock.has_info, fact["name"]
        if "timer" in fact:
            assert sock.timer == fact["timer"], fact["name"]
        if "rqueue" in fact:
            assert sock.rqueue == fact["rqueue"], fact["name"]


def test_recorded_dump_details(recorded: tuple[list[bytes], dict[str, Any]]) -> None:
    chunks, expected = recorded
    socks = decode_all(chunks)
    facts = {f["name"]: f for f in expected["facts"]}
    by_inode = {s.inode: s for s in socks}

    ka = by_inode[facts["v4_keepalive_client"]["inode"]]
    assert ka.timer == TimerKind.KEEPALIVE and ka.retrans == 0
    assert (expected["keepidle"] - 10) * 1000 < ka.expires_ms <= expected["keepidle"] * 1000

    v6 = by_inode[facts["v6_client"]["inode"]]
    assert v6.family == socket.AF_INET6 and len(v6.src) == 16
    assert v6.local == f"[::1]:{v6.sport}"

    v4 = by_inode[facts["v4_client"]["inode"]]
    assert len(v4.src) == 4 and v4.local == f"127.0.0.1:{v4.sport}"

    mapped = by_inode[facts["mapped_server"]["inode"]]
    assert mapped.family == socket.AF_INET6
    assert mapped.remote_ip.ipv4_mapped == ipaddress.IPv4Address("127.0.0.1")  # type: ignore[union-attr]
    assert mapped.remote.startswith("[::ffff:") and mapped.remote.endswith(f"]:{mapped.dport}")

    unread = by_inode[facts["v4_unread_server"]["inode"]]
    assert unread.rqueue == expected["queued"] and unread.timer == TimerKind.NONE

    assert by_inode[facts["close_wait_server"]["inode"]].state == TcpState.CLOSE_WAIT
    assert by_inode[facts["fin_wait2_client"]["inode"]].state == TcpState.FIN_WAIT2
    assert all(s.state != TcpState.LISTEN for s in socks)  # listeners are not asked for


# --- dump() and fetch_raw() over an injected socket ----------------------------------------


class ReplaySocket:
    """Stands in for the netlink socket: records requests, replays datagrams."""

    def __init__(
        self,
        datagrams: list[bytes],
        recv_error: OSError | None = None,
        send_error: OSError | None = None,
        flags: int = 0,
    ) -> None:
        self.datagrams = list(datagrams)
        self.recv_error = recv_error
        self.send_error = send_error
        self.flags = flags
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> int:
        if self.send_error is not None:
            raise self.send_error
        self.sent.append(bytes(data))
        return len(data)

    def recvmsg_into(self, buffers: list[memoryview]) -> tuple[int, list[Any], int, Any]:
        if self.recv_error is not None:
            raise self.recv_error
        if not self.datagrams:
            return 0, [], 0, None
        chunk = self.datagrams.pop(0)
        buffers[0][: len(chunk)] = chunk
        return len(chunk), [], self.flags, None

    def close(self) -> None:
        self.closed = True


def factory_for(fake: ReplaySocket) -> Any:
    return lambda: fake


def test_dump_replays_a_recorded_dump(recorded: tuple[list[bytes], dict[str, Any]]) -> None:
    chunks, expected = recorded
    fake = ReplaySocket(chunks)
    stats = DumpStats()
    socks = list(sockdiag.dump(stats, factory=factory_for(fake)))
    assert socks == [sock_from_json(r) for r in expected["records"]]
    assert stats.done == 2 and not stats.truncated
    assert fake.sent == [
        build_request(socket.AF_INET, list(DEFAULT_STATES), 1),
        build_request(socket.AF_INET6, list(DEFAULT_STATES), 2),
    ]
    assert fake.closed and not fake.datagrams


def test_fetch_raw_returns_the_datagrams(recorded: tuple[list[bytes], dict[str, Any]]) -> None:
    chunks, _ = recorded
    fake = ReplaySocket(chunks)
    assert sockdiag.fetch_raw(factory=factory_for(fake)) == chunks
    assert fake.closed


def test_dump_enobufs_is_a_kernel_error() -> None:
    fake = ReplaySocket([], recv_error=OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS)))
    with pytest.raises(KernelError, match="sock_diag dump failed: No buffer space available"):
        list(sockdiag.dump(DumpStats(), factory=factory_for(fake)))
    assert fake.closed


def test_dump_truncated_datagram_is_a_kernel_error() -> None:
    fake = ReplaySocket([nlmsg(NLMSG_DONE, bytes(4))], flags=socket.MSG_TRUNC)
    with pytest.raises(KernelError, match="larger than the receive buffer"):
        list(sockdiag.dump(DumpStats(), factory=factory_for(fake)))


def test_dump_send_failure_is_a_kernel_error() -> None:
    fake = ReplaySocket([], send_error=OSError(errno.EPERM, os.strerror(errno.EPERM)))
    with pytest.raises(KernelError, match="request failed: Operation not permitted"):
        list(sockdiag.dump(DumpStats(), factory=factory_for(fake)))
    assert fake.closed


def test_dump_cannot_open_is_a_kernel_error() -> None:
    def refuse() -> socket.socket:
        raise OSError(errno.EPROTONOSUPPORT, os.strerror(errno.EPROTONOSUPPORT))

    with pytest.raises(KernelError, match="cannot open a sock_diag netlink socket"):
        list(sockdiag.dump(DumpStats(), factory=refuse))


def test_dump_stops_on_end_of_stream() -> None:
    """A socket that returns nothing before NLMSG_DONE: truncated, not an endless loop."""
    fake = ReplaySocket([diag_message(info=tcp_info())])
    stats = DumpStats()
    assert (
        len(list(sockdiag.dump(stats, families=(socket.AF_INET,), factory=factory_for(fake)))) == 1
    )
    assert stats.truncated and stats.done == 0


def test_dump_nlmsg_error_is_a_kernel_error() -> None:
    fake = ReplaySocket([nlmsg(NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + bytes(16))])
    with pytest.raises(KernelError, match="Operation not permitted"):
        list(sockdiag.dump(DumpStats(), factory=factory_for(fake)))
    assert fake.closed


# --- crafted messages ----------------------------------------------------------------------


def test_full_message_fields() -> None:
    info = tcp_info(retransmits=2, probes=3, backoff=4, rto=1_600_000, unacked=5,
                    last_data_sent=11, last_data_recv=22, last_ack_recv=33, rtt=44,
                    total_retrans=55)  # fmt: skip
    chunk = diag_message(info=info, timer=1, retrans=7, sport=443, dport=51000, expires=900,
                         rqueue=10, wqueue=20, uid=1001, inode=777)  # fmt: skip
    (sock,), stats = one(chunk)
    assert sock_to_json(sock) == {
        "family": socket.AF_INET, "state": TcpState.ESTABLISHED, "timer": 1, "retrans": 7,
        "sport": 443, "dport": 51000, "src": "c0000201", "dst": "c6336407",
        "expires_ms": 900, "rqueue": 10, "wqueue": 20, "uid": 1001, "inode": 777,
        "has_info": True, "ca_retransmits": 2, "probes": 3, "backoff": 4, "rto_us": 1_600_000,
        "unacked": 5, "last_data_sent_ms": 11, "last_data_recv_ms": 22, "last_ack_recv_ms": 33,
        "rtt_us": 44, "total_retrans": 55,
    }  # fmt: skip
    assert sock.local == "192.0.2.1:443" and sock.remote == "198.51.100.7:51000"
    assert stats.messages == 1 and stats.skipped == 0 and not stats.truncated


def test_ipv6_addresses_keep_16_bytes() -> None:
    chunk = diag_message(info=tcp_info(), family=socket.AF_INET6, src="2001:db8::1",
                         dst="::ffff:192.0.2.9", sport=8443, dport=40000)  # fmt: skip
    (sock,), _ = one(chunk)
    assert sock.local == "[2001:db8::1]:8443"
    # Python < 3.13 prints a mapped address as ::ffff:c000:209, later ones as ::ffff:192.0.2.9.
    assert sock.remote in ("[::ffff:c000:209]:40000", "[::ffff:192.0.2.9]:40000")


def test_longer_tcp_info_of_a_newer_kernel_is_cut() -> None:
    info = tcp_info(last_data_recv=5000, total_retrans=9) + b"\xff" * 180
    (sock,), stats = one(diag_message(info=info))
    assert sock.last_data_recv_ms == 5000 and sock.total_retrans == 9 and stats.skipped == 0


def test_short_tcp_info_of_an_older_kernel_is_zero_padded() -> None:
    # 60 bytes: the struct up to tcpi_last_ack_recv; rtt and total_retrans are missing.
    full = tcp_info(rto=400_000, unacked=2, last_data_recv=1234, last_ack_recv=1200,
                    rtt=999, total_retrans=8)  # fmt: skip
    (sock,), stats = one(diag_message(info=full[:60]))
    assert sock.has_info
    assert (sock.rto_us, sock.unacked, sock.last_data_recv_ms, sock.last_ack_recv_ms) == (
        400_000, 2, 1234, 1200,
    )  # fmt: skip
    assert (sock.rtt_us, sock.total_retrans) == (0, 0)
    assert stats.skipped == 0


def test_tiny_tcp_info_is_zero_padded_too() -> None:
    (sock,), _ = one(diag_message(info=bytes([1, 0, 3, 4, 5])))
    assert (sock.ca_retransmits, sock.probes, sock.backoff, sock.rto_us) == (3, 4, 5, 0)


def test_message_without_tcp_info() -> None:
    (sock,), stats = one(diag_message(info=None, state=TcpState.SYN_RECV, inode=0))
    assert not sock.has_info
    assert (sock.rto_us, sock.last_data_recv_ms, sock.total_retrans) == (0, 0, 0)
    assert stats.skipped == 0


def test_tcp_info_after_other_attributes() -> None:
    # As root the kernel adds INET_DIAG_MARK (15) and others before INET_DIAG_INFO.
    extra = rtattr(15, bytes(4)) + rtattr(5, b"\x00")  # MARK, then TOS with a padded payload
    (sock,), stats = one(diag_message(info=tcp_info(last_data_recv=77), extra_attrs=extra))
    assert sock.has_info and sock.last_data_recv_ms == 77 and stats.skipped == 0


def test_messages_with_different_attribute_layouts_in_one_datagram() -> None:
    # Full sockets (MARK before INFO, as for a privileged dump), a SYN_RECV mini socket with
    # no attributes, and a socket with INFO first: each decoded by its own attributes.
    mark = rtattr(15, bytes(4))
    chunk = (
        diag_message(info=tcp_info(rto=300_000, last_data_recv=1), extra_attrs=mark, inode=1)
        + diag_message(info=None, state=TcpState.SYN_RECV, inode=2)
        + diag_message(info=tcp_info(rto=400_000, last_data_recv=3), extra_attrs=mark, inode=3)
        + diag_message(info=tcp_info(rto=500_000, last_data_recv=4) + bytes(160), inode=4)
        + diag_message(info=tcp_info(rto=600_000, last_data_recv=5)[:60], extra_attrs=mark, inode=5)
    )
    socks, stats = one(chunk)
    assert [(s.inode, s.has_info, s.rto_us, s.last_data_recv_ms) for s in socks] == [
        (1, True, 300_000, 1),
        (2, False, 0, 0),
        (3, True, 400_000, 3),
        (4, True, 500_000, 4),
        (5, True, 600_000, 5),
    ]
    assert stats.skipped == 0


def test_info_offset_shifted_by_a_pad_attribute() -> None:
    pad = rtattr(14, b"")  # INET_DIAG_PAD, 4 bytes
    first = diag_message(info=tcp_info() + bytes(160), extra_attrs=pad, inode=1)
    lossy = tcp_info(state=1, ca_state=4, retransmits=2, rto=3_200_000, last_data_recv=999)
    second = diag_message(info=lossy + bytes(160), inode=2)
    socks, _ = one(first + second)
    assert (socks[1].rto_us, socks[1].ca_retransmits, socks[1].last_data_recv_ms) == (
        3_200_000,
        2,
        999,
    )


def _variants() -> list[bytes]:
    """Messages of several layouts: runs of one layout are decoded together (sockdiag's
    ``_run_length``), and each of these must end a run of another where it starts."""
    pad, mark = rtattr(14, b""), rtattr(15, bytes(4))
    info = tcp_info(rto=300_000, last_data_recv=7, last_ack_recv=9) + bytes(160)
    other_type = bytearray(diag_message(info=info, inode=9))
    struct.pack_into("=H", other_type, 4, 99)  # a diag message's length, a type never asked for
    return [
        diag_message(info=info, inode=1, sport=1),
        diag_message(info=tcp_info(rto=1, probes=2) + bytes(160), inode=2, timer=2, retrans=1),
        diag_message(info=info, inode=3, flags=0x2 | NLM_F_DUMP_INTR),  # flags differ
        diag_message(info=info[:-4], extra_attrs=pad, inode=4),  # same length, INFO later
        diag_message(info=info, extra_attrs=mark, inode=5),  # longer
        diag_message(info=None, state=TcpState.SYN_RECV, inode=6),
        diag_message(info=info[:60], inode=7),  # short tcp_info
        diag_message(
            info=info, inode=8, family=socket.AF_INET6, src="2001:db8::1", dst="2001:db8::2"
        ),
        nlmsg(NLMSG_NOOP, b""),
        bytes(other_type),
    ]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 9), max_size=40), st.booleans())
def test_runs_decode_as_message_by_message(picks: list[int], done: bool) -> None:
    variants = _variants()
    messages = [variants[i] for i in picks] + ([nlmsg(NLMSG_DONE, bytes(4))] if done else [])
    together, stats = one(b"".join(messages))
    alone = DumpStats()
    assert together == [sock for m in messages for sock in decode(m, alone)]
    assert stats == alone


def test_a_run_of_one_layout_ends_where_the_info_attribute_moves() -> None:
    info = tcp_info(last_data_recv=5) + bytes(160)
    same = [diag_message(info=info, inode=i) for i in range(6)]
    moved = diag_message(info=tcp_info(last_data_recv=6) + bytes(156),
                         extra_attrs=rtattr(14, b""), inode=6)  # fmt: skip
    assert len(moved) == len(same[0])
    socks, stats = one(b"".join([*same, moved, *same]))
    assert [(s.inode, s.last_data_recv_ms) for s in socks] == [
        *((i, 5) for i in range(6)),
        (6, 6),
        *((i, 5) for i in range(6)),
    ]
    assert (stats.messages, stats.skipped) == (13, 0)


@pytest.mark.parametrize("bad_len", [0, 3, 4096])
def test_attribute_with_a_bad_length_is_skipped(bad_len: int) -> None:
    bad = rtattr(15, bytes(4), length=bad_len)
    (sock,), stats = one(diag_message(info=tcp_info(last_data_recv=77), extra_attrs=bad))
    assert stats.skipped == 1
    assert not sock.has_info  # the attributes after the bad one are not trusted
    assert sock.inode == 4242  # the socket itself is still reported


def test_nlmsg_error_eperm_raises_a_clear_kernel_error() -> None:
    chunk = diag_message(info=tcp_info()) + nlmsg(
        NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + bytes(16)
    )
    stats = DumpStats()
    it = decode(chunk, stats)
    assert next(it).inode == 4242  # sockets before the error are delivered
    with pytest.raises(KernelError) as err:
        next(it)
    assert str(err.value) == "sock_diag dump failed: Operation not permitted (errno 1)"


def test_nlmsg_error_without_a_code_is_eio() -> None:
    with pytest.raises(KernelError, match=r"errno 5\)"):
        one(nlmsg(NLMSG_ERROR, b""))


def test_nlmsg_error_zero_is_an_ack_and_ignored() -> None:
    socks, stats = one(nlmsg(NLMSG_ERROR, bytes(20)) + diag_message(info=tcp_info()))
    assert len(socks) == 1 and stats.skipped == 0


def test_truncated_message_sets_truncated_and_stops() -> None:
    first = diag_message(info=tcp_info(), inode=1)
    second = diag_message(info=tcp_info(), inode=2)
    socks, stats = one(first + second[:-40])
    assert [s.inode for s in socks] == [1]
    assert stats.truncated and stats.messages == 1


def test_header_length_below_minimum_sets_truncated() -> None:
    socks, stats = one(nlmsg(SOCK_DIAG_BY_FAMILY, bytes(72), length=8) + diag_message())
    assert socks == [] and stats.truncated


def test_too_short_diag_message_is_skipped() -> None:
    short = nlmsg(SOCK_DIAG_BY_FAMILY, bytes(40))
    socks, stats = one(short + diag_message(info=tcp_info(), inode=9))
    assert [s.inode for s in socks] == [9] and stats.skipped == 1


def test_unknown_message_types_are_skipped_noop_is_not_counted() -> None:
    chunk = (
        nlmsg(99, b"whatever")
        + nlmsg(NLMSG_NOOP, b"")
        + diag_message(info=tcp_info(), inode=3)
        + nlmsg(NLMSG_DONE, bytes(4))
    )
    socks, stats = one(chunk)
    assert [s.inode for s in socks] == [3]
    assert (stats.messages, stats.skipped, stats.done) == (4, 1, 1)


def test_dump_intr_sets_interrupted() -> None:
    socks, stats = one(diag_message(info=tcp_info(), flags=0x2 | NLM_F_DUMP_INTR))
    assert len(socks) == 1 and stats.interrupted
    _, clean = one(diag_message(info=tcp_info()))
    assert not clean.interrupted


def test_done_counts_per_family() -> None:
    _, stats = one(nlmsg(NLMSG_DONE, bytes(4)) + nlmsg(NLMSG_DONE, bytes(4)))
    assert stats.done == 2


def test_trailing_garbage_shorter_than_a_header_is_ignored() -> None:
    socks, stats = one(diag_message(info=tcp_info()) + bytes(8))
    assert len(socks) == 1 and not stats.truncated


# --- the request ---------------------------------------------------------------------------


def test_build_request_layout() -> None:
    req = build_request(socket.AF_INET6, [TcpState.ESTABLISHED, TcpState.CLOSE_WAIT], 7)
    assert len(req) == 72  # nlmsghdr 16 + inet_diag_req_v2 56
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert (length, mtype, flags, seq, pid) == (72, SOCK_DIAG_BY_FAMILY, 0x301, 7, 0)
    family, proto, ext, pad, states = struct.unpack_from("=BBBBI", req, 16)
    assert (family, proto, pad) == (socket.AF_INET6, socket.IPPROTO_TCP, 0)
    assert ext == 1 << (INET_DIAG_INFO - 1) == 2  # only tcp_info is asked for
    assert states == (1 << 1) | (1 << 8)
    assert req[24:] == bytes(48)  # inet_diag_sockid: no filter


def test_default_states_leave_out_listen_and_time_wait() -> None:
    _, _, _, _, states = struct.unpack_from("=BBBBI", build_request(2, DEFAULT_STATES, 1), 16)
    assert not states & (1 << TcpState.LISTEN)
    assert not states & (1 << TcpState.TIME_WAIT)
    assert states & (1 << TcpState.ESTABLISHED) and states & (1 << TcpState.CLOSE_WAIT)


# --- live ------------------------------------------------------------------------------------


def test_live_dump_sees_a_keepalive_socket_of_this_process() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    try:
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        try:
            try:
                socks = list(sockdiag.dump(DumpStats(), families=(socket.AF_INET,)))
            except KernelError as exc:
                pytest.skip(f"no sock_diag here: {exc}")
            by_inode = {s.inode: s for s in socks}
            mine = by_inode[fd_inode(client)]
            assert mine.timer == TimerKind.KEEPALIVE and mine.state == TcpState.ESTABLISHED
            assert mine.sport == client.getsockname()[1]
            assert by_inode[fd_inode(server)].timer == TimerKind.NONE
        finally:
            server.close()
    finally:
        client.close()
        listener.close()
