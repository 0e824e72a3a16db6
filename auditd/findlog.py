"""The agent's finding lines: one per finding that lasts, one summary per audit for the rest.

On a host whose connections come and go, a line for every finding appearing and clearing
floods the journal (issue 15: 1,893 lines in 37 minutes for 100 short-lived idle connections
every 3 minutes). So a finding gets its own ``finding:`` line once it has been open for
``after`` seconds (``--log.findings-after``), with its owner and hint as known then; one that
clears sooner is only counted. Each audit that saw such findings appear or clear logs one
``findings: N new, M cleared within ...`` line with the counts by kind and rule. A finding
logged on its own line also gets a line when its severity changes, when its owner becomes
known (it was logged without a process: the owner scan ran out of time), and when it clears.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from auditd.model import Finding

Key = tuple[str | None, ...]


def fields(f: Finding) -> dict[str, object]:
    out: dict[str, object] = {
        "kind": f.kind, "severity": f.severity.label, "rule": f.rule, "netns": f.netns,
    }  # fmt: skip
    for name in ("state", "local", "remote", "pid", "process", "sysctl", "value"):
        value = getattr(f, name)
        if value is not None:
            # LogRecord has its own "process" (our pid): extra={"process": ...} raises KeyError.
            out["process_name" if name == "process" else name] = value
    return out


@dataclass
class _Open:
    finding: Finding  # as last logged (or as first seen, until it is logged)
    since: float  # when it was first seen
    logged: bool


def _counts(findings: Iterable[Finding]) -> str:
    """``idle_no_keepalive/default=100, close_wait/db=2``: by kind and rule, most first."""
    counts = Counter(f"{f.kind}/{f.rule}" for f in findings)
    return ", ".join(f"{what}={n}" for what, n in counts.most_common())


class FindingLog:
    """Turns each audit's findings into log lines (see the module docstring)."""

    def __init__(self, log: logging.Logger, after: float) -> None:
        self.log = log
        self.after = after
        self.open: dict[Key, _Open] = {}

    def update(self, findings: Iterable[Finding], now: float, clears: bool = True) -> None:
        """``clears`` False: findings missing from ``findings`` may only have been left out
        (--audit.max-findings), so they are forgotten without a line."""
        current = {f.key: f for f in findings}
        appeared: list[Finding] = []
        for key, f in current.items():
            entry = self.open.get(key)
            if entry is None:
                entry = self.open[key] = _Open(f, now, False)
                appeared.append(f)
            if entry.logged:
                self._changed(entry, f)
            elif now - entry.since >= self.after:
                self.log.warning(f"finding: {f.message}", extra={**fields(f), "hint": f.hint})
                entry.finding, entry.logged = f, True
        gone = [key for key in self.open if key not in current]
        short = []
        for key in gone:
            entry = self.open.pop(key)
            if not clears:
                continue
            if entry.logged:
                self.log.info("finding cleared", extra=fields(entry.finding))
            else:
                short.append(entry.finding)
        new = [f for f in appeared if not self.open[f.key].logged]
        if new or short:
            self.log.info(
                f"findings: {len(new)} new, {len(short)} cleared within {self.after:g}s",
                extra={"new": len(new), "cleared": len(short), "new_by_kind": _counts(new),
                       "cleared_by_kind": _counts(short)},
            )  # fmt: skip

    def _changed(self, entry: _Open, f: Finding) -> None:
        before = entry.finding
        if before.severity != f.severity:  # e.g. warning -> critical as idle grows
            self.log.warning(
                f"finding now {f.severity.label}: {f.message}",
                extra={**fields(f), "was": before.severity.label, "hint": f.hint},
            )
        elif before.pid is None and f.pid is not None:
            self.log.warning(
                f"finding attributed: {f.message}", extra={**fields(f), "hint": f.hint}
            )
        else:
            return
        entry.finding = f
