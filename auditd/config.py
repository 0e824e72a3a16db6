"""The YAML rules file: parsed once into frozen dataclasses, with precise errors.

An error names the file, the line and the key path, e.g.
``rules.yaml:7: rules[0].idle_timeout: expected a duration like "350s", got "fast"``.

The file is read with ``yaml.compose`` rather than ``yaml.safe_load``: the node graph keeps
the line of every key and value (so each error can point at it), shows duplicate keys that
``safe_load`` silently merges, and never expands aliases (so an alias bomb costs nothing).
Every scalar is then converted and checked here against the schema documented in
``config/rules.yaml``. Nothing but ``ConfigError`` escapes ``parse_rules`` and ``load_rules``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from auditd.model import SYSCTL_NAMES, Severity, TcpState

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_CONFIG_PATH = "/etc/keepalive-auditd/rules.yaml"
BUILTIN_SOURCE = "<built-in>"

# The sysctls a ``sysctls:`` bound may name: those the agent reads (they decide how fast a
# dead peer is noticed).
KNOWN_SYSCTLS = SYSCTL_NAMES

# Findings of sockets that no rule matches carry this rule name (audit.evaluate.DEFAULT_RULE);
# a user rule of the same name would be indistinguishable from them in output and metrics.
RESERVED_RULE_NAMES = ("default",)


class ConfigError(Exception):
    """A rules file that cannot be used; ``str()`` is the one-line message for the user."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The tunables of ``defaults:``; a rule overrides any of them."""

    idle_timeout: float = 350.0  # seconds
    warn_at: float = 0.5  # fraction of idle_timeout
    detection_budget: float = 900.0  # seconds
    close_wait_after: float = 60.0  # seconds
    retransmit_threshold: int = 3


@dataclass(frozen=True, slots=True)
class SysctlBound:
    name: str  # dotted, e.g. "net.ipv4.tcp_keepalive_time"
    min: int | None = None
    max: int | None = None
    severity: Severity = Severity.WARNING


@dataclass(frozen=True, slots=True)
class Match:
    """Criteria of a rule; an empty criterion matches anything; all given criteria must hold."""

    local_ports: frozenset[int] = frozenset()
    remote_ports: frozenset[int] = frozenset()
    local_cidrs: tuple[IPNetwork, ...] = ()
    remote_cidrs: tuple[IPNetwork, ...] = ()
    processes: tuple[str, ...] = ()  # fnmatch globs on the process name
    states: frozenset[int] = frozenset()  # TcpState values


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    match: Match = field(default_factory=Match)
    thresholds: Thresholds = field(default_factory=Thresholds)  # defaults merged in
    severity: Severity | None = None  # overrides the severity of this rule's findings
    ignore: bool = False
    overrides: frozenset[str] = frozenset()  # threshold names the rule set itself


@dataclass(frozen=True, slots=True)
class RuleSet:
    defaults: Thresholds = field(default_factory=Thresholds)
    sysctls: tuple[SysctlBound, ...] = ()
    rules: tuple[Rule, ...] = ()
    source: str = BUILTIN_SOURCE

    @property
    def uses_processes(self) -> bool:
        return any(rule.match.processes for rule in self.rules)


def builtin_rules() -> RuleSet:
    """What the agent uses when no rules file exists: the documented defaults, no rules."""
    return RuleSet()


# --- durations -------------------------------------------------------------------------------

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"  # ASCII only: float() would also take "1_0", "1e3", "nan"
_PLAIN_NUMBER = re.compile(_NUMBER)
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+")  # "ms" first, so "5ms" is not 5 m
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_DURATION_HINT = 'a duration like "350s", "15m", "1h30m" or "500ms"'


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds (>= 0) or a string like ``"350s"`` or ``"1h30m"``.

    Units: ``ms``, ``s``, ``m``, ``h``, ``d``; a plain number string is seconds. Raises
    ValueError, with a message fit for the user, on anything else.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {_DURATION_HINT}, got {_show(value)}")
    if isinstance(value, str):
        seconds = _duration_text(value.strip())
    else:
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond float range
            seconds = math.inf
    if math.isnan(seconds):
        raise ValueError(f"expected {_DURATION_HINT}, got {_show(value)}")
    if seconds < 0:
        raise ValueError(f"a duration must not be negative, got {_show(value)}")
    if math.isinf(seconds):
        raise ValueError(f"a duration must be finite, got {_show(value)}")
    return seconds + 0.0  # -0.0 -> 0.0


def _duration_text(text: str) -> float:
    if _PLAIN_NUMBER.fullmatch(text.removeprefix("-")):
        return float(text)  # negative is reported by the caller
    if not _DURATION.fullmatch(text):
        if _DURATION.fullmatch(text[1:]) and text.startswith("-"):
            raise ValueError(f"a duration must not be negative, got {_show(text)}")
        raise ValueError(f"expected {_DURATION_HINT}, got {_show(text)}")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(text))


def _show(value: object) -> str:
    """A value as the user wrote it in YAML, short and on one line."""
    if isinstance(value, str):
        return json.dumps(_truncate(value), ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return _truncate(str(value))
    return f"a {type(value).__name__}"


def _truncate(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# --- loading ---------------------------------------------------------------------------------


class _FileMissing(ConfigError):
    """The file does not exist: ``load_rules_or_default`` falls back to the builtin rules."""


# A rules file is a few kB; anything this large is a mistake (a log, a device), not rules.
MAX_CONFIG_BYTES = 1 << 20
# A file written in place (``cat > rules.yaml``) passes through states that parse: empty (the
# built-in defaults) or cut after a rule. A file changed within this many seconds is read
# only once it has stayed the same for SETTLE_SECONDS.
RECENT_SECONDS = 1.0
SETTLE_SECONDS = 0.05
SETTLE_TRIES = 20


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
        if now is None or _identity(now) == identity:
            if now is None or abs(time.time() - now.st_mtime) > RECENT_SECONDS:
                return data
            time.sleep(SETTLE_SECONDS)
            try:
                if _identity(os.stat(path)) == identity:
                    return data
            except OSError:
                return data
        else:
            time.sleep(SETTLE_SECONDS)
    raise ConfigError(_one_line(f"{path}: cannot read: it kept changing while being read"))


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_once(path: str) -> tuple[bytes, tuple[int, int, int, int]]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        error = _FileMissing if isinstance(exc, FileNotFoundError) else ConfigError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise error(_one_line(f"{path}: cannot read: {reason}")) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "Is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ConfigError(_one_line(f"{path}: cannot read: {what}"))
        with open(fd, "rb", closefd=False) as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(_one_line(f"{path}: cannot read: {exc.strerror or exc}")) from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        what = f"larger than {MAX_CONFIG_BYTES // 1024} KiB, not a config file"
        raise ConfigError(_one_line(f"{path}: cannot read: {what}"))
    return data, _identity(st)


def load_rules(path: str) -> RuleSet:
    """Parse the rules file at ``path``; raises ConfigError if it cannot be read or used."""
    data = read_config_file(path)
    try:
        text = data.decode("utf-8-sig")  # -sig: tolerate the BOM some editors write
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{_one_line(path)}:{line}: invalid UTF-8: {exc.reason}") from None
    return parse_rules(text, path)


def load_rules_or_default(path: str | None) -> RuleSet:
    """The rules at ``path``; with None, DEFAULT_CONFIG_PATH if it exists, else the builtins."""
    if path is not None:
        return load_rules(path)
    try:
        return load_rules(DEFAULT_CONFIG_PATH)
    except _FileMissing:
        return builtin_rules()


def compose_yaml(text: str, source: str) -> Node | None:
    """The node tree of a YAML document (line numbers kept for errors); ConfigError if it is
    not YAML. Shared by the rules file and the web config file."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "syntax error"
        if exc.problem and exc.context:
            problem = f"{exc.problem} ({exc.context})"
        raise ConfigError(_one_line(f"{source}:{line}: invalid YAML: {problem}")) from None
    except yaml.reader.ReaderError as exc:  # a character YAML forbids, e.g. NUL
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character  # the code point for str input
        shown = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        problem = f"unacceptable character {shown}: {exc.reason}"
        raise ConfigError(_one_line(f"{source}:{line}: invalid YAML: {problem}")) from None
    except yaml.YAMLError as exc:  # no other kind is known to come from compose; to be safe
        raise ConfigError(_one_line(f"{source}:1: invalid YAML: {exc}")) from None
    except RecursionError:  # the composer recurses once per nesting level
        raise ConfigError(f"{_one_line(source)}:1: invalid YAML: nested too deeply") from None
    return root


def parse_rules(text: str, source: str) -> RuleSet:
    """Parse the text of a rules file; ``source`` names it in errors and in the RuleSet."""
    root = compose_yaml(text, source)
    if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL):
        return RuleSet(source=source)  # an empty file (or only comments): the builtin defaults
    try:
        return _ruleset(root, source)
    except _Invalid as exc:
        raise ConfigError(_one_line(f"{source}:{exc.line}: {exc.path}: {exc.what}")) from None


def _one_line(message: str) -> str:
    # Keys, values and paths come from the user: escape newlines and other control characters.
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message
    )


# --- the schema ------------------------------------------------------------------------------

_TOP_KEYS = ("version", "defaults", "sysctls", "rules")
_THRESHOLD_KEYS = tuple(f.name for f in dataclasses.fields(Thresholds))
_RULE_KEYS = ("name", "match", *_THRESHOLD_KEYS, "severity", "ignore")
_MATCH_KEYS = tuple(f.name for f in dataclasses.fields(Match))
_BOUND_KEYS = ("min", "max", "severity")
_SYSCTL_MAX = 2**63 - 1  # the widest sysctl the kernel has (unsigned long)

# "close-wait", "CLOSE_WAIT" and "closewait" all name TcpState.CLOSE_WAIT, as do ss's "fin-wait-1".
_STATES = {s.name.replace("_", ""): s for s in TcpState if s is not TcpState.UNKNOWN}


class _Invalid(Exception):
    """Raised at the offending node; ``parse_rules`` adds the source and makes a ConfigError."""

    def __init__(self, node: Node, path: str, what: str) -> None:
        super().__init__(what)
        self.line = node.start_mark.line + 1 if node.start_mark is not None else 1
        self.path = path
        self.what = what


def _ruleset(root: Node, source: str) -> RuleSet:
    if not isinstance(root, MappingNode):
        raise _Invalid(
            root,
            "(top level)",
            f'expected a mapping starting with "version: 1", got {_describe(root)}',
        )
    entries = _mapping(root, "", _TOP_KEYS)
    if "version" not in entries:
        raise _Invalid(root, "version", 'required key missing; start the file with "version: 1"')
    version = _scalar(entries["version"][1], "version", "1")
    if isinstance(version, bool) or not isinstance(version, int) or version != 1:
        raise _Invalid(entries["version"][1], "version", f"expected 1, got {_show(version)}")
    defaults = Thresholds()
    if "defaults" in entries:
        values = _thresholds(
            _mapping(entries["defaults"][1], "defaults", _THRESHOLD_KEYS), "defaults"
        )
        defaults = dataclasses.replace(defaults, **values)
    sysctls = _sysctls(entries["sysctls"][1]) if "sysctls" in entries else ()
    rules = _rules(entries["rules"][1], defaults) if "rules" in entries else ()
    return RuleSet(defaults=defaults, sysctls=sysctls, rules=rules, source=source)


def _sysctls(node: Node) -> tuple[SysctlBound, ...]:
    bounds = []
    for name, (_, value) in _mapping(node, "sysctls", KNOWN_SYSCTLS, noun="sysctl").items():
        path = f"sysctls.{name}"
        entries = _mapping(value, path, _BOUND_KEYS, null_ok=False)
        low, high = (
            _int(entries[k][1], f"{path}.{k}", 0, _SYSCTL_MAX) if k in entries else None
            for k in ("min", "max")
        )
        if low is None and high is None:
            raise _Invalid(value, path, "needs at least one of min, max")
        if low is not None and high is not None and low > high:
            what = f"min {low} is greater than max {high}"
            raise _Invalid(entries["min"][1], f"{path}.min", what)
        severity = Severity.WARNING
        if "severity" in entries:
            severity = _severity(entries["severity"][1], f"{path}.severity")
        bounds.append(SysctlBound(name=name, min=low, max=high, severity=severity))
    return tuple(bounds)


def _rules(node: Node, defaults: Thresholds) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    first_use: dict[str, str] = {}  # rule name -> key path of the rule that has it
    for index, item in enumerate(_sequence(node, "rules", empty_ok=True)):
        path = f"rules[{index}]"
        entries = _mapping(item, path, _RULE_KEYS, null_ok=False)
        if "name" not in entries:
            raise _Invalid(item, f"{path}.name", "required key missing")
        name_node = entries["name"][1]
        name = _string(name_node, f"{path}.name", "a rule name")
        if name in RESERVED_RULE_NAMES:
            what = f"{_show(name)} is reserved for sockets that no rule matches; choose another"
            raise _Invalid(name_node, f"{path}.name", what)
        if name in first_use:
            what = f"duplicate rule name {_show(name)}, already used by {first_use[name]}"
            raise _Invalid(name_node, f"{path}.name", what)
        first_use[name] = path
        rules.append(_rule(name, entries, path, defaults))
    return tuple(rules)


def _rule(name: str, entries: dict[str, tuple[Node, Node]], path: str, base: Thresholds) -> Rule:
    match = _match(entries["match"][1], f"{path}.match") if "match" in entries else Match()
    severity = None
    if "severity" in entries:
        severity = _severity(entries["severity"][1], f"{path}.severity")
    ignore = _bool(entries["ignore"][1], f"{path}.ignore") if "ignore" in entries else False
    overrides = _thresholds(entries, path)
    return Rule(
        name=name,
        match=match,
        thresholds=dataclasses.replace(base, **overrides),
        severity=severity,
        ignore=ignore,
        overrides=frozenset(overrides),
    )


def _match(node: Node, path: str) -> Match:
    entries = _mapping(node, path, _MATCH_KEYS)

    def items(key: str) -> list[tuple[Node, str]]:
        if key not in entries:
            return []
        nodes = _sequence(entries[key][1], f"{path}.{key}", empty_ok=False)
        return [(item, f"{path}.{key}[{i}]") for i, item in enumerate(nodes)]

    return Match(
        local_ports=frozenset(_int(n, p, 0, 65535) for n, p in items("local_ports")),
        remote_ports=frozenset(_int(n, p, 0, 65535) for n, p in items("remote_ports")),
        local_cidrs=tuple(_cidr(n, p) for n, p in items("local_cidrs")),
        remote_cidrs=tuple(_cidr(n, p) for n, p in items("remote_cidrs")),
        processes=tuple(_string(n, p, "a process name glob") for n, p in items("processes")),
        states=frozenset(_state(n, p) for n, p in items("states")),
    )


def _thresholds(entries: dict[str, tuple[Node, Node]], path: str) -> dict[str, Any]:
    """The threshold keys present in ``entries``, converted and checked.

    ``Any``: the values are floats and one int, for ``dataclasses.replace(thresholds, **values)``.
    """
    values: dict[str, Any] = {}
    for key in _THRESHOLD_KEYS:
        if key in entries:
            node, key_path = entries[key][1], f"{path}.{key}"
            if key == "warn_at":
                values[key] = _fraction(node, key_path)
            elif key == "retransmit_threshold":
                values[key] = _int(node, key_path, 1, None)
            else:  # the durations; only close_wait_after may be 0 (flag any CLOSE_WAIT)
                values[key] = _duration(node, key_path, zero_ok=key == "close_wait_after")
    return values


# --- typed values ----------------------------------------------------------------------------

_NULL = "tag:yaml.org,2002:null"
_STR = "tag:yaml.org,2002:str"
_CONSTRUCTOR = SafeConstructor()
_CONVERTERS = {
    _NULL: _CONSTRUCTOR.construct_yaml_null,
    "tag:yaml.org,2002:bool": _CONSTRUCTOR.construct_yaml_bool,
    "tag:yaml.org,2002:int": _CONSTRUCTOR.construct_yaml_int,
    "tag:yaml.org,2002:float": _CONSTRUCTOR.construct_yaml_float,
}


def _mapping(
    node: Node, path: str, allowed: tuple[str, ...], *, noun: str = "key", null_ok: bool = True
) -> dict[str, tuple[Node, Node]]:
    """The entries of a mapping node by key, in file order: ``{key: (key_node, value_node)}``.

    ``null_ok`` accepts an empty value (``defaults:`` with every entry commented out).
    """
    if null_ok and isinstance(node, ScalarNode) and node.tag == _NULL:
        return {}
    if not isinstance(node, MappingNode):
        raise _Invalid(node, path or "(top level)", f"expected a mapping, got {_describe(node)}")
    entries: dict[str, tuple[Node, Node]] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode):
            raise _Invalid(
                key_node,
                path or "(top level)",
                f"expected a {noun} name, got {_describe(key_node)} as a key",
            )
        key = str(key_node.value)
        key_path = f"{path}.{key}" if path else key
        if key in entries:
            first = entries[key][0].start_mark
            where = f" (first at line {first.line + 1})" if first is not None else ""
            raise _Invalid(key_node, key_path, f"duplicate key{where}")
        if key not in allowed:
            raise _Invalid(
                key_node, key_path, f"unknown {noun}, expected one of: " + ", ".join(allowed)
            )
        entries[key] = (key_node, value_node)
    return entries


def _sequence(node: Node, path: str, *, empty_ok: bool) -> list[Node]:
    if empty_ok and isinstance(node, ScalarNode) and node.tag == _NULL:
        return []
    if not isinstance(node, SequenceNode):
        raise _Invalid(node, path, f"expected a list, got {_describe(node)}")
    if not node.value and not empty_ok:
        raise _Invalid(node, path, "must not be empty; leave the key out to match anything")
    return list(node.value)


def _scalar(node: Node, path: str, expected: str) -> object:
    """The Python value of a scalar node: None, bool, int, float or str."""
    if isinstance(node, ScalarNode):
        if node.tag == _STR:
            return str(node.value)
        converter = _CONVERTERS.get(node.tag)
        if converter is not None:
            try:
                return converter(node)
            except (ValueError, LookupError):  # an explicit tag on a bad value: !!int "x"
                tag = node.tag.replace("tag:yaml.org,2002:", "!!")
                what = f"expected {expected}, got {tag} {_show(node.value)}"
                raise _Invalid(node, path, what) from None
    raise _Invalid(node, path, f"expected {expected}, got {_describe(node)}")


def _describe(node: Node) -> str:
    """A node as the user wrote it, for "got ..." in messages."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _STR:
        return _show(node.value)
    text = _truncate(str(node.value)) or "nothing"
    if node.tag in _CONVERTERS:
        return text
    # A tag we do not convert (!!timestamp, !!binary, !custom): show it, or "got 1" would puzzle.
    return f"{node.tag.replace('tag:yaml.org,2002:', '!!')} {text}"


def _int(node: Node, path: str, low: int, high: int | None) -> int:
    value = _scalar(node, path, "an integer")
    if isinstance(value, bool) or not isinstance(value, int):
        # bool is an int in Python; "ignore: yes" where a number belongs is a mistake.
        raise _Invalid(node, path, f"expected an integer, got {_describe(node)}")
    if value < low or (high is not None and value > high):
        allowed = f"between {low} and {high}" if high is not None else f">= {low}"
        raise _Invalid(node, path, f"expected an integer {allowed}, got {_describe(node)}")
    return value


def _fraction(node: Node, path: str) -> float:
    value = _scalar(node, path, "a number")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(node, path, f"expected a number, got {_describe(node)}")
    if not 0 < value <= 1:
        raise _Invalid(node, path, f"expected a number > 0 and <= 1, got {_describe(node)}")
    return float(value)


def _duration(node: Node, path: str, *, zero_ok: bool) -> float:
    try:
        seconds = parse_duration(_scalar(node, path, _DURATION_HINT))
    except ValueError as exc:
        raise _Invalid(node, path, str(exc)) from None
    if seconds == 0 and not zero_ok:
        raise _Invalid(node, path, f"a duration must be greater than 0, got {_describe(node)}")
    return seconds


def _string(node: Node, path: str, expected: str) -> str:
    value = _scalar(node, path, expected)
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(node, path, f"expected {expected}, got {_describe(node)}")
    return value


def _bool(node: Node, path: str) -> bool:
    value = _scalar(node, path, "true or false")
    if not isinstance(value, bool):
        raise _Invalid(node, path, f"expected true or false, got {_describe(node)}")
    return value


def _severity(node: Node, path: str) -> Severity:
    expected = "one of: " + ", ".join(s.label for s in Severity)
    try:
        return Severity.parse(_string(node, path, expected))
    except ValueError:
        raise _Invalid(node, path, f"expected {expected}, got {_describe(node)}") from None


def _cidr(node: Node, path: str) -> IPNetwork:
    text = _string(node, path, 'an IP network like "10.0.0.0/8"')
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise _Invalid(
            node,
            path,
            f'expected an IP network like "10.0.0.0/8" or "fd00::/8", got {_describe(node)}',
        ) from None


def _state(node: Node, path: str) -> TcpState:
    expected = "a TCP state, one of: " + ", ".join(s.label for s in _STATES.values())
    text = _string(node, path, expected)
    state = _STATES.get(text.strip().upper().replace("-", "").replace("_", ""))
    if state is None:
        raise _Invalid(node, path, f"expected {expected}, got {_describe(node)}")
    return state
