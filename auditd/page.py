"""The findings page served at ``/``: the last audit as a person reads it. Pure: state -> str.

Everything shown passes through ``html.escape``: addresses, command lines, unit and
namespace names come from the audited host, and a process may name itself ``<script>``.
The last aborts (at most auditd.events.RECENT) come from the kernel's abort events and are
rendered with the same escaping, whenever they change.
The page has no script and needs none (``<details>`` folds the sysctls); the server sends
it with a Content-Security-Policy that allows only the one inline style block below, by
its hash (``STYLE_HASH``), so even a missed escape could not run a script.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Iterable

from auditd import __version__
from auditd.abort_records import AbortRecord
from auditd.events import RECENT
from auditd.exporter import ExporterState
from auditd.model import Finding, Keepalive, Severity
from auditd.report import owner_text, rfc3339
from auditd.results import AuditResult, NamespaceReport

STYLE = (
    "body{font-family:sans-serif;margin:1.5em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
    "th{background:#eee}.critical{background:#fdd}.warning{background:#ffd}.info{background:#eef}"
    "code{white-space:pre-wrap;word-break:break-all}.bad{color:#a00;font-weight:bold}"
)
STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
CSP = (
    f"default-src 'none'; style-src '{STYLE_HASH}'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
API_PATH = "/api/v1/findings"


def _e(value: object) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


def _row(cells: Iterable[object], cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<tr{attr}>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"


def _head(*names: str) -> str:
    return "<tr>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"


def _what(f: Finding) -> str:
    if f.sysctl is not None:
        value = "-" if f.value is None else f"{f.value:g}"
        return f"{f.sysctl} = {value} (expected {f.expected or '-'})"
    return f"{f.state or '-'} {f.local or '-'} -> {f.remote or '-'}"


def _finding(f: Finding) -> str:
    sev = f.severity.label
    return (
        f'<tr class="{sev}"><td>{_e(sev)}</td><td>{_e(f.kind)}</td><td>{_e(f.rule)}</td>'
        f"<td>{_e(_what(f))}</td><td>{_e(_secs(f.idle_seconds))}</td>"
        f"<td>{_e(f.keepalive)}</td><td>{_e(_secs(f.abort_in_seconds))}</td>"
        f"<td><b>why:</b> {_e(f.message)}<br><b>fix:</b> {_e(f.hint)}</td>"
        f"<td><code>{_e(owner_text(f, started=True))}</code></td></tr>"
    )


def _worst(ns: NamespaceReport) -> tuple[int, int]:
    worst = max((Severity.parse(s) for (_, s, _) in ns.finding_counts), default=0)
    return int(worst), sum(ns.finding_counts.values())


def _namespace_table(result: AuditResult, order: list[NamespaceReport]) -> list[str]:
    out = ["<h2>Namespaces</h2><table>"]
    out.append(
        _head("netns", "sockets", "keepalive on/off/unknown", "keepalive time/intvl/probes",
              "tcp_retries2", "dead peer noticed (idle)", "(data in flight)", "findings",
              "not as on the host", "all sysctls")
    )  # fmt: skip
    for ns in order:
        ka: dict[str, int] = dict.fromkeys(Keepalive.ALL, 0)
        s = ns.sysctls
        for (_, k), n in ns.connections.items():
            ka[k] = ka.get(k, 0) + n
        sysctls = "".join(
            f"{_e(name)} = {_e(value)}<br>" for name, value in sorted(ns.sysctls.values.items())
        )
        cells = (
            ns.netns, ns.sockets, f"{ka['on']} / {ka['off']} / {ka['unknown']}",
            f"{s.keepalive_time} / {s.keepalive_intvl} / {s.keepalive_probes}", s.retries2,
            f"{ns.detection_idle_seconds:g} s", f"{ns.detection_in_flight_seconds:g} s",
            sum(ns.finding_counts.values()), ", ".join(ns.differs_from_host) or "-",
        )  # fmt: skip
        out.append(
            _row(cells)[: -len("</tr>")]
            + f"<td><details><summary>{len(ns.sysctls.values)}</summary>{sysctls}"
            + "</details></td></tr>"
        )
    out.append("</table>")
    for name, reason in result.skipped_namespaces:
        out.append(f"<p>netns {_e(name)} skipped: {_e(reason)}</p>")
    return out


def _findings(result: AuditResult, order: list[NamespaceReport]) -> list[str]:
    sev = result.severity_counts()
    counts = ", ".join(f"{sev[s]} {s.label}" for s in sorted(sev, reverse=True))
    out = [f"<h2>Findings</h2><p>{result.findings_total} findings: {_e(counts)}.</p>"]
    if result.findings_omitted:
        out.append(
            f"<p>The worst {len(result.findings)} are listed; {result.findings_omitted} more "
            "are counted only (--audit.max-findings).</p>"
        )
    by_ns: dict[str, list[Finding]] = {}
    for f in result.findings:  # already worst first
        by_ns.setdefault(f.netns, []).append(f)
    for ns in order:
        listed = by_ns.get(ns.netns)
        if not listed:
            continue
        out.append(f"<h3>netns {_e(ns.netns)}</h3><table>")
        out.append(_head("severity", "kind", "rule", "connection or sysctl", "idle",
                         "keepalive", "abort in", "why and fix", "owner"))  # fmt: skip
        out.extend(_finding(f) for f in listed)
        out.append("</table>")
    return out


def _abort_owner(r: AbortRecord) -> str:
    if r.pid is None:
        return "-"
    text = f"pid {r.pid} {r.process or '?'}"
    if r.unit:
        text += f", unit {r.unit}"
    return f"{text}, container {r.container}" if r.container else text


def _abort(r: AbortRecord) -> str:
    predicted = "no"
    if r.predicted:
        predicted = f"yes: {r.finding or '-'}, reported {_secs(r.reported_seconds_before)} before"
    settings = "-"
    if r.settings is not None:
        on = "-" if r.keepalive is None else "on" if r.keepalive else "off"
        settings = (f"keepalive {on} {r.keepidle}/{r.keepintvl}/{r.keepcnt}, user timeout "
                    f"{r.user_timeout_ms or 0} ms ({r.settings})")  # fmt: skip
    cells = (
        rfc3339(r.time),
        r.netns,
        f"{r.local} -> {r.remote}",
        r.reason.value,
        predicted,
        r.rule,
        f"{r.probes if r.probes is not None else '-'} / {r.retransmits}",
        settings,
    )
    return _row(cells)[: -len("</tr>")] + f"<td><code>{_e(_abort_owner(r))}</code></td></tr>"


def _aborts(state: ExporterState) -> list[str]:
    """The last aborts the kernel's events showed (at most auditd.events.RECENT), newest first."""
    a = state.aborts
    out = ["<h2>Connections the kernel aborted</h2>"]
    if a.error is not None:
        return [*out, f"<p>Abort events are off: {_e(a.error)}</p>"]
    if a.source is None:
        return [*out, "<p>Abort events are not read yet.</p>"]
    out.append(f"<p>The last {len(a.recent)} (at most {RECENT}), newest first; events from "
               f"{_e(a.source)}.</p>")  # fmt: skip
    if a.recent:
        out.append("<table>")
        out.append(_head("time", "netns", "connection", "reason", "predicted", "rule",
                         "probes / retransmits", "its settings", "owner"))  # fmt: skip
        out.extend(_abort(r) for r in reversed(a.recent))
        out.append("</table>")
    return out


def _health(state: ExporterState) -> list[str]:
    result = state.result
    rows = [
        ("last successful audit",
         "never" if state.last_success is None else rfc3339(state.last_success)),
        ("audit duration", "-" if result is None else f"{result.duration_seconds:.3f} s"),
        ("rules", f"{state.rules.source}" + ("" if state.reload_ok else " (last reload FAILED)")),
    ]  # fmt: skip
    errors = ", ".join(f"{stage} {n}" for stage, n in sorted(state.errors.items()) if n)
    out = ["<h2>Agent</h2><table>", *(_row(r) for r in rows)]
    out.append(_row(("errors since start", errors or "none"), "warning" if errors else ""))
    out.append("</table>")
    return out


def render(state: ExporterState, metrics_path: str = "/metrics") -> str:
    """The whole page for ``state``; called once per state by the server, not per request."""
    result = state.result
    body = [
        f"<h1>keepalive-auditd {_e(__version__)}</h1>",
        f'<p><a href="{_e(metrics_path)}">Metrics</a> · <a href="{API_PATH}">Findings as '
        "JSON</a> (the document of <code>audit --format json</code>)</p>",
    ]
    if result is None:
        body.append("<p>No audit has finished yet.</p>")
    else:
        order = sorted(result.namespaces, key=lambda ns: tuple(-x for x in _worst(ns)))
        body.append(
            f"<p>Audit of {rfc3339(result.generated_at)}: {len(result.namespaces)} network "
            "namespaces.</p>"
        )
        body.extend(_findings(result, order))
        body.extend(_aborts(state))
        body.extend(_namespace_table(result, order))
    body.extend(_health(state))
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>keepalive-auditd</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
