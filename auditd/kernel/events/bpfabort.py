"""The abort events from BPF: ``aborts.bpf.o`` on the tracepoints, records from its ring buffer.

The program (auditd/kernel/bpf/aborts.bpf.c) sends one record per connection the kernel
aborted, filtered in the kernel, with what the perf path cannot have: the network namespace
(its inode), the socket cookie (sock_diag's ``idiag_cookie``) and inode, the probes out, the
retransmissions, and the socket's own keepalive settings as its timers use them, read from
the socket at the moment of the abort. ``decode`` is pure (tests feed recorded bytes);
``BpfSource`` loads, attaches and reads. Loading needs CAP_BPF and CAP_PERFMON (or
CAP_SYS_ADMIN), the kernel's BTF and libbpf 1.x; any failure is a BpfUnavailable, for the
caller to fall back to the perf path.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

from auditd.errors import BpfUnavailable
from auditd.kernel.bpf.libbpf import BpfObject, Libbpf, RingBuffer, lookup_u64, system_libbpf
from auditd.model import SocketOptions, format_endpoint

OBJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bpf",
                      "aborts.bpf.o")  # fmt: skip
PROGRAMS = ("keepalive_rst", "peer_rst", "keepalive_abort")
# struct abort_rec: time_ns, cookie, ino; netns, error, keepalive_time, keepalive_intvl,
# user_timeout, hz, total_retrans, netns_keepalive_time, netns_keepalive_intvl; family,
# sport, dport; oldstate, probes_out, keepalive_probes, netns_keepalive_probes, keepopen,
# cause; saddr[16], daddr[16]. Native byte order, as the program writes it.
_REC = struct.Struct("=QQQIi7I3H6B16s16s")
RECORD_SIZE = _REC.size  # 104
CAUSE_KEEPALIVE_RST, CAUSE_PEER_RST = 1, 2
# Reads come at most this often: the ring wakes its reader for nearly every record at a low
# rate, and 200 aborts/s read one by one cost 4.3 % of a core here (perf's rings wake at a
# quarter full); 50 ms of latency batches them.
MIN_INTERVAL = 0.05


@dataclass(frozen=True, slots=True)
class BpfAbort:
    """One record: the abort as the socket told it at that moment."""

    time_ns: int  # CLOCK_MONOTONIC
    cookie: int
    inode: int | None  # the socket's inode, None once its application closed the fd
    netns_inode: int
    error: int
    local: str
    remote: str
    oldstate: int
    probes: int  # icsk_probes_out
    retransmits: int  # total_retrans
    keepalive_rst: bool
    peer_rst: bool
    options: SocketOptions  # effective values: the socket's own, else its namespace's


def _seconds(raw: int, netns: int, hz: int) -> int:
    """A keepalive time in jiffies, 0 meaning the namespace's sysctl (keepalive_time_when(),
    include/net/tcp.h) -> seconds."""
    return (raw or netns) // hz if hz else 0


def decode(data: bytes) -> BpfAbort | None:
    """One ring buffer record -> BpfAbort; None if it is not one (short, unknown family)."""
    if len(data) < RECORD_SIZE:
        return None
    (time_ns, cookie, ino, netns, error, ktime, kintvl, uto, hz, retrans, ns_ktime, ns_kintvl,
     family, sport, dport, oldstate, probes_out, kprobes, ns_kprobes, keepopen, cause,
     saddr, daddr) = _REC.unpack_from(data)  # fmt: skip
    if family == socket.AF_INET:
        src, dst = saddr[:4], daddr[:4]
    elif family == socket.AF_INET6:
        src, dst = saddr, daddr
    else:
        return None
    options = SocketOptions(
        bool(keepopen), _seconds(ktime, ns_ktime, hz), _seconds(kintvl, ns_kintvl, hz),
        kprobes or ns_kprobes, uto, source="kernel",
    )  # fmt: skip
    return BpfAbort(
        time_ns, cookie, ino or None, netns, error,
        format_endpoint(family, src, sport), format_endpoint(family, dst, dport),
        oldstate, probes_out, retrans, cause == CAUSE_KEEPALIVE_RST, cause == CAUSE_PEER_RST,
        options,
    )  # fmt: skip


class BpfSource:
    """The loaded program and its ring buffer; ``read`` waits at most ``timeout`` seconds.
    ``path`` and ``libbpf`` are parameters for tests (a refused object, no library)."""

    def __init__(self, path: str = OBJECT, libbpf: Libbpf | None = None) -> None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise BpfUnavailable(f"BPF: cannot read {path}: {exc.strerror}", exc.errno) from exc
        self._obj = BpfObject(data, os.path.basename(path), libbpf or system_libbpf())
        try:
            self._obj.load()
            for program in PROGRAMS:
                self._obj.attach(program)
            self._ring = RingBuffer(self._obj.lib, self._obj.map_fd("aborts"), "aborts")
            self._lost_fd = self._obj.map_fd("lost")
        except BpfUnavailable:
            self._obj.close()
            raise
        self._lost = 0
        self._last = 0.0

    def read(self, timeout: float) -> tuple[list[BpfAbort], int]:
        """The aborts that came, and how many the kernel dropped since the last read (the
        ring buffer was full)."""
        wait = self._last + MIN_INTERVAL - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last = time.monotonic()
        records = [r for r in map(decode, self._ring.poll(timeout)) if r is not None]
        total = lookup_u64(self._obj.lib, self._lost_fd) or 0
        lost, self._lost = max(0, total - self._lost), max(total, self._lost)
        return records, lost

    def close(self) -> None:
        self._ring.close()
        self._obj.close()
