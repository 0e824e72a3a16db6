"""Owner lookups across the audits of a session: a cache per namespace, and the child scan.

``Attribution`` is what one audit knows how to look up owners with: each namespace's
``OwnerCache`` carried over from the last audit (known owners re-checked with one readlink,
an unfinished scan resumed), and the ``/proc/*/fd`` scan running in a child for this audit,
if one was started. Each namespace's source asks its ``OwnerFinder``.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Protocol

from auditd.kernel.owners.prescan import FdPrescan
from auditd.kernel.owners.scan import (
    OwnerCache,
    OwnerScan,
    find_owners,
    recheck_owners,
    remember,
)


class OwnerPass(Protocol):
    """Owners of every socket from one pass of the kernel (the BPF owner iterator)."""

    @property
    def loaded(self) -> bool: ...

    def prefetch_owners(self) -> None:
        """Starts the pass (on a thread of its own), if it has not started."""
        ...

    def owners(self, inodes: Collection[int], proc_root: str = "/proc") -> OwnerScan | None:
        """None: the pass cannot be had; look in /proc."""
        ...


class OwnerFinder:
    """Finds the owners of socket inodes under ``proc_root`` for one namespace."""

    def __init__(
        self,
        proc_root: str = "/proc",
        cache: OwnerCache | None = None,
        prescan: FdPrescan | None = None,
        bpf: OwnerPass | None = None,
    ) -> None:
        self.proc_root = proc_root
        self.cache = cache
        # The audit's owner iterator, if it loaded: one pass for every socket. Only for the
        # real /proc: the iterator sees the real kernel's processes (tests hand in trees).
        self.bpf = bpf if os.path.realpath(proc_root) == "/proc" else None
        if self.bpf is not None and not cache:
            # Cold: the pass runs while the namespace dumps. Warm (an agent's later audits):
            # only if some owner is not remembered, after the dump (see _from_pass).
            self.bpf.prefetch_owners()
        # The child scans one /proc: only a finder on the same one may ask it.
        self.prescan = prescan if prescan is not None and prescan.proc_root == proc_root else None

    def find(self, inodes: Collection[int], deadline: float | None = None) -> OwnerScan:
        """``deadline``: a time.monotonic() bound on the search. From the owner iterator
        when it loaded, else (and when its pass fails) the /proc scan."""
        if self.bpf is not None:
            scan = self._from_pass(self.bpf, inodes)
            if scan is not None:
                return scan
        return find_owners(inodes, self.proc_root, deadline, cache=self.cache, prescan=self.prescan)

    def _from_pass(self, bpf: OwnerPass, inodes: Collection[int]) -> OwnerScan | None:
        """Remembered owners re-checked with one readlink each, the others from the owner
        pass (which walks every open file of the host, about 0.4 s of kernel time at 200k
        sockets): an agent whose flagged sockets stay the same pays no pass at all."""
        cache = self.cache
        known = recheck_owners(inodes, cache, self.proc_root) if cache else OwnerScan()
        missing = [inode for inode in inodes if inode and inode not in known.found]
        fresh = bpf.owners(missing, self.proc_root) if missing else OwnerScan()
        if fresh is None:
            return None
        scan = OwnerScan({**known.found, **fresh.found}, fds={**known.fds, **fresh.fds})
        if cache is not None:
            remember(cache, scan)
        return scan


class Attribution:
    """The owner lookups of one audit; ``caches`` afterwards holds those of the namespaces
    it audited (a namespace gone since the last audit takes its cache along)."""

    def __init__(
        self,
        previous: Mapping[str, OwnerCache] | None = None,
        prescan: FdPrescan | None = None,
        bpf: OwnerPass | None = None,
    ) -> None:
        self.previous = dict(previous or {})
        self.prescan = prescan
        self.bpf = bpf if bpf is not None and bpf.loaded else None
        self.caches: dict[str, OwnerCache] = {}

    def finder(self, netns: str, proc_root: str = "/proc") -> OwnerFinder:
        cache = self.caches.get(netns)
        if cache is None:  # (an empty cache is falsy: no `or`)
            cache = self.previous.get(netns)
        if cache is None:
            cache = OwnerCache()
        self.caches[netns] = cache
        return OwnerFinder(proc_root, cache, self.prescan, self.bpf)
