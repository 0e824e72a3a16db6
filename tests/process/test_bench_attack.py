"""bench/attack.py measures what it claims, at a small N. No timing is asserted: the figures
are the benchmark's output (README "Performance"), not a test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ATTACK = Path(__file__).resolve().parents[2] / "bench" / "attack.py"


def _run(*args: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, str(ATTACK), *args], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    figures: dict[str, object] = json.loads(proc.stdout)
    return figures


def test_the_rules_bench_loads_reloads_and_stops() -> None:
    got = _run("rules", "--rules", "300")
    assert got["rules"] == 300 and 15_000 < got["file_bytes"] < 30_000  # type: ignore[operator]
    assert got["scrape_status"] == 200
    series = got["series"]
    assert isinstance(series, dict) and series["keepalive_findings"] == 0 and series["total"] > 0
    for key in ("load_seconds_median", "invalid_cpu_seconds_median",
                "sigterm_during_reload_seconds"):  # fmt: skip
        assert got[key] > 0  # type: ignore[operator]
    reloads = got["agent_reload_seconds"]
    assert isinstance(reloads, list) and len(reloads) == 3 and all(r > 0 for r in reloads)
    # the file cut off in its last line (4 header lines, 3 a rule, then the cut one): rejected
    # where the stream ends unclosed, the line after it, as PyYAML's loader also says
    error = got["invalid_error"]
    assert isinstance(error, str) and error.endswith(
        f"invalid.yaml:{4 + 3 * 300 + 2}: invalid YAML: did not find expected ',' or ']' "
        "(while parsing a flow sequence)"
    ), error


def test_the_flood_bench_floods_and_scrapes() -> None:
    got = _run("flood", "--clients", "5", "--seconds", "3", "--cost", "4")
    assert got["scrapes"] > 0 and got["scrape_failures"] == 0  # type: ignore[operator]
    answers = got["flood_answers"]
    assert isinstance(answers, dict)
    assert answers.get("401", 0) >= 5  # the free failures, then the backoff answers
    assert answers.get("429", 0) > 0
