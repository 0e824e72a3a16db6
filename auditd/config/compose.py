"""YAML text to a node tree, fast and safe: libyaml's parser, a composer of our own.

A 1 MiB rules file (14,047 rules, issue 16) took 7.6 s with PyYAML's pure-Python loader and
1.1-2.8 s with libyaml's parser feeding PyYAML's Python composer. The time went to three
things, each dealt with here:

- the cyclic garbage collector, run again and again over the growing tree (more than half
  of the time): it is paused while a file is composed and checked (``gc_paused``);
- PyYAML's composer, which resolves every scalar's tag with a list of regular expressions
  and makes three calls per event: ``compose_tree`` reads the events in one loop and
  remembers each distinct scalar's tag;
- not ``yaml.CSafeLoader``: its composer is C code that recurses once per nesting level
  without a limit, and 100,000 ``[`` crash the process (SIGSEGV). ``compose_tree`` keeps
  its own stack and stops at ``MAX_DEPTH``.

The tree is the one PyYAML's composer builds from the same events (same node classes, tags,
values, marks, shared nodes for aliases; tests/process/test_hardening.py compares them).
Text that is not one YAML document raises ``Malformed`` with libyaml's line and problem (or
this composer's: a second document, an undefined alias, an anchor twice): PyYAML's
pure-Python loader would name the same line, but it took 3.4-4 s to get there through an
invalid 1 MiB file. Only without libyaml (``NotTaken``) does the caller use that loader.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

# Rules nest 5 deep and the web config 4; PyYAML's pure composer fails near 490 (the
# recursion limit). Deeper is a mistake or an attack.
MAX_DEPTH = 100

_CPARSER: Any = getattr(getattr(yaml, "_yaml", None), "CParser", None)


class TooDeep(Exception):
    """Nested more than MAX_DEPTH; ``line`` is where the level too many starts (1-based)."""

    def __init__(self, line: int) -> None:
        super().__init__(f"nested more than {MAX_DEPTH} deep")
        self.line = line


class NotTaken(Exception):
    """Not composed here (no libyaml, input libyaml refuses to take): use PyYAML's loader."""


class Malformed(Exception):
    """Not one YAML document: ``line`` (1-based) is where, ``problem`` says what."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(problem)
        self.line = line
        self.problem = problem


_NO_TOKEN = "found character that cannot start any token"  # libyaml's words


def error_at(exc: yaml.YAMLError, text: str, libyaml: bool = False) -> tuple[int, str]:
    """The line and problem of a parser's error, from libyaml's or from PyYAML's loader."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if libyaml and mark is not None and exc.problem == _NO_TOKEN:
            with contextlib.suppress(IndexError):  # name it, as PyYAML's loader does
                char = text.split("\n", mark.line + 1)[mark.line][mark.column]
                problem = f"found character {char!r} that cannot start any token"
        if exc.problem and exc.context:
            problem = f"{problem} ({exc.context})"
        return (mark.line + 1 if mark is not None else 1), problem
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML forbids, e.g. NUL
        # PyYAML's loader counts characters, libyaml bytes of the UTF-8 text
        if libyaml:
            before = text.encode("utf-8", "surrogatepass")[: exc.position].decode(
                "utf-8", "replace"
            )
        else:
            before = text[: exc.position]
        char = exc.character  # the code point for str input
        shown = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        return before.count("\n") + 1, f"unacceptable character {shown}: {exc.reason}"
    return 1, str(exc)  # no other kind is known to come from a parser; to be safe


def compose_tree(text: str) -> Node | None:
    """The root node of the one YAML document in ``text``, None if it has none.

    Raises TooDeep, Malformed, or NotTaken when libyaml is not there to do it.
    """
    if _CPARSER is None or Resolver.yaml_path_resolvers:
        raise NotTaken("no libyaml, or path resolvers that only PyYAML's composer applies")
    # Raised after the except blocks, not in them: an exception raised while another is
    # handled keeps it as __context__, and with it the traceback, the composer's frame and
    # the half-built tree, in a cycle only the collector frees (0.2 s for a 1 MiB file).
    error: Exception
    try:
        return _compose(_CPARSER(text))
    except yaml.YAMLError as exc:
        error = Malformed(*error_at(exc, text, libyaml=True))
    except (UnicodeError, ValueError, TypeError) as exc:  # lone surrogates, for one
        error = NotTaken(str(exc))
    raise error


def _compose(parser: Any) -> Node | None:
    get = parser.get_event
    get()  # StreamStartEvent
    if isinstance(get(), StreamEndEvent):
        return None
    resolver: Any = Resolver()  # untyped in the stubs
    tags: dict[tuple[str, Any], str] = {}  # a scalar's tag, by (value, implicit)
    seq_tag = resolver.resolve(SequenceNode, None, (True, False))
    map_tag = resolver.resolve(MappingNode, None, (True, False))
    anchors: dict[str, Node] = {}
    # The collection being filled (its list of values; for a mapping, the key waiting for
    # its value), and the ones around it. One loop, no call per event: a 1 MiB file has
    # 180,000 events.
    parent: list[Any] | None = None
    in_mapping = False
    key: Node | None = None
    outer: list[tuple[Node, list[Any] | None, bool, Node | None]] = []
    root: Node | None = None
    while True:
        event = get()
        kind = type(event)
        node: Node
        if kind is ScalarEvent:
            tag = event.tag
            if tag is None or tag == "!":
                implicit = (event.value, event.implicit)
                tag = tags.get(implicit)
                if tag is None:
                    tag = tags[implicit] = resolver.resolve(ScalarNode, *implicit)
            # libyaml calls the plain style "", PyYAML None
            node = ScalarNode(
                tag, event.value, event.start_mark, event.end_mark, event.style or None
            )
            if event.anchor is not None:
                _anchor(anchors, event, node)
        elif kind is MappingStartEvent or kind is SequenceStartEvent:
            if len(outer) >= MAX_DEPTH:
                raise TooDeep(event.start_mark.line + 1)
            tag = event.tag
            mapping = kind is MappingStartEvent
            if tag is None or tag == "!":
                tag = map_tag if mapping else seq_tag
            cls = MappingNode if mapping else SequenceNode
            node = cls(tag, [], event.start_mark, None, flow_style=event.flow_style)
            if event.anchor is not None:
                _anchor(anchors, event, node)
            outer.append((node, parent, in_mapping, key))
            parent, in_mapping, key = node.value, mapping, None
            continue
        elif kind is MappingEndEvent or kind is SequenceEndEvent:
            node, parent, in_mapping, key = outer.pop()
            node.end_mark = event.end_mark
        elif kind is AliasEvent:
            found = anchors.get(event.anchor)
            if found is None:
                raise Malformed(_line(event), f"found undefined alias {event.anchor!r}")
            node = found
        elif kind is DocumentEndEvent:
            break
        else:  # no other event comes inside a document
            raise Malformed(_line(event), f"unexpected {kind.__name__}")
        if parent is None:
            root = node
        elif not in_mapping:
            parent.append(node)
        elif key is None:
            key = node
        else:
            parent.append((key, node))
            key = None
    event = get()
    if not isinstance(event, StreamEndEvent):
        what = "but found another document (expected a single document in the stream)"
        raise Malformed(_line(event), what)
    return root


def _line(event: Any) -> int:
    return event.start_mark.line + 1 if event.start_mark is not None else 1


def _anchor(anchors: dict[str, Node], event: Any, node: Node) -> None:
    # As PyYAML's composer: an anchor names its node from its start (an alias inside the
    # node refers to it), and the same anchor twice is an error.
    if event.anchor in anchors:
        first = _line(anchors[event.anchor])
        raise Malformed(
            _line(event), f"found duplicate anchor {event.anchor!r} (first at line {first})"
        )
    anchors[event.anchor] = node


_gc_lock = threading.Lock()
_gc_holds = 0
_gc_resume = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block (of any thread), then as it was.

    Building the tree and the rules of a 1 MiB file makes about a million objects; the
    collector, triggered every 700 of them, walks the surviving ones again and again, which
    took longer than the work itself. The tree holds no cycle (but for a recursive alias),
    so refcounting frees it as before.
    """
    global _gc_holds, _gc_resume
    with _gc_lock:
        if _gc_holds == 0:
            _gc_resume = gc.isenabled()
            gc.disable()
        _gc_holds += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holds -= 1
            if _gc_holds == 0 and _gc_resume:
                gc.enable()
