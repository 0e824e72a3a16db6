"""Property-based fuzzing of what the agent reads from outside: netlink datagrams, rules files,
web config files and command lines.

The contract: bad input is a clear error (KernelError, ConfigError, exit code 2) or a record
skipped and counted, never a traceback, a hang or a record that is not well formed.
``KEEPALIVE_FUZZ_EXAMPLES`` raises the number of examples per property for a longer run.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    FakeKernel,
    diag_message,
    diag_msg,
    load_datagrams,
    make_sock,
    nlmsg,
    rtattr,
    tcp_info,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from auditd import cli, config, daemon
from auditd.aborts import Correlator
from auditd.config import ConfigError, RuleSet, WebConfig, parse_rules, parse_web_config
from auditd.errors import KernelError
from auditd.kernel.events import Kind
from auditd.kernel.events.decode import Decoder, parse_ring
from auditd.kernel.events.tracefs import parse_format
from auditd.kernel.sockdiag import (
    INET_DIAG_INFO,
    NLM_F_DUMP_INTR,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_NOOP,
    SOCK_DIAG_BY_FAMILY,
    DumpStats,
    decode,
)
from auditd.model import Sock

EXAMPLES = int(os.environ.get("KEEPALIVE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=2000,  # ms per example: a hang shows up as a deadline error, not a stuck run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # CI runs are reproducible; a run with KEEPALIVE_FUZZ_EXAMPLES set explores new inputs.
    derandomize="KEEPALIVE_FUZZ_EXAMPLES" not in os.environ,
    database=None,
)
RECORDED = load_datagrams("loopback")


# --- the netlink decoder -------------------------------------------------------------------------

_U8 = range(256)
_U16 = range(1 << 16)
_U32 = range(1 << 32)
# Sock fields in order, with the range the kernel's struct gives each.
_FIELD_RANGES: list[range | type] = [
    _U8, _U8, _U8, _U8, _U16, _U16, bytes, bytes, _U32, _U32, _U32, _U32, _U32, bool,
    _U8, _U8, _U8, _U32, _U32, _U32, _U32, _U32, _U32, _U32,
]  # fmt: skip


def check_decode(buf: bytes) -> tuple[list[Sock], DumpStats]:
    """Decode ``buf`` and check the contract; returns what came out."""
    stats = DumpStats()
    socks: list[Sock] = []
    try:
        for sock in decode(buf, stats):
            socks.append(sock)
    except KernelError as exc:
        message = str(exc)
        assert message.startswith("sock_diag dump failed: ") and "\n" not in message
        assert exc.errno is None or 0 < exc.errno < 4096
        assert _has_error_message(buf), "KernelError without an NLMSG_ERROR in the datagram"
    for sock in socks:
        assert type(sock) is Sock and len(sock) == len(_FIELD_RANGES)
        for value, allowed in zip(sock, _FIELD_RANGES):
            if allowed is bytes:
                assert isinstance(value, bytes) and len(value) == 16
            elif allowed is bool:
                assert isinstance(value, bool)
            else:
                assert isinstance(value, int) and value in allowed  # type: ignore[operator]
        assert isinstance(sock.local, str) and isinstance(sock.remote, str)
        assert 0 <= sock.sport < 65536 and 0 <= sock.dport < 65536
    assert stats.messages <= len(buf) // 16
    assert len(socks) <= stats.messages
    assert stats.skipped <= stats.messages
    assert stats.done <= stats.messages
    return socks, stats


def _has_error_message(buf: bytes) -> bool:
    off = 0
    while off + 16 <= len(buf):
        length, mtype = struct.unpack_from("=IH", buf, off)
        if length < 16 or off + length > len(buf):
            return False
        if mtype == NLMSG_ERROR:
            return True
        off += (length + 3) & ~3
    return False


@FUZZ
@given(st.binary(max_size=4096))
def test_decode_random_bytes(buf: bytes) -> None:
    check_decode(buf)


@st.composite
def mutated_dump(draw: st.DrawFn) -> bytes:
    """A recorded datagram with bytes flipped, cut, inserted or repeated."""
    buf = bytearray(draw(st.sampled_from(RECORDED)))
    for _ in range(draw(st.integers(1, 8))):
        action = draw(st.sampled_from(["flip", "set", "cut", "insert", "repeat", "length"]))
        at = draw(st.integers(0, max(0, len(buf) - 1)))
        if action == "flip" and buf:
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and buf:
            buf[at] = draw(st.sampled_from([0, 1, 2, 3, 4, 0x10, 0x7F, 0x80, 0xFF]))
        elif action == "cut":
            del buf[at:]
        elif action == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif action == "repeat":
            buf[at:at] = buf[at : at + draw(st.integers(1, 256))]
        elif action == "length" and len(buf) >= at + 4:
            # A header or attribute length: 0, tiny, odd, or past the end.
            value = draw(st.sampled_from([0, 1, 3, 4, 15, 16, 17, 87, 88, 108, 0xFFFF, 2**32 - 1]))
            struct.pack_into("=I", buf, at - at % 4, value)
    return bytes(buf)


@FUZZ
@given(mutated_dump())
def test_decode_mutated_recorded_dumps(buf: bytes) -> None:
    check_decode(buf)


_TCP_INFO_FIELDS = st.dictionaries(
    st.sampled_from(["retransmits", "probes", "backoff", "rto", "unacked", "last_data_sent",
                     "last_data_recv", "last_ack_recv", "rtt", "total_retrans"]),
    st.integers(0, 255),
)  # fmt: skip


@st.composite
def crafted_message(draw: st.DrawFn) -> bytes:
    """One netlink message: diag messages with odd attributes, errors, done, junk types."""
    kind = draw(st.sampled_from(["diag", "diag", "diag", "error", "done", "noop", "other"]))
    flags = draw(st.sampled_from([0x2, 0x2 | NLM_F_DUMP_INTR, 0]))
    if kind == "diag":
        info = tcp_info(**draw(_TCP_INFO_FIELDS))
        info = info[: draw(st.integers(0, len(info) + 16))]  # short tcp_info, or long
        attrs = b""
        for _ in range(draw(st.integers(0, 3))):
            atype = draw(st.sampled_from([1, INET_DIAG_INFO, 3, 8, 0x8002, 0xFFFF]))
            payload = draw(st.binary(max_size=32)) if atype != INET_DIAG_INFO else info
            length = draw(st.sampled_from([None, None, 0, 1, 3, 4, 5, 0xFFFF]))
            attrs += rtattr(atype, payload, length)
        fields: dict[str, Any] = {
            "family": draw(st.sampled_from([socket.AF_INET, socket.AF_INET6, 0, 255])),
            "state": draw(st.integers(0, 255)),
            "timer": draw(st.integers(0, 255)),
            "retrans": draw(st.integers(0, 255)),
            "expires": draw(st.integers(0, 2**32 - 1)),
            "inode": draw(st.integers(0, 2**32 - 1)),
        }
        body = diag_msg(**fields)[: draw(st.sampled_from([72, 72, 72, 0, 10, 71]))]
        payload = body + attrs + rtattr(INET_DIAG_INFO, info)
        mtype = SOCK_DIAG_BY_FAMILY
    elif kind == "error":
        payload = struct.pack("=i", draw(st.integers(-(2**31), 2**31 - 1))) + bytes(16)
        payload = payload[: draw(st.integers(0, len(payload)))]
        mtype = NLMSG_ERROR
    elif kind == "done":
        payload, mtype = bytes(4), NLMSG_DONE
    elif kind == "noop":
        payload, mtype = b"", NLMSG_NOOP
    else:
        payload, mtype = draw(st.binary(max_size=64)), draw(st.integers(0, 0xFFFF))
    length = draw(st.sampled_from([None] * 6 + [0, 1, 15, 16, 17, 2**32 - 1]))
    return nlmsg(mtype, payload, flags=flags, length=length)


@FUZZ
@given(st.lists(crafted_message(), max_size=12))
@example([nlmsg(NLMSG_ERROR, struct.pack("=i", -(2**31)) + bytes(16))])  # errno 2**31
@example([nlmsg(NLMSG_ERROR, struct.pack("=i", 5) + bytes(16))])  # a positive "errno"
@example([diag_message(info=tcp_info()[:7]), diag_message(info=tcp_info())])  # short tcp_info
def test_decode_crafted_messages(messages: list[bytes]) -> None:
    check_decode(b"".join(messages))


def test_decode_of_a_huge_datagram_is_linear() -> None:
    """200k well-formed messages in a few seconds: no quadratic path, no hang."""
    one = diag_message(info=tcp_info(rto=200_000))
    stats = DumpStats()
    assert sum(1 for _ in decode(one * 200_000, stats)) == 200_000
    assert stats.messages == 200_000 and stats.skipped == 0


# --- the rules file ------------------------------------------------------------------------------

_LINE = re.compile(r"^<fuzz>:\d+: \S")


def check_rules(text: str) -> RuleSet | None:
    try:
        return parse_rules(text, "<fuzz>")
    except ConfigError as exc:
        message = str(exc)
        assert _LINE.match(message), message
        assert "\n" not in message and "\r" not in message
        return None


_KEYS = [
    "version", "defaults", "sysctls", "rules", "name", "match", "idle_timeout", "warn_at",
    "detection_budget", "close_wait_after", "retransmit_threshold", "severity", "ignore",
    "local_ports", "remote_ports", "local_cidrs", "remote_cidrs", "processes", "states", "min",
    "max", "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_retries2", "junk", "",
]  # fmt: skip
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["350s", "1h30m", "5ms", "-3s", "0", "1e999", "fast", "10.0.0.0/8",
                     "::ffff:1.2.3.4/128", "close-wait", "critical", "p*", "2**64", "1_0"]),
)  # fmt: skip
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS), inner,
                                                                max_size=5),
    max_leaves=20,
)  # fmt: skip


@st.composite
def rules_document(draw: st.DrawFn) -> str:
    """A YAML document shaped roughly like a rules file, with wrong types and values mixed in."""
    doc: dict[str, Any] = {"version": draw(st.sampled_from([1, 1, 1, 2, "1", None]))}
    if draw(st.booleans()):
        doc["defaults"] = draw(st.dictionaries(st.sampled_from(_KEYS[5:11]), _VALUES, max_size=5))
    if draw(st.booleans()):
        doc["sysctls"] = draw(st.dictionaries(st.sampled_from(_KEYS[21:]), _VALUES, max_size=3))
    if draw(st.booleans()):
        rule = st.dictionaries(st.sampled_from(_KEYS[4:13]), _VALUES, max_size=6)
        doc["rules"] = draw(st.lists(rule, max_size=4))
    text = yaml.safe_dump(doc, allow_unicode=True)
    if draw(st.booleans()) and text:  # and sometimes break the syntax
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + draw(st.sampled_from(["", ":", "- ", "{", "&a *a", "!!int x", "\t"]))
        text += text[at + 1 :]
    return text


@FUZZ
@given(st.text(max_size=400))
@example("\0")
@example("version: 1\n" + "[" * 2000)
@example("a: &a [*a, *a]\nversion: 1\n")
@example("version: 1\ndefaults: {idle_timeout: 99999999999999999999999999999999999999999999d}\n")
@example("\ufeffversion: 1\n")
def test_rules_from_any_text(text: str) -> None:
    check_rules(text)


@FUZZ
@given(rules_document())
def test_rules_from_rules_like_documents(text: str) -> None:
    rules = check_rules(text)
    if rules is not None:
        for rule in rules.rules:
            assert rule.thresholds.idle_timeout > 0 and 0 < rule.thresholds.warn_at <= 1


def test_a_rules_file_that_is_not_a_regular_file(tmp_path: Path) -> None:
    """/dev/zero would be read forever, a FIFO would block: both are refused at once."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        with pytest.raises(ConfigError, match="not a regular file"):
            config.load_rules(path)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (config.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        config.load_rules(str(big))
    with pytest.raises(ConfigError, match="cannot read"):
        config.load_rules("rules\0.yaml")


# --- the web config ------------------------------------------------------------------------------

_WEB_KEYS = ["tls_server_config", "http_server_config", "basic_auth_users", "cert_file",
             "key_file", "client_auth_type", "client_ca_file", "min_version", "cipher_suites",
             "headers", "http2", "X-Frame-Options", "alice", "rate_limit"]  # fmt: skip


@FUZZ
@given(
    st.one_of(
        st.text(max_size=300),
        st.dictionaries(
            st.sampled_from(_WEB_KEYS),
            st.recursive(
                _SCALARS,
                lambda i: st.dictionaries(st.sampled_from(_WEB_KEYS), i, max_size=4),
                max_leaves=8,
            ),
            max_size=4,
        ).map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    )
)
def test_web_config_from_any_text(text: str) -> None:
    try:
        assert isinstance(parse_web_config(text, "<fuzz>"), WebConfig)
    except ConfigError as exc:
        assert _LINE.match(str(exc)) and "\n" not in str(exc), str(exc)


# --- the command line ----------------------------------------------------------------------------

_TOKENS = [
    "audit", "explain", "check-config", "run", "--version", "--help", "-h", "--config",
    "--format", "json", "table", "xml", "--fail-on", "info", "warning", "critical", "never",
    "--netns", "self", "all", "--config.file", "--web.listen-address", ":9977", "[::1]:0",
    "127.0.0.1:notaport", "--web.telemetry-path", "/metrics", "/", "metrics",
    "--audit.interval", "30s", "0.5s", "-1s", "1h30m", "--log.level", "debug", "--log.format",
    "logfmt", "--web.config.file", "/dev/null", "/dev/zero", "/nonexistent/rules.yaml", "",
    "--", "-", "=", "--config=", "\0", "rules\0.yaml",
]  # fmt: skip


@pytest.fixture(scope="module")
def no_daemon() -> Any:
    """``run`` with good flags would serve forever: stop it right after start-up checks."""
    patch = pytest.MonkeyPatch()
    patch.setattr(daemon.Daemon, "serve", lambda self: None)
    patch.setattr(daemon.Daemon, "install_signals", lambda self: None)
    yield
    patch.undo()


@FUZZ
@given(st.lists(st.one_of(st.sampled_from(_TOKENS), st.text(max_size=12)), max_size=8))
@example(["check-config", "/dev/zero"])
@example(["audit", "--config", "rules\0.yaml"])
@example(["run", "--web.config.file", "/dev/zero"])
def test_cli_any_argv_gives_an_exit_code(no_daemon: None, argv: list[str]) -> None:
    fake = FakeKernel([make_sock(inode=1, idle_s=1000)])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv, sources=lambda _: [("host", fake)])
        except SystemExit as exc:  # argparse: --help, --version, a usage error
            code = exc.code  # type: ignore[assignment]
    assert code in (0, 1, 2, 3), (argv, code, err.getvalue())
    assert "Traceback" not in err.getvalue()
    if code == 2 and err.getvalue():
        assert err.getvalue().startswith(("keepalive-auditd", "usage:")), err.getvalue()


# --- abort events: perf ring bytes, raw tracepoint samples, format files ----------------------

EVENT_DATA = Path(__file__).parent.parent / "data" / "events"


@functools.cache
def _event_decoder() -> Decoder:
    formats = {}
    for kind in Kind:
        system, name = kind.value
        formats[kind] = parse_format(system, (EVENT_DATA / f"{system}.{name}.format").read_text())
    return Decoder(formats)


@FUZZ
@given(st.binary(max_size=2048))
def test_any_ring_bytes_parse_without_raising(data: bytes) -> None:
    ring = parse_ring(data)
    assert ring.lost >= 0 and all(len(raw) <= len(data) for _, raw in ring.samples)


@FUZZ
@given(st.sampled_from(list(Kind)), st.binary(max_size=128))
def test_any_sample_of_a_known_tracepoint_decodes_or_is_refused(kind: Kind, tail: bytes) -> None:
    decoder = _event_decoder()
    raw = decoder.formats[kind].id.to_bytes(2, sys.byteorder) + tail
    event = decoder.decode(0, raw)
    if event is not None:
        Correlator().feed(event)  # whatever the fields hold, folding them does not raise


@FUZZ
@given(st.text(max_size=600))
def test_any_format_text_parses_or_is_a_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_format("tcp", text)
