"""The shipped iterators: loaded once, then run per namespace (sockets) or per audit (owners).

An iter/tcp iterator walks the network namespace of the thread that calls
``bpf_iter_create`` (net/ipv4/tcp_ipv4.c bpf_iter_init_tcp -> bpf_iter_init_seq_net takes
current's netns), so the programs are loaded and attached once from any thread and each
namespace's instance is created by the caller's ``enter`` function (a short-lived thread
inside it, ``auditd.kernel.netns.call_in_netns``); the fd is read wherever. iter/task_file
walks every process on the host whatever the namespace.

Loading needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN), the kernel's BTF, and libbpf 1.x;
a failure is kept as ``error`` and ``ensure`` tries again after ``retry_seconds``, so an agent
recovers when the cause goes away (a capability granted, a lockdown lifted).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from auditd.errors import BpfUnavailable
from auditd.kernel.bpf.libbpf import BpfObject, Libbpf, Link, read_iter, system_libbpf

OBJECT_DIR = os.path.dirname(os.path.abspath(__file__))
SOCKETS = ("sockets.bpf.o", "keepalive_sockets")
OWNERS = ("owners.bpf.o", "keepalive_owners")
# The audit pass (aggregates and candidates in the kernel): loaded apart from the other two,
# so a kernel that refuses it still gets exact options and owners from them.
AUDIT = ("audit.bpf.o", "keepalive_audit")
# After a failure, loading is tried again at most this often: a refused load costs a few ms
# (the verifier's refusal more), an agent auditing every second should not pay it each time.
RETRY_SECONDS = 60.0

T = TypeVar("T")


def _here(fn: Callable[[], int]) -> int:
    return fn()


class _Retried:
    """The last failure of one load, kept: ``attempt`` raises it again without trying until
    ``retry_seconds`` have passed since. The caller holds the lock."""

    def __init__(self, unavailable: str, retry_seconds: float, clock: Callable[[], float]) -> None:
        self.unavailable = unavailable  # the message while no error is known
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._failed_at: float | None = None
        self.error: str | None = None

    def attempt(self, load: Callable[[], T]) -> T:
        now = self._clock()
        if self._failed_at is not None and now - self._failed_at < self.retry_seconds:
            raise BpfUnavailable(self.error or self.unavailable)
        self._failed_at = now
        try:
            loaded = load()
        except OSError as exc:
            self.error = f"BPF: cannot read {exc.filename}: {exc.strerror}"
            raise BpfUnavailable(self.error, exc.errno) from exc
        except BpfUnavailable as exc:
            self.error = str(exc)
            raise
        self.error = None
        self._failed_at = None
        return loaded


class Iterators:
    """Both iterators of one process. ``libbpf`` and ``directory`` are parameters for tests
    (a missing library, objects the kernel refuses)."""

    def __init__(
        self,
        directory: str = OBJECT_DIR,
        libbpf: Callable[[], Libbpf] = system_libbpf,
        kconfig: str | None = None,
        retry_seconds: float = RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self._libbpf = libbpf
        self._kconfig = kconfig
        self._objects: list[BpfObject] = []
        self._links: dict[str, Link] = {}
        self._lock = threading.Lock()
        self._loads = _Retried("BPF: unavailable", retry_seconds, clock)
        self._audit: tuple[BpfObject, Link] | None = None
        self._audit_loads = _Retried("BPF: the audit pass is unavailable", retry_seconds, clock)
        self._ns_locks: dict[int, threading.Lock] = {}

    @property
    def error(self) -> str | None:
        """Why the last load of the socket and owner iterators failed."""
        return self._loads.error

    @property
    def audit_error(self) -> str | None:
        """Why the audit pass did not load."""
        return self._audit_loads.error

    def _load(self, file: str, program: str) -> Link:
        return self._load_object(file, program)[1]

    def _load_object(self, file: str, program: str) -> tuple[BpfObject, Link]:
        with open(os.path.join(self.directory, file), "rb") as f:
            data = f.read()
        obj = BpfObject(data, file, self._libbpf(), self._kconfig)
        try:
            obj.load()
            link = obj.attach(program)
        except BpfUnavailable:
            obj.close()
            raise
        self._objects.append(obj)
        return obj, link

    def ensure(self) -> None:
        """Loads what is not loaded yet; raises BpfUnavailable (also kept in ``error``)."""
        with self._lock:
            if len(self._links) < 2:
                self._loads.attempt(self._load_missing)

    def _load_missing(self) -> None:
        for file, program in (SOCKETS, OWNERS):
            if program not in self._links:
                self._links[program] = self._load(file, program)

    @property
    def loaded(self) -> bool:
        return len(self._links) == 2

    def _run(self, program: str, enter: Callable[[Callable[[], int]], int]) -> bytes:
        self.ensure()
        link = self._links[program]
        return read_iter(enter(link.iter_fd))

    def sockets(self, enter: Callable[[Callable[[], int]], int] = _here) -> bytes:
        """One pass over the TCP sockets of the namespace ``enter`` runs its function in."""
        return self._run(SOCKETS[1], enter)

    def owners(self) -> bytes:
        """One pass over every process's open TCP sockets."""
        return self._run(OWNERS[1], _here)

    def _ensure_audit(self) -> tuple[BpfObject, Link]:
        """The audit pass's object, loaded once (retried as ``ensure``); raises
        BpfUnavailable, kept in ``audit_error``."""
        self.ensure()
        with self._lock:
            if self._audit is None:
                self._audit = self._audit_loads.attempt(lambda: self._load_object(*AUDIT))
            return self._audit

    def audit_pass(
        self,
        netns_inode: int,
        params: bytes,
        enter: Callable[[Callable[[], int]], int] = _here,
        ports: Sequence[tuple[bytes, bytes]] = (),
    ) -> bytes:
        """One audit pass over the namespace ``enter`` runs its function in, whose inode is
        ``netns_inode``, under ``params`` (a packed ``struct audit_params``) and the
        thresholds by port ``ports`` (keys and values of the map "ports"). Passes of one
        namespace take turns (its parameters are keyed by its inode); others overlap."""
        obj, link = self._ensure_audit()
        key = struct.pack("=I", netns_inode)
        with self._lock:
            ns_lock = self._ns_locks.setdefault(netns_inode, threading.Lock())
        with ns_lock:
            written: list[bytes] = []
            try:
                for port_key, value in ports:
                    obj.map_update("ports", port_key, value)
                    written.append(port_key)
                obj.map_update("params", key, params)
                return read_iter(enter(link.iter_fd))
            finally:
                obj.map_delete("params", key)
                for port_key in written:
                    obj.map_delete("ports", port_key)

    def close(self) -> None:
        with self._lock:
            for obj in self._objects:
                obj.close()
            self._objects.clear()
            self._links.clear()
            self._audit = None
