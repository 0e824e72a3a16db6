"""Remediation hints: what to change, naming the application's own knob when we know it.

``APP_KNOBS`` is data: which processes are which application, and how that application sets
its keepalive and its TCP_USER_TIMEOUT (shared/KERNEL.md, "Per-application keepalive knobs").
Extend it by adding a row. A process is recognised by its name (``comm``); a client whose name
says nothing (any program linked with libpq) by the port of the service it talks to.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from auditd.audit.inference import probes_before_abort, retries2_timeout
from auditd.config import SysctlBound, Thresholds
from auditd.model import SocketOptions, Sysctls


@dataclass(frozen=True, slots=True)
class AppKnob:
    """One recognised application and its settings.

    ``keepalive`` is a template: ``{idle}``, ``{intvl}``, ``{cnt}`` (seconds, count; ``{idle_ms}``
    in ms) are the suggested keepalive, ``{hb}`` an application heartbeat interval well inside
    ``warn_at × idle_timeout``, ``{sysctls}`` the namespace sysctls with the same values, for
    knobs that only turn SO_KEEPALIVE on. Each text was checked against the application's own
    documentation and, for the ones tests/kernel/test_apps.py runs, by applying it.
    """

    app: str  # as people call it: "PostgreSQL", "libpq"
    keepalive: str  # how it turns keepalive on and sets idle/interval/count (a template)
    processes: tuple[str, ...] = ()  # process-name globs (exact: "java" is not "javac")
    remote_ports: tuple[int, ...] = ()  # clients known by their server's port
    user_timeout: str | None = None  # how it sets TCP_USER_TIMEOUT, when it has a knob

    @property
    def knob(self) -> str:
        """The knob with placeholders as words (for tables and docs)."""
        return f"{self.app}: {self.keepalive.format_map(_WORDS)}"

    def apply(self, s: Suggestion) -> str:
        """The knob with the suggested values filled in."""
        return f"{self.app}: {self.keepalive.format_map(s.values())}"


@dataclass(frozen=True, slots=True)
class Suggestion:
    """A keepalive (and heartbeat) that keeps the path busy and fits the detection budget."""

    idle: int
    intvl: int
    cnt: int
    hb: int  # an application heartbeat interval

    def values(self) -> dict[str, object]:
        return {
            "idle": self.idle, "intvl": self.intvl, "cnt": self.cnt, "hb": self.hb,
            "idle_ms": self.idle * 1000, "sysctls": sysctl_text(self),
        }  # fmt: skip


_WORDS = {
    "idle": "IDLE", "intvl": "INTVL", "cnt": "CNT", "hb": "SECONDS", "idle_ms": "MS",
    "sysctls": "net.ipv4.tcp_keepalive_time/_intvl/_probes",
}  # fmt: skip

# First match wins: process names first, then remote ports.
APP_KNOBS: tuple[AppKnob, ...] = (
    # postgresql.org/docs/15/runtime-config-connection.html: the server turns keepalive on for
    # every TCP connection; 0 means the system default for each of the three.
    AppKnob("PostgreSQL", "tcp_keepalives_idle = {idle}, tcp_keepalives_interval = {intvl}, tcp_keepalives_count = {cnt} in postgresql.conf, then reload (new connections)", ("postgres", "postmaster"), user_timeout="tcp_user_timeout (ms) in postgresql.conf"),
    # postgresql.org/docs/15/libpq-connect.html: keepalives defaults to 1, the rest to the system.
    AppKnob("libpq", "keepalives=1 keepalives_idle={idle} keepalives_interval={intvl} keepalives_count={cnt} in the connection string", ("psql", "pg_dump", "pg_dumpall", "pg_restore", "pg_basebackup", "pg_receivewal", "pgbench"), (5432,), user_timeout="tcp_user_timeout=<ms> in the connection string"),
    # pgbouncer.org/config.html: tcp_keepalive (default 1) uses the OS defaults unless
    # tcp_keepidle/tcp_keepintvl/tcp_keepcnt are set; they apply to client and server sockets.
    AppKnob("PgBouncer", "tcp_keepalive = 1, tcp_keepidle = {idle}, tcp_keepintvl = {intvl}, tcp_keepcnt = {cnt} in pgbouncer.ini (client and server connections; new ones after a restart)", ("pgbouncer",), user_timeout="tcp_user_timeout (ms) in pgbouncer.ini"),
    # redis.conf: tcp-keepalive sets TCP_KEEPIDLE; anetKeepAlive (src/anet.c) derives
    # TCP_KEEPINTVL = value / 3 (at least 1) and TCP_KEEPCNT = 3 from it.
    AppKnob("Redis", "tcp-keepalive {idle} in redis.conf, or CONFIG SET tcp-keepalive {idle} (new connections; Redis sets the interval to a third of it, at least 1 s, and 3 probes)", ("redis-server", "redis-sentinel", "valkey-server")),
    # redis-cli.c: REDIS_CLI_KEEPALIVE_INTERVAL (15 s) through anetKeepAlive, no option.
    AppKnob("redis-cli", "no option: redis-cli sets keepalive to 15 s itself (interval 5 s, 3 probes); send a command (PING) more often than every {hb} s, or use a client whose keepalive can be set", ("redis-cli",)),
    # nginx.org/en/docs/http/ngx_http_core_module.html#listen and
    # ngx_http_proxy_module.html#proxy_socket_keepalive: "on" only sets SO_KEEPALIVE, the
    # timing stays the operating system's.
    AppKnob("nginx", "clients: listen ... so_keepalive={idle}:{intvl}:{cnt}; upstreams: proxy_socket_keepalive on, which only turns keepalive on with the namespace's sysctls, so also {sysctls}", ("nginx",)),
    # docs.haproxy.org/2.6/configuration.html: option clitcpka/srvtcpka, *-idle/-intvl/-cnt (2.2+)
    AppKnob("HAProxy", "option clitcpka with clitcpka-idle {idle}s, clitcpka-intvl {intvl}s, clitcpka-cnt {cnt} (client side: defaults or frontend); option srvtcpka with srvtcpka-idle {idle}s, srvtcpka-intvl {intvl}s, srvtcpka-cnt {cnt} (server side: defaults or backend)", ("haproxy",), user_timeout="tcp-ut <delay> on the bind or server line"),
    # man sshd_config: ClientAlive* messages go through the encrypted channel; TCPKeepAlive
    # (default yes) is SO_KEEPALIVE on the system's timing.
    AppKnob("OpenSSH server", "ClientAliveInterval {hb} with ClientAliveCountMax {cnt} in sshd_config: a heartbeat inside the channel, which keeps the path busy (no middlebox drop) and ends a dead client's session after {hb} × {cnt} s; TCPKeepAlive yes (the default) only turns TCP keepalive on, on the namespace's timing: {sysctls}", ("sshd", "sshd-session")),
    AppKnob("OpenSSH client", "ServerAliveInterval {hb} with ServerAliveCountMax {cnt} in ssh_config or -o: a heartbeat inside the channel, which keeps the path busy and ends the session after {hb} × {cnt} s of a dead server; TCPKeepAlive yes (the default) only turns TCP keepalive on, on the namespace's timing: {sysctls}", ("ssh",)),
    # JDK 11+: jdk.net.ExtendedSocketOptions; the three values do nothing while SO_KEEPALIVE
    # is off (the JDK's default).
    AppKnob("Java", "socket.setKeepAlive(true) (StandardSocketOptions.SO_KEEPALIVE), then socket.setOption(jdk.net.ExtendedSocketOptions.TCP_KEEPIDLE, {idle}), TCP_KEEPINTERVAL {intvl}, TCP_KEEPCOUNT {cnt}", ("java",)),
    # nodejs.org/api/net.html#socketsetkeepaliveenable-initialdelay; libuv 1.45+ (Node 20)
    # also sets TCP_KEEPINTVL 1 s and TCP_KEEPCNT 10 (seen with getsockopt).
    AppKnob("Node.js", "socket.setKeepAlive(true, {idle_ms}) (Node 20's libuv then probes every 1 s, 10 probes; older ones use the namespace's tcp_keepalive_intvl/_probes)", ("node", "nodejs")),
    AppKnob("Envoy", "upstream_connection_options.tcp_keepalive {{keepalive_time: {idle}, keepalive_interval: {intvl}, keepalive_probes: {cnt}}} (listeners: socket_options SO_KEEPALIVE with TCP_KEEPIDLE/INTVL/CNT)", ("envoy",), user_timeout="a socket_options entry {level: 6, name: 18, int_value: <ms>} (TCP_USER_TIMEOUT)"),
    # gRFC A8: HTTP/2 PINGs, a heartbeat; servers must allow them (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS).
    AppKnob("gRPC", "GRPC_ARG_KEEPALIVE_TIME_MS={hb}000 with GRPC_ARG_KEEPALIVE_TIMEOUT_MS (HTTP/2 PINGs: a heartbeat that keeps the path busy)", ("grpc*",), user_timeout="GRPC_ARG_KEEPALIVE_TIMEOUT_MS (with keepalive on, gRPC C-core sets TCP_USER_TIMEOUT to it: gRFC A18)"),
    # man systemd.socket
    AppKnob("systemd socket unit", "KeepAlive=yes, KeepAliveTimeSec={idle}, KeepAliveIntervalSec={intvl}, KeepAliveProbes={cnt} in the .socket unit", ("systemd",)),
)  # fmt: skip

GENERIC_KNOB = (
    "in the application: setsockopt SO_KEEPALIVE=1, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT "
    "(Go: net.Dialer.KeepAlive / KeepAliveConfig; binaries without a knob: an LD_PRELOAD shim "
    "such as libkeepalive)"
)
GENERIC_USER_TIMEOUT = (
    "in the application: setsockopt(IPPROTO_TCP, TCP_USER_TIMEOUT, ms) (Go: a net.Dialer "
    "Control function; binaries without a knob: an LD_PRELOAD shim)"
)
_BY_PORT = {port: row for row in reversed(APP_KNOBS) for port in row.remote_ports}


@lru_cache(maxsize=1024)
def _by_name(process: str) -> AppKnob | None:
    for row in APP_KNOBS:
        if any(fnmatch.fnmatchcase(process, g) for g in row.processes):
            return row
    return None


def recognise(process: str | None, remote_port: int = 0) -> AppKnob | None:
    """The application of a socket: by its process name, else by the port it talks to."""
    row = _by_name(process) if process else None
    return row if row is not None else _BY_PORT.get(remote_port)


def app_knob(process: str | None, remote_port: int = 0) -> str:
    """The named application's keepalive setting, or the generic socket options."""
    row = recognise(process, remote_port)
    return row.knob if row is not None else GENERIC_KNOB


def _knob(app: AppKnob | None, s: Suggestion) -> str:
    return app.apply(s) if app is not None else GENERIC_KNOB


def suggest_keepidle(idle_timeout: float) -> int:
    """A first-probe delay comfortably inside the path's idle timeout (about 80 %)."""
    if idle_timeout >= 60:
        return max(int(idle_timeout * 0.8) // 10 * 10, 30)
    return max(int(idle_timeout / 2), 1)


def suggest_keepalive(t: Thresholds) -> tuple[int, int, int]:
    """(idle, interval, count) that beats the idle timeout and fits the detection budget.

    The path stays silent for up to max(idle, interval) (``inference.keepalive_silence``),
    so the interval is never above the idle: both come before the idle timeout.
    """
    # The first probe must beat the idle timeout and leave half the budget for the probes.
    idle = min(suggest_keepidle(t.idle_timeout), max(int(t.detection_budget / 2), 1))
    cnt = 3 if t.detection_budget - idle < 60 else 5
    intvl = int(max(min((t.detection_budget - idle) // cnt, 75, idle), 1))
    return idle, intvl, cnt


def suggestion(t: Thresholds) -> Suggestion:
    idle, intvl, cnt = suggest_keepalive(t)
    # A heartbeat must come before the path idle reaches warn_at × idle_timeout, where a
    # connection without one is flagged: 80 % of that, at most the keepalive idle.
    hb = max(min(idle, int(t.warn_at * t.idle_timeout * 0.8)), 1)
    return Suggestion(idle, intvl, cnt, hb)


def sysctl_text(s: Suggestion) -> str:
    return (
        f"sysctl -w net.ipv4.tcp_keepalive_time={s.idle} net.ipv4.tcp_keepalive_intvl="
        f"{s.intvl} net.ipv4.tcp_keepalive_probes={s.cnt} (in its own network namespace)"
    )


def _ka_text(t: Thresholds) -> str:
    idle, intvl, cnt = suggest_keepalive(t)
    return f"keepalive idle {idle} s, interval {intvl} s, {cnt} probes"


# Hints depend only on the thresholds and the application: cached, since a busy host can
# have tens of thousands of findings that share a handful of hints.
@lru_cache(maxsize=1024)
def no_keepalive(t: Thresholds, app: AppKnob | None) -> str:
    return (
        f"enable keepalive with {_ka_text(t)}: {_knob(app, suggestion(t))}; or send "
        f"application heartbeats"
    )


class SlowCause(str, Enum):
    """What makes a socket's keepalive leave the path idle too long."""

    DEFAULT = "default"  # the namespace sysctls (presumed, or equal to the socket's values)
    OWN_IDLE = "own_idle"  # the socket's own TCP_KEEPIDLE
    OWN_INTVL = "own_intvl"  # the socket's own TCP_KEEPINTVL
    OWN = "own"  # its own TCP_KEEPIDLE or TCP_KEEPINTVL (sock_diag cannot tell which)


_OWN = {
    SlowCause.OWN_IDLE: "TCP_KEEPIDLE",
    SlowCause.OWN_INTVL: "TCP_KEEPINTVL",
    SlowCause.OWN: "TCP_KEEPIDLE or TCP_KEEPINTVL",
}


@lru_cache(maxsize=1024)
def too_slow(t: Thresholds, app: AppKnob | None, cause: SlowCause = SlowCause.DEFAULT) -> str:
    """The fix for a keepalive whose first probe or interval comes after the idle timeout."""
    s = suggestion(t)
    lower = (
        f"make the first probe and the interval both shorter than {t.idle_timeout:g} s "
        f"({_ka_text(t)})"
    )
    if cause == SlowCause.DEFAULT:
        return (
            f"{lower}: the socket runs on the namespace defaults, so {sysctl_text(s)}; or "
            f"per socket: {_knob(app, s)}"
        )
    return f"{lower}: the socket sets its own {_OWN[cause]}, so the sysctls do not apply: " + (
        _knob(app, s)
    )


@lru_cache(maxsize=1024)
def user_timeout(options: SocketOptions, app: AppKnob | None) -> str:
    """TCP_USER_TIMEOUT long enough for every keepalive probe (or unset)."""
    need = options.idle + options.cnt * options.intvl
    how = app.user_timeout if app is not None and app.user_timeout else GENERIC_USER_TIMEOUT
    if app is not None and app.user_timeout:
        how = f"{app.app}: {how}"
    return (
        f"set TCP_USER_TIMEOUT to at least {need * 1000} ms (keepidle {options.idle} + keepcnt "
        f"{options.cnt} × keepintvl {options.intvl} = {need} s), or 0 to let keepcnt decide "
        f"and tcp_retries2 bound data in flight: {how}"
    )


def user_timeout_probes(options: SocketOptions) -> int:
    """Unanswered probes the socket survives with its user timeout."""
    return probes_before_abort(options.idle, options.intvl, options.user_timeout_ms / 1000)


def probing() -> str:
    return (
        "check the peer and the path (middlebox idle timeout, firewall, host down); "
        "the application will get ETIMEDOUT and should reconnect"
    )


@lru_cache(maxsize=1024)
def in_flight(t: Thresholds, retries2: int, rto_max_ms: int, app: AppKnob | None) -> str:
    n = retries2_for_budget(t.detection_budget, rto_max_ms)
    own = f" ({app.app}: {app.user_timeout})" if app is not None and app.user_timeout else ""
    if n >= retries2:
        return (
            f"check the peer and the path; TCP_USER_TIMEOUT on the socket{own} makes it give "
            f"up sooner"
        )
    return (
        f"check the peer and the path; to notice sooner, set TCP_USER_TIMEOUT on the "
        f"socket{own} or net.ipv4.tcp_retries2={n} ({retries2_timeout(n, rto_max_ms):g} s)"
    )


@lru_cache(maxsize=1024)
def close_wait(process: str | None) -> str:
    who = process or "the application"
    return f"{who} must close() the socket once read() returns end-of-file; restart it to release the leak"


def sysctl(bound: SysctlBound, value: int) -> str:
    if bound.min is not None and value < bound.min:
        target = bound.min
    else:
        target = bound.max if bound.max is not None else value
    return (
        f"sysctl -w {bound.name}={target} (persist it in /etc/sysctl.d/; containers need it "
        f"set in their own network namespace)"
    )


def retries2_for_budget(budget: float, rto_max_ms: int = 120000) -> int:
    """The largest tcp_retries2 whose model fits the budget, at least 8 (RFC 1122: 100 s)."""
    n = 8
    while n < 15 and retries2_timeout(n + 1, rto_max_ms) <= budget:
        n += 1
    return n


def idle_arithmetic(s: Sysctls) -> str:
    total = s.keepalive_time + s.keepalive_probes * s.keepalive_intvl
    return (
        f"tcp_keepalive_time {s.keepalive_time} + tcp_keepalive_probes {s.keepalive_probes} "
        f"× tcp_keepalive_intvl {s.keepalive_intvl} = {total} s"
    )


def in_flight_arithmetic(s: Sysctls) -> str:
    n = s.retries2
    base = 0.2
    rto_max = s.rto_max_ms / 1000
    thresh = int(math.log2(s.rto_max_ms // 200)) if s.rto_max_ms >= 200 else 0
    total = retries2_timeout(n, s.rto_max_ms)
    if n <= thresh:
        return f"tcp_retries2 {n}: ((2 << {n}) - 1) × {base} s = {total:g} s"
    return (
        f"tcp_retries2 {n}: ((2 << {thresh}) - 1) × {base} s + ({n} - {thresh}) × {rto_max:g} s "
        f"= {total:g} s"
    )


def budget(case: str, budget_s: float, s: Sysctls, idle_timeout: float | None = None) -> str:
    """``idle_timeout``: the path's, which the suggested keepalive must also beat (both its
    first probe and its interval: ``inference.probe_cadence``)."""
    if case == "idle":
        idle = min(s.keepalive_time, max(int(budget_s / 2), 1))
        if idle_timeout is not None:
            idle = min(idle, suggest_keepidle(idle_timeout))
        cnt = min(s.keepalive_probes, 5)
        intvl = max(min(int((budget_s - idle) / cnt), idle), 1)
        return (
            f"net.ipv4.tcp_keepalive_time={idle} tcp_keepalive_intvl={intvl} "
            f"tcp_keepalive_probes={cnt} ({idle + cnt * intvl} s), or per socket TCP_KEEPIDLE/"
            f"TCP_KEEPINTVL/TCP_KEEPCNT"
        )
    n = retries2_for_budget(budget_s, s.rto_max_ms)
    if retries2_timeout(n, s.rto_max_ms) <= budget_s:
        return (
            f"net.ipv4.tcp_retries2={n} ({retries2_timeout(n, s.rto_max_ms):g} s), "
            f"or TCP_USER_TIMEOUT per socket"
        )
    return (
        f"TCP_USER_TIMEOUT={int(budget_s * 1000)} ms on the sockets (tcp_retries2 below 8 "
        f"breaks RFC 1122 for everything in the namespace)"
    )
