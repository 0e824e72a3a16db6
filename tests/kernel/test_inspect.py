"""Socket inspection: exact keepalive options through pidfd_getfd, on the real kernel and with
failures injected; and what the audit does with them."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import netlab
import pytest
from helpers import FakeKernel, make_sock, ruleset

import auditd.session
from auditd import cli
from auditd.audit.run import audit_namespace
from auditd.daemon import Daemon, DaemonOptions
from auditd.kernel import OwnerScan
from auditd.kernel.inspect import InspectScan, SocketInspector, Target
from auditd.kernel.owners.scan import find_owners
from auditd.model import ProcessInfo, SocketOptions, TcpState, TimerKind

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (pidfd_getfd on other processes)")

# A process holding a loopback connection whose client end has the options given on the command
# line; it prints "fd inode", waits for a line, then prints its own view of the options and
# whether the connection still carries data.
HOLDER = textwrap.dedent(
    """
    import os, socket, sys
    idle, intvl, cnt, user_timeout = (int(a) for a in sys.argv[1:5])
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in ((socket.TCP_KEEPIDLE, idle), (socket.TCP_KEEPINTVL, intvl),
                       (socket.TCP_KEEPCNT, cnt), (socket.TCP_USER_TIMEOUT, user_timeout)):
        c.setsockopt(socket.IPPROTO_TCP, opt, value)
    c.connect(srv.getsockname())
    s, _ = srv.accept()
    print(c.fileno(), os.fstat(c.fileno()).st_ino, flush=True)
    sys.stdin.readline()
    g = c.getsockopt
    c.sendall(b"ping")
    print(g(socket.SOL_SOCKET, socket.SO_KEEPALIVE), g(6, socket.TCP_KEEPIDLE),
          g(6, socket.TCP_KEEPINTVL), g(6, socket.TCP_KEEPCNT), g(6, socket.TCP_USER_TIMEOUT),
          s.recv(4).decode(), flush=True)
    """
)


class Holder:
    def __init__(self, idle: int, intvl: int, cnt: int, user_timeout_ms: int) -> None:
        args = [str(v) for v in (idle, intvl, cnt, user_timeout_ms)]
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None
        fd, inode = self.proc.stdout.readline().split()
        self.fd, self.inode, self.pid = int(fd), int(inode), self.proc.pid

    def finish(self) -> list[str]:
        """What the holder sees after the inspection."""
        out, _ = self.proc.communicate("go\n", timeout=10)
        return out.split()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def holder() -> Any:
    made: list[Holder] = []

    def start(
        idle: int = 123, intvl: int = 17, cnt: int = 4, user_timeout_ms: int = 45000
    ) -> Holder:
        h = Holder(idle, intvl, cnt, user_timeout_ms)
        made.append(h)
        return h

    yield start
    for h in made:
        h.kill()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- the real kernel ---------------------------------------------------------------------------


@needs_root
def test_reads_back_the_exact_options_of_another_process(holder: Any) -> None:
    h = holder(idle=123, intvl=17, cnt=4, user_timeout_ms=45000)
    scan = find_owners([h.inode])
    assert scan.found[h.inode].pid == h.pid and scan.fds[h.inode] == h.fd
    before = _open_fds()
    result = SocketInspector().inspect([(h.inode, h.pid, scan.fds[h.inode])])
    assert result == InspectScan({h.inode: SocketOptions(True, 123, 17, 4, 45000)})
    assert _open_fds() == before  # the duplicate and the pidfd are closed
    # Read-only: the owner's socket is unchanged and still carries data.
    assert h.finish() == ["1", "123", "17", "4", "45000", "ping"]


@needs_root
def test_a_stale_fd_number_is_skipped(holder: Any) -> None:
    h = holder()
    inspector = SocketInspector()
    gone = inspector.inspect([(h.inode, h.pid, 999)])  # not open in the holder: EBADF
    other = inspector.inspect([(h.inode + 1, h.pid, h.fd)])  # fd now holds another socket
    assert gone == other == InspectScan({}, skipped=1)
    h.kill()
    assert inspector.inspect([(h.inode, h.pid, h.fd)]) == InspectScan({}, skipped=1)  # exited
    assert inspector.unavailable is None


class OwnedKernel(FakeKernel):
    """A fake namespace whose sockets are owned by real (pid, fd) pairs."""

    def __init__(self, socks: list[Any], owners: dict[int, tuple[int, int]]) -> None:
        super().__init__(socks, {i: ProcessInfo(pid, "holder") for i, (pid, _) in owners.items()})
        self.fds = {inode: fd for inode, (_, fd) in owners.items()}

    def owners(self, inodes: Collection[int], deadline: float | None = None) -> OwnerScan:
        scan = super().owners(inodes, deadline)
        return OwnerScan(scan.found, fds={i: self.fds[i] for i in scan.found})


@needs_root
def test_without_ptrace_permission_it_says_so_once_and_falls_back(holder: Any) -> None:
    """The inspector run as nobody (fork + setresuid: no CAP_SYS_PTRACE over root's holder)."""
    h = holder()
    busy = make_sock(inode=h.inode, timer=TimerKind.RETRANSMIT, retrans=1)  # keepalive hidden
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            inspector = SocketInspector()
            first = inspector.inspect([(h.inode, h.pid, h.fd)])
            second = inspector.inspect([(h.inode, h.pid, h.fd)])
            kernel = OwnedKernel([busy], {h.inode: (h.pid, h.fd)})
            report, _ = audit_namespace(ruleset(), kernel, inspector=SocketInspector())
            out = {"first": first.error, "second": second.error, "read": len(first.options),
                   "inspection": [report.inspection.wanted, report.inspection.read,  # type: ignore[union-attr]
                                  report.inspection.error],  # type: ignore[union-attr]
                   "connections": [list(k) for k in report.connections]}  # fmt: skip
            os.write(write_end, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        out = json.loads(f.read() or "{}")
    os.waitpid(pid, 0)
    assert out["first"] == (
        "socket inspection unavailable: pidfd_getfd refused (needs CAP_SYS_PTRACE, Linux 5.6+, "
        "and pidfd_getfd allowed by any seccomp filter)"
    )
    assert out["second"] == out["first"] and out["read"] == 0  # once off, it stays off
    assert out["inspection"] == [1, 0, out["first"]]
    assert out["connections"] == [["established", "unknown"]]  # inferred, as without the flag
    assert h.finish()[-1] == "ping"


def _pair_in(ns: netlab.Netns, **opts: int) -> socket.socket:
    """A loopback connection inside ``ns``; the client end gets ``opts`` before connecting."""
    client, _ = netlab.tcp_pair(ns, ns, "127.0.0.1", **opts)
    return client


def _rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text("version: 1\n")
    return path


@pytest.mark.kernel
def test_keepalive_is_known_with_data_in_flight(lab: netlab.Lab, tmp_path: Path) -> None:
    a, b = lab.netns(), lab.netns()
    client, _ = lab.connect(lab.cable(a, b), SO_KEEPALIVE=1, TCP_KEEPIDLE=600)
    b.pull_cable()
    client.send(b"x" * 1000)  # unacknowledged: the retransmit timer hides the keepalive timer
    inferred = a.audit(_rules(tmp_path), "--fail-on", "never")
    exact = a.audit(_rules(tmp_path), "--inspect-sockets", "--fail-on", "never")
    assert inferred.doc is not None and exact.doc is not None, exact.stderr
    (ns_inferred,), (ns_exact,) = inferred.doc["namespaces"], exact.doc["namespaces"]
    assert ns_inferred["sockets"]["by_keepalive"] == {"on": 0, "off": 0, "unknown": 1}
    assert ns_inferred["inspection"] is None
    assert ns_exact["sockets"]["by_keepalive"] == {"on": 1, "off": 0, "unknown": 0}
    assert ns_exact["inspection"] == {
        "wanted": 1,
        "read": 1,
        "error": None,
        "method": "bpf",
        "note": None,
    }
    # Its own TCP_KEEPIDLE of 600 s is read while data is in flight, but the data keeps the
    # path busy: not keepalive_too_slow (the retransmission timer decides now).
    local = f"{client.getsockname()[0]}:{client.getsockname()[1]}"
    assert exact.findings("keepalive_too_slow", local=local) == []
    assert exact.stderr == ""


@pytest.mark.kernel
def test_user_timeout_too_short_on_a_real_socket(lab: netlab.Lab, tmp_path: Path) -> None:
    """The incident: keepalive 600/30/5 with a 45 s TCP_USER_TIMEOUT."""
    ns = lab.netns()
    client = _pair_in(ns, SO_KEEPALIVE=1, TCP_KEEPIDLE=600, TCP_KEEPINTVL=30, TCP_KEEPCNT=5,
                      TCP_USER_TIMEOUT=45000)  # fmt: skip
    local = f"127.0.0.1:{client.getsockname()[1]}"
    run = ns.audit(_rules(tmp_path), "--inspect-sockets", "--fail-on", "never")
    (f,) = run.findings("user_timeout_too_short", local=local)
    assert f["severity"] == "warning" and f["keepalive"] == "on" and f["pid"] == os.getpid()
    assert f["message"].startswith(
        "TCP_USER_TIMEOUT 45 s is shorter than keepidle 600 + keepcnt 5 × keepintvl 30 = 750 s: "
        "the kernel aborts the connection after 1 unanswered keepalive probe(s) (630 s of "
        "silence), not 5"
    )
    assert f["hint"].startswith("set TCP_USER_TIMEOUT to at least 750000 ms")
    without = ns.audit(_rules(tmp_path), "--fail-on", "never")
    assert without.findings("user_timeout_too_short") == []


# --- failures injected ------------------------------------------------------------------------


def _raise(code: int) -> Callable[..., int]:
    def fail(*_: int) -> int:
        raise OSError(code, os.strerror(code))

    return fail


def _real_pidfd(_: int) -> int:
    return os.open("/dev/null", os.O_RDONLY)  # something to close


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EPERM, "pidfd_getfd refused (needs CAP_SYS_PTRACE, Linux 5.6+"),
        (errno.ENOSYS, "pidfd_getfd not implemented by this kernel (needs CAP_SYS_PTRACE"),
        (errno.EMFILE, "socket inspection stopped: pidfd_getfd: Too many open files"),
    ],
)
def test_fatal_errors_turn_inspection_off_once(code: int, expected: str) -> None:
    calls: list[tuple[int, int]] = []

    def getfd(pidfd: int, fd: int) -> int:
        calls.append((pidfd, fd))
        raise OSError(code, os.strerror(code))

    inspector = SocketInspector(pidfd_open=_real_pidfd, getfd=getfd)
    targets: list[Target] = [(1, 100, 3), (2, 100, 4), (3, 200, 5)]
    before = _open_fds()
    first = inspector.inspect(targets)
    assert first.error is not None and expected in first.error and first.options == {}
    assert len(calls) == 1 and _open_fds() == before
    assert inspector.inspect(targets).error == first.error and len(calls) == 1


def test_gone_processes_and_fds_are_skipped() -> None:
    def pidfd_open(pid: int) -> int:
        if pid == 200:
            raise OSError(errno.ESRCH, "No such process")
        return _real_pidfd(pid)

    inspector = SocketInspector(pidfd_open=pidfd_open, getfd=_raise(errno.EBADF))
    assert inspector.inspect([(1, 100, 3), (2, 200, 4), (3, 200, 5)]) == InspectScan({}, 3)
    assert inspector.unavailable is None


def test_unsupported_architecture_and_old_kernel() -> None:
    sparc = SocketInspector(machine="sparc64")
    assert sparc.inspect([(1, 2, 3)]).error == (
        "socket inspection unavailable: unsupported architecture sparc64 (pidfd_getfd's syscall "
        "number unknown)"
    )
    old = SocketInspector(pidfd_open=_raise(errno.ENOSYS), getfd=_raise(errno.EBADF))
    error = old.inspect([(1, 2, 3)]).error
    assert error is not None and "pidfd_open not implemented by this kernel" in error


def test_nothing_to_inspect_costs_nothing() -> None:
    inspector = SocketInspector(pidfd_open=_raise(errno.EPERM), getfd=_raise(errno.EPERM))
    assert inspector.inspect([]) == InspectScan()


# --- the audit with plain data ----------------------------------------------------------------


class FakeInspector:
    """Options by inode; records what it was asked."""

    method, needs_owners, note = "pidfd", True, None

    def for_namespace(self, source: object, sysctls: object) -> FakeInspector:
        return self

    def __init__(self, options: dict[int, SocketOptions], error: str | None = None) -> None:
        self.options = options
        self.error = error
        self.asked: list[list[Target]] = []

    def inspect(self, targets: Sequence[Target]) -> InspectScan:
        self.asked.append(sorted(targets))
        if self.error is not None:
            return InspectScan(error=self.error)
        return InspectScan({t[0]: self.options[t[0]] for t in targets if t[0] in self.options})


DEFAULTS = SocketOptions(True, 7200, 75, 9, 0)


def test_audit_reads_the_sockets_only_inspection_can_tell() -> None:
    socks = [
        make_sock(inode=1, idle_s=10),  # no timer: keepalive off, not inspected
        make_sock(inode=2, timer=TimerKind.KEEPALIVE, expires_ms=250_000, idle_s=10),  # on, fine
        make_sock(inode=3, timer=TimerKind.RETRANSMIT, retrans=1),  # unknown: busy
        make_sock(inode=4, state=TcpState.FIN_WAIT1, timer=TimerKind.RETRANSMIT),  # unknown
        make_sock(inode=5, timer=TimerKind.RETRANSMIT, retrans=1),  # unknown, owner not found
    ]
    owners = {i: (100 + i, 10 + i) for i in (1, 2, 3, 4)}
    inspector = FakeInspector({2: SocketOptions(True, 300, 10, 3), 3: DEFAULTS,
                               4: SocketOptions(False, 7200, 75, 9)})  # fmt: skip
    report, findings = audit_namespace(ruleset(), OwnedKernel(socks, owners), inspector=inspector)
    assert inspector.asked == [[(2, 102, 12), (3, 103, 13), (4, 104, 14)]]
    assert report.connections == {
        ("established", "off"): 1, ("established", "on"): 2, ("established", "unknown"): 1,
        ("fin_wait1", "off"): 1,
    }  # fmt: skip
    assert (report.attribution_wanted, report.attribution_found) == (4, 3)  # inode 1 is off
    assert report.inspection is not None and (report.inspection.wanted, report.inspection.read,
                                              report.inspection.error) == (4, 3, None)  # fmt: skip
    # The busy socket on the 7200 s default: keepalive on, but its traffic keeps the path
    # busy, so it is not keepalive_too_slow (cadence.py).
    assert [f for f in findings if f.inode == 3] == []
    hist = report.idle_histogram
    assert sum(hist["on"]) == 2 and sum(hist["unknown"]) == 1 and sum(hist["off"]) == 1


def test_audit_without_inspector_is_unchanged() -> None:
    socks = [make_sock(inode=3, timer=TimerKind.RETRANSMIT, retrans=1)]
    report, findings = audit_namespace(ruleset(), OwnedKernel(socks, {3: (103, 13)}))
    assert report.inspection is None and report.attribution_wanted == 0
    assert report.connections == {("established", "unknown"): 1} and findings[0].kind != (
        "keepalive_too_slow"
    )


def test_inspection_error_reaches_the_report_and_the_audit_goes_on() -> None:
    socks = [make_sock(inode=3, timer=TimerKind.RETRANSMIT, retrans=1)]
    inspector = FakeInspector({}, error="socket inspection unavailable: no")
    report, _ = audit_namespace(ruleset(), OwnedKernel(socks, {3: (103, 13)}), inspector=inspector)
    assert (
        report.inspection is not None
        and report.inspection.error == "socket inspection unavailable: no"
    )
    assert report.connections == {("established", "unknown"): 1}


def test_a_user_timeout_flagged_beyond_the_pre_filter() -> None:
    """Keepalive on, 300 s first probe (fine for 350 s): only the user timeout is wrong."""
    sock = make_sock(inode=2, timer=TimerKind.KEEPALIVE, expires_ms=250_000, idle_s=10)
    fragile = SocketOptions(True, 300, 10, 3, 20_000)
    kernel = OwnedKernel([sock], {2: (102, 12)})
    _, findings = audit_namespace(ruleset(), kernel, inspector=FakeInspector({2: fragile}))
    assert [f.kind for f in findings if f.inode == 2] == ["user_timeout_too_short"]


# --- the CLI and the agent say it once ----------------------------------------------------------


class _Refused(SocketInspector):
    def __init__(self) -> None:
        super().__init__(pidfd_open=_real_pidfd, getfd=_raise(errno.EPERM))


def _two_namespaces(_: Any = None) -> list[tuple[str, Any]]:
    socks = [make_sock(inode=3, timer=TimerKind.RETRANSMIT, retrans=1)]
    return [
        ("host", OwnedKernel(socks, {3: (103, 13)})),
        ("pod:a", OwnedKernel(socks, {3: (103, 13)})),
    ]


def test_cli_notes_once_that_inspection_is_off(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(auditd.session, "SocketInspector", _Refused)
    argv = ["audit", "--config", str(_rules(tmp_path)), "--inspect-sockets", "--format", "json",
            "--fail-on", "never"]  # fmt: skip
    code = cli.main(argv, sources=_two_namespaces)
    out, err = capsys.readouterr()
    assert code == 0
    notes = [line for line in err.splitlines() if "socket inspection" in line]
    assert notes == [
        "keepalive-auditd: note: socket inspection unavailable: pidfd_getfd refused (needs "
        "CAP_SYS_PTRACE, Linux 5.6+, and pidfd_getfd allowed by any seccomp filter)"
    ]
    doc = json.loads(out)
    assert [ns["inspection"]["error"] is not None for ns in doc["namespaces"]] == [True, True]


def test_agent_logs_once_that_inspection_is_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import auditd.daemon

    monkeypatch.setattr(auditd.session, "SocketInspector", _Refused)
    log = logging.getLogger("t-inspect")
    daemon = Daemon(DaemonOptions(None, inspect_sockets=True), _two_namespaces, log)
    with caplog.at_level(logging.INFO, logger="t-inspect"):
        for _ in range(3):
            assert daemon.audit_once() is not None
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("socket inspection off, keepalive inferred") == 1


def test_run_accepts_the_flag() -> None:
    args = cli.build_parser().parse_args(["run", "--audit.inspect-sockets"])
    assert args.inspect_sockets is True
    assert cli.build_parser().parse_args(["audit"]).inspect_sockets is False
