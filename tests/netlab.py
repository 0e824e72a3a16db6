"""A small network lab for tests on the real kernel: namespaces, a veth cable, a firewall.

Everything a test builds here is torn down by ``Lab.close`` (the ``lab`` fixture in
conftest.py calls it even when the test fails): spawned processes are killed, sockets are
reset, lingering sockets are destroyed with ``ss -K`` (an orphan socket pins its netns after
``ip netns delete``, see shared/KERNEL.md "Lab notes for tests"), then the namespaces go.

Namespace names are ``kaud-<pid>-<hex>``: the pid of the test run that made them lets the
session safety net (``sweep_stale``) delete what a crashed run left behind without touching
the namespaces of a run that is still going.

Addresses come from 198.18.0.0/15 (RFC 2544, benchmarking); traffic only ever goes to the
namespaces made here, or to loopback.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

PREFIX = "kaud-"
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h
NET = ipaddress.ip_network("198.18.0.0/15")
_NAME = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+$")
_NFT_TABLE = "kaud"

T = TypeVar("T")


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def run(
    argv: list[str], *, check: bool = True, timeout: float = 20, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def call_in_netns(path: str, fn: Callable[[], T]) -> T:
    """``fn()`` in a fresh thread that entered the netns at ``path``.

    setns moves only the calling thread, and that thread ends here, so the test process stays
    where it was. Sockets made by ``fn`` keep the namespace they were created in.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"setns {os.path.basename(path)}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class AuditRun:
    """What one run of the real CLI gave back."""

    rc: int
    doc: dict[str, Any] | None  # parsed JSON stdout, None when stdout was not JSON
    stderr: str
    stdout: str

    def findings(self, kind: str | None = None, local: str | None = None) -> list[dict[str, Any]]:
        assert self.doc is not None, f"no JSON from the CLI (exit {self.rc}): {self.stderr}"
        return [
            f
            for f in self.doc["findings"]
            if (kind is None or f["kind"] == kind) and (local is None or f["local"] == local)
        ]


@dataclass
class Netns:
    name: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    socks: list[socket.socket] = field(default_factory=list)

    @property
    def path(self) -> str:
        return os.path.join(NETNS_DIR, self.name)

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run(self.exec_argv(argv), **kwargs)

    def call(self, fn: Callable[[], T]) -> T:
        return call_in_netns(self.path, fn)

    # --- sysctls (per netns: /proc/sys/net shows the namespace of the opening thread) ----

    def set_sysctl(self, name: str, value: int) -> None:
        path = "/proc/sys/" + name.replace(".", "/")

        def write() -> str:
            with open(path, "w", encoding="ascii") as f:
                f.write(f"{value}\n")
            with open(path, encoding="ascii") as f:
                return f.read().strip()

        got = self.call(write)
        if got != str(value):
            raise LabError(f"{self.name}: {name} reads {got} after writing {value}")

    def sysctl(self, name: str) -> int:
        path = "/proc/sys/" + name.replace(".", "/")

        def read() -> int:
            with open(path, encoding="ascii") as f:
                return int(f.read())

        return self.call(read)

    # --- the cable -----------------------------------------------------------------------

    def pull_cable(self) -> None:
        """Drop every packet in and out of this namespace except on lo; links stay up.

        nft when it works, else iptables. ARP is not filtered (the nft inet family does not
        see it), so the peer gets ETIMEDOUT rather than EHOSTUNREACH.
        """
        ruleset = (
            f"table inet {_NFT_TABLE} {{\n"
            "  chain input { type filter hook input priority 0; policy accept; "
            'iifname "lo" accept; drop; }\n'
            "  chain output { type filter hook output priority 0; policy accept; "
            'oifname "lo" accept; drop; }\n'
            "}\n"
        )
        try:
            self.run(["nft", "-f", "-"], stdin=ruleset)
            return
        except (LabError, FileNotFoundError):
            pass
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.run(["iptables", "-A", chain, flag, "lo", "-j", "ACCEPT"])
            self.run(["iptables", "-A", chain, "-j", "DROP"])

    # --- sockets and processes -----------------------------------------------------------

    def make_socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A TCP socket created inside this namespace, owned by the test process."""
        sock = self.call(lambda: socket.socket(family, socket.SOCK_STREAM))
        self.socks.append(sock)
        return sock

    def listen(self, addr: str, port: int = 0) -> socket.socket:
        sock = self.make_socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(8)
        return sock

    def adopt(self, sock: socket.socket) -> socket.socket:
        """Track a socket made elsewhere (e.g. from ``accept``) for cleanup."""
        self.socks.append(sock)
        return sock

    def spawn(self, argv: list[str]) -> subprocess.Popen[str]:
        """A process inside the namespace; ``ip netns exec`` execs it, so the pid is its own."""
        proc = subprocess.Popen(
            self.exec_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def audit(self, config: str | os.PathLike[str], *args: str, timeout: float = 30) -> AuditRun:
        """The real CLI inside this namespace: ``keepalive-auditd audit --format json``."""
        argv = [sys.executable, "-m", "auditd", "audit", "--config", os.fspath(config)]
        proc = self.run([*argv, "--format", "json", *args], check=False, timeout=timeout)
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            doc = None
        return AuditRun(proc.returncode, doc, proc.stderr, proc.stdout)

    # --- teardown ------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Tear everything down; every step is tried, the failures are returned."""
        errors: list[str] = []
        for sock in self.socks:
            with contextlib.suppress(OSError):
                # Linger 0: close sends RST and frees the socket instead of leaving an orphan
                # in FIN_WAIT1 retransmitting into the dropped cable.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.close()
        self.socks.clear()
        for proc in self.procs:
            _kill(proc)
        self.procs.clear()
        errors.extend(destroy_netns(self.name))
        return errors


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=5)


def destroy_netns(name: str) -> list[str]:
    """Kill what is left inside ``name`` (processes we started, then sockets), delete it."""
    errors: list[str] = []
    if not os.path.exists(os.path.join(NETNS_DIR, name)):
        return errors
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    # Orphans (FIN_WAIT*, LAST_ACK) outlive their process and would pin the namespace.
    proc = run(["ip", "netns", "exec", name, "ss", "-K", "-t", "-a"], check=False)
    if proc.returncode != 0:
        errors.append(f"ss -K in {name}: {proc.stderr.strip()}")
    # TIME_WAIT does not hold the namespace (inet_twsk_purge at netns exit); others would.
    left = run(["ip", "netns", "exec", name, "ss", "-tanH", "exclude", "time-wait"], check=False)
    if left.stdout.strip():
        errors.append(f"sockets survived ss -K in {name}: {left.stdout.strip()}")
    proc = run(["ip", "netns", "del", name], check=False)
    if proc.returncode != 0:
        errors.append(f"ip netns del {name}: {proc.stderr.strip()}")
    return errors


def ours() -> list[str]:
    """Names of every namespace with our prefix, whoever made it."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(include_own: bool = False) -> list[str]:
    """Delete ``kaud-*`` namespaces whose test run is gone (and ours with ``include_own``).

    A name without a pid is not from this lab's naming and counts as stale. Namespaces of
    another test run that is still alive are left alone.
    """
    swept = []
    for name in ours():
        m = _NAME.match(name)
        pid = int(m.group(1)) if m else None
        if pid is not None and _alive(pid) and not (include_own and pid == os.getpid()):
            continue
        destroy_netns(name)
        swept.append(name)
    return swept


def netns_available() -> str | None:
    """None if this process can make network namespaces, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    try:
        proc = run(["ip", "netns", "add", name], check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return f"cannot run ip netns add: {exc}"
    if proc.returncode != 0:
        return f"ip netns add failed: {proc.stderr.strip()}"
    run(["ip", "netns", "del", name], check=False)
    return None


def tcp_pair(
    client_ns: Netns, server_ns: Netns, addr: str, **opts: int
) -> tuple[socket.socket, socket.socket]:
    """A TCP connection from a socket in ``client_ns`` to a listener on ``addr`` in ``server_ns``.

    ``opts`` are SOL_SOCKET or IPPROTO_TCP options (``SO_KEEPALIVE=1``) set on the client
    before connecting. Returns (client, server side); the namespaces close both.
    """
    listener = server_ns.listen(addr)
    client = client_ns.make_socket(listener.family)
    for opt, value in opts.items():
        level = socket.SOL_SOCKET if opt.startswith("SO_") else socket.IPPROTO_TCP
        client.setsockopt(level, getattr(socket, opt), value)
    client.settimeout(10)
    client.connect(listener.getsockname()[:2])
    server, _ = listener.accept()
    server_ns.adopt(server)
    listener.close()
    return client, server


@dataclass(frozen=True)
class Cable:
    """A veth pair between two namespaces; ``a_ip``/``b_ip`` are the two ends' addresses."""

    a: Netns
    b: Netns
    a_ip: str
    b_ip: str


class Lab:
    """The namespaces of one test; ``close`` removes all of them."""

    def __init__(self) -> None:
        self.namespaces: list[Netns] = []
        self._cables = 0

    def netns(self) -> Netns:
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        run(["ip", "netns", "add", name])
        ns = Netns(name)
        self.namespaces.append(ns)
        ns.run(["ip", "link", "set", "lo", "up"])
        return ns

    def cable(self, a: Netns, b: Netns) -> Cable:
        """A veth from ``a`` to ``b`` with a /30 out of 198.18.0.0/15, both ends up."""
        base = NET.network_address + 4 * self._cables
        self._cables += 1
        a_ip, b_ip = str(base + 1), str(base + 2)
        a_if, b_if = f"veth{self._cables}a", f"veth{self._cables}b"
        # Created inside a: no interface ever appears in the host namespace.
        a.run(["ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name])
        for ns, ifname, ip in ((a, a_if, a_ip), (b, b_if, b_ip)):
            ns.run(["ip", "addr", "add", f"{ip}/30", "dev", ifname])
            ns.run(["ip", "link", "set", ifname, "up"])
        return Cable(a, b, a_ip, b_ip)

    def connect(self, cable: Cable, **opts: int) -> tuple[socket.socket, socket.socket]:
        """A TCP connection from ``cable.a`` to a listener on ``cable.b_ip`` in ``cable.b``."""
        return tcp_pair(cable.a, cable.b, cable.b_ip, **opts)

    def close(self) -> list[str]:
        errors: list[str] = []
        for ns in reversed(self.namespaces):
            try:
                errors.extend(ns.close())
            except Exception as exc:  # keep going: the next namespace must still go
                errors.append(f"{ns.name}: {exc!r}")
        self.namespaces.clear()
        return errors
