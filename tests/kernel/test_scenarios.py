"""The "Peer failures" of shared/KERNEL.md, staged in network namespaces, audited by the real CLI.

Topology: the client socket lives in namespace A (made by this process from a setns'd
thread), the server in B, a veth between them. "Pulling the cable" is a DROP-everything
firewall in B, so A's link stays up and A's kernel sees a silent peer. Timers are seconds:
A's sysctls are set before connecting (a running keepalive timer is not re-armed by a sysctl
change). Each test runs ``python -m auditd audit --format json`` inside A and asserts on its
JSON; polling with a deadline stands in for fixed sleeps.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from netlab import AuditRun, Lab, Netns

from auditd.kernel import procfs

pytestmark = pytest.mark.kernel

COMM = Path(f"/proc/{os.getpid()}/comm").read_text().strip()  # what /proc attribution finds


def rules_file(tmp_path: Path, defaults: dict[str, Any], **extra: Any) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "defaults": defaults, **extra}))
    return path


def endpoint(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def poll(
    ns: Netns, config: Path, until: Callable[[AuditRun], bool], timeout: float, *args: str
) -> AuditRun:
    """Run the CLI in ``ns`` until ``until(run)`` holds; fail with the last output if never."""
    deadline = time.monotonic() + timeout
    while True:
        run = ns.audit(config, *args)
        assert run.doc is not None, f"CLI exit {run.rc}, stderr: {run.stderr}"
        if until(run):
            return run
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s; last findings: {run.findings()}")
        time.sleep(0.1)


def socket_findings(run: AuditRun) -> list[dict[str, Any]]:
    return [f for f in run.findings() if f["local"] is not None]


def wait_for_error(sock: socket.socket, timeout: float) -> tuple[int | None, float]:
    """Block in recv until the kernel kills the connection: (errno, monotonic time)."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1)
    except OSError as exc:  # ETIMEDOUT is a TimeoutError too; Python's own timeout has no errno
        if exc.errno is None:
            pytest.fail(f"the connection was still alive after {timeout} s")
        return exc.errno, time.monotonic()
    pytest.fail(f"recv returned {data!r} instead of an error")


def test_cable_pulled_idle_without_keepalive(lab: Lab, tmp_path: Path) -> None:
    a, b = lab.netns(), lab.netns()
    config = rules_file(tmp_path, {"idle_timeout": "2s", "warn_at": 0.5})
    client, _server = lab.connect(lab.cable(a, b))
    connected = time.monotonic()
    b.pull_cable()
    local, remote = endpoint(client.getsockname()), endpoint(client.getpeername())

    # Half way there (warn_at 0.5 of 2 s): a warning, with the idle time the kernel measured.
    time.sleep(max(0.0, connected + 1.2 - time.monotonic()))
    started = time.monotonic()
    early = a.audit(config)
    ended = time.monotonic()
    [f] = socket_findings(early)
    assert (f["kind"], f["local"], f["remote"]) == ("idle_no_keepalive", local, remote)
    assert started - connected - 0.05 <= f["idle_seconds"] <= ended - connected + 0.05
    assert f["severity"] == ("warning" if f["idle_seconds"] < 2 else "critical")

    # Past the 2 s idle timeout: critical, and still exactly this one connection.
    def critical(run: AuditRun) -> bool:
        return any(f["severity"] == "critical" for f in run.findings("idle_no_keepalive", local))

    run = poll(a, config, critical, 5)
    [f] = socket_findings(run)
    assert f["kind"] == "idle_no_keepalive"
    assert f["severity"] == "critical"
    assert (f["local"], f["remote"]) == (local, remote)
    assert (f["state"], f["keepalive"]) == ("established", "off")
    assert (f["probes"], f["retransmits"], f["abort_in_seconds"]) == (0, 0, None)
    assert f["idle_seconds"] >= 2
    assert (f["pid"], f["process"]) == (os.getpid(), COMM)
    assert f["inode"] == os.fstat(client.fileno()).st_ino
    assert run.rc == 1  # --fail-on critical is the default


def test_cable_pulled_with_keepalive_probes_then_aborts(lab: Lab, tmp_path: Path) -> None:
    a, b = lab.netns(), lab.netns()
    # Before connecting: the timer is armed from these at connect time (7200 s otherwise).
    for name, value in (("time", 1), ("intvl", 1), ("probes", 3)):
        a.set_sysctl(f"net.ipv4.tcp_keepalive_{name}", value)
    config = rules_file(tmp_path, {"idle_timeout": "2s", "warn_at": 0.5})
    client, _server = lab.connect(lab.cable(a, b), SO_KEEPALIVE=1)
    connected = time.monotonic()
    b.pull_cable()
    local = endpoint(client.getsockname())

    # Probes at 1, 2, 3 s after the last ACK, abort at 4 s (keepidle + probes * intvl).
    def probing(run: AuditRun) -> bool:
        return bool(run.findings("keepalive_probing", local))

    run = poll(a, config, probing, 3.5)
    seen = time.monotonic()
    [f] = socket_findings(run)
    assert f["kind"] == "keepalive_probing"
    assert (f["state"], f["keepalive"], f["remote"]) == (
        "established",
        "on",
        endpoint(client.getpeername()),
    )
    assert 1 <= f["probes"] <= 3
    assert f["severity"] == ("warning" if f["probes"] == 1 else "critical")
    assert f["abort_in_seconds"] is not None
    assert 0 <= f["abort_in_seconds"] <= 4
    predicted = seen + f["abort_in_seconds"]

    err, died = wait_for_error(client, 8)
    assert err == errno.ETIMEDOUT
    assert 3.5 <= died - connected <= 6  # 4 s after the last ACK received
    assert abs(died - predicted) <= 1.5, (died - connected, predicted - connected)

    after = a.audit(config)
    assert not after.findings(local=local)
    assert after.doc is not None
    ns = after.doc["namespaces"][0]
    assert ns["sockets"]["total"] == 0  # an aborted socket is CLOSE, outside the dump
    assert ns["counters"]["keepalive_probes"] >= 3
    assert ns["counters"]["abort_on_timeout"] == 1


def test_cable_pulled_with_data_in_flight_retransmits(lab: Lab, tmp_path: Path) -> None:
    a, b = lab.netns(), lab.netns()
    a.set_sysctl("net.ipv4.tcp_retries2", 5)  # tcp_model_timeout: 12.6 s
    config = rules_file(tmp_path, {"idle_timeout": "2s", "retransmit_threshold": 3})
    client, _server = lab.connect(lab.cable(a, b))
    b.pull_cable()
    local = endpoint(client.getsockname())
    sent = time.monotonic()
    client.sendall(b"x" * 100)

    # RTO ~0.2 s doubling: the third retransmission leaves about 1.4 s after the send.
    def retransmitting(run: AuditRun) -> bool:
        return any(f["retransmits"] >= 3 for f in run.findings("retransmitting", local))

    run = poll(a, config, retransmitting, 6)
    seen = time.monotonic()
    [f] = socket_findings(run)
    assert f["kind"] == "retransmitting"
    assert (f["state"], f["remote"]) == ("established", endpoint(client.getpeername()))
    assert f["keepalive"] == "unknown"  # the retransmit timer hides the keepalive timer
    assert f["severity"] == ("critical" if f["retransmits"] >= 6 else "warning")
    assert f["abort_in_seconds"] is not None
    assert 0 < f["abort_in_seconds"] <= 12.6
    predicted = seen + f["abort_in_seconds"]

    err, died = wait_for_error(client, 30)
    assert err == errno.ETIMEDOUT  # not EHOSTUNREACH: B's link and ARP still answer
    # The model is a lower bound; the check runs when an RTO fires (the next one is ~25 s).
    assert 12.6 <= died - sent <= 26
    assert abs(died - predicted) <= 2.5, (died - sent, predicted - sent)


SERVER = """
import socket, sys, time
listener = socket.create_server((sys.argv[1], 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
print("accepted", flush=True)
time.sleep(600)
"""


def readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from the server within {timeout} s"
    return proc.stdout.readline().strip()


def test_peer_process_killed_leaves_close_wait(lab: Lab, tmp_path: Path) -> None:
    a, b = lab.netns(), lab.netns()
    cable = lab.cable(a, b)
    config = rules_file(tmp_path, {"idle_timeout": "1h", "close_wait_after": "1s"})
    server = b.spawn([sys.executable, "-c", SERVER, cable.b_ip])
    port = int(readline(server, 10))
    client = a.make_socket()
    client.settimeout(10)
    client.connect((cable.b_ip, port))
    assert readline(server, 10) == "accepted"
    local, remote = endpoint(client.getsockname()), endpoint(client.getpeername())

    server.kill()  # SIGKILL, nothing unread: the kernel closes with FIN, not RST
    assert server.wait(10) == -9
    assert client.recv(1) == b""  # the FIN arrived; the client never closes its side

    def close_wait(run: AuditRun) -> bool:
        return bool(run.findings("close_wait", local))

    run = poll(a, config, close_wait, 6)
    [f] = socket_findings(run)
    assert f["kind"] == "close_wait"
    assert (f["state"], f["local"], f["remote"]) == ("close_wait", local, remote)
    assert f["severity"] == "warning"
    assert (f["pid"], f["process"]) == (os.getpid(), COMM)
    assert f["inode"] == os.fstat(client.fileno()).st_ino
    assert f["keepalive"] == "off"
    assert run.doc is not None
    assert run.doc["namespaces"][0]["sockets"]["by_state"] == {"close_wait": 1}


def test_namespace_sysctls_differ_from_host(lab: Lab, tmp_path: Path) -> None:
    host = procfs.read_sysctls().values  # this thread's namespace, not the lab's
    retries2 = 3 if host.get("net.ipv4.tcp_retries2") != 3 else 4
    ns = lab.netns()
    # A fresh namespace starts at the compiled defaults (7200/75/9/15), whatever the host has.
    assert ns.sysctl("net.ipv4.tcp_keepalive_intvl") == 75
    assert ns.sysctl("net.ipv4.tcp_keepalive_probes") == 9
    changed = {"net.ipv4.tcp_retries2": retries2, "net.ipv4.tcp_keepalive_time": 7200}
    for name, value in changed.items():
        ns.set_sysctl(name, value)
    config = rules_file(
        tmp_path,
        {"detection_budget": "15m"},
        sysctls={
            "net.ipv4.tcp_keepalive_time": {"max": 300},
            "net.ipv4.tcp_retries2": {"min": 8},
        },
    )

    run = ns.audit(config, "--fail-on", "warning")
    assert run.rc == 1, run.stderr
    bounds = {f["sysctl"]: f for f in run.findings("sysctl")}
    assert set(bounds) == set(changed)
    tk, r2 = bounds["net.ipv4.tcp_keepalive_time"], bounds["net.ipv4.tcp_retries2"]
    assert (tk["value"], tk["expected"], tk["severity"]) == (7200, "<= 300", "warning")
    assert (r2["value"], r2["expected"], r2["severity"]) == (retries2, ">= 8", "warning")
    # Idle: 7200 + 9 * 75 = 7875 s over 900 s. In flight: retries2 3 or 4 is 3 or 6.2 s, within.
    [budget] = run.findings("detection_budget")
    assert (budget["value"], budget["expected"]) == (7875, "<= 900")
    assert budget["severity"] == "warning"

    assert run.doc is not None
    [report] = run.doc["namespaces"]
    assert report["inode"] == os.stat(ns.path).st_ino
    assert report["detection"]["idle_seconds"] == 7875
    sysctls = report["sysctls"]
    for name, value in changed.items():
        assert sysctls[name] == value
    assert sysctls["net.ipv4.tcp_retries2"] != host["net.ipv4.tcp_retries2"]
    assert (sysctls["net.ipv4.tcp_keepalive_intvl"], sysctls["net.ipv4.tcp_keepalive_probes"]) == (
        75,
        9,
    )

    assert ns.audit(config, "--fail-on", "never").rc == 0
    assert ns.audit(config, "--fail-on", "critical").rc == 0  # nothing critical here
