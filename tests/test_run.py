"""The audit pipeline over a fake kernel: counting, attribution budget, transient retries."""

from __future__ import annotations

import errno
from collections.abc import Collection, Iterator

import pytest
from helpers import FakeKernel

from auditd.audit.run import ATTRIBUTION_MIN_SECONDS, audit, audit_namespace
from auditd.config import RuleSet, Thresholds
from auditd.errors import KernelError
from auditd.kernel import DumpStats, OwnerScan
from auditd.model import ProcessInfo, TimerKind, make_sock

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
