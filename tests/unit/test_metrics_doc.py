"""README.md's ``## Metrics`` table against what the exporter really exposes.

The table has one row per metric: the name in backticks, the type (gauge, counter,
histogram, info), the labels (backticked, comma-separated, or "none"), then free text.
Counters are named with ``_total`` and histograms by their base name, as users query them.
"""

from __future__ import annotations

import re
from pathlib import Path

from exposition import Row, exposed

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "## Metrics"


def table_rows(markdown: str, heading: str = HEADING) -> dict[str, Row]:
    """Metric name -> row, from the first table under ``heading`` (up to the next heading)."""
    lines = markdown.splitlines()
    assert heading in lines, f"README.md has no {heading!r} section"
    section = []
    for line in lines[lines.index(heading) + 1 :]:
        if line.startswith("#"):
            break
        section.append(line)
    table = [line.strip() for line in section if line.strip().startswith("|")]
    assert len(table) > 2, f"no table under {heading!r}"
    rows: dict[str, Row] = {}
    for line in table[2:]:  # after the header and the |---| separator
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) >= 3, f"row with fewer than 3 cells: {line}"
        name = re.fullmatch(r"`([a-z_:][a-z0-9_:]*)`", cells[0])
        assert name is not None, f"first cell is not a backticked metric name: {line}"
        assert name.group(1) not in rows, f"listed twice: {name.group(1)}"
        labels = (
            frozenset() if cells[2] == "none" else frozenset(re.findall(r"`([^`]+)`", cells[2]))
        )
        assert cells[2] == "none" or labels, f"labels cell is neither backticked nor none: {line}"
        rows[name.group(1)] = Row(cells[1].lower(), labels)
    return rows


def test_the_table_lists_every_metric_and_only_those() -> None:
    documented = table_rows(README.read_text(encoding="utf-8"))
    real = exposed()
    assert sorted(set(real) - set(documented)) == [], "exposed but not in README.md"
    assert sorted(set(documented) - set(real)) == [], "in README.md but not exposed"


def test_the_table_has_the_right_types_and_labels() -> None:
    documented = table_rows(README.read_text(encoding="utf-8"))
    real = exposed()
    wrong = {
        name: {"README": documented[name], "exposed": row}
        for name, row in real.items()
        if name in documented and documented[name] != row
    }
    assert wrong == {}


def test_table_parser() -> None:
    text = "\n".join(
        [
            "## Metrics",
            "",
            "Some words.",
            "",
            "| metric | type | labels | meaning |",
            "|---|---|---|---|",
            "| `a_total` | counter | `x`, `y` | text with | a pipe |",
            "| `b` | Gauge | none | |",
            "",
            "## Next",
            "| `c` | gauge | none | not in the section |",
        ]
    )
    assert table_rows(text) == {
        "a_total": Row("counter", frozenset({"x", "y"})),
        "b": Row("gauge", frozenset()),
    }
