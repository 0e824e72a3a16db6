"""keepalive_too_slow: judged on the silence keepalive leaves on the path, and on what the
connection does. Pure.

A healthy idle connection with keepalive is silent for up to max(keepidle, keepintvl)
(``inference.probe_cadence``, from tcp_keepalive_timer): the verdict compares that with the
path's idle timeout and names what sets it (the socket's own TCP_KEEPIDLE or TCP_KEEPINTVL,
or the namespace defaults), so the hint changes the value that matters.

A connection whose traffic keeps the path busy (application heartbeats: OpenSSH's
ClientAliveInterval, Redis replication pings, HTTP/2 PINGs) is not at risk of a middlebox
drop, whatever its keepalive settings: like ``idle_no_keepalive``, the verdict waits until the
path has been idle for ``warn_at × idle_timeout``.
"""

from __future__ import annotations

from auditd.audit.inference import Silence, keepalive_silence, path_idle_ms
from auditd.audit.paths import fmt_s
from auditd.config import Thresholds
from auditd.model import Sock, SocketOptions, Sysctls


def too_slow(
    t: Thresholds, sock: Sock, sysctls: Sysctls, options: SocketOptions | None = None
) -> Silence | None:
    """The silence that makes this socket keepalive_too_slow, or None when it is not."""
    if path_idle_ms(sock) / 1000 < t.warn_at * t.idle_timeout:
        return None  # busy, or kept busy by the application: no middlebox drops it now
    silence = keepalive_silence(sock, sysctls, options)
    if silence is None or silence.seconds <= t.idle_timeout:
        return None
    return silence


REARM = "the kernel re-arms the timer for keepintvl after each probe, answered or not"


def _exact(s: Silence, sysctls: Sysctls, options: SocketOptions) -> str:
    if s.which == "idle":
        value = f"TCP_KEEPIDLE {options.idle} s"
        default = f"tcp_keepalive_time={sysctls.keepalive_time}"
    else:
        value = (
            f"the first probe comes after {options.idle} s but TCP_KEEPINTVL is "
            f"{options.intvl} s ({REARM})"
        )
        default = f"tcp_keepalive_intvl={sysctls.keepalive_intvl}"
    whose = (
        f"equal to the namespace default {default}: the socket's own value or the default"
        if s.cause == "default"
        else "the socket's own value"
    )
    return f"{value}, {whose}"


def _inferred(s: Silence, sysctls: Sysctls) -> str:
    if s.cause == "default" and s.which:
        if s.which == "idle":
            return f"the namespace default tcp_keepalive_time={sysctls.keepalive_time}"
        return (
            f"the namespace default tcp_keepalive_intvl={sysctls.keepalive_intvl}, longer than "
            f"tcp_keepalive_time={sysctls.keepalive_time}: {REARM}"
        )
    if s.cause == "default":
        return (
            f"the timer is below the namespace default tcp_keepalive_time="
            f"{sysctls.keepalive_time}: the default, armed before the last segment received, "
            f"or the socket's own TCP_KEEPIDLE"
        )
    return (
        "longer than the namespace defaults: the socket sets its own TCP_KEEPIDLE or "
        "TCP_KEEPINTVL, or enabled keepalive after its last segment"
    )


def message(
    s: Silence,
    t: Thresholds,
    sock: Sock,
    sysctls: Sysctls,
    middlebox: str,
    options: SocketOptions | None = None,
) -> str:
    where = f"idle timeout of {middlebox}" if middlebox else "idle timeout of the path"
    why = _exact(s, sysctls, options) if options is not None else _inferred(s, sysctls)
    up_to = "up to" if s.exact or (s.cause == "default" and s.which) else "at least"
    return (
        f"keepalive is on but leaves the path silent for {up_to} {fmt_s(s.seconds)} between "
        f"segments received, longer than the {fmt_s(t.idle_timeout)} {where} ({why}); idle "
        f"for {fmt_s(path_idle_ms(sock) / 1000)} now"
    )
