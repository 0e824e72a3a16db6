"""Structured logs for journald: logfmt (default) or JSON lines, on stderr."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR}  # fmt: skip

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "msg": record.getMessage(),
    }
    for key, value in vars(record).items():
        if key not in _RESERVED and not key.startswith("_"):
            out[key] = value
    return out


def _logfmt_value(value: Any) -> str:
    text = "" if value is None else str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    # Quote, and escape what would break one line per record (journald splits on \n).
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c.isprintable() else _CONTROL.get(c, f"\\x{ord(c):02x}")
                      for c in escaped)  # fmt: skip
    return f'"{escaped}"'


_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str, ensure_ascii=False)


class _SafeStream(logging.StreamHandler):  # type: ignore[type-arg]
    """A log line that cannot be written (full disk, closed pipe) is dropped, not raised;
    the daemon exports the count as ``keepalive_audit_errors_total{stage="log"}``."""

    dropped = 0

    def handleError(self, record: logging.LogRecord) -> None:
        del record
        self.dropped += 1


def dropped_lines(logger: logging.Logger) -> int:
    """Log lines ``logger``'s handlers could not write since ``setup``."""
    return sum(getattr(handler, "dropped", 0) for handler in logger.handlers)


def setup(level: str = "info", fmt: str = "logfmt", stream: Any = None) -> logging.Logger:
    logger = logging.getLogger("keepalive-auditd")
    logger.handlers.clear()
    handler = _SafeStream(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    logger.addHandler(handler)
    logger.setLevel(LEVELS[level])
    logger.propagate = False
    return logger
