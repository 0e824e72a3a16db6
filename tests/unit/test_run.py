"""The audit pipeline over a fake kernel: counting, attribution budget, transient retries."""

from __future__ import annotations

import errno
from collections.abc import Collection, Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
from helpers import DEFAULT_SYSCTLS, FakeKernel
from hypothesis import given, settings
from hypothesis import strategies as st

from auditd.audit.inference import keepalive_status
from auditd.audit.run import (
    ATTRIBUTION_MIN_SECONDS,
    ONE_SHOT_ATTRIBUTION_CAP_SECONDS,
    _Judged,
    audit,
    audit_namespace,
)
from auditd.audit.verdicts import socket_findings
from auditd.config import RuleSet, Thresholds
from auditd.errors import KernelError
from auditd.kernel import DumpStats, OwnerScan
from auditd.kernel.inspect import InspectScan, Target
from auditd.model import (
    Finding,
    ProcessInfo,
    Sock,
    SocketOptions,
    Sysctls,
    TimerKind,
    make_sock,
    state_label,
)
from auditd.results import attribution_note

IDLE = make_sock(sport=40000, dport=5432, inode=11, last_data_recv_ms=400_000,
                 last_ack_recv_ms=400_000, last_data_sent_ms=400_000)  # fmt: skip
BUSY = make_sock(sport=40001, dport=80, inode=12, timer=TimerKind.RETRANSMIT, retrans=1)
KEEPALIVE = make_sock(sport=40002, dport=80, inode=13, timer=TimerKind.KEEPALIVE,
                      expires_ms=60_000)  # fmt: skip


class FlakyKernel(FakeKernel):
    """Fails the first dump with ``code`` part-way through, then behaves."""

    def __init__(self, code: int) -> None:
        super().__init__([IDLE, BUSY, KEEPALIVE], owners={11: ProcessInfo(7, "psql")})
        self.code = code
        self.dumps = 0

    def sockets(self, stats: DumpStats) -> Iterator:  # type: ignore[type-arg]
        self.dumps += 1
        if self.dumps == 1:
            yield self.socks[0]
            raise KernelError("sock_diag dump failed: No buffer space available", self.code)
        yield from super().sockets(stats)


def test_counts_and_attribution() -> None:
    kernel = FakeKernel([IDLE, BUSY, KEEPALIVE], owners={11: ProcessInfo(7, "psql")})
    report, findings = audit_namespace(RuleSet(), kernel)
    assert report.sockets == 3
    assert report.connections == {("established", "off"): 1, ("established", "unknown"): 1,
                                  ("established", "on"): 1}  # fmt: skip
    assert kernel.owner_queries == [[11]]  # only the flagged socket is attributed
    assert (report.attribution_wanted, report.attribution_found) == (1, 1)
    assert report.attribution_complete
    idle = [f for f in findings if f.kind == "idle_no_keepalive"]
    assert len(idle) == 1 and idle[0].pid == 7 and idle[0].severity.label == "critical"


def test_transient_dump_error_is_retried_once() -> None:
    kernel = FlakyKernel(errno.ENOBUFS)
    result = audit(RuleSet(), [("host", kernel)])
    assert kernel.dumps == 2
    assert result.namespaces[0].sockets == 3  # the partial first dump is not counted


def test_permanent_dump_error_propagates() -> None:
    kernel = FlakyKernel(errno.EPERM)
    with pytest.raises(KernelError, match="No buffer space"):
        audit(RuleSet(), [("host", kernel)])
    assert kernel.dumps == 1


class SlowOwners(FakeKernel):
    def __init__(self) -> None:
        super().__init__([IDLE])
        self.deadlines: list[float | None] = []

    def owners(self, inodes: Collection[int], deadline: float | None = None) -> OwnerScan:
        self.deadlines.append(deadline)
        return OwnerScan({}, complete=False)


def test_attribution_gets_a_budget_relative_to_the_dump() -> None:
    kernel = SlowOwners()
    clock = iter([100.0, 110.0, 110.0])  # dump starts, dump ends (10 s), budget starts
    report, findings = audit_namespace(
        RuleSet(defaults=Thresholds()), kernel, monotonic=lambda: next(clock)
    )
    assert kernel.deadlines == [110.0 + 0.3 * 10.0]
    assert not report.attribution_complete and report.attribution_found == 0
    assert findings[0].pid is None  # unattributed, still reported
    assert ATTRIBUTION_MIN_SECONDS > 0


# The per-socket pass inlines keepalive_status / path_idle_ms / could_flag for speed: it must
# count exactly as they do and keep every socket socket_findings would flag.
_ms = st.integers(min_value=0, max_value=10_000_000)
_socks = st.builds(
    lambda state, timer, retrans, expires, sent, recv, ack, inode: make_sock(
        state=state,
        timer=timer,
        retrans=retrans,
        expires_ms=expires,
        last_data_sent_ms=sent,
        last_data_recv_ms=recv,
        last_ack_recv_ms=ack,
        inode=inode,
        sport=inode % 60000,
    ),
    st.sampled_from([1, 1, 1, 2, 4, 5, 8, 8, 9]),
    st.sampled_from([0, 0, 1, 2, 2, 3, 4, 5, 9]),
    st.integers(min_value=0, max_value=20),
    _ms,
    _ms,
    _ms,
    _ms,
    st.integers(min_value=1, max_value=10**9),
)
_thresholds = st.builds(
    Thresholds,
    idle_timeout=st.sampled_from([0.001, 1.0, 2.5, 350.0, 7200.0]),
    warn_at=st.sampled_from([0.1, 0.5, 0.999, 1.0]),
    close_wait_after=st.sampled_from([0.0, 0.5, 60.0]),
    retransmit_threshold=st.integers(min_value=1, max_value=8),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_socks, max_size=30), _thresholds)
def test_fast_pass_matches_the_reference_functions(socks: list, t: Thresholds) -> None:  # type: ignore[type-arg]
    rules = RuleSet(defaults=t)
    report, findings = audit_namespace(rules, FakeKernel(socks))
    expected: list[Finding] = []
    counts: dict[tuple[str, str], int] = {}
    for s in socks:
        key = (state_label(s.state), keepalive_status(s))
        counts[key] = counts.get(key, 0) + 1
        expected.extend(socket_findings(rules, s, None, DEFAULT_SYSCTLS, "host"))
    assert report.connections == counts
    socket_level = [f for f in findings if f.local is not None]
    assert sorted(f.key for f in socket_level) == sorted(f.key for f in expected)
    assert sum(sum(h) for h in report.idle_histogram.values()) == sum(
        1 for s in socks if s.state == 1
    )


# Idle ages at and around every threshold _thresholds can make: exact ties are where the two
# ways of judging would part.
_EDGES = sorted({
    max(0, round(w * t * 1000) + d)
    for w in (0.1, 0.5, 0.999, 1.0) for t in (0.001, 1.0, 2.5, 350.0, 7200.0) for d in (-1, 0, 1)
})  # fmt: skip
_idle_socks = st.builds(
    lambda timer, idle, inode: make_sock(
        timer=timer, last_data_sent_ms=idle, last_data_recv_ms=idle, last_ack_recv_ms=idle,
        inode=inode, sport=inode % 60000,
    ),
    st.sampled_from([0, 0, 0, 2]),
    st.one_of(st.sampled_from(_EDGES), _ms),
    st.integers(min_value=1, max_value=10**9),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_idle_socks, _socks), max_size=40), _thresholds,
       st.integers(min_value=0, max_value=5))  # fmt: skip
def test_judging_idle_sockets_directly_matches_judge(
    socks: list[Sock],
    t: Thresholds,
    limit: int,
) -> None:
    # _Judged judges idle sockets without keepalive itself when there are no rules and no
    # local middlebox: the counts and the sockets kept must be what judge() gives.
    rules = RuleSet(defaults=t)
    fast = _Judged(rules, DEFAULT_SYSCTLS, limit, set())
    slow = _Judged(rules, DEFAULT_SYSCTLS, limit, set())
    assert fast._idle_limits is not None
    slow._idle_limits = None
    for sock in socks:
        fast.add(sock)
        slow.add(sock)
    assert fast.counts == slow.counts
    assert fast.socks() == slow.socks()


def test_a_rule_or_a_middlebox_turns_direct_judging_off() -> None:
    from helpers import rule, sysctls

    assert _Judged(RuleSet(rules=(rule("pg"),)), DEFAULT_SYSCTLS, 1, set())._idle_limits is None
    conntrack = replace(sysctls(nf_conntrack_tcp_timeout_established=300), conntrack_entries=1)
    assert _Judged(RuleSet(), conntrack, 1, set())._idle_limits is None


def test_a_broken_namespace_is_skipped_but_a_broken_host_is_not() -> None:
    broken = FlakyKernel(errno.EPERM)
    result = audit(RuleSet(), [("host", FakeKernel([IDLE])), ("container:abc", broken)])
    assert [ns.netns for ns in result.namespaces] == ["host"]
    assert result.skipped_namespaces == (
        ("container:abc", "sock_diag dump failed: No buffer space available"),
    )
    with pytest.raises(KernelError):
        audit(RuleSet(), [("host", FlakyKernel(errno.EPERM))])


_CONNTRACK = Sysctls(
    {**DEFAULT_SYSCTLS.values, "net.netfilter.nf_conntrack_tcp_timeout_established": 300},
    conntrack_entries=1,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_socks, max_size=30), _thresholds)
def test_fast_pass_keeps_what_a_tighter_conntrack_flags(socks: list, t: Thresholds) -> None:  # type: ignore[type-arg]
    """The namespace's conntrack timeout caps the pre-filter's idle timeout, as it caps the
    rules' in socket_findings."""
    rules = RuleSet(defaults=t)
    _, findings = audit_namespace(rules, FakeKernel(socks, sysctls=_CONNTRACK))
    expected = [f for s in socks for f in socket_findings(rules, s, None, _CONNTRACK, "host")]
    socket_level = [f for f in findings if f.local is not None]
    assert sorted(f.key for f in socket_level) == sorted(f.key for f in expected)


class _Inspector:
    method, needs_owners, note = "pidfd", True, None

    def for_namespace(self, source: object, sysctls: object) -> _Inspector:
        return self

    def __init__(self, options: dict[int, SocketOptions]) -> None:
        self.options = options

    def inspect(self, targets: Sequence[Target]) -> InspectScan:
        return InspectScan({t[0]: self.options[t[0]] for t in targets})


class _Owned(FakeKernel):
    def owners(self, inodes: Collection[int], deadline: float | None = None) -> OwnerScan:
        scan = super().owners(inodes, deadline)
        return OwnerScan(scan.found, fds=dict.fromkeys(scan.found, 3))


_options = st.builds(
    SocketOptions,
    keepalive=st.booleans(),
    idle=st.sampled_from([1, 300, 400, 7200]),
    intvl=st.sampled_from([1, 75]),
    cnt=st.sampled_from([1, 9]),
    user_timeout_ms=st.sampled_from([0, 45_000, 10_000_000]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_socks, max_size=30, unique_by=lambda s: s.inode), _thresholds, st.data())
def test_inspecting_pass_matches_the_reference_functions(
    socks: list,  # type: ignore[type-arg]
    t: Thresholds,
    data: st.DataObject,
) -> None:
    """With an inspector, every owned socket whose status the timer leaves open is read and
    counted and evaluated with its options; the others exactly as without."""
    rules = RuleSet(defaults=t)
    options = {s.inode: data.draw(_options) for s in socks}
    owners = {s.inode: ProcessInfo(1, "app") for s in socks}
    kernel = _Owned(socks, owners=owners)
    report, findings = audit_namespace(rules, kernel, inspector=_Inspector(options))
    counts: dict[tuple[str, str], int] = {}
    expected: list[Finding] = []
    for s in socks:
        known_off = s.timer == 0 and s.state in (1, 8)
        opts = None if known_off else options[s.inode]
        key = (state_label(s.state), keepalive_status(s, opts))
        counts[key] = counts.get(key, 0) + 1
        expected.extend(socket_findings(rules, s, owners[s.inode], DEFAULT_SYSCTLS, "host", opts))
    assert report.connections == counts
    socket_level = [f for f in findings if f.local is not None]
    assert sorted(f.key for f in socket_level) == sorted(f.key for f in expected)


# --- max_findings: every finding counted, the worst described and attributed ---------------


def _idle(i: int, idle_s: float, **kw: Any) -> Sock:
    ms = int(idle_s * 1000)
    return make_sock(sport=20000 + i, dport=5432, inode=1000 + i, last_data_recv_ms=ms,
                     last_ack_recv_ms=ms, last_data_sent_ms=ms, **kw)  # fmt: skip


def _many() -> list:  # type: ignore[type-arg]
    # 300 idle sockets without keepalive: over the 350 s default path timeout (critical) from
    # 400 s up, warnings below; and retransmitting ones (critical at 2x the threshold).
    socks = [_idle(i, 300 + (i * 7919) % 200) for i in range(300)]
    socks += [_idle(300 + i, 1.0, timer=TimerKind.RETRANSMIT, retrans=8 + i) for i in range(5)]
    return socks


def _key(f: Finding) -> tuple:  # type: ignore[type-arg]
    return (f.kind, f.severity, f.local, f.idle_seconds, f.pid)


@pytest.mark.parametrize("limit", [1, 7, 50, 304, 305, 1000])
def test_max_findings_describes_the_worst_and_counts_all(limit: int) -> None:
    socks = _many()
    owners = {s.inode: ProcessInfo(s.inode, "psql") for s in socks}
    full = audit(RuleSet(), [("host", FakeKernel(socks, owners=owners))], max_findings=0)
    kernel = FakeKernel(socks, owners=owners)
    cut = audit(RuleSet(), [("host", kernel)], max_findings=limit)
    socket_full = [f for f in full.findings if f.local is not None]
    socket_cut = [f for f in cut.findings if f.local is not None]
    assert len(socket_full) == 305 and full.findings_omitted == 0
    assert [_key(f) for f in socket_cut] == [_key(f) for f in socket_full[:limit]]
    assert cut.findings_omitted == max(0, 305 - limit)
    # Namespace findings are always described; the counts are the same either way.
    assert [f for f in cut.findings if f.local is None] == [
        f for f in full.findings if f.local is None
    ]
    assert cut.namespaces[0].finding_counts == full.namespaces[0].finding_counts
    assert cut.findings_total == full.findings_total == len(full.findings)
    assert cut.severity_counts() == full.severity_counts()
    # Only the sockets described were looked up, and every one was attributed.
    [asked] = kernel.owner_queries
    assert len(asked) == min(limit, 305)
    assert all(f.pid is not None for f in socket_cut)


def test_max_findings_applies_across_namespaces() -> None:
    a = [_idle(i, 500) for i in range(10)]  # critical
    b = [_idle(i, 320) for i in range(10)]  # warnings
    result = audit(RuleSet(), [("host", FakeKernel(b)), ("other", FakeKernel(a))], max_findings=4)
    described = [f for f in result.findings if f.local is not None]
    assert [f.netns for f in described] == ["other"] * 4
    assert result.findings_omitted == 16
    counts = {ns.netns: sum(ns.finding_counts.values()) for ns in result.namespaces}
    namespace_level = {ns: sum(1 for f in result.findings if f.local is None and f.netns == ns)
                       for ns in counts}  # fmt: skip
    assert {ns: counts[ns] - namespace_level[ns] for ns in counts} == {"host": 10, "other": 10}


def test_max_findings_with_process_rules_judges_with_the_owner() -> None:
    # A rule on the process name needs the owner of every flagged socket before judging:
    # here the psql sockets are ignored, so the limit is filled with the others.
    from helpers import rule

    from auditd.config import Match

    socks = [_idle(i, 500) for i in range(20)]
    owners = {s.inode: ProcessInfo(s.inode, "psql" if i % 2 else "java")
              for i, s in enumerate(socks)}  # fmt: skip
    rules = RuleSet(rules=(rule("psql", match=Match(processes=("psql",)), ignore=True),))
    kernel = FakeKernel(socks, owners=owners)
    result = audit(rules, [("host", kernel)], max_findings=3)
    described = [f for f in result.findings if f.local is not None]
    assert [f.process for f in described] == ["java"] * 3
    assert result.findings_omitted == 7
    assert len(kernel.owner_queries[0]) == 20  # all flagged sockets, to know their rule


def test_one_shot_attribution_keeps_looking_within_its_cap() -> None:
    """A one-shot audit has no next cycle: its owner scan may run until the cap (it stops
    by itself once every owner is found), not 30 % of a 10 s dump."""
    kernel = SlowOwners()
    clock = iter([100.0, 110.0, 110.0])
    report, _ = audit_namespace(
        RuleSet(defaults=Thresholds()), kernel, monotonic=lambda: next(clock),
        attribution_cap=ONE_SHOT_ATTRIBUTION_CAP_SECONDS,
    )  # fmt: skip
    assert kernel.deadlines == [110.0 + ONE_SHOT_ATTRIBUTION_CAP_SECONDS]
    note = attribution_note([report])
    assert note == (
        "owner scan cut short by its time budget (host): 1 of 1 sockets described have no "
        "process, and a generic hint"
    )
    complete = audit_namespace(RuleSet(), FakeKernel([IDLE], owners={11: ProcessInfo(7, "psql")}))[
        0
    ]
    assert attribution_note([complete]) is None


def test_the_cap_is_shared_by_the_namespaces_of_one_audit() -> None:
    kernels = [SlowOwners(), SlowOwners()]
    audit(RuleSet(), [("host", kernels[0]), ("other", kernels[1])], attribution_cap=4.0)
    first, second = (k.deadlines[0] for k in kernels)
    assert first is not None and second is not None and second <= first + 0.5
