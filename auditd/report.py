"""Audit results as people and programs read them: the JSON document, the table, explain.

The JSON schema (``schema_version`` 1) is documented in README.md; a change that removes or
renames a key bumps the version.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from auditd.audit import hints
from auditd.audit.inference import probe_cadence, retries2_timeout
from auditd.audit.matching import DEFAULT_RULE
from auditd.config import RuleSet, Thresholds
from auditd.model import Finding, Keepalive, Sysctls
from auditd.results import AuditResult, NamespaceReport, attribution_note

SCHEMA_VERSION = 1


def rfc3339(ts: float) -> str:
    return (
        datetime.fromtimestamp(ts, tz=timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def finding_dict(f: Finding) -> dict[str, Any]:
    return {
        "kind": f.kind,
        "severity": f.severity.label,
        "rule": f.rule,
        "netns": f.netns,
        "state": f.state,
        "local": f.local,
        "remote": f.remote,
        "idle_seconds": f.idle_seconds,
        "keepalive": f.keepalive,
        "probes": f.probes,
        "retransmits": f.retransmits,
        "abort_in_seconds": f.abort_in_seconds,
        "pid": f.pid,
        "process": f.process,
        "cmdline": f.cmdline,
        "unit": f.unit,
        "container": f.container,
        "inode": f.inode,
        "uid": f.uid,
        "user": f.user,
        "started_at": None if f.started_at is None else rfc3339(f.started_at),
        "sysctl": f.sysctl,
        "value": f.value,
        "expected": f.expected,
        "case": f.case,
        "keepalive_idle_seconds": f.keepalive_idle_seconds,
        "keepalive_interval_seconds": f.keepalive_interval_seconds,
        "keepalive_count": f.keepalive_count,
        "user_timeout_ms": f.user_timeout_ms,
        "options_source": f.options_source,
        "message": f.message,
        "hint": f.hint,
    }


def namespace_dict(ns: NamespaceReport) -> dict[str, Any]:
    by_state: dict[str, int] = {}
    by_keepalive: dict[str, int] = dict.fromkeys(Keepalive.ALL, 0)
    by_both: dict[str, dict[str, int]] = {}
    for (state, ka), n in sorted(ns.connections.items()):
        by_state[state] = by_state.get(state, 0) + n
        by_keepalive[ka] = by_keepalive.get(ka, 0) + n
        by_both.setdefault(state, dict.fromkeys(Keepalive.ALL, 0))[ka] = n
    c = ns.counters
    return {
        "netns": ns.netns,
        "inode": ns.inode,
        "sysctls": dict(sorted(ns.sysctls.values.items())),
        "differs_from_host": list(ns.differs_from_host),
        "detection": {
            "idle_seconds": ns.detection_idle_seconds,
            "in_flight_seconds": ns.detection_in_flight_seconds,
        },
        "sockets": {
            "total": ns.sockets,
            "by_state": by_state,
            "by_keepalive": by_keepalive,
            "by_state_and_keepalive": by_both,
        },
        "counters": {
            "keepalive_probes": c.keepalive_probes,
            "abort_on_timeout": c.abort_on_timeout,
            "timeouts": c.timeouts,
            "retrans_segs": c.retrans_segs,
        },
        "source": ns.source,
        "source_note": ns.source_note,
        "dump": {
            "messages": ns.dump_messages,
            "skipped": ns.dump_skipped,
            "interrupted": ns.dump_interrupted,
        },
        "attribution": {
            "wanted": ns.attribution_wanted,
            "found": ns.attribution_found,
            "complete": ns.attribution_complete,
        },
        "finding_counts": [
            {"kind": kind, "severity": severity, "rule": rule, "count": n}
            for (kind, severity, rule), n in sorted(ns.finding_counts.items())
        ],
        "inspection": None
        if ns.inspection is None
        else {
            "wanted": ns.inspection.wanted,
            "read": ns.inspection.read,
            "error": ns.inspection.error,
            "method": ns.inspection.method,
            "note": ns.inspection.note,
        },
    }


def to_json(result: AuditResult, recent_aborts: list[dict[str, Any]] | None = None) -> str:
    """``audit --format json``; the agent's API adds ``recent_aborts`` (its last aborts)."""
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": rfc3339(result.generated_at),
        "duration_seconds": round(result.duration_seconds, 6),
        "namespaces": [namespace_dict(ns) for ns in result.namespaces],
        "skipped_namespaces": [
            {"netns": name, "reason": reason} for name, reason in result.skipped_namespaces
        ],
        "findings": [finding_dict(f) for f in result.findings],
        "findings_total": result.findings_total,
        "findings_omitted": result.findings_omitted,
    }
    if recent_aborts is not None:
        doc["recent_aborts"] = recent_aborts
    return json.dumps(doc, indent=2, ensure_ascii=False)


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{seconds:.1f}s"


COLUMNS = ("SEVERITY", "KIND", "RULE", "NETNS", "STATE", "LOCAL", "REMOTE", "IDLE", "KA",
           "PROBES", "RETX", "ABORT_IN", "PROCESS")  # fmt: skip


def _row(f: Finding) -> tuple[str, ...]:
    proc = f"{f.process}[{f.pid}]" if f.process else "-"
    if f.sysctl is not None:
        return (f.severity.label, f.kind, f.rule, f.netns, "-", f.sysctl, f"={f.value:g}" if
                f.value is not None else "-", "-", "-", "-", "-", "-", "-")  # fmt: skip
    return (
        f.severity.label, f.kind, f.rule, f.netns, f.state or "-", f.local or "-", f.remote or "-",
        _dur(f.idle_seconds), f.keepalive or "-", str(f.probes if f.probes is not None else "-"),
        str(f.retransmits if f.retransmits is not None else "-"), _dur(f.abort_in_seconds), proc,
    )  # fmt: skip


def owner_text(f: Finding, started: bool = False) -> str:
    """``pid 4102 redis-server, user redis, unit redis.service, container 0123456789ab:
    <cmdline>`` (``user uid 999`` when the uid has no name in the process's /etc/passwd;
    ``started``: the process's start time after the user, as the findings page shows it);
    ``-`` for a finding without an owner."""
    if f.pid is None:
        return "-"
    text = f"pid {f.pid} {f.process or '?'}"
    if f.uid is not None:
        text += f", user {f.user or f'uid {f.uid}'}"
    if started and f.started_at is not None:
        text += f", started {rfc3339(f.started_at)}"
    if f.unit:
        text += f", unit {f.unit}"
    if f.container:
        text += f", container {f.container}"
    return f"{text}: {f.cmdline}" if f.cmdline else text


def _settings(f: Finding) -> str:
    """`` (keepalive 7200/75/9, user timeout 0 ms, inferred)``: the settings the verdict used."""
    if f.options_source is None or f.keepalive_idle_seconds is None:
        return ""
    return (
        f" (keepalive {f.keepalive_idle_seconds:g}/{f.keepalive_interval_seconds:g}/"
        f"{f.keepalive_count}, user timeout {f.user_timeout_ms} ms, {f.options_source})"
    )


def to_table(result: AuditResult) -> str:
    lines: list[str] = []
    for ns in result.namespaces:
        counts = namespace_dict(ns)["sockets"]
        ka = counts["by_keepalive"]
        lines.append(
            f"netns {ns.netns}: {ns.sockets} TCP sockets (keepalive on {ka['on']}, off "
            f"{ka['off']}, unknown {ka['unknown']}); dead peer noticed after "
            f"{ns.detection_idle_seconds:g} s idle, {ns.detection_in_flight_seconds:g} s in flight"
        )
        if ns.differs_from_host:
            names = ", ".join(name.rsplit(".", 1)[-1] for name in ns.differs_from_host)
            lines.append(f"  sysctls not as on the host: {names}")
        seen = ns.inspection
        if seen is not None:
            lines.append(
                f"  socket inspection ({seen.method}): {seen.error}"
                if seen.error
                else f"  socket inspection ({seen.method}): options read from {seen.read} of "
                f"{seen.wanted} sockets"
            )
            if seen.note:
                lines.append(f"  socket inspection: not by BPF: {seen.note}")
    for name, reason in result.skipped_namespaces:
        lines.append(f"netns {name}: skipped: {reason}")
    if not result.findings:
        lines.append("no findings")
        return "\n".join(lines) + "\n"
    rows = [COLUMNS] + [_row(f) for f in result.findings]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines.append("")
    for i, (row, f) in enumerate(zip(rows, [None, *result.findings])):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if f is not None:
            lines.append(f"    why: {f.message}{_settings(f)}")
            lines.append(f"    fix: {f.hint}")
            if f.pid is not None:
                lines.append(f"    who: {owner_text(f)}")
        del i
    by_sev = result.severity_counts()
    lines.append("")
    lines.append(
        f"{result.findings_total} findings: "
        + ", ".join(f"{by_sev[s]} {s.label}" for s in sorted(by_sev, reverse=True))
        + (
            f"; the worst {len(result.findings)} listed, {result.findings_omitted} more "
            f"counted only (--max-findings)"
            if result.findings_omitted
            else ""
        )
    )
    note = attribution_note(result.namespaces)
    if note is not None:
        lines.append(note)
    return "\n".join(lines) + "\n"


def _needs(t: Thresholds, s: Sysctls, label: str) -> list[str]:
    idle, intvl, cnt = hints.suggest_keepalive(t)
    ka_detect = s.keepalive_time + s.keepalive_probes * s.keepalive_intvl
    in_flight = retries2_timeout(s.retries2, s.rto_max_ms)
    out = [
        f"  {label}: idle_timeout {t.idle_timeout:g} s, detection_budget {t.detection_budget:g} s"
    ]
    # After each probe the timer re-arms for keepintvl (inference.probe_cadence).
    silence = probe_cadence(s.keepalive_time, s.keepalive_intvl)
    verdict = "ok" if silence <= t.idle_timeout else "TOO SLOW"
    out.append(
        f"    keepalive must leave the path silent at most {t.idle_timeout:g} s: namespace "
        f"defaults max(tcp_keepalive_time {s.keepalive_time}, tcp_keepalive_intvl "
        f"{s.keepalive_intvl}) = {silence:g} s: {verdict}"
    )
    verdict = "ok" if ka_detect <= t.detection_budget else "OVER BUDGET"
    out.append(
        f"    idle dead-peer detection {ka_detect:g} s <= {t.detection_budget:g} s: {verdict}"
    )
    verdict = "ok" if in_flight <= t.detection_budget else "OVER BUDGET"
    out.append(
        f"    in-flight dead-peer detection {in_flight:g} s <= {t.detection_budget:g} s: {verdict}"
    )
    out.append(
        f"    a fitting keepalive: idle {idle} s, interval {intvl} s, {cnt} probes "
        f"({idle + intvl * cnt} s to notice a dead peer); tcp_retries2 "
        f"{hints.retries2_for_budget(t.detection_budget, s.rto_max_ms)}"
    )
    return out


def _middleboxes(s: Sysctls) -> list[str]:
    """The namespace's own conntrack and IPVS, and the idle timeouts they put on its flows."""
    lines = ["local middleboxes (an idle entry is dropped, and the connection's next segment):"]
    ct = s.conntrack_timeout
    if ct is not None:
        lines.append(
            f"  conntrack ({s.conntrack_entries} flows tracked): established flows idle "
            f"{ct} s (net.netfilter.nf_conntrack_tcp_timeout_established); a rule's "
            f"idle_timeout above it is replaced by it"
        )
    elif s.values.get("net.netfilter.nf_conntrack_tcp_timeout_established") is not None:
        lines.append("  conntrack: loaded, but tracks no flow in this namespace")
    else:
        lines.append("  conntrack: not loaded")
    if s.ipvs_tcp_timeout is not None and s.ipvs_services:
        lines.append(
            f"  IPVS: TCP timeout {s.ipvs_tcp_timeout} s for the {len(s.ipvs_services)} virtual "
            f"services of this namespace; it replaces a longer idle_timeout for connections "
            f"to or from them"
        )
    else:
        lines.append("  IPVS: no TCP virtual service")
    lines.append("")
    return lines


def explain(rules: RuleSet, netns: str, inode: int | None, s: Sysctls) -> str:
    """The arithmetic behind a namespace's detection times, from its sysctls."""
    lines = [f"netns {netns}" + (f" (inode {inode})" if inode else "")]
    lines.append("sysctls:")
    for name, value in sorted(s.values.items()):
        lines.append(f"  {name} = {value}")
    lines.append("")
    lines.append("dead peer, idle connection with SO_KEEPALIVE on the namespace defaults:")
    lines.append(f"  {hints.idle_arithmetic(s)}")
    lines.append("  (without SO_KEEPALIVE an idle connection never notices: ESTABLISHED forever)")
    lines.append("dead peer, data in flight (tcp_retries2 model, a lower bound):")
    lines.append(f"  {hints.in_flight_arithmetic(s)}")
    lines.append("  TCP_USER_TIMEOUT on a socket replaces this model")
    lines.append("")
    lines.extend(_middleboxes(s))
    lines.append(f"rules ({rules.source}):")
    lines.extend(_needs(rules.defaults, s, DEFAULT_RULE))
    for rule in rules.rules:
        if rule.ignore:
            lines.append(f"  {rule.name}: ignored")
        elif rule.overrides:
            lines.extend(_needs(rule.thresholds, s, rule.name))
    return "\n".join(lines) + "\n"
