"""A toolkit for YAML node trees: typed values with the line and key path of each error.

Config files are read with ``yaml.compose`` rather than ``yaml.safe_load``: the node graph
keeps the line of every key and value (so each error can point at it), shows duplicate keys
that ``safe_load`` silently merges, and never expands aliases (so an alias bomb costs
nothing). A schema walks the tree with the helpers below; each raises ``Invalid`` at the
offending node, and ``parse_document`` turns that into the one-line ``ConfigError``
``file:line: key.path: what``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from auditd.config.compose import Malformed, NotTaken, TooDeep, compose_tree, error_at, gc_paused
from auditd.config.durations import DURATION_HINT, parse_duration
from auditd.config.errors import ConfigError, one_line, show, truncate

T = TypeVar("T")
# The entries of a mapping by key, in file order: ``{key: (key_node, value_node)}``.
Entries = dict[str, tuple[Node, Node]]

NULL_TAG = "tag:yaml.org,2002:null"
STR_TAG = "tag:yaml.org,2002:str"
INT_TAG = "tag:yaml.org,2002:int"
_CONSTRUCTOR = SafeConstructor()
_CONVERTERS = {
    NULL_TAG: _CONSTRUCTOR.construct_yaml_null,
    "tag:yaml.org,2002:bool": _CONSTRUCTOR.construct_yaml_bool,
    INT_TAG: _CONSTRUCTOR.construct_yaml_int,
    "tag:yaml.org,2002:float": _CONSTRUCTOR.construct_yaml_float,
}


class Invalid(Exception):
    """Raised at the offending node; ``parse_document`` adds the source, making a ConfigError."""

    def __init__(self, node: Node, path: str, what: str) -> None:
        super().__init__(what)
        self.line = node.start_mark.line + 1 if node.start_mark is not None else 1
        self.path = path
        self.what = what


def parse_document(text: str, source: str, build: Callable[[Node], T], empty: T) -> T:
    """``build(root)`` for the YAML document in ``text``, ``empty`` for an empty document.

    Nothing but ConfigError escapes: ``Invalid`` becomes ``source:line: path: what``.
    """
    # The collector paused (see compose.gc_paused) until the tree is freed, with the
    # return of _parse: enabled while the tree lives, its next run would walk all of it.
    with gc_paused():
        return _parse(text, source, build, empty)


def _parse(text: str, source: str, build: Callable[[Node], T], empty: T) -> T:
    root = compose_yaml(text, source)
    if root is None or is_null(root):
        return empty  # an empty file (or only comments)
    try:
        return build(root)
    except Invalid as exc:
        raise ConfigError(one_line(f"{source}:{exc.line}: {exc.path}: {exc.what}")) from None


def compose_yaml(text: str, source: str) -> Node | None:
    """The node tree of a YAML document; ConfigError if it is not YAML.

    ``compose_tree`` (libyaml's parser); PyYAML's pure-Python loader only where libyaml is
    not installed (its messages then name the same lines in its own words).
    """
    # Raised after the except blocks (see compose.compose_tree): raised in one, the error
    # would keep the tree of an invalid 1 MiB file alive for the collector.
    try:
        return compose_tree(text)
    except TooDeep as exc:
        error = ConfigError(f"{one_line(source)}:{exc.line}: invalid YAML: nested too deeply")
    except Malformed as exc:
        error = ConfigError(one_line(f"{source}:{exc.line}: invalid YAML: {exc.problem}"))
    except NotTaken:
        return _compose_pure(text, source)
    raise error


def _compose_pure(text: str, source: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        line, problem = error_at(exc, text)
        raise ConfigError(one_line(f"{source}:{line}: invalid YAML: {problem}")) from None
    except RecursionError:  # the pure composer recurses once per nesting level
        raise ConfigError(f"{one_line(source)}:1: invalid YAML: nested too deeply") from None


def is_null(node: Node) -> bool:
    """An empty value (``key:`` with nothing after it, or ``null``)."""
    return isinstance(node, ScalarNode) and node.tag == NULL_TAG


def mapping(
    node: Node, path: str, allowed: tuple[str, ...], *, noun: str = "key", null_ok: bool = True
) -> Entries:
    """The entries of a mapping node; unknown and duplicate keys are errors.

    ``null_ok`` accepts an empty value (``defaults:`` with every entry commented out).
    """
    if null_ok and is_null(node):
        return {}
    where = path or "(top level)"
    if not isinstance(node, MappingNode):
        raise Invalid(node, where, f"expected a mapping, got {describe(node)}")
    entries: Entries = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode):
            what = f"expected a {noun} name, got {describe(key_node)} as a key"
            raise Invalid(key_node, where, what)
        key = str(key_node.value)
        if key in entries or key not in allowed:
            key_path = f"{path}.{key}" if path else key
            if key in entries:
                first = entries[key][0].start_mark
                at = f" (first at line {first.line + 1})" if first is not None else ""
                raise Invalid(key_node, key_path, f"duplicate key{at}")
            what = f"unknown {noun}, expected one of: " + ", ".join(allowed)
            raise Invalid(key_node, key_path, what)
        entries[key] = (key_node, value_node)
    return entries


def sequence(node: Node, path: str, *, empty_ok: bool) -> list[Node]:
    if empty_ok and is_null(node):
        return []
    if not isinstance(node, SequenceNode):
        raise Invalid(node, path, f"expected a list, got {describe(node)}")
    if not node.value and not empty_ok:
        raise Invalid(node, path, "must not be empty; leave the key out to match anything")
    return list(node.value)


def scalar(node: Node, path: str, expected: str) -> object:
    """The Python value of a scalar node: None, bool, int, float or str."""
    if isinstance(node, ScalarNode):
        if node.tag == STR_TAG:
            return str(node.value)
        if node.tag in _CONVERTERS:
            try:
                value = node.value
                if node.tag == INT_TAG and value.isdigit() and value.isascii() and value[0] != "0":
                    return int(value)  # plain decimal, as construct_yaml_int reads it; faster
                return _converted(node.tag, value)
            except (ValueError, LookupError):  # an explicit tag on a bad value: !!int "x"
                tag = node.tag.replace("tag:yaml.org,2002:", "!!")
                what = f"expected {expected}, got {tag} {show(node.value)}"
                raise Invalid(node, path, what) from None
    raise Invalid(node, path, f"expected {expected}, got {describe(node)}")


# A large file repeats a few values (ports, "300s") thousands of times: each distinct one is
# converted once. Pure functions of the text, so a cache cannot change a result.
@functools.lru_cache(maxsize=4096)
def _converted(tag: str, value: str) -> object:
    return _CONVERTERS[tag](ScalarNode(tag, value))


_seconds = functools.lru_cache(maxsize=4096, typed=True)(parse_duration)  # typed: 1 vs True


def describe(node: Node) -> str:
    """A node as the user wrote it, for "got ..." in messages."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == STR_TAG:
        return show(node.value)
    text = truncate(str(node.value)) or "nothing"
    if node.tag in _CONVERTERS:
        return text
    # A tag we do not convert (!!timestamp, !!binary, !custom): show it, or "got 1" would puzzle.
    return f"{node.tag.replace('tag:yaml.org,2002:', '!!')} {text}"


def integer(node: Node, path: str, low: int, high: int | None) -> int:
    value = scalar(node, path, "an integer")
    if isinstance(value, bool) or not isinstance(value, int):
        # bool is an int in Python; "ignore: yes" where a number belongs is a mistake.
        raise Invalid(node, path, f"expected an integer, got {describe(node)}")
    if value < low or (high is not None and value > high):
        allowed = f"between {low} and {high}" if high is not None else f">= {low}"
        raise Invalid(node, path, f"expected an integer {allowed}, got {describe(node)}")
    return value


def fraction(node: Node, path: str) -> float:
    """A number in (0, 1]."""
    value = scalar(node, path, "a number")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(node, path, f"expected a number, got {describe(node)}")
    if not 0 < value <= 1:
        raise Invalid(node, path, f"expected a number > 0 and <= 1, got {describe(node)}")
    return float(value)


def duration(node: Node, path: str, *, zero_ok: bool) -> float:
    """Seconds, from a number or a string like ``"350s"`` (see ``parse_duration``)."""
    try:
        seconds = _seconds(scalar(node, path, DURATION_HINT))
    except ValueError as exc:
        raise Invalid(node, path, str(exc)) from None
    if seconds == 0 and not zero_ok:
        raise Invalid(node, path, f"a duration must be greater than 0, got {describe(node)}")
    return seconds


def string(node: Node, path: str, expected: str) -> str:
    """A non-blank string; ``expected`` says what it names, for the error."""
    value = scalar(node, path, expected)
    if not isinstance(value, str) or not value.strip():
        raise Invalid(node, path, f"expected {expected}, got {describe(node)}")
    return value


def boolean(node: Node, path: str) -> bool:
    value = scalar(node, path, "true or false")
    if not isinstance(value, bool):
        raise Invalid(node, path, f"expected true or false, got {describe(node)}")
    return value


def choice(node: Node, path: str, expected: str, allowed: tuple[str, ...] | dict[str, T]) -> str:
    """A string that must be one of ``allowed`` (names, or the keys of a table)."""
    text = string(node, path, expected)
    if text not in allowed:
        raise Invalid(node, path, f"expected one of: {', '.join(allowed)}, got {show(text)}")
    return text
