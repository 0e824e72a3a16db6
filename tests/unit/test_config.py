"""The rules file: durations, the shipped config/rules.yaml, merging, and every rejection."""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

import pytest

from auditd.config import (
    KNOWN_SYSCTLS,
    ConfigError,
    Match,
    Rule,
    RuleSet,
    SysctlBound,
    Thresholds,
    builtin_rules,
    load_rules,
    load_rules_or_default,
    parse_duration,
    parse_rules,
)
from auditd.config import rules as config_rules
from auditd.model import Severity, TcpState

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "rules.yaml"


# --- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (350, 350.0),
        (2.5, 2.5),
        ("350s", 350.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1d", 86400.0),
        ("500ms", 0.5),
        ("1m500ms", 60.5),
        ("1.5h", 5400.0),
        ("90", 90.0),
        ("0", 0.0),
        ("2.25", 2.25),
        (" 10s ", 10.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "must not be negative"),
        (-0.5, "must not be negative"),
        ("-5s", "must not be negative"),
        ("-90", "must not be negative"),
        ("", 'got ""'),
        ("   ", 'got ""'),
        ("1x", 'got "1x"'),
        ("s", 'got "s"'),
        ("5 m", 'got "5 m"'),
        ("1e3", 'got "1e3"'),
        ("1_000", 'got "1_000"'),
        ("nan", 'got "nan"'),
        ("inf", 'got "inf"'),
        ("5S", 'got "5S"'),
        ("1h-30m", 'got "1h-30m"'),
        (True, "got true"),
        (None, "got null"),
        ([1], "got a list"),
        (float("nan"), "got nan"),
        (float("inf"), "must be finite"),
        (10**400, "must be finite"),
        ("9" * 400 + "s", "must be finite"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match="duration") as info:
        parse_duration(value)
    assert message in str(info.value)


# --- the shipped file ------------------------------------------------------------------------


def test_shipped_rules() -> None:
    rules = load_rules(str(SHIPPED))
    defaults = Thresholds(
        idle_timeout=350.0,
        warn_at=0.5,
        detection_budget=900.0,
        close_wait_after=60.0,
        retransmit_threshold=3,
    )
    assert rules == RuleSet(
        defaults=defaults,
        sysctls=(
            SysctlBound("net.ipv4.tcp_keepalive_time", max=300),
            SysctlBound("net.ipv4.tcp_retries2", min=8, max=8, severity=Severity.INFO),
        ),
        rules=(
            Rule(
                name="postgres",
                match=Match(remote_ports=frozenset({5432})),
                thresholds=Thresholds(idle_timeout=300.0),
                severity=Severity.CRITICAL,
                overrides=frozenset({"idle_timeout"}),
            ),
            Rule(name="ssh", match=Match(local_ports=frozenset({22})), ignore=True),
        ),
        source=str(SHIPPED),
    )
    # The shipped defaults are the builtin ones: no file and the shipped file agree.
    assert rules.defaults == builtin_rules().defaults


def test_shipped_rules_document_every_known_sysctl() -> None:
    text = SHIPPED.read_text()
    assert all(name in text for name in KNOWN_SYSCTLS)


# --- what a valid file becomes ---------------------------------------------------------------

MERGE = """\
version: 1
defaults:
  idle_timeout: 10m
  warn_at: 0.8
rules:
  - name: db
    idle_timeout: 1m
    retransmit_threshold: 5
  - name: plain
  - name: web
    close_wait_after: 0
    detection_budget: 2h
"""


def test_defaults_merge_into_rules() -> None:
    rules = parse_rules(MERGE, "m.yaml")
    assert rules.defaults == Thresholds(idle_timeout=600.0, warn_at=0.8)
    db, plain, web = rules.rules
    assert db.thresholds == Thresholds(idle_timeout=60.0, warn_at=0.8, retransmit_threshold=5)
    assert db.overrides == {"idle_timeout", "retransmit_threshold"}
    assert plain.thresholds == rules.defaults
    assert plain.overrides == frozenset()
    assert web.thresholds == Thresholds(
        idle_timeout=600.0, warn_at=0.8, close_wait_after=0.0, detection_budget=7200.0
    )
    assert web.overrides == {"close_wait_after", "detection_budget"}
    assert [r.name for r in rules.rules] == ["db", "plain", "web"]  # file order: first match wins


def test_match_criteria() -> None:
    text = """\
version: 1
rules:
  - name: everything
    match:
      local_ports: [0, 8080, 65535]
      remote_ports: [5432, 5432]
      local_cidrs: [10.0.0.1/8, "fd00::/8"]
      remote_cidrs: [192.0.2.7]
      processes: [java, "postgres*"]
      states: [ESTABLISHED, close-wait, Fin_Wait1, syn-recv, timewait]
    severity: Warning
    ignore: false
"""
    (rule,) = parse_rules(text, "x.yaml").rules
    assert rule.match == Match(
        local_ports=frozenset({0, 8080, 65535}),
        remote_ports=frozenset({5432}),
        local_cidrs=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")),
        remote_cidrs=(ipaddress.ip_network("192.0.2.7/32"),),
        processes=("java", "postgres*"),
        states=frozenset(
            {
                TcpState.ESTABLISHED,
                TcpState.CLOSE_WAIT,
                TcpState.FIN_WAIT1,
                TcpState.SYN_RECV,
                TcpState.TIME_WAIT,
            }
        ),
    )
    assert rule.severity is Severity.WARNING
    assert rule.ignore is False
    assert parse_rules(text, "x.yaml").uses_processes


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        "# only a comment\n",
        "---\n",
        "~\n",
    ],
)
def test_empty_document_gives_builtin_defaults(text: str) -> None:
    assert parse_rules(text, "e.yaml") == RuleSet(source="e.yaml")


@pytest.mark.parametrize(
    "text",
    [
        "version: 1\n",
        "version: 1\ndefaults:\nsysctls:\nrules:\n",  # sections with every entry commented out
        "version: 1\ndefaults: {}\nsysctls: {}\nrules: []\n",
    ],
)
def test_empty_sections(text: str) -> None:
    assert parse_rules(text, "e.yaml") == RuleSet(source="e.yaml")


def test_rule_without_match_matches_everything() -> None:
    (rule,) = parse_rules("version: 1\nrules: [{name: all}]\n", "a.yaml").rules
    assert rule.match == Match()


def test_aliases_are_allowed_and_not_a_bomb() -> None:
    text = """\
version: 1
rules:
  - {name: a, match: &m {remote_ports: [1]}}
  - {name: b, match: *m}
"""
    a, b = parse_rules(text, "a.yaml").rules
    assert a.match == b.match == Match(remote_ports=frozenset({1}))
    # Billion laughs: 9**20 leaves if expanded; composed, a few shared nodes, and a quick error.
    levels = [f"l0: &l0 [{', '.join(['x'] * 9)}]"] + [
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 21)
    ]
    bomb = "version: 1\n" + "\n".join(levels) + "\nrules: *l20\n"
    with pytest.raises(ConfigError, match=r"^b\.yaml:2: l0: unknown key"):
        parse_rules(bomb, "b.yaml")


# --- rejections ------------------------------------------------------------------------------

REJECTIONS = [
    # (id, text, "file:line: keypath:" prefix, part of the reason)
    ("not a mapping: list", "- a\n- b\n", "t.yaml:1: (top level):", "got a list"),
    ("not a mapping: scalar", "hello\n", "t.yaml:1: (top level):", 'got "hello"'),
    ("missing version", "defaults: {}\n", "t.yaml:1: version:", "required key missing"),
    ("wrong version", "version: 2\n", "t.yaml:1: version:", "expected 1, got 2"),
    ("version as string", "version: '1'\n", "t.yaml:1: version:", 'got "1"'),
    ("version as float", "version: 1.0\n", "t.yaml:1: version:", "got 1.0"),
    ("version true", "version: true\n", "t.yaml:1: version:", "got true"),
    ("unknown top key", "version: 1\nrule: []\n", "t.yaml:2: rule:", "unknown key"),
    (
        "unknown defaults key",
        "version: 1\ndefaults:\n  idle: 5s\n",
        "t.yaml:3: defaults.idle:",
        "unknown key, expected one of: idle_timeout, warn_at",
    ),
    (
        "unknown rule key",
        "version: 1\nrules:\n  - name: a\n    idel_timeout: 5s\n",
        "t.yaml:4: rules[0].idel_timeout:",
        "unknown key, expected one of: name, match, idle_timeout",
    ),
    (
        "unknown match key",
        "version: 1\nrules:\n  - name: a\n    match:\n      port: [1]\n",
        "t.yaml:5: rules[0].match.port:",
        "unknown key, expected one of: local_ports, remote_ports",
    ),
    (
        "unknown bound key",
        "version: 1\nsysctls:\n  net.ipv4.tcp_retries2:\n    maximum: 8\n",
        "t.yaml:4: sysctls.net.ipv4.tcp_retries2.maximum:",
        "unknown key, expected one of: min, max, severity",
    ),
    (
        "unknown sysctl",
        "version: 1\nsysctls:\n  net.ipv4.tcp_keepalive_tim: {max: 300}\n",
        "t.yaml:3: sysctls.net.ipv4.tcp_keepalive_tim:",
        "unknown sysctl, expected one of: net.ipv4.tcp_keepalive_time, ",
    ),
    ("merge key", "version: 1\n<<: {rules: []}\n", "t.yaml:2: <<:", "unknown key"),
    ("non-scalar key", "version: 1\n? [a]\n: 1\n", "t.yaml:2: (top level):", "got a list"),
    # wrong types
    ("defaults a list", "version: 1\ndefaults: [1]\n", "t.yaml:2: defaults:", "expected a mapping"),
    ("rules a mapping", "version: 1\nrules: {a: 1}\n", "t.yaml:2: rules:", "expected a list"),
    ("rule a string", "version: 1\nrules: [a]\n", "t.yaml:2: rules[0]:", 'got "a"'),
    ("rule empty", "version: 1\nrules:\n  -\n", "t.yaml:3: rules[0]:", "expected a mapping"),
    (
        "ports not a list",
        "version: 1\nrules:\n  - name: a\n    match: {remote_ports: '5432'}\n",
        "t.yaml:4: rules[0].match.remote_ports:",
        'expected a list, got "5432"',
    ),
    (
        "ports empty",
        "version: 1\nrules:\n  - name: a\n    match: {remote_ports: []}\n",
        "t.yaml:4: rules[0].match.remote_ports:",
        "must not be empty",
    ),
    (
        "port a bool",
        "version: 1\nrules:\n  - name: a\n    match:\n      local_ports:\n"
        "        - 22\n        - yes\n",
        "t.yaml:7: rules[0].match.local_ports[1]:",
        "expected an integer, got yes",
    ),
    (
        "port out of range",
        "version: 1\nrules:\n  - name: a\n    match: {local_ports: [22, 65536]}\n",
        "t.yaml:4: rules[0].match.local_ports[1]:",
        "between 0 and 65535, got 65536",
    ),
    (
        "negative port",
        "version: 1\nrules:\n  - name: a\n    match: {remote_ports: [-1]}\n",
        "t.yaml:4: rules[0].match.remote_ports[0]:",
        "between 0 and 65535",
    ),
    (
        "port range string",
        "version: 1\nrules:\n  - name: a\n    match: {remote_ports: [8000-8100]}\n",
        "t.yaml:4: rules[0].match.remote_ports[0]:",
        'got "8000-8100"',
    ),
    (
        "retransmit_threshold a bool",
        "version: 1\ndefaults:\n  retransmit_threshold: true\n",
        "t.yaml:3: defaults.retransmit_threshold:",
        "expected an integer, got true",
    ),
    (
        "retransmit_threshold a float",
        "version: 1\ndefaults:\n  retransmit_threshold: 2.5\n",
        "t.yaml:3: defaults.retransmit_threshold:",
        "expected an integer, got 2.5",
    ),
    (
        "retransmit_threshold zero",
        "version: 1\ndefaults:\n  retransmit_threshold: 0\n",
        "t.yaml:3: defaults.retransmit_threshold:",
        "expected an integer >= 1, got 0",
    ),
    (
        "warn_at zero",
        "version: 1\ndefaults:\n  warn_at: 0\n",
        "t.yaml:3: defaults.warn_at:",
        "> 0 and <= 1",
    ),
    (
        "warn_at above one",
        "version: 1\nrules:\n  - name: a\n    warn_at: 1.5\n",
        "t.yaml:4: rules[0].warn_at:",
        "> 0 and <= 1, got 1.5",
    ),
    (
        "warn_at a string",
        "version: 1\ndefaults:\n  warn_at: 50%\n",
        "t.yaml:3: defaults.warn_at:",
        'expected a number, got "50%"',
    ),
    (
        "ignore not a bool",
        "version: 1\nrules:\n  - name: a\n    ignore: 1\n",
        "t.yaml:4: rules[0].ignore:",
        "expected true or false, got 1",
    ),
    (
        "name not a string",
        "version: 1\nrules:\n  - name: 42\n",
        "t.yaml:3: rules[0].name:",
        "got 42",
    ),
    ("name empty", "version: 1\nrules:\n  - name: ''\n", "t.yaml:3: rules[0].name:", 'got ""'),
    (
        "name missing",
        "version: 1\nrules:\n  - name: a\n  - match: {}\n",
        "t.yaml:4: rules[1].name:",
        "required key missing",
    ),
    (
        "name reserved",
        "version: 1\nrules:\n  - name: default\n",
        "t.yaml:3: rules[0].name:",
        "reserved",
    ),
    (
        "processes empty glob",
        "version: 1\nrules:\n  - name: a\n    match: {processes: [java, '']}\n",
        "t.yaml:4: rules[0].match.processes[1]:",
        'got ""',
    ),
    (
        "unsupported tag",
        "version: 1\ndefaults:\n  idle_timeout: !!timestamp 2001-01-01\n",
        "t.yaml:3: defaults.idle_timeout:",
        "got !!timestamp 2001-01-01",
    ),
    (
        "bad explicit tag",
        "version: 1\ndefaults:\n  retransmit_threshold: !!int x\n",
        "t.yaml:3: defaults.retransmit_threshold:",
        'got !!int "x"',
    ),
    # durations
    (
        "bad duration",
        "version: 1\nrules:\n  - name: a\n  - name: b\n  - name: c\n    idle_timeout: fast\n",
        "t.yaml:6: rules[2].idle_timeout:",
        'expected a duration like "350s", "15m", "1h30m" or "500ms", got "fast"',
    ),
    (
        "negative duration",
        "version: 1\ndefaults:\n  close_wait_after: -1s\n",
        "t.yaml:3: defaults.close_wait_after:",
        "must not be negative",
    ),
    (
        "zero idle_timeout",
        "version: 1\ndefaults:\n  idle_timeout: 0s\n",
        "t.yaml:3: defaults.idle_timeout:",
        "must be greater than 0",
    ),
    (
        "zero detection_budget",
        "version: 1\ndefaults:\n  detection_budget: 0\n",
        "t.yaml:3: defaults.detection_budget:",
        "must be greater than 0",
    ),
    (
        "duration a bool",
        "version: 1\ndefaults:\n  idle_timeout: on\n",
        "t.yaml:3: defaults.idle_timeout:",
        "got true",
    ),
    (
        "duration a list",
        "version: 1\ndefaults:\n  idle_timeout: [5s]\n",
        "t.yaml:3: defaults.idle_timeout:",
        "got a list",
    ),
    ("duration nan", "version: 1\ndefaults:\n  idle_timeout: .nan\n", "t.yaml:3:", "got nan"),
    # CIDRs, states, severities
    (
        "bad CIDR",
        "version: 1\nrules:\n  - name: a\n    match:\n"
        "      remote_cidrs: [10.0.0.0/8, 10.0.0.0/33]\n",
        "t.yaml:5: rules[0].match.remote_cidrs[1]:",
        'expected an IP network like "10.0.0.0/8" or "fd00::/8", got "10.0.0.0/33"',
    ),
    (
        "CIDR not a string",
        "version: 1\nrules:\n  - name: a\n    match: {local_cidrs: [10]}\n",
        "t.yaml:4: rules[0].match.local_cidrs[0]:",
        "got 10",
    ),
    (
        "bad state",
        "version: 1\nrules:\n  - name: a\n    match: {states: [established, half-open]}\n",
        "t.yaml:4: rules[0].match.states[1]:",
        "one of: established, syn_sent, syn_recv, fin_wait1, fin_wait2, time_wait, close, "
        'close_wait, last_ack, listen, closing, new_syn_recv, bound_inactive, got "half-open"',
    ),
    (
        "state UNKNOWN",
        "version: 1\nrules:\n  - name: a\n    match: {states: [UNKNOWN]}\n",
        "t.yaml:4: rules[0].match.states[0]:",
        'got "UNKNOWN"',
    ),
    (
        "bad rule severity",
        "version: 1\nrules:\n  - name: a\n    severity: fatal\n",
        "t.yaml:4: rules[0].severity:",
        'expected one of: info, warning, critical, got "fatal"',
    ),
    (
        "bad sysctl severity",
        "version: 1\nsysctls:\n  net.ipv4.tcp_retries2: {max: 8, severity: 3}\n",
        "t.yaml:3: sysctls.net.ipv4.tcp_retries2.severity:",
        "got 3",
    ),
    # sysctl bounds
    (
        "min > max",
        "version: 1\nsysctls:\n  net.ipv4.tcp_retries2:\n    min: 9\n    max: 8\n",
        "t.yaml:4: sysctls.net.ipv4.tcp_retries2.min:",
        "min 9 is greater than max 8",
    ),
    (
        "bound without min or max",
        "version: 1\nsysctls:\n  net.ipv4.tcp_retries2: {severity: info}\n",
        "t.yaml:3: sysctls.net.ipv4.tcp_retries2:",
        "needs at least one of min, max",
    ),
    (
        "bound empty",
        "version: 1\nsysctls:\n  net.ipv4.tcp_retries2:\n",
        "t.yaml:3: sysctls.net.ipv4.tcp_retries2:",
        "expected a mapping, got nothing",
    ),
    (
        "bound a duration",
        "version: 1\nsysctls:\n  net.ipv4.tcp_keepalive_time: {max: 300s}\n",
        "t.yaml:3: sysctls.net.ipv4.tcp_keepalive_time.max:",
        'expected an integer, got "300s"',
    ),
    (
        "bound a bool",
        "version: 1\nsysctls:\n  net.ipv4.tcp_keepalive_time: {min: false}\n",
        "t.yaml:3: sysctls.net.ipv4.tcp_keepalive_time.min:",
        "expected an integer, got false",
    ),
    (
        "bound negative",
        "version: 1\nsysctls:\n  net.ipv4.tcp_keepalive_time: {min: -1}\n",
        "t.yaml:3: sysctls.net.ipv4.tcp_keepalive_time.min:",
        "between 0 and",
    ),
    (
        "sysctls a list",
        "version: 1\nsysctls: [net.ipv4.tcp_retries2]\n",
        "t.yaml:2: sysctls:",
        "expected a mapping, got a list",
    ),
    # duplicates
    (
        "duplicate rule name",
        "version: 1\nrules:\n  - name: db\n  - name: web\n  - name: db\n",
        "t.yaml:5: rules[2].name:",
        'duplicate rule name "db", already used by rules[0]',
    ),
    (
        "duplicate top key",
        "version: 1\nrules: []\nversion: 1\n",
        "t.yaml:3: version:",
        "duplicate key (first at line 1)",
    ),
    (
        "duplicate defaults key",
        "version: 1\ndefaults:\n  idle_timeout: 1s\n  warn_at: 0.5\n  idle_timeout: 2s\n",
        "t.yaml:5: defaults.idle_timeout:",
        "duplicate key (first at line 3)",
    ),
    (
        "duplicate sysctl",
        "version: 1\nsysctls:\n  net.ipv4.tcp_retries2: {max: 8}\n"
        "  net.ipv4.tcp_retries2: {max: 9}\n",
        "t.yaml:4: sysctls.net.ipv4.tcp_retries2:",
        "duplicate key (first at line 3)",
    ),
    (
        "duplicate match key",
        "version: 1\nrules:\n  - name: a\n    match: {local_ports: [1], local_ports: [2]}\n",
        "t.yaml:4: rules[0].match.local_ports:",
        "duplicate key (first at line 4)",
    ),
    # invalid YAML
    ("unclosed flow", "version: 1\nrules: [\n", "t.yaml:3: invalid YAML:", "expected node content"),
    ("bad indent", "version: 1\n  rules: []\n", "t.yaml:2: invalid YAML:", "mapping values"),
    ("tab indent", "version: 1\nrules:\n\t- name: a\n", "t.yaml:3: invalid YAML:", "'\\t'"),
    (
        "two documents",
        "version: 1\n---\nversion: 1\n",
        "t.yaml:2: invalid YAML:",
        "single document",
    ),
    ("undefined alias", "version: *v\n", "t.yaml:1: invalid YAML:", "undefined alias"),
    ("NUL character", "version: 1\nrules: []\x00\n", "t.yaml:2: invalid YAML:", "#x0000"),
]


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [pytest.param(text, where, reason, id=name) for name, text, where, reason in REJECTIONS],
)
def test_rejections(text: str, where: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rules(text, "t.yaml")
    message = str(info.value)
    assert message.startswith(where + " "), message
    assert reason in message, message
    assert "\n" not in message


def test_nesting_too_deep_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^d\.yaml:\d+: invalid YAML"):
        parse_rules("[" * 100_000, "d.yaml")


def test_nesting_is_limited_and_the_error_names_its_line() -> None:
    from auditd.config.compose import MAX_DEPTH

    def nested(levels: int) -> str:  # the top mapping is one level
        return "version: 1\nx:\n  " + "[" * (levels - 1) + "]" * (levels - 1) + "\n"

    with pytest.raises(ConfigError, match=r"^d\.yaml:2: x: unknown key"):
        parse_rules(nested(MAX_DEPTH), "d.yaml")
    with pytest.raises(ConfigError, match=r"^d\.yaml:3: invalid YAML: nested too deeply$"):
        parse_rules(nested(MAX_DEPTH + 1), "d.yaml")


def test_the_collector_is_paused_while_parsing_and_then_as_it_was() -> None:
    import gc

    from auditd.config.compose import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()
    with pytest.raises(ConfigError):
        parse_rules("version: 2\n", "v.yaml")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # disabled before: left disabled
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "text",
    [
        'version: 1\n"bad\\nkey": 1\n',  # a key with a newline
        'version: 1\nrules:\n  - name: "a\\rb\\u2028c"\n    severity: "x\\ny"\n',
        "version: 1\ndefaults:\n  idle_timeout: |\n    5s\n    6s\n",  # a multi-line value
        "version: 1\nrules: [\n  a,\n  b\n",  # invalid YAML spanning lines
    ],
)
def test_message_is_one_line(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rules(text, "one.yaml")
    message = str(info.value)
    assert message.startswith("one.yaml:")
    assert message.splitlines() == [message]


def test_long_values_are_shortened() -> None:
    with pytest.raises(ConfigError) as info:
        parse_rules(f"version: 1\ndefaults:\n  idle_timeout: {'x' * 10_000}\n", "l.yaml")
    assert len(str(info.value)) < 200


# --- files -----------------------------------------------------------------------------------


def test_load_rules_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("version: 1\nrules:\n  - name: a\n    ignore: maybe\n")
    with pytest.raises(ConfigError) as info:
        load_rules(str(path))
    assert str(info.value).startswith(f"{path}:4: rules[0].ignore: expected true or false")


def test_a_file_just_truncated_is_not_read_as_empty(tmp_path: Path) -> None:
    """``cat > rules.yaml`` truncates, then writes: a reload in between, however long the
    writer stalls (a loaded host), must not take the empty file for the built-in defaults."""
    path = tmp_path / "rules.yaml"
    path.write_text("# the team's rules\n")  # just written: comments only, an empty document
    writer = threading.Timer(0.3, path.write_text, ("version: 1\nrules:\n  - name: a\n",))
    writer.start()
    try:
        rules = load_rules(str(path))
    finally:
        writer.join()
    assert [r.name for r in rules.rules] == ["a"]


def test_an_empty_file_left_alone_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("")
    assert load_rules(str(path)).rules == ()


def test_load_rules_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_rules(str(path))
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_load_rules_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        load_rules(str(tmp_path))


def test_load_rules_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\nrules:\n  - name: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_rules(str(path))
    assert str(info.value).startswith(f"{path}:3: invalid UTF-8")


def test_load_rules_empty_file_and_bom(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_rules(str(empty)) == RuleSet(source=str(empty))
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfversion: 1\nrules: [{name: a}]\n")
    assert [r.name for r in load_rules(str(bom)).rules] == ["a"]


def test_load_rules_or_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "missing.yaml"
    monkeypatch.setattr(config_rules, "DEFAULT_CONFIG_PATH", str(missing))
    assert load_rules_or_default(None) == builtin_rules()
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        load_rules_or_default(str(missing))  # an explicit path must exist

    present = tmp_path / "rules.yaml"
    present.write_text("version: 1\nrules: [{name: a}]\n")
    monkeypatch.setattr(config_rules, "DEFAULT_CONFIG_PATH", str(present))
    assert load_rules_or_default(None).source == str(present)
    assert load_rules_or_default(str(SHIPPED)).source == str(SHIPPED)

    present.write_text("version: 3\n")  # a broken default file is an error, not a fallback
    with pytest.raises(ConfigError, match=r"rules\.yaml:1: version: expected 1"):
        load_rules_or_default(None)
