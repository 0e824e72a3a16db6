"""Shared fixtures. Kernel tests (``@pytest.mark.kernel``) get a ``lab`` of network namespaces.

Kernel tests are skipped, with the reason, when this process cannot make network namespaces
(not root, or ``ip netns add`` fails). A session-level safety net deletes ``kaud-*``
namespaces left by runs that died, at the start, and ours at the end.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterator

import netlab  # tests/ is on sys.path (pytest's rootdir-relative "prepend" import mode)
import pytest


@functools.cache
def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return netlab.netns_available()


def _can_sweep() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def pytest_sessionstart(session: pytest.Session) -> None:
    if _can_sweep():
        netlab.sweep_stale()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _can_sweep():
        netlab.sweep_stale(include_own=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kernel = [item for item in items if item.get_closest_marker("kernel")]
    if not kernel:
        return
    reason = _netns_unavailable()
    if reason is not None:
        for item in kernel:
            item.add_marker(pytest.mark.skip(reason=f"kernel test: {reason}"))


@pytest.fixture
def lab() -> Iterator[netlab.Lab]:
    """Namespaces, cables, sockets and processes of one test, all gone afterwards."""
    reason = _netns_unavailable()  # for a test that asks for a lab without the kernel mark
    if reason is not None:
        pytest.skip(f"kernel test: {reason}")
    the_lab = netlab.Lab()
    try:
        yield the_lab
    finally:
        names = {ns.name for ns in the_lab.namespaces}
        errors = the_lab.close()
    left = names.intersection(netlab.ours())
    assert not errors and not left, f"lab cleanup failed: {errors}, namespaces left: {left}"
