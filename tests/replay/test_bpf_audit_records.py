"""Decoding the audit pass (audit.bpf.c): a recorded pass (tests/record_bpf_audit.py)
against what sock_diag and getsockopt said about the same sockets, and the edge cases on
hand-made output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import sysctls

from auditd.audit.kernelpass import cadence_min
from auditd.kernel.bpf.records import (
    AGG_MAGIC,
    AUDIT_AGG,
    AUDIT_REC,
    REC_KEPT,
    REC_READ,
    AuditParams,
    RecordError,
    decode_audit,
)
from auditd.model import Sock, SocketOptions

DATA = Path(__file__).parent.parent / "data" / "bpf"
AGES = ("expires_ms", "last_data_sent_ms", "last_data_recv_ms", "last_ack_recv_ms")


@pytest.fixture(scope="module")
def mix() -> dict[str, Any]:
    return json.loads((DATA / "mix.audit.json").read_text())  # type: ignore[no-any-return]


def _value(raw: object) -> object:
    return bytes.fromhex(raw) if isinstance(raw, str) else raw


def test_recorded_pass_decodes_to_sock_diag_fields(mix: dict[str, Any]) -> None:
    out = decode_audit((DATA / "mix.audit.bin").read_bytes())
    s = mix["sysctls"]
    ns = sysctls(
        tcp_keepalive_time=s["net.ipv4.tcp_keepalive_time"],
        tcp_keepalive_intvl=s["net.ipv4.tcp_keepalive_intvl"],
        tcp_keepalive_probes=s["net.ipv4.tcp_keepalive_probes"],
    )
    assert out.records and out.aggregates.handed == len(out.records)
    assert out.aggregates.total == len(mix["before"])
    for rec in out.records:
        key = str(rec.sock.inode)
        before, after = mix["before"][key], mix["after"][key]
        for name in Sock._fields:
            got = getattr(rec.sock, name)
            lo, hi = _value(before[name]), _value(after[name])
            if name in AGES:
                assert isinstance(lo, int) and isinstance(hi, int), name
                assert min(lo, hi) - 8 <= got <= max(lo, hi) + 8, name
            elif name not in ("retrans", "backoff", "rto_us", "total_retrans", "probes",
                              "ca_retransmits"):  # fmt: skip
                assert got in (lo, hi), (name, got, lo, hi)
        assert rec.flags & REC_READ
        assert rec.options(ns) == SocketOptions._make([*mix["options"][key], "bpf"])
    assert any(r.flags & REC_KEPT for r in out.records)
    assert sum(out.aggregates.counts) == out.aggregates.total


def _agg(handed: int, magic: int = AGG_MAGIC) -> bytes:
    return AUDIT_AGG.pack(magic, 0, 0, 0, *([0] * 48), *([0] * 30), 0, handed, 0, 0)


def test_output_that_is_not_a_pass_is_refused() -> None:
    with pytest.raises(RecordError):
        decode_audit(b"")
    with pytest.raises(RecordError):
        decode_audit(_agg(0, magic=1))
    with pytest.raises(RecordError):
        decode_audit(b"\0" * 8 + _agg(0))
    with pytest.raises(RecordError):  # one record announced, none there
        decode_audit(_agg(1))
    rec = bytearray(AUDIT_REC.size)  # HZ 0: not a record the kernel writes
    with pytest.raises(RecordError):
        decode_audit(bytes(rec) + _agg(1))
    assert decode_audit(_agg(0)).records == []


def test_params_pack_clamps_and_checks() -> None:
    p = AuditParams(-5, 2**70, 10, 3, cadence_min(300.0), 7200, 75, 9, (1,) * 9, True, False)
    assert len(p.pack()) == 88
    with pytest.raises(RecordError):
        AuditParams(0, 0, 0, 0, 0, 0, 0, 0, (1, 2), False, False).pack()
    assert cadence_min(300.0) == 301 and cadence_min(299.5) == 300
    assert cadence_min(float("inf")) == 0xFFFFFFFF
