"""The one layer that touches the OS: netlink sock_diag, procfs, the process table.

Everything above it works on the records of ``auditd.model``. ``KernelSource``
(``sources``) is the seam: the audit takes sources as parameters, tests hand in fakes or
recorded dumps. Modules: ``sockdiag`` (the dump), ``procfs`` (sysctls, counters),
``netns`` (namespaces), ``owners`` (socket -> process), ``inspect`` (a socket's options),
``ipvs``, ``limits`` (what an audit could only partly read), ``sources``.

This package only hands names on, and lazily: the console script imports
``auditd.kernel.owners.spawn`` before anything else, and must not pay for the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from auditd.kernel.netns import NamespaceRef as NamespaceRef
    from auditd.kernel.owners.attribution import (
        Attribution as Attribution,
    )
    from auditd.kernel.owners.attribution import (
        OwnerFinder as OwnerFinder,
    )
    from auditd.kernel.owners.scan import OwnerCache as OwnerCache
    from auditd.kernel.owners.scan import OwnerScan as OwnerScan
    from auditd.kernel.sockdiag import DumpStats as DumpStats
    from auditd.kernel.sources import (
        KernelSource as KernelSource,
    )
    from auditd.kernel.sources import (
        LocalKernel as LocalKernel,
    )
    from auditd.kernel.sources import (
        NamespaceKernel as NamespaceKernel,
    )

_WHERE = {
    "Attribution": "auditd.kernel.owners.attribution",
    "DumpStats": "auditd.kernel.sockdiag",
    "KernelSource": "auditd.kernel.sources",
    "LocalKernel": "auditd.kernel.sources",
    "NamespaceKernel": "auditd.kernel.sources",
    "NamespaceRef": "auditd.kernel.netns",
    "OwnerCache": "auditd.kernel.owners.scan",
    "OwnerFinder": "auditd.kernel.owners.attribution",
    "OwnerScan": "auditd.kernel.owners.scan",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'auditd.kernel' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
