"""Owners: pid, name, command line, systemd unit and container of a socket, and the hint of a
recognised application, on fake /proc trees and on the real kernel."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import netlab
import pytest
from helpers import FakeKernel, fake_process, make_sock, ruleset

from auditd import report
from auditd.audit import hints
from auditd.audit.run import audit
from auditd.config import Thresholds
from auditd.kernel.owners.scan import CMDLINE_MAX, OwnerCache, find_owners, unit_and_container
from auditd.model import ProcessInfo

DOCKER_ID = "3f2a" + "0" * 56 + "beef"
CRI_ID = "ab12" * 16


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        ("0::/system.slice/nginx.service\n", ("nginx.service", None)),
        # a user's service inside user@.service: the innermost unit
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/redis.service\n",
         ("redis.service", None)),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", ("session-3.scope", None)),
        # docker with the systemd cgroup driver: the scope is the unit and names the container
        (f"0::/system.slice/docker-{DOCKER_ID}.scope\n", (f"docker-{DOCKER_ID}.scope",
                                                         DOCKER_ID[:12])),
        # docker with cgroupfs: no unit
        (f"0::/docker/{DOCKER_ID}\n", (None, DOCKER_ID[:12])),
        # a Kubernetes pod's container (containerd, systemd driver)
        ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234abcd_5678_"
         f"9abc_def0_123456789abc.slice/cri-containerd-{CRI_ID}.scope\n",
         (f"cri-containerd-{CRI_ID}.scope", CRI_ID[:12])),
        # cgroup v1 only: the name=systemd hierarchy tells the unit
        ("12:memory:/system.slice/sshd.service\n1:name=systemd:/system.slice/sshd.service\n",
         ("sshd.service", None)),
        ("0::/\n", (None, None)),
        ("0::/init.scope\n", ("init.scope", None)),
        ("", (None, None)),
        ("garbage\n", (None, None)),
    ],
)  # fmt: skip
def test_unit_and_container(cgroup: str, expected: tuple[str | None, str | None]) -> None:
    assert unit_and_container(cgroup) == expected


def fake_proc(root: Path, pid: int, comm: str, cmdline: bytes, cgroup: str,
              fds: dict[int, str]) -> None:  # fmt: skip
    fake_process(root, pid, fds, comm, cmdline, cgroup)


def test_owner_with_cmdline_unit_container_and_fd(tmp_path: Path) -> None:
    long_arg = b"x" * 300
    fake_proc(tmp_path, 41, "redis-server", b"redis-server\0*:6379\0" + long_arg + b"\0",
              f"0::/system.slice/docker-{DOCKER_ID}.scope\n",
              {3: "/dev/null", 7: "socket:[9001]", 9: "socket:[9002]"})  # fmt: skip
    fake_proc(tmp_path, 42, "nginx", b"nginx: worker process\0", "0::/system.slice/nginx.service\n",
              {5: "socket:[9003]"})  # fmt: skip
    scan = find_owners([9001, 9003, 9999], str(tmp_path))
    assert scan.complete and set(scan.found) == {9001, 9003}
    redis, nginx = scan.found[9001], scan.found[9003]
    assert (redis.pid, redis.name, redis.container) == (41, "redis-server", DOCKER_ID[:12])
    assert redis.unit == f"docker-{DOCKER_ID}.scope"
    assert redis.cmdline.startswith("redis-server *:6379 xxx") and len(redis.cmdline) == CMDLINE_MAX
    assert redis.cmdline.endswith("...")
    assert (nginx.unit, nginx.container, nginx.cmdline) == ("nginx.service", None,
                                                           "nginx: worker process")  # fmt: skip
    assert scan.fds == {9001: 7, 9003: 5}  # the fd numbers socket inspection duplicates


def test_cached_owner_keeps_its_fd_and_rereads_the_process(tmp_path: Path) -> None:
    fake_proc(tmp_path, 41, "app", b"app\0", "0::/system.slice/app.service\n",
              {7: "socket:[9001]"})  # fmt: skip
    cache = OwnerCache()
    assert find_owners([9001], str(tmp_path), cache=cache).fds == {9001: 7}
    (tmp_path / "41" / "cgroup").write_text("0::/system.slice/app2.service\n")  # moved
    again = find_owners([9001], str(tmp_path), cache=cache)
    assert again.fds == {9001: 7} and again.found[9001].unit == "app2.service"


def test_process_without_cgroup_file(tmp_path: Path) -> None:
    fake_proc(tmp_path, 41, "app", b"app\0", "", {7: "socket:[9001]"})
    (tmp_path / "41" / "cgroup").unlink()
    owner = find_owners([9001], str(tmp_path)).found[9001]
    assert (owner.unit, owner.container) == (None, None)


def test_findings_and_json_name_the_owner() -> None:
    owner = ProcessInfo(4102, "redis-server", "redis-server *:6379", "redis.service",
                        DOCKER_ID[:12], uid=999, user="redis",
                        started_at=1_700_000_000.25)  # fmt: skip
    kernel = FakeKernel([make_sock(inode=102, idle_s=1000, dport=40000)], owners={102: owner})
    result = audit(ruleset(), [("host", kernel)])
    (finding,) = [f for f in result.findings if f.inode == 102]
    assert (finding.pid, finding.process, finding.cmdline, finding.unit, finding.container) == (
        4102, "redis-server", "redis-server *:6379", "redis.service", DOCKER_ID[:12],
    )  # fmt: skip
    doc = json.loads(report.to_json(result))
    (f,) = [f for f in doc["findings"] if f["inode"] == 102]
    assert (f["cmdline"], f["unit"], f["container"]) == ("redis-server *:6379", "redis.service",
                                                         DOCKER_ID[:12])  # fmt: skip
    assert (f["uid"], f["user"], f["started_at"]) == (999, "redis", "2023-11-14T22:13:20.250Z")
    assert "Redis: tcp-keepalive" in f["hint"]
    table = report.to_table(result)
    assert (f"    who: pid 4102 redis-server, user redis, unit redis.service, container "
            f"{DOCKER_ID[:12]}: redis-server *:6379") in table  # fmt: skip


def test_unknown_owner_is_null_everywhere() -> None:
    result = audit(ruleset(), [("host", FakeKernel([make_sock(inode=5, idle_s=1000)]))])
    (f,) = [f for f in json.loads(report.to_json(result))["findings"] if f["inode"] == 5]
    assert (f["pid"], f["process"], f["cmdline"], f["unit"], f["container"]) == (None,) * 5
    assert (f["uid"], f["user"], f["started_at"]) == (None,) * 3
    assert "    who: " not in report.to_table(result)


# --- recognised applications -> their own knob -------------------------------------------------


@pytest.mark.parametrize(
    ("process", "port", "app"),
    [
        ("postgres", 0, "PostgreSQL"),
        ("psql", 5432, "libpq"),
        ("python3", 5432, "libpq"),  # an unrecognised client of PostgreSQL's port
        ("redis-server", 5432, "Redis"),  # the name wins over the port
        ("pgbouncer", 0, "PgBouncer"),
        ("haproxy", 0, "HAProxy"),
        ("sshd-session", 22, "OpenSSH server"),
        ("envoy", 0, "Envoy"),
        ("node", 0, "Node.js"),
        ("systemd", 0, "systemd socket unit"),
        ("mygoservice", 443, None),  # Go binaries have no fixed name: the generic hint
        (None, 0, None),
    ],
)
def test_recognise(process: str | None, port: int, app: str | None) -> None:
    row = hints.recognise(process, port)
    assert (row.app if row is not None else None) == app


def test_app_table_is_data() -> None:
    for row in hints.APP_KNOBS:
        assert row.app and row.keepalive and (row.processes or row.remote_ports)
    assert "LD_PRELOAD" in hints.GENERIC_KNOB and "net.Dialer" in hints.GENERIC_KNOB


def test_libpq_client_gets_the_connection_string_knob() -> None:
    kernel = FakeKernel([make_sock(inode=7, idle_s=1000, dport=5432)],
                        owners={7: ProcessInfo(70, "python3")})  # fmt: skip
    (f,) = [f for f in audit(ruleset(), [("host", kernel)]).findings if f.inode == 7]
    assert "libpq: keepalives=1 keepalives_idle=" in f.hint


# A process that calls itself redis-server (prctl PR_SET_NAME sets /proc/PID/comm) and holds an
# idle loopback connection without keepalive, inside a namespace of the lab.
REDIS_LOOKALIKE = textwrap.dedent(
    """
    import ctypes, socket, time
    ctypes.CDLL(None).prctl(15, b"redis-server", 0, 0, 0)  # PR_SET_NAME
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    client = socket.create_connection(srv.getsockname())
    server, _ = srv.accept()
    print(client.getsockname()[1], flush=True)
    time.sleep(120)  # the lab kills it
    """
)


@pytest.mark.kernel
def test_real_process_named_redis_gets_redis_hint(lab: netlab.Lab, tmp_path: Path) -> None:
    ns = lab.netns()
    proc = ns.spawn([sys.executable, "-c", REDIS_LOOKALIKE])
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\ndefaults:\n  idle_timeout: 2s\n  warn_at: 0.5\n")
    time.sleep(1.2)  # idle past warn_at × idle_timeout
    run = ns.audit(rules, "--fail-on", "never")
    (f,) = run.findings("idle_no_keepalive", local=f"127.0.0.1:{port}")
    assert (f["pid"], f["process"]) == (proc.pid, "redis-server")
    assert f["cmdline"].startswith(sys.executable)  # comm renamed, cmdline untouched
    assert "Redis: tcp-keepalive 1 in redis.conf" in f["hint"]
    assert f["unit"] == unit_and_container(Path(f"/proc/{proc.pid}/cgroup").read_text())[0]


def test_hint_for_unrecognised_process_names_socket_options() -> None:
    t = Thresholds()
    assert hints.no_keepalive(t, hints.recognise("mydaemon")).startswith(
        "enable keepalive with keepalive idle 280 s, interval 75 s, 5 probes: in the application:"
    )
