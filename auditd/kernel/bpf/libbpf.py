"""A small, generic ctypes loader over the system libbpf (``libbpf.so.1``, version 1.x).

Opens a compiled BPF object (bytes or a file), loads it (CO-RE relocations against the
running kernel's BTF, then the verifier), finds programs and maps by name, attaches programs
(iterators, ``tp_btf``, anything libbpf knows from the SEC() name), runs iterators with
``bpf_iter_create`` and reads BPF ring buffers (``RingBuffer``, libbpf's ``ring_buffer__*``).
No compiler or headers are needed at run time, and no bcc.

libbpf 1.0 changed its error convention (NULL + errno for pointers, -errno for ints; see
libbpf's "libbpf 1.0 migration guide"), hence the >= 1.0 check through
``libbpf_major_version``. libbpf logs through one process-wide print callback
(``libbpf_set_print``): while this module calls into libbpf it holds ``_LOCK`` and collects
the warnings, so a failure's message carries libbpf's own explanation (the verifier's
complaint, a missing BTF, a missing capability). Every failure raises ``BpfUnavailable``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import io
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from auditd.errors import BpfUnavailable

LIBBPF = "libbpf.so.1"
MIN_MAJOR = 1
LOG_TAIL_CHARS = 600  # of libbpf's log, in the one-line error (a verifier log can be MBs)

# enum libbpf_print_level (libbpf.h): LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG
_WARN, _INFO, _DEBUG = 0, 1, 2

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
# ring_buffer_sample_fn (libbpf.h): int (*)(void *ctx, void *data, size_t size)
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_LOCK = threading.RLock()
_log: list[str] = []  # collected while _LOCK is held


class _OpenOpts(ctypes.Structure):
    """struct bpf_object_open_opts of libbpf 1.x (libbpf.h), up to ``kconfig``; ``sz`` tells
    libbpf how much of it we know (its OPTS_VALID forward/backward compatibility)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_attach_prog_fd", ctypes.c_uint32),  # removed field, kept as padding by libbpf
        ("kconfig", ctypes.c_char_p),
    ]


def _vsnprintf() -> Callable[[Any, int, bytes, int], int]:
    libc = ctypes.CDLL(None)
    fn = libc.vsnprintf
    fn.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def _make_printer() -> Any:
    fmt_into = _vsnprintf()
    buf = ctypes.create_string_buffer(4096)

    def printer(level: int, fmt: bytes, args: int) -> int:
        # va_list: a pointer on x86_64, and passed by reference on arm64 (AAPCS64).
        if level != _DEBUG:
            fmt_into(buf, len(buf), fmt, args)
            _log.append(buf.value.decode(errors="replace").rstrip())
        return 0

    return _PRINT_FN(printer)


def _bind(lib: Any) -> None:
    p, i, u, c = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p
    sigs: dict[str, tuple[list[Any], Any]] = {
        "libbpf_major_version": ([], u),
        "libbpf_minor_version": ([], u),
        "libbpf_set_print": ([_PRINT_FN], p),
        "libbpf_strerror": ([i, c, ctypes.c_size_t], i),
        "bpf_object__open_mem": ([c, ctypes.c_size_t, ctypes.POINTER(_OpenOpts)], p),
        "bpf_object__load": ([p], i),
        "bpf_object__close": ([p], None),
        "bpf_object__next_program": ([p, p], p),
        "bpf_object__find_program_by_name": ([p, c], p),
        "bpf_object__find_map_by_name": ([p, c], p),
        "bpf_program__name": ([p], c),
        "bpf_program__set_autoload": ([p, ctypes.c_bool], i),
        "bpf_program__attach": ([p], p),
        "bpf_map__fd": ([p], i),
        "bpf_link__fd": ([p], i),
        "bpf_link__destroy": ([p], i),
        "bpf_iter_create": ([i], i),
        "bpf_map_update_elem": ([i, p, p, ctypes.c_uint64], i),
        "bpf_map_delete_elem": ([i, p], i),
        "bpf_map_lookup_elem": ([i, p, p], i),
        "ring_buffer__new": ([i, _SAMPLE_FN, p, p], p),
        "ring_buffer__poll": ([p, i], i),
        "ring_buffer__consume": ([p], i),
        "ring_buffer__free": ([p], None),
    }
    for name, (argtypes, restype) in sigs.items():
        fn = getattr(lib, name)  # AttributeError: an older libbpf without it
        fn.argtypes, fn.restype = argtypes, restype


class Libbpf:
    """The bound library, checked to be 1.x; ``path`` is a parameter for tests."""

    def __init__(self, path: str = LIBBPF) -> None:
        try:
            lib = ctypes.CDLL(path, use_errno=True)
        except OSError as exc:
            raise BpfUnavailable(f"BPF unavailable: cannot load {path} ({exc})") from exc
        try:
            _bind(lib)
        except AttributeError as exc:
            raise BpfUnavailable(f"BPF unavailable: {path} is older than libbpf 1.0") from exc
        self.version = (int(lib.libbpf_major_version()), int(lib.libbpf_minor_version()))
        if self.version[0] < MIN_MAJOR:
            raise BpfUnavailable(
                f"BPF unavailable: {path} is libbpf {self.version[0]}.{self.version[1]}, "
                f"need {MIN_MAJOR}.0 or later"
            )
        self.lib = lib
        self._printer = _make_printer()  # kept alive as long as libbpf may call it
        lib.libbpf_set_print(self._printer)


@functools.cache
def system_libbpf() -> Libbpf:
    """The system's libbpf, bound once per process; raises BpfUnavailable."""
    return Libbpf()


def _tail(entries: list[str]) -> str:
    """libbpf's log on one line: its lines joined, its "libbpf: " prefixes dropped, the
    end kept (where the verifier says what it refused)."""
    lines = (line.strip().removeprefix("libbpf: ") for e in entries for line in e.splitlines())
    text = " | ".join(line for line in lines if line)
    return text if len(text) <= LOG_TAIL_CHARS else "..." + text[-LOG_TAIL_CHARS:]


def _strerror(err: int) -> str:
    """strerror, and libbpf's own codes (LIBBPF_ERRNO__*, 4000 and up) by libbpf_strerror."""
    if err < 4000:
        return os.strerror(err)
    buf = ctypes.create_string_buffer(256)
    system_libbpf().lib.libbpf_strerror(-err, buf, len(buf))
    return buf.value.decode(errors="replace")


@contextmanager
def _calling(what: str) -> Iterator[Callable[[int], BpfUnavailable]]:
    """Holds the lock and collects libbpf's log; yields a factory of this call's error."""
    with _LOCK:
        _log.clear()

        def failed(err: int) -> BpfUnavailable:
            log = _tail(_log)
            reason = _strerror(err) if err else "failed"
            error = BpfUnavailable(f"BPF: {what}: {reason}" + (f" (libbpf: {log})" if log else ""))
            error.errno = err or None
            error.log = list(_log)  # type: ignore[attr-defined]
            return error

        try:
            yield failed
        finally:
            _log.clear()


class Link:
    """An attached program; ``destroy`` detaches it (also done by its object's ``close``)."""

    def __init__(self, lib: Libbpf, ptr: int, name: str) -> None:
        self._lib, self._ptr, self.name = lib, ptr, name

    @property
    def fd(self) -> int:
        return int(self._lib.lib.bpf_link__fd(self._ptr))

    def destroy(self) -> None:
        if self._ptr:
            self._lib.lib.bpf_link__destroy(self._ptr)
            self._ptr = 0

    def iter_fd(self) -> int:
        """A new iterator instance (``bpf_iter_create``): it walks what the calling thread
        sees, such as its network namespace for iter/tcp. The caller reads and closes it."""
        with _calling(f"bpf_iter_create({self.name})") as failed:
            fd = int(self._lib.lib.bpf_iter_create(self.fd))
            if fd < 0:
                raise failed(-fd)
        return fd


def read_iter(fd: int) -> bytes:
    """Everything an iterator fd yields until its end; closes the fd. Raises BpfUnavailable."""
    with io.FileIO(fd, "r", closefd=True) as f:
        try:
            return f.readall()
        except OSError as exc:
            raise BpfUnavailable(f"BPF: reading the iterator: {exc.strerror}", exc.errno) from exc


class RingBuffer:
    """A BPF_MAP_TYPE_RINGBUF map read through libbpf: ``poll`` waits at most ``timeout``
    seconds for a wakeup, then reads every record in the ring, each copied out as bytes."""

    def __init__(self, lib: Libbpf, map_fd: int, name: str) -> None:
        self._lib, self.name = lib, name
        self._got: list[bytes] = []

        def sample(_ctx: int, data: int, size: int) -> int:
            self._got.append(ctypes.string_at(data, size))
            return 0

        self._callback = _SAMPLE_FN(sample)  # kept alive as long as libbpf may call it
        with _calling(f"ring buffer {name}") as failed:
            ptr = lib.lib.ring_buffer__new(map_fd, self._callback, None, None)
            if not ptr:
                raise failed(ctypes.get_errno())
        self._ptr: int = ptr

    def poll(self, timeout: float) -> list[bytes]:
        """Raises BpfUnavailable if the ring cannot be read (EINTR is no error)."""
        if not self._ptr:
            raise BpfUnavailable(f"BPF: ring buffer {self.name} is closed")
        err = int(self._lib.lib.ring_buffer__poll(self._ptr, int(timeout * 1000)))
        if err >= 0 or -err == errno.EINTR:
            # Then whatever else is in the ring, announced or not: the kernel notifies only
            # when the reader has caught up (adaptive wakeup, kernel/bpf/ringbuf.c), from an
            # irq_work, so a late wakeup would hold back every later record too.
            err = int(self._lib.lib.ring_buffer__consume(self._ptr))
        if err < 0 and -err != errno.EINTR:
            raise BpfUnavailable(f"BPF: reading ring buffer {self.name}: {os.strerror(-err)}", -err)
        got, self._got = self._got, []
        return got

    def close(self) -> None:
        if self._ptr:
            self._lib.lib.ring_buffer__free(self._ptr)
            self._ptr = 0


def lookup_u64(lib: Libbpf, map_fd: int, key: int = 0) -> int | None:
    """The u64 value at a u32 ``key`` of an array map, None if there is none."""
    k, v = ctypes.c_uint32(key), ctypes.c_uint64()
    if int(lib.lib.bpf_map_lookup_elem(map_fd, ctypes.byref(k), ctypes.byref(v))) < 0:
        return None
    return int(v.value)


class BpfObject:
    """One BPF object: ``open`` (parse, no kernel yet), ``load``, ``attach``, ``close``.

    ``kconfig`` adds ``CONFIG_X=value`` lines to the system's kernel config for the
    object's ``__kconfig`` externs (libbpf reads /proc/config.gz or /boot/config-*).
    """

    def __init__(
        self, data: bytes, name: str, lib: Libbpf | None = None, kconfig: str | None = None
    ) -> None:
        self._lib = lib if lib is not None else system_libbpf()
        self.name = name
        self._links: list[Link] = []
        self._data = data  # libbpf keeps pointing into the buffer until close
        opts = _OpenOpts(ctypes.sizeof(_OpenOpts), name.encode(), False, None, 0)
        opts.kconfig = kconfig.encode() if kconfig is not None else None
        with _calling(f"opening {name}") as failed:
            ptr = self._lib.lib.bpf_object__open_mem(data, len(data), ctypes.byref(opts))
            if not ptr:
                raise failed(ctypes.get_errno())
        self._ptr: int = ptr

    @classmethod
    def from_file(cls, path: str, lib: Libbpf | None = None) -> BpfObject:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise BpfUnavailable(f"BPF: cannot read {path}: {exc.strerror}", exc.errno) from exc
        return cls(data, os.path.basename(path), lib)

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _program(self, name: str) -> int:
        ptr = self._lib.lib.bpf_object__find_program_by_name(self._live(), name.encode())
        if not ptr:
            raise BpfUnavailable(f"BPF: {self.name} has no program {name}")
        return int(ptr)

    def _live(self) -> int:
        if not self._ptr:
            raise BpfUnavailable(f"BPF: {self.name} is closed")
        return self._ptr

    def programs(self) -> list[str]:
        names, lib, prog = [], self._lib.lib, None
        while prog := lib.bpf_object__next_program(self._live(), prog):
            names.append(lib.bpf_program__name(prog).decode())
        return names

    def set_autoload(self, program: str, autoload: bool) -> None:
        """Before ``load``: leave a program out (loads only what a caller will use)."""
        self._lib.lib.bpf_program__set_autoload(self._program(program), autoload)

    def load(self) -> None:
        with _calling(f"loading {self.name}") as failed:
            err = int(self._lib.lib.bpf_object__load(self._live()))
            if err < 0:
                raise failed(-err)

    def attach(self, program: str) -> Link:
        """Attaches as the SEC() name says (iter/..., tp_btf/..., ...); the link lives until
        ``destroy`` or ``close``."""
        prog = self._program(program)
        with _calling(f"attaching {program}") as failed:
            ptr = self._lib.lib.bpf_program__attach(prog)
            if not ptr:
                raise failed(ctypes.get_errno())
        link = Link(self._lib, ptr, program)
        self._links.append(link)
        return link

    @property
    def lib(self) -> Libbpf:
        return self._lib

    def map_fd(self, name: str) -> int:
        ptr = self._lib.lib.bpf_object__find_map_by_name(self._live(), name.encode())
        fd = int(self._lib.lib.bpf_map__fd(ptr)) if ptr else -1
        if fd < 0:
            raise BpfUnavailable(f"BPF: {self.name} has no loaded map {name}")
        return fd

    def map_update(self, name: str, key: bytes, value: bytes) -> None:
        """Writes one element of a loaded map (BPF_ANY). Raises BpfUnavailable."""
        fd = self.map_fd(name)
        err = int(self._lib.lib.bpf_map_update_elem(fd, key, value, 0))
        if err < 0:
            raise BpfUnavailable(f"BPF: updating map {name}: {os.strerror(-err)}", -err)

    def map_delete(self, name: str, key: bytes) -> None:
        """Deletes one element if it is there."""
        self._lib.lib.bpf_map_delete_elem(self.map_fd(name), key)

    def close(self) -> None:
        for link in self._links:
            link.destroy()
        self._links.clear()
        if self._ptr:
            self._lib.lib.bpf_object__close(self._ptr)
            self._ptr = 0
