"""Builds config/grafana/keepalive-auditd-fleet.json, the fleet overview dashboard.

    python3 config/grafana/dashboard.py            # rewrites the JSON next to this file
    python3 config/grafana/dashboard.py --check    # exit 1 if the committed JSON is stale

Panels are declared as data below (title, query, unit, size) and expanded into Grafana's
dashboard JSON model (schemaVersion 39: Grafana 10.3 and later import it). Every query
reads only the families that federate.yml and remote-write.yml pass on, so the dashboard
works on a site Prometheus and on a central one alike. Findings series exist only while
nonzero (README Metrics): counts that must read 0 rather than "No data" end in
``or vector(0)``. tests/test_grafana.py validates the JSON against the schemas generated
from @grafana/schema (config/grafana/schema/) and parses every query with promtool.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "keepalive-auditd-fleet.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job="$job",instance=~"$instance"'
FOUND = f'keepalive_findings{{{SEL},severity=~"warning|critical"}}'
HALF_OPEN = (
    f'keepalive_findings{{{SEL},kind=~"keepalive_probing|retransmitting",severity="critical"}}'
)
ABORTS = f"keepalive_connection_aborts_total{{{SEL}}}"
WIDTH = 24  # Grafana's grid


@dataclass(frozen=True)
class P:
    """One panel: ``kind`` stat, timeseries or table; queries as (expr, legend)."""

    kind: str
    title: str
    description: str
    queries: tuple[tuple[str, str], ...]
    unit: str = "short"
    w: int = 6
    h: int = 4
    red_above: float | None = None  # stat: the value from which it turns red


ROWS: tuple[tuple[str, tuple[P, ...]], ...] = (
    ("Fleet now", (
        P("stat", "Hosts with findings", "Agents (hosts) with at least one warning or "
          "critical finding in any network namespace.",
          ((f"count(count by (instance) ({FOUND} > 0)) or vector(0)", ""),), red_above=1),
        P("stat", "Namespaces with findings", "Network namespaces (host, pods, containers) "
          "with at least one warning or critical finding.",
          ((f"count(count by (instance, netns) ({FOUND} > 0)) or vector(0)", ""),),
          red_above=1),
        P("stat", "Half-open connections now", "Connections whose peer stopped answering: "
          ">= 2 keepalive probes unanswered, or data retransmitted >= 2 x "
          "retransmit_threshold times (critical keepalive_probing and retransmitting).",
          ((f"sum({HALF_OPEN}) or vector(0)", ""),), red_above=1),
        P("stat", "Agents up", "Targets of the job scraped successfully, of all its targets.",
          ((f"sum(up{{{SEL}}})", "up"), (f"count(up{{{SEL}}})", "targets")), w=3),
        P("stat", "Firing alerts", "Alerts of alerts.yml firing now (ALERTS; on a central "
          "server when federate.yml passes them on).",
          (('count(ALERTS{alertname=~"Keepalive.+",alertstate="firing",job="$job"}) '
            "or vector(0)", ""),), w=3, red_above=1),
    )),
    ("Findings", (
        P("table", "Hosts and namespaces with findings", "Every open finding by host, "
          "network namespace, kind, severity and rule, worst first; the agent's log and "
          "`keepalive-auditd audit` on the host name the connections and the fix.",
          ((f"sum by (instance, netns, kind, severity, rule) ({FOUND} > 0)", ""),),
          w=14, h=9),
        P("timeseries", "Findings by kind", "Open findings by kind and severity, fleet-wide.",
          ((f'sum by (kind, severity) (keepalive_findings{{{SEL},severity!="info"}})',
            "{{kind}} {{severity}}"),), w=10, h=9),
        P("timeseries", "Half-open connections by host", "Critical keepalive_probing and "
          "retransmitting findings per host and namespace.",
          ((f"sum by (instance, netns) ({HALF_OPEN})", "{{instance}} {{netns}}"),),
          w=12, h=8),
        P("timeseries", "Idle connections without keepalive past the path timeout",
          "Critical idle_no_keepalive findings per host and namespace: a middlebox has "
          "probably dropped them already.",
          ((f'sum by (instance, netns) (keepalive_findings{{{SEL},kind="idle_no_keepalive",'
            'severity="critical"})', "{{instance}} {{netns}}"),), w=12, h=8),
    )),
    ("Aborts", (
        P("stat", "Connections aborted (1 h)", "Connections the kernel gave up on in the "
          "last hour (keepalive, retransmission or user timeout, reset, unreachable), from "
          "the agents' tracepoints.",
          ((f"sum(increase({ABORTS}[1h])) or vector(0)", ""),), w=4, red_above=1),
        P("stat", "Flagged before the abort (1 h)", "Of those, the ones a finding of the "
          "agent had reported before the kernel aborted them.",
          ((f'sum(increase(keepalive_connection_aborts_total{{{SEL},predicted="true"}}[1h])) '
            "or vector(0)", ""),), w=4),
        P("timeseries", "Connections aborted by reason", "Aborts per host, namespace and "
          "reason; netns unknown: no audit had flagged the connection.",
          ((f"sum by (instance, netns, reason) (increase({ABORTS}[$__rate_interval])) > 0",
            "{{instance}} {{netns}} {{reason}}"),), w=8, h=8),
        P("timeseries", "Aborts on timeout (kernel counter)", "TcpExt TCPAbortOnTimeout per "
          "host and namespace: keepalive or retransmission timeouts that ended a connection "
          "(other namespaces than host count from their first abort).",
          ((f"sum by (instance, netns) (increase(keepalive_kernel_abort_on_timeout_total"
            f"{{{SEL}}}[$__rate_interval])) > 0", "{{instance}} {{netns}}"),), w=8, h=8),
    )),
    ("Detection times and tuning", (
        P("table", "Dead-peer detection time", "Seconds until a dead peer is noticed on the "
          "namespace defaults (idle: keepalive; in_flight: the tcp_retries2 model). Other "
          "namespaces than host appear only where they differ from their host.",
          ((f"max by (instance, netns, case) (keepalive_dead_peer_detection_seconds{{{SEL}}})",
            ""),), unit="s", w=12, h=8),
        P("table", "Namespaces not tuned like their host", "Sysctls whose value in a "
          "namespace is not its host's: a new network namespace starts at the kernel "
          "defaults and does not inherit the host's tuning.",
          ((f"keepalive_sysctl_differs_from_host{{{SEL}}} == 1", ""),), w=12, h=8),
    )),
    ("Agent health", (
        P("timeseries", "Time since the last successful audit", "Per agent; "
          "KeepaliveAuditStale fires above 300 s.",
          ((f"time() - keepalive_audit_last_success_timestamp_seconds{{{SEL}}}",
            "{{instance}}"),), unit="s", w=8, h=8),
        P("timeseries", "Audit duration", "Wall time of each agent's last audit.",
          ((f"keepalive_audit_duration_seconds{{{SEL}}}", "{{instance}}"),),
          unit="s", w=8, h=8),
        P("timeseries", "Audit errors", "Audit errors per agent and stage (dump, sysctls, "
          "counters, attribution, netns, config, http, log, internal).",
          ((f"sum by (instance, stage) (increase(keepalive_audit_errors_total{{{SEL}}}"
            "[$__rate_interval])) > 0", "{{instance}} {{stage}}"),), w=8, h=8),
        P("table", "Agents", "Version, namespaces audited, whether the last rules reload "
          "succeeded (1) or the old rules are still in use (0), and whether the agent reads "
          "the kernel's abort events (1).",
          ((f"max by (instance, version) (keepalive_build_info{{{SEL}}})", ""),
           (f"max by (instance) (keepalive_namespaces{{{SEL}}})", ""),
           (f"max by (instance) (keepalive_config_last_reload_successful{{{SEL}}})", ""),
           (f"max by (instance) (keepalive_events_up{{{SEL}}})", "")),
          w=12, h=8),
        P("table", "Namespaces read incompletely", "Namespaces whose audit could only "
          "partly read a part (attribution, counters, dump, sysctls): their findings may "
          "be missing.",
          ((f"keepalive_namespace_read_incomplete{{{SEL}}} == 1", ""),), w=12, h=8),
    )),
)  # fmt: skip


def targets(panel: P) -> list[dict[str, Any]]:
    instant = panel.kind != "timeseries"
    fmt = "table" if panel.kind == "table" else "time_series"
    return [
        {"datasource": DS, "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
         "instant": instant, "range": not instant, "format": fmt}
        for i, (expr, legend) in enumerate(panel.queries)
    ]  # fmt: skip


def field_config(panel: P) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if panel.red_above is not None:
        steps.append({"color": "red", "value": panel.red_above})
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "color": {"mode": "thresholds" if panel.kind == "stat" else "palette-classic"},
        "thresholds": {"mode": "absolute", "steps": steps},
    }
    if panel.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                              "showPoints": "never", "spanNulls": False}  # fmt: skip
    elif panel.kind == "table":
        defaults["custom"] = {"align": "auto", "cellOptions": {"type": "auto"}, "inspect": False}
    return {"defaults": defaults, "overrides": []}


def options(panel: P) -> dict[str, Any]:
    if panel.kind == "stat":
        return {"colorMode": "background", "graphMode": "none", "justifyMode": "auto",
                "orientation": "auto", "percentChangeColorMode": "standard",
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "showPercentChange": False, "textMode": "value_and_name" if len(panel.queries)
                > 1 else "value", "wideLayout": True}  # fmt: skip
    if panel.kind == "timeseries":
        return {"legend": {"calcs": [], "displayMode": "list", "placement": "bottom",
                           "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"}}  # fmt: skip
    return {"frameIndex": 0, "showHeader": True, "cellHeight": "sm"}


def transformations(panel: P) -> list[dict[str, Any]]:
    if panel.kind != "table":
        return []
    # One row per label set: merge the instant queries, drop the Time column.
    return [{"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": {"Time": True}}}]  # fmt: skip


def panels() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    y, ids = 0, iter(range(1, 1000))
    for row_title, row in ROWS:
        out.append({"type": "row", "id": next(ids), "title": row_title, "collapsed": False,
                    "panels": [], "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y}})  # fmt: skip
        y += 1
        x, line_h = 0, 0
        for panel in row:
            if x + panel.w > WIDTH:
                x, y, line_h = 0, y + line_h, 0
            out.append({
                "type": panel.kind, "id": next(ids), "title": panel.title,
                "description": panel.description, "datasource": DS,
                "gridPos": {"h": panel.h, "w": panel.w, "x": x, "y": y},
                "targets": targets(panel), "fieldConfig": field_config(panel),
                "options": options(panel), "transformations": transformations(panel),
            })  # fmt: skip
            x, line_h = x + panel.w, max(line_h, panel.h)
        y += line_h
    return out


def variables() -> list[dict[str, Any]]:
    def query(name: str, label: str, expr: str, **extra: Any) -> dict[str, Any]:
        return {"type": "query", "name": name, "label": label, "datasource": DS,
                "query": {"query": expr, "refId": f"{name}-variable"}, "refresh": 2,
                "sort": 1, **extra}  # fmt: skip

    return [
        {"type": "datasource", "name": "datasource", "label": "Data source",
         "query": "prometheus", "current": {"text": "default", "value": "default"}},
        query("job", "Job", "label_values(keepalive_build_info, job)",
              current={"text": "keepalive-auditd", "value": "keepalive-auditd"}),
        query("instance", "Host", 'label_values(keepalive_build_info{job="$job"}, instance)',
              multi=True, includeAll=True, allValue=".+",
              current={"text": "All", "value": "$__all"}),
    ]  # fmt: skip


def dashboard() -> dict[str, Any]:
    return {
        "uid": "keepalive-auditd-fleet",
        "title": "keepalive-auditd: fleet overview",
        "description": "Hosts and network namespaces with connections at risk of going "
        "half-open, detection times, and the health of the agents (keepalive-auditd).",
        "tags": ["keepalive-auditd", "tcp"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "1m",
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "templating": {"list": variables()},
        "annotations": {"list": []},
        "links": [],
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        if OUT.read_text() != render():
            print(f"{OUT} is stale: run {sys.argv[0]}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
