"""Durations as the config files and flags write them: ``350``, ``"350s"``, ``"1h30m"``."""

from __future__ import annotations

import math
import re

from auditd.config.errors import show

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"  # ASCII only: float() would also take "1_0", "1e3", "nan"
_PLAIN_NUMBER = re.compile(_NUMBER)
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+")  # "ms" first, so "5ms" is not 5 m
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
DURATION_HINT = 'a duration like "350s", "15m", "1h30m" or "500ms"'


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds (>= 0) or a string like ``"350s"`` or ``"1h30m"``.

    Units: ``ms``, ``s``, ``m``, ``h``, ``d``; a plain number string is seconds. Raises
    ValueError, with a message fit for the user, on anything else.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {DURATION_HINT}, got {show(value)}")
    if isinstance(value, str):
        seconds = _duration_text(value.strip())
    else:
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond float range
            seconds = math.inf
    if math.isnan(seconds):
        raise ValueError(f"expected {DURATION_HINT}, got {show(value)}")
    if seconds < 0:
        raise ValueError(f"a duration must not be negative, got {show(value)}")
    if math.isinf(seconds):
        raise ValueError(f"a duration must be finite, got {show(value)}")
    return seconds + 0.0  # -0.0 -> 0.0


def _duration_text(text: str) -> float:
    if _PLAIN_NUMBER.fullmatch(text.removeprefix("-")):
        return float(text)  # negative is reported by the caller
    if not _DURATION.fullmatch(text):
        if _DURATION.fullmatch(text[1:]) and text.startswith("-"):
            raise ValueError(f"a duration must not be negative, got {show(text)}")
        raise ValueError(f"expected {DURATION_HINT}, got {show(text)}")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(text))
