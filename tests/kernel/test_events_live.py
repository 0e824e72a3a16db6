"""The rows of issue 13's table, staged in network namespaces, seen by the agent and ``watch``.

Each test builds a client namespace A and a server namespace B and runs one agent (``run``)
and one ``watch --format json`` inside A, so their audits see the test's connections only
(another run's 200k sockets elsewhere on the machine cannot push the test's finding out of
``--audit.max-findings``); A is the namespace they call ``host``. It waits until both have
flagged the client's connection, makes the kernel abort it, and asserts the reason, the
4-tuple, the namespace, the owner and ``predicted`` in the agent's log line and counter and in
watch's JSON line. Tracepoints are global (the agent in A still gets every namespace's
events): everything is looked up by the test's own client address and port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from agent import Agent, Agents, wait_for
from netlab import Lab, Netns

from auditd.errors import BpfUnavailable
from auditd.events import source_line
from auditd.kernel.bpf.iterators import OBJECT_DIR
from auditd.kernel.events import EventSource, open_event_source, probes
from auditd.kernel.events.bpfabort import BpfSource

pytestmark = pytest.mark.kernel

BPF_DIR = Path(OBJECT_DIR)
BPF_DATA = Path(__file__).parent.parent / "data" / "bpf"
PID = os.getpid()  # the owner of every client socket: made by this process
COMM = Path(f"/proc/{PID}/comm").read_text().strip()
RULES = {"version": 1, "defaults": {"idle_timeout": "2s", "warn_at": 0.5,
         "retransmit_threshold": 1, "detection_budget": "1d"}}  # fmt: skip


class Watch:
    """``keepalive-auditd watch --format json`` in ``ns``, its lines collected by a thread."""

    def __init__(self, ns: Netns, config: Path, source: str) -> None:
        argv = [sys.executable, "-m", "auditd", "watch", "--format", "json", "--source", source,
                "--interval", "1s", "--config", str(config)]  # fmt: skip
        self.proc = subprocess.Popen(
            ns.exec_argv(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream: IO[bytes], out: bool) -> None:
        for line in stream:
            if out:
                self.lines.append(json.loads(line))
            else:
                self.stderr.append(line.decode(errors="replace"))

    def abort(self, local: str) -> dict[str, Any] | None:
        return next((d for d in self.lines if d["local"] == local), None)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C: a quiet exit 0
        rc = self.proc.wait(10)
        assert rc == 0, (rc, self.stderr)
        assert not any("Traceback" in s for s in self.stderr), self.stderr


@dataclass
class Stage:
    a: Netns
    b: Netns
    agent: Agent
    watch: Watch
    source: str  # where the events come from: "bpf" or "perf"
    lost_base: float = 0.0  # agent_lost() before the abort
    watch_lost_base: int = 0  # watch_lost() before it


@pytest.fixture(params=["bpf", "perf"])
def stage(request: pytest.FixtureRequest, lab: Lab, tmp_path: Path) -> Iterator[Stage]:
    """Agent and watch with the events from ``request.param``: each says so once."""
    source = request.param
    config = tmp_path / "rules.yaml"
    config.write_text(yaml.safe_dump(RULES))
    a, b = lab.netns(), lab.netns()
    agents = Agents(tmp_path, a)
    watch = Watch(a, config, source)
    try:
        agent = agents.start("--log.findings-after", "0s", "--events.source", source,
                             config=config, interval="1s")  # fmt: skip
        wait_for("watch to start", lambda: any("watching" in s for s in watch.stderr), 30)
        said = [s for s in watch.stderr if "abort events from" in s]
        assert said == [f"keepalive-auditd: abort events from {source}\n"], watch.stderr
        wait_for("the agent's source line", lambda: [
            d for d in agent.log() if d["msg"].startswith("abort events from")], 10)  # fmt: skip
        lines = [d for d in agent.log() if d["msg"].startswith("abort events from")]
        assert [d["source"] for d in lines] == [source], lines
        assert agent.scrape().total("keepalive_events_source", source=source) == 1
        yield Stage(a, b, agent, watch, source)
        watch.close()
        assert agent.stop() == 0  # SIGTERM with the event thread running: a clean exit
        assert not [d for d in agent.log() if d["level"] == "error"], agent.log_text()
    finally:
        if watch.proc.poll() is None:
            watch.proc.kill()
        agents.close()


def endpoint(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def ends(client: socket.socket) -> tuple[str, str]:
    return endpoint(client.getsockname()), endpoint(client.getpeername())


def flagged(st: Stage, local: str, kind: str) -> None:
    """Until the agent logged the finding and watch has had an audit since."""

    def seen() -> bool:
        return any(
            d.get("local") == local and d.get("kind") == kind and "finding" in d["msg"]
            for d in st.agent.log()
        )

    wait_for(f"a {kind} finding for {local}", seen, 20)
    time.sleep(1.5)  # watch audits every second too


def agent_lost(st: Stage) -> float:
    """The events the agent counted lost."""
    return st.agent.scrape().total("keepalive_events_lost_total")


def watch_lost(st: Stage) -> int:
    """The "events lost" notes watch printed."""
    return sum("events lost in the kernel" in s for s in st.watch.stderr)


def aborted(st: Stage, local: str, timeout: float = 30) -> tuple[dict[str, Any], dict[str, Any]]:
    """The agent's line and watch's JSON of the abort. From perf, a timer-driven abort's
    events are now and then counted by the kernel and never delivered (perf.py); from either
    source a burst of aborts elsewhere on the machine can fill the buffer. Then the agent
    must have counted events lost and watch said so, and the row is an xfail; a loss that
    neither of them noticed fails it."""

    def logged() -> dict[str, Any] | None:
        return next((d for d in st.agent.log() if d.get("local") == local
                     and d["msg"].startswith("connection aborted")), None)  # fmt: skip

    base, watch_base = agent_lost(st), watch_lost(st)
    st.lost_base, st.watch_lost_base = base, watch_base
    seen = wait_for(f"the agent's abort line for {local} (or events lost)",
                    lambda: logged() or agent_lost(st) > base, timeout)  # fmt: skip
    if seen is True:
        time.sleep(2)  # the events lost may have been another connection's
    line = logged()
    doc = wait_for(f"watch's abort line for {local} (or events lost)",
                   lambda: st.watch.abort(local) or watch_lost(st) > watch_base, 5)  # fmt: skip
    if line is None or doc is True:
        time.sleep(0 if line is None else 2)
        doc = st.watch.abort(local)
    if line is None or doc is None:
        pytest.xfail(f"{st.source}: the abort's events were lost, and counted lost")
    return line, doc


@contextmanager
def judged(st: Stage) -> Iterator[None]:
    """The row's assertions on the abort's record. From perf, a record short of some of its
    events (retransmissions sampled on an idle CPU, perf.py) fails the row only where neither
    the agent nor watch counted a loss since the abort's wait began."""
    try:
        yield
    except AssertionError:
        if st.source != "perf":
            raise
        time.sleep(1.5)  # a loss is counted at the read after the one that missed it
        if agent_lost(st) > st.lost_base or watch_lost(st) > st.watch_lost_base:
            pytest.xfail("perf: events of the abort were lost, and counted lost")
        raise


def check(
    st: Stage, line: dict[str, Any], doc: dict[str, Any], ends: tuple[str, str], reason: str
) -> None:
    for got in (line, doc):
        assert got["reason"] == reason, got
        assert (got["local"], got["remote"]) == ends, got
        assert got["netns"] == "host", got  # A, where the agent and watch run
        assert got["pid"] == PID, got
        assert got["predicted"] is True, got
        assert got["reported_seconds_before"] > 0, got
        if st.source == "bpf":  # read from the socket itself
            assert got["cookie"] and got["settings"] == "kernel", got
    assert doc["process"] == line["process_name"] == COMM


def settings(st: Stage) -> str:
    """Where the settings of an aborted socket come from: the kernel (BPF), else its fd."""
    return "kernel" if st.source == "bpf" else "socket"


def counted(st: Stage, reason: str) -> float:
    return st.agent.scrape().total(
        "keepalive_connection_aborts_total", netns="host", reason=reason, predicted="true"
    )


def connect(lab: Lab, st: Stage, **opts: int) -> socket.socket:
    client, _ = lab.connect(lab.cable(st.a, st.b), **opts)
    return client


def in_flight(client: socket.socket) -> None:
    client.setblocking(False)
    client.send(b"x" * 1000)


def test_keepalive_timeout(lab: Lab, stage: Stage) -> None:
    client = connect(lab, stage, SO_KEEPALIVE=1, TCP_KEEPIDLE=2, TCP_KEEPINTVL=1, TCP_KEEPCNT=4)
    where = ends(client)  # getpeername fails once it is aborted
    stage.b.pull_cable()
    flagged(stage, where[0], "keepalive_probing")
    line, doc = aborted(stage, where[0])
    with judged(stage):
        check(stage, line, doc, where, "keepalive_timeout")
        assert doc["probes"] == 4 and doc["settings"] == settings(stage) and doc["keepidle"] == 2
        assert (doc["keepintvl"], doc["keepcnt"], doc["keepalive"]) == (1, 4, True)
        assert doc["retransmits"] == 0 and doc["errno"] == 110
        assert counted(stage, "keepalive_timeout") == 1


def test_retransmit_timeout(lab: Lab, stage: Stage) -> None:
    stage.a.set_sysctl("net.ipv4.tcp_retries2", 3)
    client = connect(lab, stage)
    where = ends(client)  # getpeername fails once it is aborted
    stage.b.pull_cable()
    in_flight(client)
    flagged(stage, where[0], "retransmitting")
    line, doc = aborted(stage, where[0])
    with judged(stage):
        check(stage, line, doc, where, "retransmit_timeout")
        # BPF reads the socket's total_retrans (3 or more here); perf counts the
        # tcp_retransmit_skb events of the 4-tuple; the kernel's bound at tcp_retries2 3 is a
        # time (3.0 s from the first retransmission), and it has ended a train after 2 traced
        # ones with no event lost (the timeouts' rounding is the likely cause, not proven)
        assert doc["retransmits"] >= (3 if stage.source == "bpf" else 2)
        assert doc["user_timeout_ms"] == 0
        assert counted(stage, "retransmit_timeout") == 1


def test_user_timeout(lab: Lab, stage: Stage) -> None:
    client = connect(lab, stage, TCP_USER_TIMEOUT=6000)
    where = ends(client)  # getpeername fails once it is aborted
    stage.b.pull_cable()
    in_flight(client)
    flagged(stage, where[0], "retransmitting")
    line, doc = aborted(stage, where[0])
    with judged(stage):
        check(stage, line, doc, where, "user_timeout")
        assert doc["user_timeout_ms"] == 6000 and doc["settings"] == settings(stage)
        assert counted(stage, "user_timeout") == 1


def reboot(lab: Lab, st: Stage, a_ip: str, b_ip: str) -> None:
    """The peer "reboots": its namespace goes with its sockets (their RSTs dropped, as a host
    that loses power sends none), a new one takes its address."""
    st.b.pull_cable()
    assert not st.b.close(), "old peer namespace not removed"
    lab.namespaces.remove(st.b)
    new = lab.netns()
    st.a.run(["ip", "link", "add", "vethra", "type", "veth", "peer", "name", "vethrb",
              "netns", new.name])  # fmt: skip
    for ns, ifname, ip in ((st.a, "vethra", a_ip), (new, "vethrb", b_ip)):
        ns.run(["ip", "addr", "add", f"{ip}/30", "dev", ifname])
        ns.run(["ip", "link", "set", ifname, "up"])


def test_peer_reboot_resets(lab: Lab, stage: Stage) -> None:
    cable = lab.cable(stage.a, stage.b)
    client, _ = lab.connect(cable)
    where = ends(client)
    flagged(stage, where[0], "idle_no_keepalive")
    reboot(lab, stage, cable.a_ip, cable.b_ip)
    client.send(b"hello")  # the new peer knows no such connection: RST
    line, doc = aborted(stage, where[0])
    with judged(stage):
        check(stage, line, doc, where, "peer_reset")
        assert doc["cookie"] and doc["errno"] == 104
        assert counted(stage, "peer_reset") == 1


def test_every_sample_the_kernel_counted_arrives_or_is_counted_lost(lab: Lab) -> None:
    """What the perf rings give plus what the source counts lost is what the kernel counted
    (issue 13's defect: samples counted, never written, no PERF_RECORD_LOST). Eight
    keepalive aborts and four retransmission trains; the events are disabled before the
    last reads, so the counts stop where the samples do, whatever else the machine does."""
    source = open_event_source(source="perf")
    assert isinstance(source, EventSource)
    try:
        a, b = lab.netns(), lab.netns()
        cable = lab.cable(a, b)
        clients = [lab.connect(cable, SO_KEEPALIVE=1, TCP_KEEPIDLE=1, TCP_KEEPINTVL=1,
                               TCP_KEEPCNT=2)[0] for _ in range(8)]  # fmt: skip
        clients += [lab.connect(cable, TCP_USER_TIMEOUT=3000)[0] for _ in range(4)]
        b.pull_cable()
        for client in clients[8:]:
            in_flight(client)
        got, lost = 0, 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(map(probing, clients)):
            batch = source.read(0.2)
            got, lost = got + len(batch.events), lost + batch.lost
        assert not any(map(probing, clients)), "the connections were not aborted"
        source.perf.disable()
        for _ in range(2):  # the second read holds the counts of the first to the samples
            batch = source.read(0.05)
            got, lost = got + len(batch.events), lost + batch.lost
        counts = source.perf.counts()
        assert sum(counts[: len(counts) // len(probes(source.decoder.formats))]) >= 8
        assert got + lost == sum(counts), (got, lost, counts)
    finally:
        source.close()


def probing(client: socket.socket) -> bool:
    """Still connected: the kernel has not aborted it yet."""
    try:
        client.getpeername()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def refused_abort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An abort program the verifier refuses, built as the shipped ones are."""
    out = tmp_path_factory.mktemp("bpf") / "refused_abort.bpf.o"
    argv = ["clang", "-target", "bpf", "-O2", "-g", f"-I{BPF_DIR}", "-c"]
    subprocess.run([*argv, str(BPF_DATA / "refused_abort.bpf.c"), "-o", str(out)], check=True)
    return out


def test_a_refused_program_falls_back_to_perf(refused_abort: Path) -> None:
    """The verifier's refusal is the note of the perf source that takes over; asked for
    BPF only, it is the error."""
    source = open_event_source(bpf=lambda: BpfSource(str(refused_abort)))
    try:
        assert source.name == "perf" and isinstance(source, EventSource)
        assert source.note is not None
        assert source.note.startswith("BPF: loading refused_abort.bpf.o: "), source.note
        assert "invalid bpf_context access" in source.note, source.note
        assert source_line(source).startswith("abort events from perf (BPF: loading ")
    finally:
        source.close()
    with pytest.raises(BpfUnavailable, match=r"refused_abort\.bpf\.o"):
        open_event_source(source="bpf", bpf=lambda: BpfSource(str(refused_abort)))


def test_normal_close_is_no_abort(lab: Lab, stage: Stage) -> None:
    client, server = lab.connect(lab.cable(stage.a, stage.b))
    local = ends(client)[0]
    flagged(stage, local, "idle_no_keepalive")
    client.shutdown(socket.SHUT_WR)
    server.recv(10)
    server.close()
    client.recv(10)
    client.close()
    time.sleep(2)  # what an abort would have needed to show up (they come within 0.2 s)
    assert stage.watch.abort(local) is None
    assert not [d for d in stage.agent.log() if d.get("local") == local
                and d["msg"].startswith("connection aborted")]  # fmt: skip
    assert stage.agent.scrape().total("keepalive_connection_aborts_total", netns="host") == 0
