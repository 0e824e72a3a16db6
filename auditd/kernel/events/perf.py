"""perf_event_open on tracepoints, filtered in the kernel, read from mmap rings.

One event per tracepoint per online CPU (pid -1: every task, system-wide, which needs
CAP_PERFMON or CAP_SYS_ADMIN, or kernel.perf_event_paranoid <= -1 for raw tracepoint samples;
kernel/events/core.c ``perf_event_open``), each with a tracepoint filter
(PERF_EVENT_IOC_SET_FILTER, the tracefs filter syntax), so the kernel drops what is not an
abort before it is copied anywhere.

Each event has a ring of its own, so the kernel's count of an event (``counts``, a
``read`` of its fd) can be held against the samples its ring gave: on 6.18 (issue 13) a
sample made on a CPU that is idle when the tracepoint fires (a timer's softirq on the idle
task) is counted but never written to the ring, with no PERF_RECORD_LOST and
PERF_FORMAT_LOST at 0 (measured: CPU 1 idle, 53 retransmission samples counted and none
written, CPU 0 all of its 56; every one with a task spinning on CPU 1; ``perf record -a``
loses them alike; with an ftrace instance on the same tracepoint none reaches any ring). The
caller counts those as lost; the BPF source (auditd.kernel.events.bpfabort) does not go
through perf's output and has no such loss.

``drain`` gives the rings of the first probe (the event that ends an abort) before the
others: whatever happened before an error report on its CPU is then in the same drain or an
earlier one, never in a later one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import platform
import select
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from auditd.errors import KernelError

# perf_event_open's syscall number (arch/*/entry/syscalls, include/uapi/asm-generic/unistd.h).
PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "arm64": 241, "riscv64": 241, "i686": 336,
                   "i386": 336, "armv7l": 364, "ppc64le": 319, "s390x": 331}  # fmt: skip
PERF_TYPE_TRACEPOINT = 2
PERF_SAMPLE_TIME = 1 << 2
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
ATTR_SIZE = 128  # PERF_ATTR_SIZE_VER7; the kernel zero-extends what it does not get
# attr bit flags (the u64 at offset 40): disabled, watermark, use_clockid
_DISABLED, _WATERMARK, _USE_CLOCKID = 1 << 0, 1 << 14, 1 << 25
CLOCK_MONOTONIC = 1
# ioctls (include/uapi/linux/perf_event.h): _IO('$', 0), _IO('$', 1), _IOW('$', 6, char *)
IOC_ENABLE, IOC_DISABLE, IOC_SET_FILTER = 0x2400, 0x2401, 0x40082406
# struct perf_event_mmap_page: data_head, data_tail, data_offset, data_size
_HEAD, _TAIL = 1024, 1032
# Pages of each ring, a power of two: the first probe's 32 (128 KiB with 4 KiB pages), the
# others' 16. With the control pages, 4 probes take 88 pages a CPU, under the 516 KiB a CPU
# that kernel.perf_event_mlock_kb lets a user without CAP_IPC_LOCK lock.
RING_PAGES = (32, 16)

NEEDS = "needs CAP_PERFMON or CAP_SYS_ADMIN, or kernel.perf_event_paranoid <= -1"


def parse_cpu_list(text: str) -> list[int]:
    """``0-3,8`` (/sys/devices/system/cpu/online) -> [0, 1, 2, 3, 8]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def online_cpus(path: str = "/sys/devices/system/cpu/online") -> list[int]:
    try:
        with open(path, encoding="ascii") as f:
            return parse_cpu_list(f.read())
    except (OSError, ValueError):
        return list(range(os.cpu_count() or 1))


def attr_bytes(tracepoint_id: int, wakeup_bytes: int) -> bytes:
    """A perf_event_attr: one raw sample per hit with its CLOCK_MONOTONIC time,
    disabled until enabled, a wakeup when ``wakeup_bytes`` wait in the ring."""
    attr = bytearray(ATTR_SIZE)
    struct.pack_into("=IIQQQQQ", attr, 0, PERF_TYPE_TRACEPOINT, ATTR_SIZE, tracepoint_id,
                     1, PERF_SAMPLE_TIME | PERF_SAMPLE_RAW, 0,
                     _DISABLED | _WATERMARK | _USE_CLOCKID)  # fmt: skip
    struct.pack_into("=I", attr, 48, wakeup_bytes)
    struct.pack_into("=i", attr, 92, CLOCK_MONOTONIC)
    return bytes(attr)


@functools.cache
def _syscall() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall


def perf_event_open(attr: bytes, cpu: int) -> int:
    number = PERF_EVENT_OPEN.get(platform.machine())
    if number is None:
        raise KernelError(f"perf_event_open: unknown syscall number on {platform.machine()}")
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = _syscall()(ctypes.c_long(number), buf, ctypes.c_int(-1), ctypes.c_int(cpu),
                    ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))  # fmt: skip
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.EACCES, errno.EPERM):
            raise KernelError(f"perf_event_open refused ({NEEDS})", err)
        raise KernelError(f"perf_event_open on CPU {cpu}: {os.strerror(err)}", err)
    return int(fd)


class PerfRing:
    """The mmap ring of one CPU: ``drain`` returns the bytes the kernel wrote since the last
    call, unwrapped, and gives the space back."""

    def __init__(self, fd: int, pages: int = RING_PAGES[0]) -> None:
        self.fd = fd
        self.size = pages * mmap.PAGESIZE
        try:
            self.map = mmap.mmap(fd, (pages + 1) * mmap.PAGESIZE, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        except OSError as exc:
            raise KernelError(f"perf ring mmap: {exc.strerror}", exc.errno) from None

    def drain(self) -> bytes:
        m, base = self.map, mmap.PAGESIZE
        head = struct.unpack_from("=Q", m, _HEAD)[0]  # x86 and arm64 loads of one u64 are
        tail = struct.unpack_from("=Q", m, _TAIL)[0]  # atomic; the kernel writes head last
        if head == tail:
            return b""
        start, length = tail % self.size, head - tail
        if start + length <= self.size:
            data = m[base + start : base + start + length]
        else:
            data = m[base + start : base + self.size] + m[base : base + start + length - self.size]
        struct.pack_into("=Q", m, _TAIL, head)
        return data

    def close(self) -> None:
        self.map.close()


@dataclass(frozen=True, slots=True)
class Probe:
    """One tracepoint to open: its id and the filter the kernel applies ("" for none)."""

    id: int
    filter: str


class PerfSource:
    """Every probe on every online CPU; ``wait`` then ``drain`` gives each ring's bytes."""

    def __init__(self, probes: Sequence[Probe], cpus: Sequence[int] | None = None) -> None:
        self.fds: list[int] = []
        self.rings: list[PerfRing] = []  # probe by probe, CPU by CPU within a probe
        try:
            for index, probe in enumerate(probes):
                pages = RING_PAGES[min(index, 1)]
                for cpu in cpus if cpus is not None else online_cpus():
                    self._open(probe, cpu, pages)
            for fd in self.fds:
                fcntl.ioctl(fd, IOC_ENABLE, 0)
        except OSError as exc:
            self.close()
            raise KernelError(f"perf event setup: {exc.strerror}", exc.errno) from None
        except KernelError:
            self.close()
            raise
        self._poll = select.poll()
        for ring in self.rings:
            self._poll.register(ring.fd, select.POLLIN)

    def _open(self, probe: Probe, cpu: int, pages: int) -> None:
        fd = perf_event_open(attr_bytes(probe.id, pages * mmap.PAGESIZE // 4), cpu)
        self.fds.append(fd)
        if probe.filter:
            try:
                fcntl.ioctl(fd, IOC_SET_FILTER, probe.filter.encode() + b"\0")
            except OSError as exc:
                raise KernelError(
                    f"tracepoint filter {probe.filter!r} refused: {exc.strerror}", exc.errno
                ) from None
        self.rings.append(PerfRing(fd, pages))

    def wait(self, timeout: float) -> None:
        """Until a ring is a quarter full or ``timeout`` seconds pass."""
        with contextlib.suppress(InterruptedError):
            self._poll.poll(int(timeout * 1000))

    def drain(self) -> list[bytes]:
        """Each ring's new bytes, in ``rings`` order: the first probe's rings first."""
        return [ring.drain() for ring in self.rings]

    def counts(self) -> list[int]:
        """The kernel's count of each event (samples it produced, filter passed), in
        ``rings`` order."""
        return [int.from_bytes(os.read(fd, 8), sys.byteorder) for fd in self.fds]

    def disable(self) -> None:
        """Stops every event: nothing more is counted or written."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, IOC_DISABLE, 0)

    def close(self) -> None:
        self.disable()
        for ring in self.rings:
            ring.close()
        for fd in self.fds:
            os.close(fd)
        self.fds, self.rings = [], []
