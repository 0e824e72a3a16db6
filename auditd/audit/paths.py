"""The idle timeout of a socket's path: the rule's, or a local middlebox's when tighter. Pure.

A namespace's own conntrack and IPVS are middleboxes on every path through them: an entry
idle past its timeout is dropped, and the next segment of the connection with it
(shared/KERNEL.md, "Network namespaces").
"""

from __future__ import annotations

from auditd.config import Thresholds
from auditd.model import Sock, Sysctls


def fmt_s(seconds: float) -> str:
    """``350 s``, ``924.6 s``: seconds as messages print them."""
    r = round(seconds, 1)
    return f"{int(r)} s" if r == int(r) else f"{r} s"


def middlebox_timeout(t: Thresholds, sysctls: Sysctls, sock: Sock) -> tuple[float, str]:
    """The idle timeout of the socket's path and what sets it: the rule's ``idle_timeout``
    (``""``), or the namespace's own conntrack or IPVS when tighter (a description)."""
    timeout, what = t.idle_timeout, ""
    ct = sysctls.conntrack_timeout
    if ct is not None and ct < timeout:
        timeout = float(ct)
        what = (
            f"this namespace's conntrack (net.netfilter.nf_conntrack_tcp_timeout_established="
            f"{ct}; the rule's idle_timeout is {fmt_s(t.idle_timeout)})"
        )
    ipvs = sysctls.ipvs_tcp_timeout
    if ipvs is not None and ipvs < timeout and _through_ipvs(sock, sysctls):
        timeout = float(ipvs)
        what = (
            f"this namespace's IPVS (TCP timeout {ipvs} s for the virtual service; the rule's "
            f"idle_timeout is {fmt_s(t.idle_timeout)})"
        )
    return timeout, what


def _through_ipvs(sock: Sock, sysctls: Sysctls) -> bool:
    """The socket talks to an IPVS virtual service of its namespace (a client of the VIP), or
    is one (a local real server answers with the VIP as its address)."""
    services = sysctls.ipvs_services
    return (sock.dst16, sock.dport) in services or (sock.src16, sock.sport) in services


def middlebox_cap(sysctls: Sysctls) -> float | None:
    """The tightest local middlebox timeout that may apply to some socket of the namespace."""
    caps = [c for c in (sysctls.conntrack_timeout,) if c is not None]
    if sysctls.ipvs_tcp_timeout is not None and sysctls.ipvs_services:
        caps.append(sysctls.ipvs_tcp_timeout)
    return float(min(caps)) if caps else None
