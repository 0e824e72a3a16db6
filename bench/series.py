"""Series count of a real agent with N empty network namespaces and M rules (bench --namespaces).

Makes the namespaces in one ``ip -batch`` (names ``kbench-<pid>-<i>``), starts the agent in
the host namespace with ``--audit.netns all``, waits for an audit that saw them all, counts
the series of /metrics by owner (the agent itself, the host, the bench's namespaces, any
other namespace of the machine) and the exposition's size and render time, then deletes the
namespaces. Root only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def _rules(path: str, count: int) -> None:
    # Rules that match nothing (TEST-NET-1 peers), as a large but quiet rules file.
    lines = ["version: 1", "defaults: {detection_budget: 30d}", "rules:" if count else "rules: []"]
    for i in range(count):
        lines.append(f"  - name: r{i}")
        lines.append(
            f"    match: {{remote_cidrs: [192.0.2.{i % 256}/32], remote_ports: [{1 + i}]}}"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _ip_batch(commands: list[str]) -> None:
    subprocess.run(["ip", "-force", "-batch", "-"], input="".join(commands), text=True,
                   check=True, capture_output=True)  # fmt: skip


def _scrape(url: str) -> tuple[str, float]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    return body, time.perf_counter() - started


def count(text: str, ours: set[str]) -> dict[str, int]:
    counts = {"agent": 0, "host": 0, "bench": 0, "other": 0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            netns = s.labels.get("netns")
            owner = "agent" if netns is None else "host" if netns == "host" else None
            counts[owner or ("bench" if netns in ours else "other")] += 1
    return counts


def measure(namespaces: int, rules: int, port: int, root: str) -> dict[str, Any]:
    prefix = f"kbench-{os.getpid()}-"
    names = [f"{prefix}{i}" for i in range(namespaces)]
    tmp = tempfile.mkdtemp(prefix="keepalive-bench-series-")
    rules_file = os.path.join(tmp, "rules.yaml")
    _rules(rules_file, rules)
    _ip_batch([f"netns add {n}\n" for n in names])
    cmd = [sys.executable, "-m", "auditd", "run", "--audit.netns", "all", "--audit.interval",
           "2s", "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "error",
           "--config.file", rules_file]  # fmt: skip
    try:
        agent = subprocess.Popen(cmd, cwd=root, stderr=subprocess.DEVNULL)
        try:
            body = _wait(f"http://127.0.0.1:{port}/metrics", namespaces + 1, agent)
            _, seconds = _scrape(f"http://127.0.0.1:{port}/metrics")
        finally:
            agent.kill()  # not a test of stopping (with millions of series it took 10 s+)
            agent.wait(timeout=10)
    finally:
        _ip_batch([f"netns delete {n}\n" for n in names])
        os.remove(rules_file)
        os.rmdir(tmp)
    counts = count(body, set(names))
    return {"namespaces": namespaces, "rules": rules, "netns_prefix": prefix, "series": counts,
            "series_total": sum(counts.values()), "metrics_bytes": len(body),
            "scrape_ms": round(seconds * 1000, 2)}  # fmt: skip


def _wait(url: str, want: int, agent: subprocess.Popen[bytes], timeout: float = 120) -> str:
    """The exposition of the first audit that saw at least ``want`` namespaces."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise RuntimeError(f"the agent exited with {agent.returncode}")
        try:
            body, _ = _scrape(url)
            for line in body.splitlines():
                if line.startswith("keepalive_namespaces ") and float(line.split()[1]) >= want:
                    return body
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no audit of {want} namespaces within {timeout:g} s")


def report(r: dict[str, Any]) -> None:
    s = r["series"]
    print(f"series with {r['namespaces']} empty namespaces and {r['rules']} rules: "
          f"{r['series_total']} in all (agent {s['agent']}, host {s['host']}, the bench's "
          f"namespaces {s['bench']}, other namespaces of this machine {s['other']}); "
          f"/metrics {r['metrics_bytes']} bytes, scraped in {r['scrape_ms']} ms")  # fmt: skip
