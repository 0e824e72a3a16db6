"""Remediation hints: what to change, naming the application's own knob when we know it.

``APP_KNOBS`` is data: process-name globs -> how that application sets its keepalive
(shared/KERNEL.md, "Per-application keepalive knobs"). Extend it by adding a row.
"""

from __future__ import annotations

import fnmatch
import math
from functools import lru_cache

from auditd.audit.inference import retries2_timeout
from auditd.config import SysctlBound, Thresholds
from auditd.model import Sysctls

# (process-name globs, the knob to set); first match wins.
APP_KNOBS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("postgres", "postmaster"), "PostgreSQL: tcp_keepalives_idle/_interval/_count and tcp_user_timeout in postgresql.conf (clients: libpq keepalives_idle=...)"),
    (("redis-server", "redis-sentinel", "valkey-server"), "Redis: tcp-keepalive <seconds> in redis.conf"),
    (("nginx",), "nginx: listen ... so_keepalive=IDLE:INTVL:CNT (clients) and proxy_socket_keepalive on (upstreams)"),
    (("haproxy",), "HAProxy: option clitcpka / option srvtcpka with clitcpka-idle/srvtcpka-idle"),
    (("sshd",), "OpenSSH server: ClientAliveInterval/ClientAliveCountMax in sshd_config (and TCPKeepAlive yes)"),
    (("ssh",), "OpenSSH client: ServerAliveInterval/ServerAliveCountMax in ssh_config"),
    (("java",), "Java: socket.setOption(jdk.net.ExtendedSocketOptions.TCP_KEEPIDLE/TCP_KEEPINTERVAL/TCP_KEEPCOUNT)"),
    (("node", "nodejs"), "Node.js: socket.setKeepAlive(true, initialDelayMs)"),
    (("envoy",), "Envoy: upstream_connection_options.tcp_keepalive {keepalive_time, keepalive_interval, keepalive_probes}"),
    (("grpc*",), "gRPC: GRPC_ARG_KEEPALIVE_TIME_MS / GRPC_ARG_KEEPALIVE_TIMEOUT_MS"),
    (("systemd",), "systemd socket unit: KeepAlive=yes with KeepAliveTimeSec=/KeepAliveIntervalSec=/KeepAliveProbes="),
)  # fmt: skip

GENERIC_KNOB = (
    "in the application: setsockopt SO_KEEPALIVE=1, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT "
    "(Go: net.Dialer.KeepAlive; binaries without a knob: an LD_PRELOAD shim such as libkeepalive)"
)


@lru_cache(maxsize=1024)
def app_knob(process: str | None) -> str:
    """The named application's keepalive setting, or the generic socket options."""
    if process:
        for globs, knob in APP_KNOBS:
            if any(fnmatch.fnmatchcase(process, g) for g in globs):
                return knob
    return GENERIC_KNOB


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
def no_keepalive(t: Thresholds, process: str | None) -> str:
    return (
        f"enable keepalive with {_ka_text(t)}: {app_knob(process)}; or send application heartbeats"
    )


@lru_cache(maxsize=1024)
def too_slow(t: Thresholds, process: str | None) -> str:
    idle, _, _ = suggest_keepalive(t)
    return (
        f"lower the first probe below {t.idle_timeout:g} s ({_ka_text(t)}): {app_knob(process)}; "
        f"for sockets on the defaults, net.ipv4.tcp_keepalive_time={idle}"
    )


def probing() -> str:
    return (
        "check the peer and the path (middlebox idle timeout, firewall, host down); "
        "the application will get ETIMEDOUT and should reconnect"
    )


@lru_cache(maxsize=1024)
def in_flight(t: Thresholds, retries2: int, rto_max_ms: int, process: str | None) -> str:
    n = retries2_for_budget(t.detection_budget, rto_max_ms)
    if n >= retries2:
        return "check the peer and the path; TCP_USER_TIMEOUT on the socket makes it give up sooner"
    return (
        "check the peer and the path; to notice sooner, set TCP_USER_TIMEOUT on the socket "
        f"or net.ipv4.tcp_retries2={n} ({retries2_timeout(n, rto_max_ms):g} s)"
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
