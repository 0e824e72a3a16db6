"""Sysctls and TCP counters of the calling thread's network namespace, from procfs.

``/proc/sys/net`` and ``/proc/thread-self/net`` show the namespace of the *thread* that opens
them (``current->nsproxy``), which is what lets a thread that entered another namespace with
setns read that namespace's values. The procfs root is a parameter so tests use a fake tree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from auditd.kernel import ipvs
from auditd.model import SYSCTL_NAMES, Counters, Sysctls


def sysctl_path(proc_root: str, name: str) -> str:
    return os.path.join(proc_root, "sys", *name.split("."))


def read_sysctls(proc_root: str = "/proc", names: Iterable[str] = SYSCTL_NAMES) -> Sysctls:
    """The namespace's sysctls; a file that is missing or unreadable is left out. With them,
    its local middleboxes: how many flows conntrack tracks, and IPVS (``auditd.kernel.ipvs``)."""
    values: dict[str, int] = {}
    for name in names:
        parsed = _read_int(sysctl_path(proc_root, name))
        if parsed is not None:
            values[name] = parsed
    conntrack = _read_int(sysctl_path(proc_root, CONNTRACK_COUNT))
    ipvs_timeout, services = ipvs.read_ipvs(_net_dir(proc_root))
    return Sysctls(values, conntrack, ipvs_timeout, services)


# Not a setting: whether conntrack tracks anything in the namespace (Sysctls.conntrack_timeout).
CONNTRACK_COUNT = "net.netfilter.nf_conntrack_count"


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return parse_sysctl(f.read())
    except OSError:
        return None


def _net_dir(proc_root: str) -> str:
    """/proc/thread-self/net: the calling thread's namespace (/proc/net is the process's)."""
    net = os.path.join(proc_root, "thread-self", "net")
    if not os.path.isdir(net):  # fake trees and kernels before 3.17
        net = os.path.join(proc_root, "net")
    return net


def parse_sysctl(text: str) -> int | None:
    """``"7200\\n"`` -> 7200; anything that is not a single integer -> None."""
    try:
        return int(text.strip())
    except ValueError:
        return None


def parse_snmp_table(text: str) -> dict[str, dict[str, int]]:
    """Pairs of header/value lines (``TcpExt: A B`` / ``TcpExt: 1 2``) -> {prefix: {key: n}}.

    The format of /proc/net/netstat and /proc/net/snmp. Malformed pairs are skipped.
    """
    tables: dict[str, dict[str, int]] = {}
    lines = text.splitlines()
    for head, body in zip(lines[::2], lines[1::2]):
        hname, _, hkeys = head.partition(":")
        bname, _, bvalues = body.partition(":")
        if hname != bname or not hname:
            continue
        keys = hkeys.split()
        values = bvalues.split()
        if len(keys) != len(values):
            continue
        table = tables.setdefault(hname, {})
        for key, value in zip(keys, values):
            try:
                table[key] = int(value)
            except ValueError:
                continue
    return tables


def _read_table(path: str) -> dict[str, dict[str, int]]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return parse_snmp_table(f.read())
    except OSError:
        return {}


def read_counters(proc_root: str = "/proc") -> Counters:
    """TcpExt and Tcp counters of the calling thread's namespace; missing ones are None."""
    net = _net_dir(proc_root)
    ext = _read_table(os.path.join(net, "netstat")).get("TcpExt", {})
    tcp = _read_table(os.path.join(net, "snmp")).get("Tcp", {})
    return Counters(
        keepalive_probes=ext.get("TCPKeepAlive"),
        abort_on_timeout=ext.get("TCPAbortOnTimeout"),
        timeouts=ext.get("TCPTimeouts"),
        retrans_segs=tcp.get("RetransSegs"),
    )
