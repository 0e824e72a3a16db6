"""Reading a config file safely: a regular file of sane size, read whole and settled.

A config path comes from the user (or from a file the user wrote), so it may name a FIFO (an
open that blocks the agent forever), ``/dev/zero`` (a read that never ends), a directory, or
a file being rewritten in place. Every config file the agent reads goes through here.
"""

from __future__ import annotations

import os
import stat
import time

from auditd.config.errors import ConfigError, one_line


class FileMissing(ConfigError):
    """The file does not exist: ``load_rules_or_default`` falls back to the builtin rules."""


# A rules file is a few kB; anything this large is a mistake (a log, a device), not rules.
MAX_CONFIG_BYTES = 1 << 20
# A file written in place (``cat > rules.yaml``) passes through states that parse: empty (the
# built-in defaults) or cut after a rule. A file changed within this many seconds is read
# only once it has stayed the same for SETTLE_SECONDS (an empty one: until it is this old).
RECENT_SECONDS = 1.0
SETTLE_SECONDS = 0.05
SETTLE_TRIES = 20


def read_config_text(path: str) -> str:
    """The text of a UTF-8 config file (a BOM tolerated); ConfigError (one line) if unusable."""
    data = read_config_file(path)
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate the BOM some editors write
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{one_line(path)}:{line}: invalid UTF-8: {exc.reason}") from None


def read_config_file(path: str) -> bytes:
    """The bytes of a config file; ConfigError (one line) if it cannot or should not be read.

    Opened without blocking and checked to be a regular file of sane size first: a FIFO
    would block the reload forever and /dev/zero would never end. A file being rewritten
    while we read is read again once it has settled (an atomic rename needs no wait: the
    open file is one version or the other).
    """
    for _ in range(SETTLE_TRIES):
        data, identity = _read_once(path)
        try:
            now = os.stat(path)
        except OSError:
            now = None  # deleted or renamed away after we read it: what we read is whole
        if now is None:
            return data
        if _identity(now) == identity:
            age = time.time() - now.st_mtime
            if abs(age) > RECENT_SECONDS:
                return data
            # Just written: whole if it stays the same a while. An empty file (or comments
            # only) is what truncating before the write leaves, whatever the writer's pace:
            # it must also be RECENT_SECONDS old, or it would load as the built-in defaults.
            time.sleep(
                SETTLE_SECONDS if _has_content(data) else max(SETTLE_SECONDS, RECENT_SECONDS - age)
            )
            try:
                if _identity(os.stat(path)) == identity:
                    return data
            except OSError:
                return data
        else:
            time.sleep(SETTLE_SECONDS)
    raise ConfigError(one_line(f"{path}: cannot read: it kept changing while being read"))


def _has_content(data: bytes) -> bool:
    """False for what parses as an empty document: blank lines and comments only."""
    for line in data.splitlines():
        line = line.strip()
        if line and not line.startswith(b"#"):
            return True
    return False


def open_regular_file(path: str) -> int:
    """A read-only fd on ``path``, checked to be a regular file; ConfigError if it is not.

    ``O_NONBLOCK``: opening a FIFO for reading would otherwise wait for a writer. Files that
    a library opens by name (OpenSSL's certificate and key) are handed to it as
    ``/proc/self/fd/N`` of this fd, so what it opens is what was checked.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        error = FileMissing if isinstance(exc, FileNotFoundError) else ConfigError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise error(one_line(f"{path}: cannot read: {reason}")) from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise ConfigError(one_line(f"{path}: cannot read: {exc.strerror or exc}")) from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "Is a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ConfigError(one_line(f"{path}: cannot read: {what}"))
    return fd


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_once(path: str) -> tuple[bytes, tuple[int, int, int, int]]:
    fd = open_regular_file(path)
    try:
        st = os.fstat(fd)
        with open(fd, "rb", closefd=False) as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(one_line(f"{path}: cannot read: {exc.strerror or exc}")) from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        what = f"larger than {MAX_CONFIG_BYTES // 1024} KiB, not a config file"
        raise ConfigError(one_line(f"{path}: cannot read: {what}"))
    return data, _identity(st)
