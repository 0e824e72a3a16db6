"""Every runtime dependency in pyproject.toml is imported by the package, and the test
oracles (psutil, pyroute2) are not: a dependency nobody imports is weight on every install."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
IMPORT_NAMES = {"prometheus-client": "prometheus_client", "pyyaml": "yaml", "bcrypt": "bcrypt"}
ORACLES = ("psutil", "pyroute2")


def _imported() -> set[str]:
    found: set[str] = set()
    pattern = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", re.M)
    for path in (ROOT / "auditd").rglob("*.py"):
        found.update(pattern.findall(path.read_text()))
    return found


def _project() -> Any:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_runtime_dependency_is_imported() -> None:
    declared: list[str] = _project()["dependencies"]
    names = [re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in declared]
    assert set(names) == set(IMPORT_NAMES), "new dependency: add its import name here"
    imported = _imported()
    for name in names:
        assert IMPORT_NAMES[name] in imported, f"{name} is declared but auditd never imports it"


def test_oracles_stay_in_the_test_extra() -> None:
    imported = _imported()
    test_extra = " ".join(_project()["optional-dependencies"]["test"])
    for name in ORACLES:
        assert name not in imported and name in test_extra
