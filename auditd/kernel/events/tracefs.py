"""Tracepoint formats from tracefs: the ids and field offsets the raw samples are decoded by.

Each tracepoint's ``events/<system>/<name>/format`` file gives its id (the ``common_type`` at
the start of every raw sample) and every field's offset, size and signedness
(kernel/trace/trace_events.c, ``f_show``). Layouts change between kernels
(``tcp_send_reset`` gained ``state`` and ``reason`` in 6.10), so nothing here hard-codes an
offset: parsing is pure (``parse_format``), reading is I/O (``read_format``).
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass

from auditd.errors import KernelError

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

_FIELD = re.compile(
    r"field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"\s*signed:(?P<signed>\d+);"
)
_ID = re.compile(r"^ID:\s*(\d+)\s*$", re.M)
_NAME = re.compile(r"^name:\s*(\S+)\s*$", re.M)
# __print_symbolic(REC->reason, { 0, "NOT_SPECIFIED" }, { 15, "TCP_KEEPALIVE_TIMEOUT" }, ...)
_SYMBOLIC = re.compile(r"__print_symbolic\(REC->(\w+),((?:\s*\{\s*-?\w+,\s*\"\w+\"\s*\},?)+)\)")
_PAIR = re.compile(r"\{\s*(-?\d+),\s*\"(\w+)\"\s*\}")


@dataclass(frozen=True, slots=True)
class Field:
    offset: int
    size: int
    signed: bool


@dataclass(frozen=True, slots=True)
class EventFormat:
    """One tracepoint: its id, fields by name, and the numeric symbols its print format
    names (field -> symbol -> value), e.g. ``symbols["reason"]["TCP_KEEPALIVE_TIMEOUT"]``."""

    system: str
    name: str
    id: int
    fields: dict[str, Field]
    symbols: dict[str, dict[str, int]]

    def field(self, name: str) -> Field | None:
        return self.fields.get(name)


def _field_name(decl: str) -> str:
    """``const void * skaddr`` -> ``skaddr``; ``__u8 saddr[4]`` -> ``saddr``."""
    last = decl.strip().split()[-1].lstrip("*")
    return last.split("[", 1)[0]


def parse_format(system: str, text: str) -> EventFormat:
    """The text of a ``format`` file -> EventFormat; raises ValueError if it is not one."""
    ident, name = _ID.search(text), _NAME.search(text)
    if ident is None or name is None:
        raise ValueError("no name: or ID: line")
    fields = {
        _field_name(m["decl"]): Field(int(m["offset"]), int(m["size"]), m["signed"] == "1")
        for m in _FIELD.finditer(text)
    }
    symbols: dict[str, dict[str, int]] = {}
    for m in _SYMBOLIC.finditer(text):
        pairs = {sym: int(value) for value, sym in _PAIR.findall(m.group(2))}
        symbols.setdefault(m.group(1), {}).update(pairs)
    return EventFormat(system, name.group(1), int(ident.group(1)), fields, symbols)


def _mount_tracefs(path: str) -> None:
    """mount -t tracefs nodev PATH (needs CAP_SYS_ADMIN); a failure is left to the caller."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount(b"nodev", path.encode(), b"tracefs", ctypes.c_ulong(0), None)


def tracefs_root(dirs: tuple[str, ...] = TRACEFS_DIRS) -> str:
    """The directory holding ``events/``, mounting tracefs at the first place if absent."""
    for path in dirs:
        try:
            os.stat(os.path.join(path, "events"))
            return path
        except PermissionError:  # mounted, root-only (mode 0700): not for this user
            raise KernelError(
                f"cannot read tracefs at {path}: permission denied "
                "(reading tracepoint formats needs root or CAP_DAC_READ_SEARCH)"
            ) from None
        except OSError:
            continue
    if os.path.isdir(dirs[0]):
        _mount_tracefs(dirs[0])
        if os.path.isdir(os.path.join(dirs[0], "events")):
            return dirs[0]
    raise KernelError(f"tracefs not found at {' or '.join(dirs)} and it could not be mounted")


def read_format(root: str, system: str, name: str) -> EventFormat:
    """Raises KernelError naming the file when it is missing, unreadable or not a format."""
    path = os.path.join(root, "events", system, name, "format")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 16)
    except OSError as exc:
        raise KernelError(f"{path}: {exc.strerror}", exc.errno) from None
    try:
        return parse_format(system, text)
    except ValueError as exc:
        raise KernelError(f"{path}: {exc}") from None
