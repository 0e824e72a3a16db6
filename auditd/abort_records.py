"""Aborts made readable: matched against the last audit, classified, given an owner. Pure.

An abort from the perf path knows its 4-tuple only; one from BPF also its socket's inode and
namespace. ``AbortIndex`` remembers, from the audits, the connections a finding was open for
(by socket inode, and by local and remote address): their namespace, owner, rule, and when a
finding was first reported. An abort that matches one was ``predicted``. A connection that
left the audit is kept until the end of the audit that no longer saw it: the one the abort
itself may have emptied. (The audits' findings carry the socket inode, not the cookie:
sock_diag's ``idiag_cookie`` is not kept by the dump's decoder, so the inode, as unique on a
host while the socket lives, is what a BPF abort is matched by.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from auditd.aborts import KernelAbort, Reason, classify
from auditd.model import Finding, SocketOptions, Sysctls, state_label
from auditd.report import rfc3339
from auditd.results import AuditResult

UNKNOWN = "unknown"  # netns or rule of an abort no audit had seen


@dataclass(frozen=True, slots=True)
class Known:
    """A flagged connection of the last audits."""

    netns: str
    rule: str
    kind: str  # the worst finding's kind
    first_reported: float  # unix time of the audit that first reported it
    pid: int | None = None
    process: str | None = None
    unit: str | None = None
    container: str | None = None
    inode: int | None = None
    probes: int | None = None
    until: float | None = None  # set once an audit no longer saw it: valid until then


def _known(f: Finding, when: float) -> Known:
    return Known(
        f.netns, f.rule, f.kind, when, f.pid, f.process, f.unit, f.container, f.inode, f.probes
    )


class AbortIndex:
    """Flagged connections by (local, remote), rebuilt from each audit, first report kept."""

    def __init__(self) -> None:
        self.known: dict[tuple[str, str], Known] = {}
        self.by_inode: dict[int, tuple[str, str]] = {}
        self.sysctls: dict[str, Sysctls] = {}
        self.namespaces: tuple[str, ...] = ()
        self.netns_names: dict[int, str] = {}  # namespace inode -> name, of the audits
        self.rules: tuple[str, ...] = ()

    def update(self, result: AuditResult) -> None:
        when, end = result.generated_at, result.generated_at + result.duration_seconds
        seen: dict[tuple[str, str], Known] = {}
        for f in _socket_findings(result.findings):
            key = (f.local or "", f.remote or "")
            before = self.known.get(key)
            first = before.first_reported if before is not None and before.until is None else when
            if key not in seen:  # findings come worst first: the first one names the kind
                seen[key] = _known(f, first)
        for key, old in self.known.items():
            if key not in seen and old.until is None:
                seen[key] = replace(old, until=end)  # the abort may be why it is gone
        self.known = seen
        self.by_inode = {k.inode: key for key, k in seen.items() if k.inode}
        self.sysctls = {ns.netns: ns.sysctls for ns in result.namespaces}
        self.namespaces = tuple(ns.netns for ns in result.namespaces)
        self.netns_names.update({ns.inode: ns.netns for ns in result.namespaces if ns.inode})

    def find(
        self, local: str, remote: str, when: float,
        inode: int | None = None, netns: str | None = None,
    ) -> Known | None:  # fmt: skip
        """By the socket's inode when the abort has one and an audit saw it, else by the
        4-tuple (in namespace ``netns`` when the abort says which)."""
        key = self.by_inode.get(inode) if inode else None
        known = self.known.get(key or (local, remote))
        if known is None or (known.until is not None and when > known.until):
            return None
        if key is None and netns is not None and known.netns != netns:
            return None  # the same addresses in another namespace
        return known


def _socket_findings(findings: Iterable[Finding]) -> Iterable[Finding]:
    return (f for f in findings if f.local is not None and f.remote is not None)


@dataclass(frozen=True, slots=True)
class AbortRecord:
    """One connection the kernel gave up on (the JSON of ``watch``, the agent's log line)."""

    time: float  # unix time of the abort
    netns: str
    local: str
    remote: str
    reason: Reason
    state: str  # the state it was in
    errno: int
    predicted: bool  # a finding was open for it
    rule: str
    retransmits: int
    probes: int | None = None
    reported_seconds_before: float | None = None  # abort time - first report
    finding: str | None = None  # kind of the finding that was open
    keepalive: bool | None = None  # the socket's settings (``settings`` says whose)
    keepidle: int | None = None
    keepintvl: int | None = None
    keepcnt: int | None = None
    user_timeout_ms: int | None = None
    # "kernel" (read from the socket by BPF at the abort), "socket" (getsockopt on its
    # owner's fd after it), "netns" (its namespace's sysctls), None
    settings: str | None = None
    pid: int | None = None
    process: str | None = None
    unit: str | None = None
    container: str | None = None
    cookie: int | None = None


def record_dict(record: AbortRecord) -> dict[str, Any]:
    """The JSON object of an abort (``watch --format json``, the API's ``recent_aborts``)."""
    doc = asdict(record)
    doc["time"] = rfc3339(record.time)
    doc["reason"] = record.reason.value
    return doc


def _settings(
    options: SocketOptions | None, sysctls: Sysctls | None
) -> tuple[str | None, dict[str, int | bool | None]]:
    if options is not None:
        source = "kernel" if options.source == "kernel" else "socket"
        return source, {"keepalive": options.keepalive, "keepidle": options.idle,
                        "keepintvl": options.intvl, "keepcnt": options.cnt,
                        "user_timeout_ms": options.user_timeout_ms}  # fmt: skip
    if sysctls is not None:  # what a socket that set nothing of its own uses
        return "netns", {"keepidle": sysctls.keepalive_time, "keepintvl": sysctls.keepalive_intvl,
                         "keepcnt": sysctls.keepalive_probes}  # fmt: skip
    return None, {}


def make_record(
    abort: KernelAbort, when: float, known: Known | None,
    options: SocketOptions | None = None, sysctls: Sysctls | None = None,
    netns: str | None = None,
) -> AbortRecord | None:  # fmt: skip
    """The record of ``abort`` at unix time ``when``; None if it is not a kernel abort.
    ``options`` default to the ones the abort itself carries (BPF); ``netns`` names the
    namespace when no audit flagged the connection (BPF knows it)."""
    options = options if options is not None else abort.options
    user_timeout = options.user_timeout_ms if options is not None else None
    keepalive_rst = abort.keepalive_rst
    if keepalive_rst is None:  # no RST reason on this kernel: a keepalive abort retransmits nothing
        keepalive_rst = abort.retransmits == 0
    reason = classify(abort.error, keepalive_rst, abort.peer_rst, user_timeout)
    if reason is None:
        return None
    source, values = _settings(options, sysctls)
    probes = abort.probes if abort.probes is not None else known.probes if known else None
    if reason is Reason.KEEPALIVE_TIMEOUT and isinstance(values.get("keepcnt"), int):
        probes = int(values["keepcnt"])  # type: ignore[arg-type]  # it gives up after keepcnt
    record = AbortRecord(
        when, known.netns if known else netns or UNKNOWN, abort.local, abort.remote, reason,
        state_label(abort.state), abort.error, known is not None,
        known.rule if known else UNKNOWN, abort.retransmits, probes,
        round(when - known.first_reported, 3) if known else None, known.kind if known else None,
        settings=source, cookie=abort.cookie,
    )  # fmt: skip
    if known is not None:
        record = replace(record, pid=known.pid, process=known.process, unit=known.unit,
                         container=known.container)  # fmt: skip
    return replace(record, **values)  # type: ignore[arg-type]
