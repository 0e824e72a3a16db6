"""Prometheus families of the abort events. Translates an ``AbortState`` only.

Label values come from small known sets: the namespaces of the audits (and ``unknown`` for
an abort no audit had flagged), the five reasons, the configured rules (and ``unknown``), and
``predicted`` true or false. Like the findings (auditd.exporter), a namespace or rule costs
series only once something happened there: counts that are nonzero, plus a 0 for each reason
on the host (rule ``default`` predicted, ``unknown`` not) and in ``unknown``, so
``increase()`` sees the first abort where most happen; a series that counted stays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from auditd.abort_records import UNKNOWN
from auditd.aborts import Reason
from auditd.audit.matching import DEFAULT_RULE
from auditd.events import AbortState
from auditd.results import HOST_NETNS


class AbortCollector(Collector):
    def __init__(self, get_state: Callable[[], AbortState]) -> None:
        self._get_state = get_state

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        state = self._get_state()
        aborts = CounterMetricFamily(
            "keepalive_connection_aborts",
            "TCP connections the kernel aborted since the agent started (tracepoints), by "
            "namespace, reason (keepalive_timeout, retransmit_timeout, user_timeout, "
            "peer_reset, unreachable), the rule of the finding open for it, and whether one "
            "was (predicted); netns and rule are unknown when no audit had flagged it.",
            labels=["netns", "reason", "rule", "predicted"],
        )
        counts = dict(state.counts)
        for reason in Reason:
            counts.setdefault((UNKNOWN, reason.value, UNKNOWN, "false"), 0)
            if HOST_NETNS in state.namespaces:
                counts.setdefault((HOST_NETNS, reason.value, DEFAULT_RULE, "true"), 0)
                counts.setdefault((HOST_NETNS, reason.value, UNKNOWN, "false"), 0)
        for key in sorted(counts):
            aborts.add_metric(list(key), counts[key])
        yield aborts
        lost = CounterMetricFamily(
            "keepalive_events_lost",
            "Tracepoint events the kernel dropped because the agent's ring buffer was full "
            "(perf PERF_RECORD_LOST): aborts may be missing from the count.",
        )
        lost.add_metric([], state.lost)
        yield lost
        up = GaugeMetricFamily(
            "keepalive_events_up",
            "1 while the agent reads the kernel's abort events, 0 when it cannot "
            "(no CAP_PERFMON, no tracepoints: see the log).",
        )
        up.add_metric([], 0 if state.error is not None else 1)
        yield up
        source = GaugeMetricFamily(
            "keepalive_events_source",
            "1 for where the agent reads abort events from: bpf (a tp_btf program, which reads "
            "the socket's namespace, cookie and settings at the abort) or perf (perf_event_open "
            "on the tracepoints, when the program does not load); 0 for the other, both 0 while "
            "events are off.",
            labels=["source"],
        )
        for name in ("bpf", "perf"):
            source.add_metric([name], 1 if state.source == name else 0)
        yield source
