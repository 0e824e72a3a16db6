"""The per-namespace metric families, bounded: only what is wrong or different costs series.

The host namespace gets every series, zeros included (the STYLE habit: known label values
present as 0). Another namespace gets only the series that say something is wrong or
different there: an abort on timeout, a sysctl or detection time that differs from the
host's, a part it could not read (and its findings: auditd.exporter). Socket counts,
keepalive probes sent and the idle histogram are the host's only: healthy connections are not
news. So 100 empty or healthy namespaces cost nothing beyond the host's fixed set, and an
absent series of another namespace reads as "0" (counts) or "as on the host" (sysctls,
detection times); ``keepalive_namespace_read_incomplete`` tells "as on the host" from "not
read".
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from auditd.audit.tally import IDLE_BUCKETS
from auditd.model import AUDITED_STATES, Keepalive, TcpState
from auditd.results import HOST_NETNS, AuditResult, NamespaceReport

AS_OF = "As of the last audit."
OTHERS = "Other namespaces than host: only"  # how each HELP says which series are left out

# (metric suffix, sysctl, help); seconds-valued sysctls get _seconds.
SYSCTL_METRICS = (
    ("tcp_keepalive_time_seconds", "net.ipv4.tcp_keepalive_time",
     "Idle seconds before the first keepalive probe (net.ipv4.tcp_keepalive_time)."),
    ("tcp_keepalive_intvl_seconds", "net.ipv4.tcp_keepalive_intvl",
     "Seconds between keepalive probes (net.ipv4.tcp_keepalive_intvl)."),
    ("tcp_keepalive_probes", "net.ipv4.tcp_keepalive_probes",
     "Unanswered keepalive probes before abort (net.ipv4.tcp_keepalive_probes)."),
    ("tcp_retries2", "net.ipv4.tcp_retries2",
     "Retransmission count bounding unacknowledged data (net.ipv4.tcp_retries2)."),
    ("nf_conntrack_tcp_timeout_established_seconds",
     "net.netfilter.nf_conntrack_tcp_timeout_established",
     "Conntrack idle timeout of established TCP flows "
     "(net.netfilter.nf_conntrack_tcp_timeout_established), when conntrack is loaded."),
)  # fmt: skip

# Sysctls every Linux namespace has (net/ipv4/sysctl_net_ipv4.c): one missing is a failed read.
CORE_SYSCTLS = tuple(name for _, name, _ in SYSCTL_METRICS if name.startswith("net.ipv4."))
READ_PARTS = ("attribution", "counters", "dump", "sysctls")
PRESET_STATES = sorted({TcpState(s).label for s in AUDITED_STATES})


def host_of(result: AuditResult) -> NamespaceReport | None:
    return next((ns for ns in result.namespaces if ns.netns == HOST_NETNS), None)


def incomplete_parts(ns: NamespaceReport) -> set[str]:
    """What the audit of ``ns`` could only partly read (see READ_PARTS)."""
    parts = set()
    if not ns.attribution_complete:
        parts.add("attribution")
    if ns.counters.keepalive_probes is None or ns.counters.abort_on_timeout is None:
        parts.add("counters")
    if ns.dump_interrupted or ns.dump_skipped:
        parts.add("dump")
    if any(ns.sysctls.get(name) is None for name in CORE_SYSCTLS):
        parts.add("sysctls")
    return parts


def namespace_families(result: AuditResult) -> Iterator[Metric]:
    host = host_of(result)
    yield from _sysctls(result, host)
    yield from _detection(result, host)
    yield from _connections(host)
    yield from _counters(result, host)
    yield from _idle_histogram(host)
    yield from _namespace_set(result)


def _sysctls(result: AuditResult, host: NamespaceReport | None) -> Iterator[Metric]:
    for suffix, name, help_ in SYSCTL_METRICS:
        family = GaugeMetricFamily(
            f"keepalive_sysctl_{suffix}",
            f"{help_} {OTHERS} where it differs from the host's. {AS_OF}",
            labels=["netns"],
        )
        for ns in result.namespaces:
            value = ns.sysctls.get(name)
            # Without a host to compare with (its read failed), every namespace is shown.
            if value is not None and (host is None or ns is host or name in ns.differs_from_host):
                family.add_metric([ns.netns], value)
        yield family


def _detection(result: AuditResult, host: NamespaceReport | None) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "keepalive_dead_peer_detection_seconds",
        "Seconds until a dead peer is noticed on the namespace defaults: case idle = "
        "tcp_keepalive_time + tcp_keepalive_probes * tcp_keepalive_intvl (keepalive on), "
        f"case in_flight = the tcp_retries2 backoff model. {OTHERS} where it differs from "
        f"the host's. {AS_OF}",
        labels=["netns", "case"],
    )
    for ns in result.namespaces:
        cases = (("idle", ns.detection_idle_seconds), ("in_flight", ns.detection_in_flight_seconds))
        for case, seconds in cases:
            if host is None or ns is host or seconds != _detection_of(host, case):
                family.add_metric([ns.netns, case], seconds)
    yield family


def _detection_of(ns: NamespaceReport, case: str) -> float:
    return ns.detection_idle_seconds if case == "idle" else ns.detection_in_flight_seconds


def _connections(host: NamespaceReport | None) -> Iterator[Metric]:
    """The host only: sockets are not something wrong, and a pod with healthy connections
    must cost nothing (the JSON and the findings page count every namespace's)."""
    family = GaugeMetricFamily(
        "keepalive_tcp_connections",
        "TCP sockets of the host namespace by state and inferred keepalive status (on, off, "
        f"unknown). {AS_OF}",
        labels=["netns", "state", "keepalive"],
    )
    if host is not None:
        seen = {state for state, _ in host.connections}
        for state in sorted(set(PRESET_STATES) | seen):
            for ka in Keepalive.ALL:
                family.add_metric([host.netns, state, ka], host.connections.get((state, ka), 0))
    yield family


def _counters(result: AuditResult, host: NamespaceReport | None) -> Iterator[Metric]:
    probes = CounterMetricFamily(
        "keepalive_kernel_keepalive_probes",
        f"Keepalive probes sent by the kernel in the host namespace (TcpExt TCPKeepAlive). {AS_OF}",
        labels=["netns"],
    )
    if host is not None and host.counters.keepalive_probes is not None:
        probes.add_metric([host.netns], host.counters.keepalive_probes)
    yield probes
    # An abort on timeout is something wrong: other namespaces have the counter once nonzero.
    aborts = CounterMetricFamily(
        "keepalive_kernel_abort_on_timeout",
        "Connections the kernel aborted on timeout (TcpExt TCPAbortOnTimeout). "
        f"{OTHERS} nonzero counters. {AS_OF}",
        labels=["netns"],
    )
    for ns in result.namespaces:
        value = ns.counters.abort_on_timeout
        if value is not None and (value or ns is host):
            aborts.add_metric([ns.netns], value)
    yield aborts


def _idle_histogram(host: NamespaceReport | None) -> Iterator[Metric]:
    """The host only: 36 series per namespace would be the largest cost of all, and an idle
    connection at risk in another namespace is a finding of its own there."""
    family = HistogramMetricFamily(
        "keepalive_connection_idle_seconds",
        "Path idle time of ESTABLISHED connections of the host namespace by keepalive "
        f"status. {AS_OF}",
        labels=["netns", "keepalive"],
    )
    if host is not None:
        for ka in Keepalive.ALL:
            counts = host.idle_histogram.get(ka, [0] * (len(IDLE_BUCKETS) + 1))
            buckets, running = [], 0
            for bound, n in zip([*(f"{b:g}" for b in IDLE_BUCKETS), "+Inf"], counts):
                running += n
                buckets.append((bound, running))
            family.add_metric([host.netns, ka], buckets, host.idle_sum.get(ka, 0.0))
    yield family


def _namespace_set(result: AuditResult) -> Iterator[Metric]:
    """How many namespaces were audited, where each one's sysctls are not the host's, and
    what could not be read."""
    count = GaugeMetricFamily(
        "keepalive_namespaces",
        "Network namespaces audited (--audit.netns); those skipped because they vanished or "
        f'could not be entered count in keepalive_audit_errors_total{{stage="netns"}}. {AS_OF}',
    )
    count.add_metric([], len(result.namespaces))
    yield count
    differs = GaugeMetricFamily(
        "keepalive_sysctl_differs_from_host",
        "1 if the namespace's sysctl has another value than the host's (a new netns starts at "
        "the kernel defaults: the host's tuning is not inherited); only the 1s, so never for "
        f"the host itself. {AS_OF}",
        labels=["netns", "sysctl"],
    )
    incomplete = GaugeMetricFamily(
        "keepalive_namespace_read_incomplete",
        "1 if the audit of the namespace could only partly read a part: attribution (the "
        "owner scan ran out of time), counters, dump (cut short, inconsistent or malformed "
        f"records), sysctls; else 0. {OTHERS} the 1s. {AS_OF}",
        labels=["netns", "part"],
    )
    for ns in result.namespaces:
        full = ns.netns == HOST_NETNS
        for name in ns.differs_from_host:
            differs.add_metric([ns.netns, name], 1)
        parts = incomplete_parts(ns)
        for part in READ_PARTS:
            if full or part in parts:
                incomplete.add_metric([ns.netns, part], 1 if part in parts else 0)
    yield differs
    yield incomplete
