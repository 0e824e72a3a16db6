"""The one error a config file raises, and how user-written values appear in its message.

Keys, values and paths in messages come from the user's file: they are shown short, on one
line, with control characters escaped, so an error is always exactly one line.
"""

from __future__ import annotations

import json


class ConfigError(Exception):
    """A config file that cannot be used; ``str()`` is the one-line message for the user."""


def one_line(message: str) -> str:
    """``message`` with newlines and other control characters escaped."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message
    )


def show(value: object) -> str:
    """A value as the user wrote it in YAML, short and on one line."""
    if isinstance(value, str):
        return json.dumps(truncate(value), ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return truncate(str(value))
    return f"a {type(value).__name__}"


def truncate(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
