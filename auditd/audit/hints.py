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
from functools import lru_cache

from auditd.audit.inference import probes_before_abort, retries2_timeout
from auditd.config import SysctlBound, Thresholds
from auditd.model import SocketOptions, Sysctls


@dataclass(frozen=True, slots=True)
class AppKnob:
    """One recognised application and its settings."""

    app: str  # as people call it: "PostgreSQL", "libpq"
    keepalive: str  # how it turns keepalive on and sets idle/interval/count
    processes: tuple[str, ...] = ()  # process-name globs (exact: "java" is not "javac")
    remote_ports: tuple[int, ...] = ()  # clients known by their server's port
    user_timeout: str | None = None  # how it sets TCP_USER_TIMEOUT, when it has a knob

    @property
    def knob(self) -> str:
        return f"{self.app}: {self.keepalive}"


# First match wins: process names first, then remote ports.
APP_KNOBS: tuple[AppKnob, ...] = (
    AppKnob("PostgreSQL", "tcp_keepalives_idle/_interval/_count in postgresql.conf (clients: libpq keepalives_idle=...)", ("postgres", "postmaster"), user_timeout="tcp_user_timeout in postgresql.conf"),
    AppKnob("libpq", "keepalives=1 keepalives_idle=... keepalives_interval=... keepalives_count=... in the connection string", ("psql", "pg_dump", "pg_dumpall", "pg_restore", "pg_basebackup", "pg_receivewal", "pgbench"), (5432,), user_timeout="tcp_user_timeout=<ms> in the connection string"),
    AppKnob("PgBouncer", "tcp_keepalive/tcp_keepidle/tcp_keepintvl/tcp_keepcnt in pgbouncer.ini", ("pgbouncer",), user_timeout="tcp_user_timeout in pgbouncer.ini"),
    AppKnob("Redis", "tcp-keepalive <seconds> in redis.conf", ("redis-server", "redis-sentinel", "valkey-server")),
    AppKnob("nginx", "listen ... so_keepalive=IDLE:INTVL:CNT (clients) and proxy_socket_keepalive on (upstreams)", ("nginx",)),
    AppKnob("HAProxy", "option clitcpka / option srvtcpka with clitcpka-idle/srvtcpka-idle", ("haproxy",), user_timeout="tcp-ut <delay> on the bind or server line"),
    AppKnob("OpenSSH server", "ClientAliveInterval/ClientAliveCountMax in sshd_config (and TCPKeepAlive yes)", ("sshd", "sshd-session")),
    AppKnob("OpenSSH client", "ServerAliveInterval/ServerAliveCountMax in ssh_config", ("ssh",)),
    AppKnob("Java", "socket.setOption(jdk.net.ExtendedSocketOptions.TCP_KEEPIDLE/TCP_KEEPINTERVAL/TCP_KEEPCOUNT)", ("java",)),
    AppKnob("Node.js", "socket.setKeepAlive(true, initialDelayMs)", ("node", "nodejs")),
    AppKnob("Envoy", "upstream_connection_options.tcp_keepalive {keepalive_time, keepalive_interval, keepalive_probes}", ("envoy",), user_timeout="a socket_options entry {level: 6, name: 18, int_value: <ms>} (TCP_USER_TIMEOUT)"),
    AppKnob("gRPC", "GRPC_ARG_KEEPALIVE_TIME_MS / GRPC_ARG_KEEPALIVE_TIMEOUT_MS", ("grpc*",), user_timeout="GRPC_ARG_KEEPALIVE_TIMEOUT_MS (with keepalive on, gRPC C-core sets TCP_USER_TIMEOUT to it: gRFC A18)"),
    AppKnob("systemd socket unit", "KeepAlive=yes with KeepAliveTimeSec=/KeepAliveIntervalSec=/KeepAliveProbes=", ("systemd",)),
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


def _knob(app: AppKnob | None) -> str:
    return app.knob if app is not None else GENERIC_KNOB


def suggest_keepidle(idle_timeout: float) -> int:
    """A first-probe delay comfortably inside the path's idle timeout (about 80 %)."""
    if idle_timeout >= 60:
        return max(int(idle_timeout * 0.8) // 10 * 10, 30)
    return max(int(idle_timeout / 2), 1)


def suggest_keepalive(t: Thresholds) -> tuple[int, int, int]:
    """(idle, interval, count) that beats the idle timeout and fits the detection budget."""
    # The first probe must beat the idle timeout and leave half the budget for the probes.
    idle = min(suggest_keepidle(t.idle_timeout), max(int(t.detection_budget / 2), 1))
    cnt = 3 if t.detection_budget - idle < 60 else 5
    intvl = int(max(min((t.detection_budget - idle) // cnt, 75), 1))
    return idle, intvl, cnt


def _ka_text(t: Thresholds) -> str:
    idle, intvl, cnt = suggest_keepalive(t)
    return f"keepalive idle {idle} s, interval {intvl} s, {cnt} probes"


# Hints depend only on the thresholds and the application: cached, since a busy host can
# have tens of thousands of findings that share a handful of hints.
@lru_cache(maxsize=1024)
def no_keepalive(t: Thresholds, app: AppKnob | None) -> str:
    return f"enable keepalive with {_ka_text(t)}: {_knob(app)}; or send application heartbeats"


@lru_cache(maxsize=1024)
def too_slow(t: Thresholds, app: AppKnob | None, on_default: bool | None = None) -> str:
    """``on_default``: whether the socket's TCP_KEEPIDLE is the namespace sysctl (None: not
    known, sock_diag does not show it); the fix then is the sysctl, else the application."""
    idle, _, _ = suggest_keepalive(t)
    lower = f"lower the first probe below {t.idle_timeout:g} s ({_ka_text(t)})"
    if on_default is None:
        return (
            f"{lower}: {_knob(app)}; for sockets on the defaults, "
            f"net.ipv4.tcp_keepalive_time={idle}"
        )
    if on_default:
        return (
            f"{lower}: the socket uses the namespace default, so sysctl -w "
            f"net.ipv4.tcp_keepalive_time={idle} (in its own network namespace), or per "
            f"socket: {_knob(app)}"
        )
    return f"{lower}: the socket sets its own TCP_KEEPIDLE: {_knob(app)}"


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


def budget(case: str, budget_s: float, s: Sysctls) -> str:
    if case == "idle":
        idle = min(s.keepalive_time, max(int(budget_s / 2), 1))
        cnt = min(s.keepalive_probes, 5)
        intvl = max(int((budget_s - idle) / cnt), 1)
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
