"""Real applications for tests/kernel/test_apps.py, each started directly (no systemd) with its own
config under a temp dir, inside a network namespace of its own, on loopback.

An ``App`` starts its servers and opens idle connections with real clients; ``up(tuning)``
(re)starts everything with the keepalive values a hint gave (``tuning``, parsed from the
hint's own text by ``parse``), so a test can check that applying a hint clears its finding on
a new connection. Each App lives in its own namespace: the nginx and OpenSSH hints change
the namespace sysctls, which must not reach the other applications.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from netlab import Netns

HERE = Path(__file__).parent / "apps"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
Tuning = dict[str, int]
KA = re.compile(r"keepalive idle (\d+) s, interval (\d+) s, (\d+) probes")
SYSCTLS = re.compile(
    r"tcp_keepalive_time=(\d+) net\.ipv4\.tcp_keepalive_intvl=(\d+) "
    r"net\.ipv4\.tcp_keepalive_probes=(\d+)"
)


@dataclass(frozen=True)
class Side:
    """One end of an idle connection the audit must judge: its address and owner's name."""

    local: str
    remote: str
    process: str


def _ints(pattern: str, text: str, *names: str) -> Tuning:
    m = re.search(pattern, text)
    assert m is not None, f"{pattern!r} not in the hint: {text}"
    return dict(zip(names, map(int, m.groups()), strict=True))


def as_postgres(argv: list[str]) -> list[str]:
    return ["setpriv", "--reuid", "postgres", "--regid", "postgres", "--init-groups", *argv]


@dataclass
class App:
    """Base: processes started in ``ns``, killed by ``stop`` (and by the lab at the end)."""

    ns: Netns
    tmp: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    own: list[Path] = field(default_factory=list)  # directories of its own, removed by close
    gentle: set[int] = field(default_factory=set)
    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # the finding its idle connections get before the hint is applied
    knob: ClassVar[str] = ""  # a word the hint must contain: the application's own setting
    knobs: ClassVar[dict[str, str]] = {}  # the same, by process, for a side of another program
    expect: ClassVar[int] = 2  # idle sockets of the processes waited for in ``sides``

    def spawn(
        self, argv: list[str], stdin: bool = False, user: bool = False, gentle: bool = False
    ) -> subprocess.Popen[str]:
        """``gentle``: stopped with SIGINT (postgres: fast shutdown, so that its backends are
        gone before the next start), else SIGKILL."""
        argv = as_postgres(argv) if user else argv
        proc = subprocess.Popen(
            self.ns.exec_argv(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.procs.append(proc)
        if gentle:
            self.gentle.add(proc.pid)
        self.ns.procs.append(proc)  # the lab kills it too, even if the test fails first
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if proc.pid in self.gentle else signal.SIGKILL)
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=5)
        self.procs.clear()

    def close(self) -> None:
        self.stop()
        for path in self.own:
            shutil.rmtree(path, ignore_errors=True)

    def up(self, tuning: Tuning | None = None) -> list[Side]:
        """Start with ``tuning`` (None: the application's defaults); the idle sides."""
        raise NotImplementedError

    def parse(self, hint: str) -> Tuning:
        return _ints(KA.pattern, hint, "idle", "intvl", "cnt")

    def sides(self, ports: set[int], processes: set[str], timeout: float = 20) -> list[Side]:
        """The ESTABLISHED sockets of ``processes`` touching ``ports``, once all are up."""
        deadline = time.monotonic() + timeout
        while True:
            found = established(self.ns)
            got = [s for s in found if s.process in processes and ports & _ports(s)]
            if processes <= {s.process for s in got} and len(got) >= self.expect:
                return got
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                out = "".join(p.stdout.read() if p.stdout and p.poll() is not None else ""
                              for p in self.procs)  # fmt: skip
                raise AssertionError(f"{self.name}: connections not up: {found}\n{out}")
            time.sleep(0.1)


def _ports(side: Side) -> set[int]:
    return {int(side.local.rsplit(":", 1)[1]), int(side.remote.rsplit(":", 1)[1])}


_USERS = re.compile(r'\("([^"]+)",pid=(\d+),fd=(\d+)\)')


def established(ns: Netns) -> list[Side]:
    out = ns.run(["ss", "-tnpH", "state", "established"]).stdout
    sides = []
    for line in out.splitlines():
        parts = line.split()
        m = _USERS.search(line)
        if len(parts) >= 4 and m:
            sides.append(Side(plain(parts[2]), plain(parts[3]), m.group(1)))
    return sides


def plain(addr: str) -> str:
    return addr.replace("[::ffff:", "").replace("]", "")


@dataclass(frozen=True)
class SsView:
    """What ``ss -tinoep`` says of one socket."""

    keepalive: bool  # timer:(keepalive,...)
    pid: int
    fd: int
    idle_ms: int  # since the last segment either way: min of lastsnd, lastrcv, lastack


def ss_view(ns: Netns) -> dict[str, SsView]:
    """Local address -> ss's view, for the ESTABLISHED sockets of ``ns``."""
    out = ns.run(["ss", "-tinoepH", "state", "established"]).stdout
    views = {}
    head = ""
    for line in out.splitlines():
        if not line.startswith("\t"):
            head = line
            continue
        parts, m = head.split(), _USERS.search(head)
        ages = [int(v) for v in re.findall(r"\blast(?:snd|rcv|ack):(\d+)", line)]
        if len(parts) >= 4 and m:
            views[plain(parts[2])] = SsView(
                "timer:(keepalive" in head, int(m.group(2)), int(m.group(3)), min(ages, default=0)
            )
    return views


_libc = ctypes.CDLL(None, use_errno=True)
PIDFD_GETFD = 438  # x86_64 and arm64, include/uapi/asm-generic/unistd.h


def getsockopt(pid: int, fd: int) -> tuple[int, int, int, int]:
    """(SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT) of another process's socket,
    through a pidfd_getfd duplicate: the test's own oracle, independent of auditd.kernel."""
    pidfd = os.pidfd_open(pid)
    try:
        dup = _libc.syscall(PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    assert dup >= 0, f"pidfd_getfd({pid}, {fd}): {os.strerror(ctypes.get_errno())}"
    sock = socket.socket(fileno=dup)
    try:
        g = sock.getsockopt
        tcp = socket.IPPROTO_TCP
        return (g(socket.SOL_SOCKET, socket.SO_KEEPALIVE), g(tcp, socket.TCP_KEEPIDLE),
                g(tcp, socket.TCP_KEEPINTVL), g(tcp, socket.TCP_KEEPCNT))  # fmt: skip
    finally:
        sock.close()


def wait_postgres(ns: Netns, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Listening is not ready: until recovery is done, connections get "starting up"."""
    wait_port(ns, 5432, proc, timeout)
    deadline = time.monotonic() + timeout
    while ns.run([str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", "5432"],
                 check=False).returncode != 0:  # fmt: skip
        if time.monotonic() > deadline:
            raise AssertionError(f"postgres not ready after {timeout} s")
        time.sleep(0.05)


def wait_port(ns: Netns, port: int, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while f":{port} " not in ns.run(["ss", "-tlnH"]).stdout:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode}: {out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on {port} after {timeout} s")
        time.sleep(0.05)


# --- the applications ------------------------------------------------------------------


class PostgreSQL(App):
    """postgres 15 with psql clients, and PgBouncer between a second psql and the server."""

    name, kind, knob = "PostgreSQL", "keepalive_too_slow", "tcp_keepalives_idle"
    knobs: ClassVar[dict[str, str]] = {"psql": "keepalives_idle="}

    def _data(self) -> Path:
        # pytest's temp dirs are root's alone (mode 0700): the postgres user needs its own.
        if not self.own:
            self.own.append(Path(tempfile.mkdtemp(prefix="kaud-pg-")))
            self.own[0].chmod(0o755)
        data = self.own[0] / "pg" / "data"
        if not data.exists():
            data.parent.mkdir(parents=True)
            shutil.chown(data.parent, "postgres", "postgres")
            subprocess.run(
                as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust",
                             "-U", "postgres", "--no-sync", "-E", "UTF8"]),
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        return data

    def _postgres(self, *settings: str) -> Path:
        """Start postgres with ``settings`` (name=value) on 127.0.0.1:5432; its data dir."""
        data = self._data()
        base = ("listen_addresses=127.0.0.1", f"unix_socket_directories={data.parent}",
                "fsync=off", "shared_buffers=16MB", "max_connections=20")  # fmt: skip
        flags = [f"-c{setting}" for setting in (*base, *settings)]
        argv = [str(PG_BIN / "postgres"), "-D", str(data), "-p", "5432", *flags]
        wait_postgres(self.ns, self.spawn(argv, user=True, gentle=True))
        return data

    def up(self, tuning: Tuning | None = None) -> list[Side]:
        self.stop()
        conn = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
        settings: list[str] = []
        if tuning is not None:
            settings = [f"tcp_keepalives_{k}={tuning[v]}" for k, v in
                        (("idle", "idle"), ("interval", "intvl"), ("count", "cnt"))]  # fmt: skip
            conn += " keepalives=1 keepalives_idle={idle} keepalives_interval={intvl} " \
                    "keepalives_count={cnt}".format(**tuning)  # fmt: skip
        self._postgres(*settings)
        self.spawn(["psql", conn, "-c", "select 1", "-f", "-"], stdin=True)
        return self.sides({5432}, {"postgres", "psql"})


class PgBouncer(PostgreSQL):
    name, kind, knob = "PgBouncer", "keepalive_too_slow", "tcp_keepidle"

    def up(self, tuning: Tuning | None = None) -> list[Side]:
        self.stop()
        # The server is tuned by the PostgreSQL hint, not this one: keep it out of the picture.
        data = self._postgres("tcp_keepalives_idle=1", "tcp_keepalives_interval=1")
        ini = data.parent / "pgbouncer.ini"
        users = data.parent / "users.txt"
        users.write_text('"postgres" ""\n')
        tune = "" if tuning is None else (
            "tcp_keepalive = 1\ntcp_keepidle = {idle}\ntcp_keepintvl = {intvl}\n"
            "tcp_keepcnt = {cnt}\n".format(**tuning)
        )  # fmt: skip
        ini.write_text(
            "[databases]\n* = host=127.0.0.1 port=5432\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
            f"listen_port = 6432\nunix_socket_dir =\nauth_type = trust\nauth_file = {users}\n"
            f"pool_mode = session\n{tune}"
        )
        for path in (ini, users):
            shutil.chown(path, "postgres", "postgres")
        bouncer = self.spawn(["pgbouncer", str(ini)], user=True)
        wait_port(self.ns, 6432, bouncer)
        # The client is tuned by the libpq hint, not this one: keep it out of the picture.
        self.spawn(["psql", "host=127.0.0.1 port=6432 user=postgres dbname=postgres "
                    "keepalives=0", "-c", "select 1", "-f", "-"], stdin=True)  # fmt: skip
        sides = self.sides({6432, 5432}, {"pgbouncer"})
        return [s for s in sides if s.process == "pgbouncer"]


class Redis(App):
    """redis-server with redis-cli idle between two PINGs; the server side is judged
    (redis-cli's own keepalive is fixed at 15 s: its row in APP_KNOBS says so)."""

    name, kind, knob = "Redis", "keepalive_too_slow", "tcp-keepalive"
    expect = 2

    def parse(self, hint: str) -> Tuning:
        return _ints(r"CONFIG SET tcp-keepalive (\d+)", hint, "idle")

    def up(self, tuning: Tuning | None = None) -> list[Side]:
        self.stop()
        argv = ["redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.tmp), "--protected-mode", "no"]  # fmt: skip
        if tuning is not None:
            argv += ["--tcp-keepalive", str(tuning["idle"])]
        server = self.spawn(argv)
        wait_port(self.ns, 6379, server)
        self.spawn(["redis-cli", "-p", "6379", "-r", "2", "-i", "600", "PING"])
        return [s for s in self.sides({6379}, {"redis-server", "redis-cli"})
                if s.process == "redis-server"]  # fmt: skip


class HAProxy(App):
    """haproxy in TCP mode between nc and a plain listener (nc -l)."""

    name, kind, knob = "HAProxy", "idle_no_keepalive", "clitcpka-idle"
    expect = 2

    def up(self, tuning: Tuning | None = None) -> list[Side]:
        self.stop()
        tune = "" if tuning is None else (
            "    option clitcpka\n    clitcpka-idle {idle}s\n    clitcpka-intvl {intvl}s\n"
            "    clitcpka-cnt {cnt}\n    option srvtcpka\n    srvtcpka-idle {idle}s\n"
            "    srvtcpka-intvl {intvl}s\n    srvtcpka-cnt {cnt}\n".format(**tuning)
        )  # fmt: skip
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(
            "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n"
            f"    timeout server 1h\n{tune}frontend fe\n    bind 127.0.0.1:7000\n"
            "    default_backend be\nbackend be\n    server s1 127.0.0.1:7001\n"
        )
        backend = self.spawn(["nc", "-lk", "127.0.0.1", "7001"], stdin=True)
        wait_port(self.ns, 7001, backend)
        proxy = self.spawn(["haproxy", "-f", str(cfg), "-db"])
        wait_port(self.ns, 7000, proxy)
        self.spawn(["nc", "127.0.0.1", "7000"], stdin=True)
        return [s for s in self.sides({7000, 7001}, {"haproxy"}) if s.process == "haproxy"]


class Nginx(App):
    """nginx proxying to itself through an upstream keepalive pool; nc holds an idle client
    connection that never sends a request."""

    name, kind, knob = "nginx", "idle_no_keepalive", "so_keepalive="
    expect = 4

    def parse(self, hint: str) -> Tuning:
        listen = _ints(r"so_keepalive=(\d+):(\d+):(\d+)", hint, "idle", "intvl", "cnt")
        sysctls = _ints(SYSCTLS.pattern, hint, "s_idle", "s_intvl", "s_cnt")
        return {**listen, **sysctls}

    def up(self, tuning: Tuning | None = None) -> list[Side]:
        self.stop()
        root = self.tmp / "nginx"
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        ka, upstream = "", ""
        if tuning is not None:
            ka = " so_keepalive={idle}:{intvl}:{cnt}".format(**tuning)
            upstream = "proxy_socket_keepalive on;"
            for name, key in (("time", "s_idle"), ("intvl", "s_intvl"), ("probes", "s_cnt")):
                self.ns.set_sysctl(f"net.ipv4.tcp_keepalive_{name}", tuning[key])
        tmp = root / "tmp"
        (root / "nginx.conf").write_text(
            # One process: a master killed would leave its worker holding the connections.
            f"daemon off;\nmaster_process off;\npid {root}/nginx.pid;\nerror_log stderr warn;\n"
            "events { worker_connections 64; }\nhttp {\n    access_log off;\n"
            f"    client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};\n"
            f"    uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n"
            "    client_header_timeout 1h; keepalive_timeout 1h;\n"
            "    upstream backend { server 127.0.0.1:8081; keepalive 4; keepalive_timeout 1h; }\n"
            f"    server {{ listen 127.0.0.1:8080{ka}; location / {{ proxy_pass http://backend;\n"
            f'        proxy_http_version 1.1; proxy_set_header Connection ""; {upstream} }} }}\n'
            f'    server {{ listen 127.0.0.1:8081{ka}; location / {{ return 200 "ok\\n"; }} }}\n'
            "}\n"
        )
        server = self.spawn(["nginx", "-p", str(root), "-c", str(root / "nginx.conf")])
        wait_port(self.ns, 8080, server)
        # One request through the proxy leaves an idle upstream connection in the pool.
        got = self.ns.run(["curl", "-s", "http://127.0.0.1:8080/"]).stdout
        assert got == "ok\n", got
        self.spawn(["nc", "127.0.0.1", "8080"], stdin=True)
        return [s for s in self.sides({8080, 8081}, {"nginx", "nc"}) if s.process == "nginx"]


class OpenSSH(App):
    """sshd with a temp host key and a temp authorized key for root; ssh runs ``sleep``."""

    name, kind, knob = "OpenSSH", "keepalive_too_slow", "ClientAliveInterval"
    knobs: ClassVar[dict[str, str]] = {"ssh": "ServerAliveInterval"}

    def parse(self, hint: str) -> Tuning:
        return _ints(r"(?:Client|Server)AliveInterval (\d+) with \w+ (\d+)", hint, "hb", "cnt")

    def up(self, tuning: Tuning | None = None) -> list[Side]:
        self.stop()
        d = self.tmp / "ssh"
        if not d.exists():
            d.mkdir(mode=0o700)
            for key in ("host_key", "user_key"):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                               check=True, timeout=30)  # fmt: skip
            shutil.copy(d / "user_key.pub", d / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        alive = "" if tuning is None else "ClientAliveInterval {hb}\nClientAliveCountMax {cnt}\n"
        (d / "sshd_config").write_text(
            f"Port 2222\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"StrictModes no\nPidFile none\nLogLevel ERROR\n{alive.format(**(tuning or {}))}"
        )
        server = self.spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")])
        wait_port(self.ns, 2222, server)
        opts = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]  # fmt: skip
        if tuning is not None:
            opts += ["-o", f"ServerAliveInterval={tuning['hb']}",
                     "-o", f"ServerAliveCountMax={tuning['cnt']}"]  # fmt: skip
        self.spawn(["ssh", "-n", "-i", str(d / "user_key"), *opts, "-p", "2222",
                    "root@127.0.0.1", "sleep", "600"])  # fmt: skip
        return self.sides({2222}, {"sshd", "ssh"})


class Java(App):
    """tests/apps/KeepaliveApp.java through the source launcher: a server and its client."""

    name, kind, knob = "Java", "idle_no_keepalive", "setKeepAlive(true)"
    expect = 2

    def up(self, tuning: Tuning | None = None) -> list[Side]:
        self.stop()
        args = [] if tuning is None else [str(tuning[k]) for k in ("idle", "intvl", "cnt")]
        app = self.spawn(["java", str(HERE / "KeepaliveApp.java"), "9000", *args])
        wait_port(self.ns, 9000, app, timeout=60)
        return self.sides({9000}, {"java"})


class Node(App):
    """tests/apps/keepalive_app.js: a server and its client, both idle."""

    name, kind, knob = "Node.js", "idle_no_keepalive", "setKeepAlive(true, "

    def parse(self, hint: str) -> Tuning:
        return _ints(r"setKeepAlive\(true, (\d+)\)", hint, "ms")

    def up(self, tuning: Tuning | None = None) -> list[Side]:
        self.stop()
        args = [] if tuning is None else [str(tuning["ms"])]
        app = self.spawn(["node", str(HERE / "keepalive_app.js"), "9100", *args])
        wait_port(self.ns, 9100, app)
        return self.sides({9100}, {"node"})


APPS: dict[str, Callable[[Netns, Path], App]] = {
    cls.name: cls for cls in (PostgreSQL, PgBouncer, Redis, HAProxy, Nginx, OpenSSH, Java, Node)
}
