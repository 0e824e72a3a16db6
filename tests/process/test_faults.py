"""Faults the agent must survive: each is survived, logged once, and counted in
``keepalive_audit_errors_total`` under its stage.

Injected through the kernel layer's seams (a scripted netlink socket, a fake /proc tree) on an
in-process ``Daemon``, and for real on a running agent where that is possible: the metrics
port taken, stderr on a full disk (/dev/full), a storm of signals.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from agent import Agents, agents_fixture, wait_for
from helpers import DATA, diag_message, fake_process, nlmsg, tcp_info

from auditd import cli, logs
from auditd.daemon import Daemon, DaemonOptions
from auditd.kernel import LocalKernel, sockdiag
from auditd.kernel.owners import scan as procs
from auditd.kernel.sockdiag import NLMSG_DONE, NLMSG_ERROR

# --- a scripted kernel -------------------------------------------------------------------------

IDLE_MS = 600_000
INODE = 7777
IDLE = diag_message(
    info=tcp_info(last_data_recv=IDLE_MS, last_ack_recv=IDLE_MS, last_data_sent=IDLE_MS),
    inode=INODE,
)  # established, no keepalive, idle 600 s: a critical finding, and an owner to look for
DONE = nlmsg(NLMSG_DONE, bytes(4))
GOOD = [IDLE + DONE, DONE]  # AF_INET: one socket; AF_INET6: none

Step = bytes | OSError


class FakeNetlink:
    """A sock_diag socket that answers each recv with the next step: a datagram or an error."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = list(steps)

    def send(self, data: bytes) -> int:
        return len(data)

    def recvmsg_into(self, buffers: list[memoryview]) -> tuple[int, list[Any], int, Any]:
        if not self.steps:
            return 0, [], 0, None  # the kernel stopped talking: a dump cut short
        step = self.steps.pop(0)
        if isinstance(step, OSError):
            raise step
        buffers[0][: len(step)] = step
        return len(step), [], 0, None

    def close(self) -> None:
        pass


class Netlink:
    """A socket factory: each socket opened plays the next script (the last one repeats)."""

    def __init__(self, *scripts: Sequence[Step] | OSError) -> None:
        self.scripts = list(scripts)
        self.opened = 0

    def __call__(self) -> Any:
        script = self.scripts[min(self.opened, len(self.scripts) - 1)]
        self.opened += 1
        if isinstance(script, OSError):
            raise script
        return FakeNetlink(script)


def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """A fake /proc: the TCP sysctls, counters, and process 4242 holding socket INODE."""
    root = tmp_path / "proc"
    ipv4 = root / "sys" / "net" / "ipv4"
    ipv4.mkdir(parents=True)
    for name, value in (("tcp_keepalive_time", 7200), ("tcp_keepalive_intvl", 75),
                        ("tcp_keepalive_probes", 9), ("tcp_retries2", 8)):  # fmt: skip
        (ipv4 / name).write_text(f"{value}\n")
    (root / "net").mkdir()
    for name in ("netstat", "snmp"):
        shutil.copy(DATA / "procfs" / name, root / "net" / name)
    make_process(root, 4242, "psql", {3: f"socket:[{INODE}]"})
    return root


def make_process(root: Path, pid: int, name: str, fds: dict[int, str]) -> None:
    fake_process(root, pid, fds, name, name.encode() + b"\0-h\0db\0")


class Harness:
    """An in-process Daemon over one LocalKernel, with its JSON log in memory."""

    def __init__(self, proc_root: Path, netlink: Netlink, config: str | None = None) -> None:
        self.stream = io.StringIO()
        self.kernel = LocalKernel(proc_root=str(proc_root), netlink=netlink)
        log = logs.setup("info", "json", self.stream)
        self.daemon = Daemon(DaemonOptions(config), lambda _: [("host", self.kernel)], log)
        self.daemon.load_initial_config()

    def audit(self, times: int = 1) -> Any:
        result = None
        for _ in range(times):
            result = self.daemon.audit_once()
        return result

    def errors(self) -> dict[str, int]:
        return dict(self.daemon.state.errors)

    def log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def logged(self, msg: str) -> list[dict[str, Any]]:
        return [line for line in self.log() if line["msg"] == msg]


# --- netlink ----------------------------------------------------------------------------------


def test_a_working_dump_through_the_seam(proc: Path) -> None:
    h = Harness(proc, Netlink(GOOD))
    result = h.audit()
    assert result.namespaces[0].sockets == 1
    [finding] = [f for f in result.findings if f.kind == "idle_no_keepalive"]
    assert (finding.pid, finding.process) == (4242, "psql")
    assert h.errors() == {} and not [x for x in h.log() if x["level"] == "error"]


@pytest.mark.parametrize(
    ("fault", "message", "tries"),
    [
        (oserror(errno.EPERM), "cannot open a sock_diag netlink socket: Operation not permitted",
         1),
        ([oserror(errno.EPERM)], "sock_diag dump failed: Operation not permitted", 1),
        ([oserror(errno.ENOBUFS)], "sock_diag dump failed: No buffer space available", 2),
        ([InterruptedError(errno.EINTR, "Interrupted system call")],
         "sock_diag dump failed: Interrupted system call", 2),
        ([nlmsg(NLMSG_ERROR, (-errno.EACCES).to_bytes(4, "little", signed=True) + bytes(16))],
         "sock_diag dump failed: Permission denied (errno 13)", 1),
    ],
    ids=["EPERM-socket", "EPERM-recv", "ENOBUFS", "EINTR", "NLMSG_ERROR"],
)  # fmt: skip
def test_netlink_errors_are_counted_logged_once_and_recovered(
    proc: Path, fault: list[Step] | OSError, message: str, tries: int
) -> None:
    netlink = Netlink(fault)
    h = Harness(proc, netlink)
    assert h.audit(times=3) is None
    assert h.errors() == {"dump": 3}
    failed = h.logged("audit failed")
    assert [(x["stage"], x["error"]) for x in failed] == [("dump", message)]
    assert netlink.opened == 3 * tries  # ENOBUFS and EINTR are worth a second try per audit

    netlink.scripts, netlink.opened = [GOOD], 0
    assert h.audit() is not None
    assert [x["stage"] for x in h.logged("audit recovered")] == ["dump"]
    assert h.errors() == {"dump": 3}


@pytest.mark.parametrize("fault", [oserror(errno.ENOBUFS), InterruptedError(errno.EINTR, "")])
def test_a_transient_error_once_is_retried_silently(proc: Path, fault: OSError) -> None:
    h = Harness(proc, Netlink([fault], GOOD))
    result = h.audit()
    assert result is not None and result.namespaces[0].sockets == 1
    assert h.errors() == {} and h.log()[-1]["level"] != "error"


def test_a_dump_cut_short_is_used_counted_and_logged_once(proc: Path) -> None:
    # The kernel sends the first datagram (one socket, no NLMSG_DONE), then nothing.
    netlink = Netlink([IDLE])
    h = Harness(proc, netlink)
    result = h.audit(times=3)
    assert result.namespaces[0].sockets == 1  # what came is audited
    assert result.namespaces[0].dump_interrupted
    assert h.errors() == {"dump": 3}
    [line] = h.logged("audit incomplete")
    assert line["stage"] == "dump" and "cut short" in line["error"]
    netlink.scripts = [GOOD]
    h.audit()
    assert [x["stage"] for x in h.logged("audit recovered")] == ["dump"]


def test_a_kernel_that_stops_answering_is_a_timeout_not_a_hang(proc: Path) -> None:
    """The real netlink socket waits RECV_TIMEOUT for each datagram; here a socket whose
    peer never answers stands in for it, with a short timeout."""
    assert sockdiag.netlink_socket().gettimeout() == sockdiag.RECV_TIMEOUT
    peers: list[socket.socket] = []

    def silent() -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        peers.extend((ours, theirs))
        ours.settimeout(0.05)
        return ours

    try:
        h = Harness(proc, silent)  # type: ignore[arg-type]
        assert h.audit(times=2) is None
        assert h.errors() == {"dump": 2}
        [line] = h.logged("audit failed")
        assert line["error"] == "sock_diag dump failed: no reply from the kernel in 0.05 s"
    finally:
        for peer in peers:
            peer.close()


# --- /proc ---------------------------------------------------------------------------------------


def test_proc_unreadable_audits_what_it_can(tmp_path: Path) -> None:
    h = Harness(tmp_path / "no-proc", Netlink(GOOD))
    result = h.audit(times=2)
    ns = result.namespaces[0]
    assert ns.sockets == 1 and ns.sysctls.values == {}
    assert ns.counters.keepalive_probes is None
    assert any(f.kind == "idle_no_keepalive" and f.pid is None for f in result.findings)
    assert h.errors() == {"sysctls": 2, "counters": 2, "attribution": 2}
    incomplete = {x["stage"]: x["error"] for x in h.logged("audit incomplete")}
    assert len(h.logged("audit incomplete")) == 3  # once per stage, not once per audit
    assert incomplete["sysctls"] == "netns host: no TCP sysctl readable under /proc/sys/net"
    assert incomplete["attribution"].startswith("process attribution failed: cannot list ")


def test_the_cli_notes_what_it_could_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = LocalKernel(proc_root=str(tmp_path / "no-proc"), netlink=Netlink(GOOD))
    argv = ["audit", "--format", "json", "--fail-on", "never"]
    assert cli.main(argv, sources=lambda _: [("host", kernel)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["namespaces"][0]["sockets"]["total"] == 1
    notes = err.splitlines()
    assert notes[0] == (
        "keepalive-auditd: note: netns host: no TCP sysctl readable under /proc/sys/net"
    )
    assert len(notes) == 3 and all(n.startswith("keepalive-auditd: note: ") for n in notes)


def test_a_process_gone_mid_scan(proc: Path) -> None:
    """/proc listed three processes; one is gone before its fd table is read, one exits
    between its fds and its name. The scan goes on and finds the third."""
    make_process(proc, 100, "gone", {3: "socket:[1]"})
    make_process(proc, 200, "exiting", {3: "socket:[2]"})
    (proc / "200" / "comm").unlink()  # process_info finds it gone
    make_process(proc, 300, "stays", {3: "socket:[3]", 4: "pipe:[9]"})
    calls = 0

    def clock() -> float:
        nonlocal calls
        calls += 1
        if calls == 1:  # after /proc was listed, before pid 100 is looked at
            shutil.rmtree(proc / "100")
        return 0.0

    scan = procs.find_owners([1, 2, 3], str(proc), deadline=1.0, clock=clock)
    assert set(scan.found) == {3} and scan.found[3].name == "stays"
    assert scan.complete and scan.denied == 0 and scan.error is None


def test_deadline_inside_a_big_fd_table(proc: Path) -> None:
    """A process holding thousands of fds is read 1024 at a time between looks at the clock:
    out of time inside it, the scan stops there, is incomplete, and the next one starts with
    that process again."""
    make_process(proc, 100, "small", {3: "socket:[1]"})
    make_process(proc, 200, "big", {fd: f"socket:[{1000 + fd}]" for fd in range(3, 3003)})
    make_process(proc, 300, "after", {3: "socket:[3]"})
    times = iter([0.0, 0.0, 2.0])  # before 100, before 200, after its first 1024 fds

    cache = procs.OwnerCache()
    scan = procs.find_owners([1, 3500, 3], str(proc), deadline=1.0,
                             clock=lambda: next(times, 2.0), cache=cache)  # fmt: skip
    assert set(scan.found) == {1} and not scan.complete
    assert cache.resume_after == 199
    scan = procs.find_owners([1, 3500, 3], str(proc), deadline=None, cache=cache)
    assert {inode: info.name for inode, info in scan.found.items()} == {
        1: "small",
        3500: "big",
        3: "after",
    }
    assert scan.complete and scan.fds[3500] == 2500


# --- the rules file changing under a reload ------------------------------------------------------

RULES = "version: 1\nrules:\n" + "".join(
    f"  - name: {{name}}{i}\n    match: {{{{remote_ports: [{i + 1}]}}}}\n" for i in range(40)
)


def test_config_deleted_before_a_reload(proc: Path, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES.format(name="a"))
    h = Harness(proc, Netlink(GOOD), str(path))
    path.unlink()
    assert not h.daemon.reload()
    assert h.daemon.state.rules.rules[0].name == "a0"  # the old rules stay
    assert not h.daemon.state.reload_ok and h.errors() == {"config": 1}
    [line] = h.logged("reload failed, keeping the previous rules")
    assert line["error"] == f"{path}: cannot read: No such file or directory"
    path.write_text(RULES.format(name="b"))
    assert h.daemon.reload() and h.daemon.state.rules.rules[0].name == "b0"


def test_config_replaced_while_reloading(proc: Path, tmp_path: Path) -> None:
    """A writer rewrites the file in place (truncate, then write in pieces) while the daemon
    reloads: each reload gets all of one version, or fails and keeps the previous rules;
    never the empty file (built-in defaults) or the rules cut short that it passes through."""
    path = tmp_path / "rules.yaml"
    versions = [RULES.format(name=n) for n in "ab"]
    path.write_text(versions[0])
    h = Harness(proc, Netlink(GOOD), str(path))
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            text = versions[i % 2]
            with open(path, "w") as f:  # truncate, then write in pieces, slowly
                for at in range(0, len(text), 97):
                    f.write(text[at : at + 97])
                    f.flush()
                    time.sleep(0.001)
            i += 1
            stop.wait(0.15)

    thread = threading.Thread(target=writer)
    thread.start()
    outcomes = []
    try:
        for _ in range(30):
            outcomes.append(h.daemon.reload())
            names = [r.name for r in h.daemon.state.rules.rules]
            assert names in ([f"a{i}" for i in range(40)], [f"b{i}" for i in range(40)]), names
    finally:
        stop.set()
        thread.join()
    assert h.errors().get("config", 0) == outcomes.count(False)
    assert len(h.logged("reload failed, keeping the previous rules")) == outcomes.count(False)
    assert outcomes.count(True) > 0


# --- a real agent -------------------------------------------------------------------------


@pytest.fixture
def agents(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Agents]:
    yield from agents_fixture(request, tmp_path)


def idle_connection() -> list[socket.socket]:
    """A loopback connection that stays idle without keepalive, and its listener."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    return [listener, client, listener.accept()[0]]


def lines(agent: Any, msg: str) -> list[dict[str, Any]]:
    return [line for line in agent.log() if line["msg"] == msg]


def test_metrics_port_taken_keeps_auditing_and_retries(agents: Agents, tmp_path: Path) -> None:
    port = 9977 if agents.netns is not None else None
    config = tmp_path / "short.yaml"
    config.write_text("version: 1\ndefaults:\n  idle_timeout: 1s\n  detection_budget: 1d\n")

    def call(fn: Callable[[], Any]) -> Any:
        return fn() if agents.netns is None else agents.netns.call(fn)

    blocker = call(lambda: socket.create_server(("127.0.0.1", port or 0)))
    port = blocker.getsockname()[1]
    agent = agents.start(config=config, port=port, wait=False)
    try:
        wait_for("the bind failure", lambda: lines(agent, "cannot serve metrics"))
        # The audits go on without an endpoint: an idle connection becomes a finding.
        pair = call(idle_connection)
        opened = lambda: [x for x in agent.log() if x["msg"].startswith("finding: idle")]  # noqa: E731
        wait_for("a finding while not listening", opened)
        time.sleep(2.5)  # two more bind attempts (every --audit.interval: 1 s)
        agent.assert_running()
        [failed] = lines(agent, "cannot serve metrics")
        assert failed["stage"] == "http" and "Address already in use" in failed["error"]
    finally:
        blocker.close()
    wait_for("the agent to listen", lambda: lines(agent, "listening"), timeout=10)
    scrape = agent.wait_audit(time.time())
    assert scrape.errors("http") >= 3
    assert scrape.total("keepalive_findings", kind="idle_no_keepalive") >= 2
    assert not [x for x in agent.log() if x["level"] == "error" and x["stage"] != "http"]
    for end in pair:
        end.close()


def test_logs_to_a_full_disk(agents: Agents) -> None:
    with open("/dev/full", "wb") as full:
        agent = agents.start(stderr=full)
    scrape = agent.wait_audit(time.time())
    assert scrape.errors("log") >= 2  # "rules loaded" and "listening" were dropped, at least
    agent.proc.send_signal(signal.SIGHUP)  # one more line that cannot be written
    before = scrape.errors("log")
    wait_for(
        "the dropped line to count", lambda: agent.wait_audit(time.time()).errors("log") > before
    )
    assert agent.stop() == 0


def test_a_storm_of_signals(agents: Agents) -> None:
    """SIGHUPs every 10 ms interrupt every system call the agent makes (EINTR, retried by
    Python per PEP 475) and queue reloads; it stays up, audits and serves."""
    agent = agents.start()
    for _ in range(100):
        agent.proc.send_signal(signal.SIGHUP)
        time.sleep(0.01)
    scrape = agent.wait_audit(time.time())
    assert scrape.errors("config") == 0 and scrape.errors("internal") == 0
    assert lines(agent, "rules reloaded")
    assert not [x for x in agent.log() if x["level"] == "error"]
    assert agent.stop() == 0
