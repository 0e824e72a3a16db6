"""The benchmark measures what it claims: it opens what it says and the audit counts it.

Run at a small N in a namespace of its own, so the host's sockets do not blur the counts.
No timings are asserted here: figures are the benchmark's output, not a test's.
"""

from __future__ import annotations

import json
import os
import sys

import netlab
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "bench", "bench.py")

pytestmark = pytest.mark.kernel


def test_bench_counts_what_it_created(lab: netlab.Lab) -> None:
    ns = lab.netns()
    proc = ns.run([sys.executable, BENCH, "--sockets", "400", "--rounds", "1", "--flagged",
                   "0.01", "--scrapers", "2", "--scrape-seconds", "0.5", "--json"],
                  check=False, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["connections_opened"] == 200
    assert report["sockets_seen"] == report["established_seen"] == 400  # both ends
    assert report["keepalive_on_seen"] == 100  # every other client end
    # Connections 0 and 100 keep the 7200 s default: keepalive_too_slow under a 1 h timeout.
    assert report["too_slow_findings"] == 2
    assert report["attributed_findings"] == 2  # their holder process was found
    assert report["attribution_found_min"] == report["cli_attribution_found_min"] == 2
    assert report["findings_total"] == report["findings"]  # 2 + the detection_budget ones
    for key in ("floor_wall_s", "audit_wall_s", "ss_wall_s", "cli_process_wall_s"):
        assert report[key] > 0
    assert report["audit_peak_rss_mb"] > 0
    assert report["scrape"]["scrapes"] > 0 and report["scrape"]["errors"] == 0


def test_bench_counts_the_series_of_empty_namespaces() -> None:
    proc = netlab.run([sys.executable, BENCH, "--namespaces", "5", "--rules", "50", "--json"],
                      check=False, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["namespaces"], report["rules"]) == (5, 50)
    assert report["series"]["bench"] == 0  # empty namespaces cost nothing
    # 16, and the abort events: lost_total, up, source (bpf, perf)
    assert report["series"]["agent"] == 20
    assert report["series_total"] == sum(report["series"].values())
    left = netlab.run(["ip", "netns", "list"]).stdout.split()
    assert not [n for n in left if n.startswith(report["netns_prefix"])]  # deleted after


EVENTS = os.path.join(os.path.dirname(BENCH), "events.py")


@pytest.mark.parametrize("source", ["bpf", "perf"])
def test_events_bench_sees_every_abort_it_makes(source: str) -> None:
    proc = netlab.run([sys.executable, EVENTS, "--rate", "200", "--seconds", "1", "--rounds", "1",
                       "--abort-rate", "50", "--abort-seconds", "1", "--json", "--source", source],
                      check=False, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    aborts = report["aborts"]
    assert aborts["done"] == 50 and aborts["reader"]["seen"] == 50  # each reset is one abort
    assert aborts["reader"]["source"] == source
    # perf also counts the samples this kernel counted and never wrote, machine-wide: the
    # other sessions' timer-driven aborts on an idle CPU (README "Abort events")
    assert aborts["reader"]["lost"] == 0 or source == "perf"
    (churn,) = report["churn_with_reader"]
    assert churn["done"] == 200 and churn["reader"]["seen"] == 0  # a normal close is none
    assert report["netns"] not in netlab.run(["ip", "netns", "list"]).stdout.split()
