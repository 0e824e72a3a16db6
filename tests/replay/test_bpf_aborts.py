"""The BPF abort program's records without a kernel: recorded bytes (tests/record_bpf_aborts.py)
decoded and held to what the recorder did, then through the pipeline to AbortRecords."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest

from auditd.abort_records import UNKNOWN
from auditd.aborts import Reason, from_bpf
from auditd.events import AbortPipeline, NetnsNames
from auditd.kernel.events import Batch
from auditd.kernel.events.bpfabort import RECORD_SIZE, BpfAbort, decode
from auditd.model import Finding, FindingKind, Severity
from auditd.results import AuditResult

DATA = Path(__file__).parent.parent / "data" / "events" / "bpf"
DEFAULTS = (7200, 75, 9)  # a new namespace's keepalive sysctls


def recorded() -> list[bytes]:
    data, out, pos = (DATA / "aborts.bin").read_bytes(), [], 0
    while pos < len(data):
        (size,) = struct.unpack_from("=I", data, pos)
        out.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return out


def cases() -> dict[str | None, dict[str, Any]]:
    return {c["reason"]: c for c in json.loads((DATA / "expected.json").read_text())["cases"]}


def decoded() -> dict[str | None, BpfAbort]:
    by_ends = {(c["local"], c["remote"]): reason for reason, c in cases().items()}
    out = {}
    for data in recorded():
        rec = decode(data)
        assert rec is not None
        out[by_ends[(rec.local, rec.remote)]] = rec
    return out


def test_each_abort_has_one_record_and_a_normal_close_none() -> None:
    assert all(len(data) == RECORD_SIZE for data in recorded())
    assert sorted(decoded(), key=str) == sorted(
        ["keepalive_timeout", "retransmit_timeout", "user_timeout", "peer_reset"]
    )


@pytest.mark.parametrize("reason", ["keepalive_timeout", "retransmit_timeout", "user_timeout",
                                    "peer_reset"])  # fmt: skip
def test_records_say_what_was_done_to_the_socket(reason: str) -> None:
    rec, case = decoded()[reason], cases()[reason]
    opts = case["set"]
    assert rec.netns_inode == case["netns_inode"]
    assert rec.cookie > 0 and rec.inode is not None and rec.inode > 0  # the fd was still open
    assert rec.error == (104 if reason == "peer_reset" else 110)
    assert rec.keepalive_rst == (reason == "keepalive_timeout")
    assert rec.peer_rst == (reason == "peer_reset")
    assert rec.oldstate == 1  # ESTABLISHED
    o = rec.options
    assert o.source == "kernel" and o.keepalive == bool(opts.get("SO_KEEPALIVE", 0))
    assert (o.idle, o.intvl, o.cnt) == (
        opts.get("TCP_KEEPIDLE", DEFAULTS[0]), opts.get("TCP_KEEPINTVL", DEFAULTS[1]),
        opts.get("TCP_KEEPCNT", DEFAULTS[2]),
    )  # fmt: skip
    assert o.user_timeout_ms == opts.get("TCP_USER_TIMEOUT", 0)
    if reason == "keepalive_timeout":
        assert rec.probes == opts["TCP_KEEPCNT"] and rec.retransmits == 0
    if reason in ("retransmit_timeout", "user_timeout"):
        assert rec.retransmits >= 3 and rec.probes == 0


def test_short_or_foreign_bytes_decode_to_nothing() -> None:
    good = recorded()[0]
    assert decode(good[:-1]) is None
    assert decode(b"") is None
    family = struct.calcsize("=QQQIi7I")
    assert decode(good[:family] + b"\x07\x00" + good[family + 2 :]) is None  # no such family
    rng = random.Random(13)
    for _ in range(2000):
        decode(bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 50, 104, 200)))))


def finding(rec: BpfAbort, local: str = "10.9.9.9:1") -> Finding:
    """A finding for the socket of ``rec`` (by inode) whose 4-tuple says otherwise."""
    return Finding(FindingKind.KEEPALIVE_PROBING, Severity.WARNING, "db", "kaud-a", "m", "h",
                   local=local, remote="10.9.9.9:2", pid=7, process="psql",
                   inode=rec.inode)  # fmt: skip


class NoOptions:
    def read(self, pid: int, inode: int) -> None:
        raise AssertionError("BPF aborts carry their settings: no fd is read")


def pipeline(names: dict[int, str]) -> AbortPipeline:
    return AbortPipeline(options=NoOptions(), netns=NetnsNames(lambda: names))  # type: ignore[arg-type]


def test_the_pipeline_matches_by_inode_and_names_the_namespace() -> None:
    recs = decoded()
    ka, rst = recs["keepalive_timeout"], recs["peer_reset"]
    p = pipeline({ka.netns_inode: "pod:1234"})
    p.index.update(AuditResult(ka.time_ns / 1e9 - 5, 0.5, (), (finding(ka),)))
    records = p.records(Batch((), 0, (ka, rst)), 0.0)
    by_reason = {r.reason: r for r in records}
    k = by_reason[Reason.KEEPALIVE_TIMEOUT]
    assert k.predicted and k.netns == "kaud-a" and k.rule == "db" and k.pid == 7
    assert (k.local, k.remote) == (ka.local, ka.remote)  # the abort's own 4-tuple
    assert k.settings == "kernel" and (k.keepidle, k.keepintvl, k.keepcnt) == (1, 1, 2)
    assert k.probes == 2 and k.cookie == ka.cookie and k.reported_seconds_before == 5.0
    r = by_reason[Reason.PEER_RESET]
    assert not r.predicted and r.rule == UNKNOWN and r.netns == "pod:1234"
    assert r.settings == "kernel" and r.keepidle == 7200 and r.errno == 104


def test_an_unknown_namespace_is_named_by_its_inode() -> None:
    rec = decoded()["retransmit_timeout"]
    (record,) = pipeline({}).records(Batch((), 0, (rec,)), 0.0)
    assert record.netns == f"netns:{rec.netns_inode}" and record.reason is Reason.RETRANSMIT_TIMEOUT


def test_the_same_addresses_in_another_namespace_are_no_match() -> None:
    rec = decoded()["user_timeout"]
    p = pipeline({rec.netns_inode: "container:abc"})
    other = Finding(FindingKind.RETRANSMITTING, Severity.WARNING, "db", "host", "m", "h",
                    local=rec.local, remote=rec.remote, inode=1)  # fmt: skip
    p.index.update(AuditResult(rec.time_ns / 1e9 - 5, 0.5, (), (other,)))
    (record,) = p.records(Batch((), 0, (rec,)), 0.0)
    assert not record.predicted and record.netns == "container:abc"
    assert record.reason is Reason.USER_TIMEOUT and record.user_timeout_ms == 2000


def test_from_bpf_keeps_the_socket_s_view() -> None:
    rec = decoded()["retransmit_timeout"]
    abort = from_bpf(rec)
    assert abort.evidence and abort.retransmits == rec.retransmits and abort.inode == rec.inode
    assert abort.options == rec.options and abort.netns_inode == rec.netns_inode
