"""Command line: the only place that turns errors into exit codes.

Exit codes: 0 nothing at or above --fail-on, 1 findings at or above it, 2 bad usage or
config, 3 the kernel could not be read.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from auditd import __version__
from auditd.audit.run import ONE_SHOT_ATTRIBUTION_CAP_SECONDS
from auditd.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    RuleSet,
    load_rules,
    load_rules_or_default,
    parse_duration,
)
from auditd.config.errors import one_line
from auditd.errors import AuditdError
from auditd.httpserver import MAX_CONNECTIONS
from auditd.kernel.owners.prescan import FdPrescan
from auditd.model import Severity
from auditd.results import DEFAULT_MAX_FINDINGS, AuditResult
from auditd.session import NETNS_SOURCES, AuditOptions, AuditSession, Namespaces

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_KERNEL = 3

PROG = "keepalive-auditd"


class UsageError(Exception):
    """A flag value argparse cannot check by itself; exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line instead of argparse's usage dump; exit 2 like argparse. The message echoes
        # what the user typed: newlines and control characters in it are escaped.
        _say(one_line(f"{self.prog}: {message} (see --help)"))
        sys.exit(EXIT_USAGE)


NETNS_CHOICES = ("self", "all")
NETNS_HELP = (
    "network namespaces to audit: self (the one it runs in, the default) or all (every "
    "namespace of the host; needs CAP_SYS_ADMIN)"
)


INSPECT_HELP = (
    "read each socket's exact SO_KEEPALIVE, TCP_KEEPIDLE/KEEPINTVL/KEEPCNT and "
    "TCP_USER_TIMEOUT through a duplicate of its owner's fd (pidfd_getfd: needs "
    "CAP_SYS_PTRACE and Linux 5.6+; without them the audit infers as usual)"
)


EVENT_SOURCES = ("auto", "bpf", "perf")  # auditd.kernel.events.SOURCES
EVENTS_HELP = (
    "where abort events come from: bpf (a tp_btf program: needs CAP_BPF and CAP_PERFMON), "
    "perf (perf_event_open on the tracepoints: CAP_PERFMON), auto (bpf when it loads, else "
    "perf; the default)"
)


MAX_FINDINGS_HELP = (
    f"describe at most N socket findings, the worst (default {DEFAULT_MAX_FINDINGS}; 0: all); "
    "the others are counted, and only the sockets described are attributed to a process"
)


MAX_COUNT = 1_000_000  # --audit.max-findings: more findings than anyone reads or logs
MAX_INTERVAL = 86400.0  # --audit.interval: a day; threading's waits overflow far beyond
MAX_PATH_FLAG = 256  # --web.telemetry-path: characters


def _count(text: str) -> int:
    try:
        value = int(text) if len(text) <= 12 else MAX_COUNT + 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text[:20]!r}") from None
    if not 0 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_COUNT}, got {text[:20]}")
    return value


def _connections(text: str) -> int:
    try:
        value = int(text) if len(text) <= 6 else -1
    except ValueError:
        value = -1
    if not 1 <= value <= MAX_CONNECTIONS:
        what = f"expected a whole number from 1 to {MAX_CONNECTIONS}, got {text[:20]!r}"
        raise argparse.ArgumentTypeError(what)
    return value


def _duration(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 1 <= value <= MAX_INTERVAL:
        raise argparse.ArgumentTypeError("must be between 1s and 1d")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Find TCP connections at risk of going half-open.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    a = sub.add_parser("audit", help="audit the current network namespace (or all) once")
    default_help = f"rules file (default: {DEFAULT_CONFIG_PATH} if present, else built-in)"
    a.add_argument("--config", metavar="FILE", help=default_help)
    a.add_argument("--format", choices=("table", "json"), default="table")
    a.add_argument(
        "--fail-on",
        choices=("info", "warning", "critical", "never"),
        default="critical",
        help="exit 1 when a finding is at least this severe (default: critical)",
    )
    a.add_argument("--netns", choices=NETNS_CHOICES, default="self", help=NETNS_HELP)
    a.add_argument("--inspect-sockets", action="store_true", help=INSPECT_HELP)
    a.add_argument(
        "--max-findings",
        type=_count,
        default=DEFAULT_MAX_FINDINGS,
        metavar="N",
        help=MAX_FINDINGS_HELP,
    )

    e = sub.add_parser("explain", help="show the arithmetic behind the detection times")
    e.add_argument("--config", metavar="FILE")
    e.add_argument("--netns", choices=NETNS_CHOICES, default="self", help=NETNS_HELP)

    c = sub.add_parser("check-config", help="validate a rules file")
    c.add_argument("file", metavar="FILE")

    w = sub.add_parser("watch", help="print each connection the kernel aborts, as it happens")
    w.add_argument("--config", metavar="FILE", help=default_help)
    w.add_argument("--format", choices=("table", "json"), default="table")
    w.add_argument("--netns", choices=NETNS_CHOICES, default="self", help=NETNS_HELP)
    w.add_argument(
        "--interval",
        type=_duration,
        default=10.0,
        metavar="DURATION",
        help="time between the audits aborts are matched against (default 10s)",
    )
    w.add_argument("--source", choices=EVENT_SOURCES, default="auto", help=EVENTS_HELP)

    r = sub.add_parser("run", help="run the agent: audit periodically, serve /metrics")
    r.add_argument(
        "--config.file",
        dest="config_file",
        metavar="FILE",
        help=f"rules file (default {DEFAULT_CONFIG_PATH}; built-in defaults if absent)",
    )
    r.add_argument(
        "--web.listen-address",
        dest="listen",
        default=":9977",
        metavar="ADDR",
        help="address to serve metrics on (default :9977)",
    )
    r.add_argument(
        "--web.telemetry-path",
        dest="telemetry_path",
        default="/metrics",
        metavar="PATH",
        help="path of the metrics (default /metrics)",
    )
    r.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="FILE",
        help="TLS and basic auth for the endpoint, exporter-toolkit format (reloaded on SIGHUP)",
    )
    r.add_argument(
        "--web.max-connections",
        dest="max_connections",
        type=_connections,
        default=MAX_CONNECTIONS,
        metavar="N",
        help="most client connections at once (default 512, fewer if the open-files limit "
        "leaves less than 128 descriptors for the audit); beyond it the connection that has "
        "waited longest without a request is closed",
    )
    r.add_argument(
        "--audit.interval",
        dest="interval",
        default="30s",
        metavar="DURATION",
        help="time between audits, e.g. 30s, 1m (default 30s)",
    )
    r.add_argument(
        "--audit.netns",
        dest="netns",
        choices=NETNS_CHOICES,
        default="self",
        help=NETNS_HELP,
    )
    r.add_argument(
        "--audit.inspect-sockets", dest="inspect_sockets", action="store_true", help=INSPECT_HELP
    )
    r.add_argument(
        "--audit.max-findings",
        dest="max_findings",
        type=_count,
        default=DEFAULT_MAX_FINDINGS,
        metavar="N",
        help=MAX_FINDINGS_HELP + "; the logs follow the findings described",
    )
    r.add_argument(
        "--log.level", dest="log_level", default="info", choices=("debug", "info", "warn", "error")
    )
    r.add_argument("--log.format", dest="log_format", default="logfmt", choices=("logfmt", "json"))
    r.add_argument(
        "--log.findings-after",
        dest="log_findings_after",
        default="5m",
        metavar="DURATION",
        help="log a finding on its own line once it has lasted this long (0s: at once); "
        "shorter-lived ones are counted in one line per audit (default 5m)",
    )
    r.add_argument(
        "--events.source",
        dest="events_source",
        choices=EVENT_SOURCES,
        default="auto",
        help=EVENTS_HELP,
    )
    return p


def _load(path: str | None) -> RuleSet:
    return load_rules_or_default(path)


def _exit_code(result: AuditResult, fail_on: str) -> int:
    if fail_on == "never":
        return EXIT_OK
    threshold = Severity.parse(fail_on)
    counts = result.severity_counts()  # every finding, described or not
    return EXIT_FINDINGS if any(counts[s] for s in Severity if s >= threshold) else EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from auditd import report

    rules = _load(args.config)
    options = AuditOptions(
        inspect_sockets=args.inspect_sockets,
        max_findings=args.max_findings,
        attribution_cap=ONE_SHOT_ATTRIBUTION_CAP_SECONDS,  # no next cycle to resume in
    )
    # Owners (and, in exact mode, every socket's options) from the BPF iterators when they
    # load; else the /proc/*/fd scan, which runs in a child while this process dumps
    # (auditd.launch may have started it already).
    run = AuditSession(args.sources, options).audit(rules, prescan=args.prescan)
    result = run.result
    out = report.to_json(result) + "\n" if args.format == "json" else report.to_table(result)
    sys.stdout.write(out)
    sys.stdout.flush()
    for message in run.notes():  # what the audit could only partly read, once each
        _say(f"{PROG}: note: {message}")
    return _exit_code(result, args.fail_on)


def cmd_explain(args: argparse.Namespace) -> int:
    from auditd import report

    rules = _load(args.config)
    parts = []
    for ns in AuditSession(args.sources).namespace_sysctls():
        if ns.sysctls is None:
            parts.append(f"netns {ns.netns}: skipped: {ns.error}\n")
        else:
            parts.append(report.explain(rules, ns.netns, ns.inode, ns.sysctls))
    sys.stdout.write("\n".join(parts))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    rules = load_rules(args.file)
    sys.stdout.write(
        f"{args.file}: ok ({len(rules.rules)} rules, {len(rules.sysctls)} sysctl bounds)\n"
    )
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from auditd import logs
    from auditd.daemon import Daemon, DaemonOptions
    from auditd.http import parse_listen

    try:
        interval = parse_duration(args.interval)
    except ValueError as exc:
        raise UsageError(f"--audit.interval: {exc}") from None
    if not 1 <= interval <= MAX_INTERVAL:
        raise UsageError("--audit.interval: must be between 1s and 1d")
    try:
        findings_after = parse_duration(args.log_findings_after)
    except ValueError as exc:
        raise UsageError(f"--log.findings-after: {exc}") from None
    path = args.telemetry_path
    if not path.startswith("/") or path == "/":
        raise UsageError("--web.telemetry-path: must start with / and not be / itself")
    if len(path) > MAX_PATH_FLAG or not (path.isascii() and path.isprintable()) or " " in path:
        raise UsageError(
            f"--web.telemetry-path: must be at most {MAX_PATH_FLAG} printable ASCII "
            "characters without spaces"
        )
    try:  # a malformed address is bad usage (exit 2), found before anything is logged
        parse_listen(args.listen)
    except ValueError as exc:
        raise UsageError(f"--web.listen-address: {exc}") from None
    log = logs.setup(args.log_level, args.log_format)
    options = DaemonOptions(
        args.config_file, interval, args.listen, args.telemetry_path, args.web_config_file,
        inspect_sockets=args.inspect_sockets, max_findings=args.max_findings,
        log_findings_after=findings_after, max_connections=args.max_connections,
        events_source=args.events_source,
    )  # fmt: skip
    daemon = Daemon(options, args.sources, log)
    daemon.install_signals()  # first: a SIGHUP during start-up must not kill the process
    daemon.load_initial_config()
    daemon.serve()
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    from auditd import watch

    args.say = lambda message: _say(f"{PROG}: {message}")  # notes of the audit thread

    return watch.cmd_watch(args)


COMMANDS = {
    "audit": cmd_audit,
    "explain": cmd_explain,
    "check-config": cmd_check_config,
    "run": cmd_run,
    "watch": cmd_watch,
}


def main(
    argv: Sequence[str] | None = None,
    sources: Namespaces | None = None,
    prescan: FdPrescan | None = None,
) -> int:
    """``sources`` replaces the namespaces --netns would pick (tests hand in fakes);
    ``prescan``: the owner scan ``auditd.launch`` started for ``audit`` (closed here).

    What was written is flushed here, for every subcommand and for argparse's --help and
    --version too: a closed pipe is a quiet exit 0 (as ``grep`` or ``ss`` end when ``head``
    is done), a full disk exit 2 with one line on stderr, never Python's "Exception ignored"
    at exit (status 120)."""
    argparse_exit = False
    try:
        code = _main(argv, sources, prescan)
    except SystemExit as exc:  # argparse: --help, --version, a usage error; raised again
        code, argparse_exit = exc.code if isinstance(exc.code, int) else EXIT_USAGE, True
    except BrokenPipeError:
        code = _broken_pipe()
    except OSError as exc:  # stdout on a full disk, or an error no layer translated
        code = _write_failed(exc)
    finally:
        if prescan is not None:
            prescan.close()
    code = _flush(code)
    if argparse_exit:
        raise SystemExit(code)
    return code


def _main(argv: Sequence[str] | None, sources: Namespaces | None, prescan: FdPrescan | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.sources = sources or NETNS_SOURCES[getattr(args, "netns", "self")]
    args.prescan = prescan
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UsageError) as exc:
        _say(f"{PROG}: {exc}")
        return EXIT_USAGE
    except AuditdError as exc:
        _say(f"{PROG}: {exc}")
        return EXIT_KERNEL
    except KeyboardInterrupt:
        return 130


def _flush(code: int) -> int:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return _broken_pipe()
    except (OSError, ValueError) as exc:
        return _write_failed(exc)
    _say("")  # flushes stderr; one that cannot be written is pointed at /dev/null
    return code


def _broken_pipe() -> int:
    _drop(sys.stdout)
    return EXIT_OK


def _write_failed(exc: Exception) -> int:
    _drop(sys.stdout)
    if isinstance(exc, OSError) and exc.errno not in WRITE_ERRORS:
        _say(f"{PROG}: {exc.strerror or exc}")
        return EXIT_KERNEL
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    _say(f"{PROG}: cannot write output: {reason}")
    return EXIT_USAGE


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EPIPE)


def _say(line: str) -> None:
    """One line on stderr (with "", only a flush); a stderr that cannot be written (a full
    disk) loses it, no more: it is pointed at /dev/null so that exit does not fail on it."""
    try:
        if line:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        _drop(sys.stderr)


def _drop(stream: object) -> None:
    """Point ``stream``'s fd at /dev/null, so the exit-time flush of what is left in its
    buffer does not fail too (Python would print "Exception ignored" and exit 120)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())  # type: ignore[attr-defined]
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real fd (tests capture the stream)
        pass
