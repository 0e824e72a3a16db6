"""``--netns all``: finding, naming and entering every network namespace of the host.

Pure tiers first (cgroup paths -> names, unique names, the host callout, a fake /proc tree,
fakes that vanish), then the real kernel: namespaces made by the ``lab`` (named by their
``ip netns`` name) and by ``unshare`` (found only through their process), audited by the real
CLI and daemon. A real audit of every namespace also reads the host's and those of other test
runs that may come and go at any moment: assertions only ever look at this test's namespaces.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netlab
import pytest
from agent import Agents, Scrape, wait_for
from helpers import DEFAULT_SYSCTLS, FakeKernel
from prometheus_client.parser import text_string_to_metric_families

from auditd import cli, report
from auditd.audit.namespace import NOT_INHERITED, budget_findings, sysctl_findings
from auditd.audit.run import audit
from auditd.config import RuleSet, SysctlBound, Thresholds
from auditd.daemon import Daemon, DaemonOptions
from auditd.errors import NamespaceGone
from auditd.exporter import ExporterState, make_registry
from auditd.kernel import Attribution, DumpStats, NamespaceKernel, netns
from auditd.kernel.netns import (
    HOST,
    call_in_netns,
    cgroup_paths,
    enumerate_namespaces,
    name_from_cgroup,
    unique_names,
)
from auditd.model import Sock, Sysctls
from auditd.results import HOST_NETNS
from auditd.session import all_sources

ID = "3f4a0c9b2d1e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a"
ID2 = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
UID = "1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d"
UID_ = UID.replace("-", "_")  # the systemd cgroup driver's spelling
KEEPALIVE_TIME = "net.ipv4.tcp_keepalive_time"


# --- pure: cgroup paths -> names ---------------------------------------------------------------

CGROUPS = [
    pytest.param(
        f"12:memory:/docker/{ID}\n11:cpu,cpuacct:/docker/{ID}\n1:name=systemd:/docker/{ID}\n",
        f"container:{ID[:12]}", id="docker-cgroupfs-v1",
    ),
    pytest.param(f"0::/system.slice/docker-{ID}.scope\n", f"container:{ID[:12]}",
                 id="docker-systemd-v2"),
    pytest.param(f"0::/docker/{ID}/docker/{ID2}\n", f"container:{ID2[:12]}", id="docker-in-docker"),
    pytest.param(f"0::/kubepods/burstable/pod{UID}/{ID}\n", f"pod:{UID}", id="k8s-cgroupfs"),
    pytest.param(f"0::/kubepods/pod{UID}/{ID}\n", f"pod:{UID}", id="k8s-cgroupfs-guaranteed"),
    pytest.param(
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"cri-containerd-{ID}.scope\n",
        f"pod:{UID}", id="k8s-containerd-systemd",
    ),
    pytest.param(
        f"0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope\n", f"pod:{UID}",
        id="k8s-crio-systemd-guaranteed",
    ),
    pytest.param(
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod6ad7a5d64d2c4e2fa0a5e2f4c9cc3e07.slice/crio-conmon-{ID}.scope\n",
        "pod:6ad7a5d64d2c4e2fa0a5e2f4c9cc3e07", id="k8s-static-pod",
    ),
    pytest.param(
        f"11:pids:/kubepods/burstable/pod{UID}/{ID}\n1:name=systemd:/kubepods/burstable/"
        f"pod{UID}/{ID}\n0::/\n",
        f"pod:{UID}", id="k8s-cgroup-v1",
    ),
    pytest.param(f"0::/machine.slice/libpod-{ID}.scope/container\n", f"container:{ID[:12]}",
                 id="podman-rootful"),
    pytest.param(
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope\n",
        f"container:{ID[:12]}", id="podman-rootless",
    ),
    pytest.param(f"0::/libpod_parent/libpod-{ID}\n", f"container:{ID[:12]}",
                 id="podman-cgroupfs"),
    pytest.param(f"0::/default/{ID}\n", f"container:{ID[:12]}", id="containerd-nerdctl"),
    pytest.param("0::/system.slice/nginx.service\n", "unit:nginx.service", id="service"),
    pytest.param(
        "0::/system.slice/system-openvpn\\x2dserver.slice/openvpn-server@office.service\n",
        "unit:openvpn-server@office.service", id="template-service",
    ),
    pytest.param("0::/machine.slice/systemd-nspawn@web.service/payload\n",
                 "unit:systemd-nspawn@web.service", id="nspawn"),
    pytest.param("0::/user.slice/user-1000.slice/session-3.scope\n", "unit:session-3.scope",
                 id="user-session"),
    pytest.param(
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-4242.scope\n",
        "unit:app-firefox-4242.scope", id="user-app-scope",
    ),
    pytest.param(
        "12:pids:/\n1:name=systemd:/system.slice/sshd.service\n0::/system.slice/sshd.service\n",
        "unit:sshd.service", id="hybrid",
    ),
    pytest.param("0::/init.scope\n", "unit:init.scope", id="pid-1"),
    pytest.param("0::/\n", None, id="root"),
    pytest.param("4:memory:/process_api/86bd7c484465520f9e973a9571aef714\n0::/\n", None,
                 id="32-hex-is-no-container"),
    pytest.param("", None, id="empty"),
    pytest.param("garbage\n0:x\n", None, id="garbage"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "name"), CGROUPS)
def test_name_from_cgroup(text: str, name: str | None) -> None:
    assert name_from_cgroup(cgroup_paths(text)) == name


def test_cgroup_paths_put_v2_first() -> None:
    text = "3:cpu:/a\n1:name=systemd:/b\n0::/c\n2:memory:/a\n"
    assert cgroup_paths(text) == ["/c", "/a", "/b"]


def test_unique_names() -> None:
    wanted = [("blue", 1), ("unit:a.service", 2), ("unit:a.service", 3), ("host", 4), ("x", 5)]
    assert unique_names(wanted) == [
        "blue", "unit:a.service#2", "unit:a.service#3", "host#4", "x",
    ]  # fmt: skip


# --- pure: the host callout --------------------------------------------------------------------

BOUND = RuleSet(sysctls=(SysctlBound(KEEPALIVE_TIME, max=300),))
TUNED = Sysctls({**DEFAULT_SYSCTLS.values, KEEPALIVE_TIME: 300})


def test_sysctl_finding_names_the_hosts_value() -> None:
    (f,) = sysctl_findings(BOUND, DEFAULT_SYSCTLS, "pod:x", host=TUNED)
    assert f.message == (
        f"{KEEPALIVE_TIME} is 7200, the rules expect <= 300 (the host has 300: {NOT_INHERITED})"
    )
    # Host out of bounds too: the difference is named, but it is no lost tuning.
    (f,) = sysctl_findings(BOUND, Sysctls({KEEPALIVE_TIME: 900}), "pod:x", host=DEFAULT_SYSCTLS)
    assert f.message.endswith("(the host has 7200)")
    for host in (None, DEFAULT_SYSCTLS):  # no host given, or the same value
        (f,) = sysctl_findings(BOUND, DEFAULT_SYSCTLS, "pod:x", host=host)
        assert "host" not in f.message


def test_budget_finding_names_the_hosts_values() -> None:
    rules = RuleSet(defaults=Thresholds(detection_budget=1000))
    (f,) = budget_findings(rules, DEFAULT_SYSCTLS, "pod:x", host=TUNED)
    assert f.case == "idle"
    assert f.message.endswith(
        f"over the 1000 s detection budget; the host has tcp_keepalive_time=300 (975 s): "
        f"{NOT_INHERITED}"
    )
    (f,) = budget_findings(rules, DEFAULT_SYSCTLS, "pod:x", host=DEFAULT_SYSCTLS)
    assert "host" not in f.message


# --- pure: audit() skips what vanished, compares with the host -------------------------------


class GoneKernel(FakeKernel):
    """A namespace that vanished between enumeration and the dump."""

    def sockets(self, stats: DumpStats) -> Iterator[Sock]:
        raise NamespaceGone("cannot open /proc/4242/ns/net: No such file or directory", 2)


def test_audit_skips_a_namespace_gone_and_compares_others_with_the_host() -> None:
    rules = RuleSet(defaults=Thresholds(detection_budget=1000), sysctls=BOUND.sysctls)
    sources: list[tuple[str, Any]] = [
        ("pod:a", FakeKernel([], inode=2)),  # the compiled defaults: 7200
        ("container:gone", GoneKernel([], inode=3)),
        (HOST_NETNS, FakeKernel([], sysctls=TUNED, inode=1)),  # listed last, audited first
    ]
    result = audit(rules, sources)
    assert [ns.netns for ns in result.namespaces] == ["host", "pod:a"]
    assert [ns.differs_from_host for ns in result.namespaces] == [(), (KEEPALIVE_TIME,)]
    assert result.skipped_namespaces == (
        ("container:gone", "cannot open /proc/4242/ns/net: No such file or directory"),
    )
    assert {(f.netns, f.kind) for f in result.findings} == {
        ("pod:a", "sysctl"), ("pod:a", "detection_budget"),
    }  # fmt: skip
    assert all(NOT_INHERITED in f.message for f in result.findings)
    doc = json.loads(report.to_json(result))
    assert doc["skipped_namespaces"] == [
        {"netns": "container:gone", "reason": result.skipped_namespaces[0][1]}
    ]
    assert [ns["differs_from_host"] for ns in doc["namespaces"]] == [[], [KEEPALIVE_TIME]]
    table = report.to_table(result)
    assert "netns container:gone: skipped: cannot open" in table
    assert "  sysctls not as on the host: tcp_keepalive_time" in table
    scrape = scrape_state(ExporterState(result, rules))
    assert scrape[("keepalive_namespaces", ())] == 2
    differs = "keepalive_sysctl_differs_from_host"
    assert scrape[(differs, (("netns", "pod:a"), ("sysctl", KEEPALIVE_TIME)))] == 1
    assert (differs, (("netns", "host"), ("sysctl", KEEPALIVE_TIME))) not in scrape  # 1s only


def scrape_state(state: ExporterState) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    text = generate_latest(make_registry(lambda: state)).decode()
    return parse_exposition(text)


def parse_exposition(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_daemon_counts_each_skipped_namespace_and_logs_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sources = [("host", FakeKernel([])), ("pod:a", GoneKernel([])), ("pod:b", GoneKernel([]))]
    daemon = Daemon(DaemonOptions(None), lambda _: list(sources), logging.getLogger("t-netns"))
    with caplog.at_level(logging.INFO, logger="t-netns"):
        for _ in range(2):
            assert daemon.audit_once() is not None
    assert daemon.state.errors.get("netns") == 4  # two namespaces, two audits
    assert [r.getMessage() for r in caplog.records].count("namespace skipped") == 2


class RefusedKernel(FakeKernel):
    """A namespace setns refuses (no CAP_SYS_ADMIN, or another user namespace)."""

    def sockets(self, stats: DumpStats) -> Iterator[Sock]:
        raise NamespaceGone(f"cannot enter /proc/4242/ns/net: {os.strerror(errno.EPERM)}", 1)


def test_daemon_says_what_a_refused_namespace_needs(caplog: pytest.LogCaptureFixture) -> None:
    sources = [("host", FakeKernel([])), ("pod:a", RefusedKernel([])), ("pod:b", GoneKernel([]))]
    daemon = Daemon(DaemonOptions(None), lambda _: list(sources), logging.getLogger("t-netns2"))
    with caplog.at_level(logging.INFO, logger="t-netns2"):
        assert daemon.audit_once() is not None
    skipped = {r.netns: r for r in caplog.records if r.getMessage() == "namespace skipped"}  # type: ignore[attr-defined]
    assert "needs CAP_SYS_ADMIN" in skipped["pod:a"].hint  # type: ignore[attr-defined]
    assert not hasattr(skipped["pod:b"], "hint")  # gone: nothing to grant


# --- a fake /proc tree --------------------------------------------------------------------------


def _ns_file(path: Path, same_as: Path | None = None) -> Path:
    """A stand-in for an nsfs file: namespaces are told apart by inode, like the real ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if same_as is None:
        path.touch()
    else:
        os.link(same_as, path)
    return path


def _proc(root: Path, pid: int, cgroup: str, same_as: Path | None = None) -> Path:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cgroup").write_text(cgroup)
    return _ns_file(root / str(pid) / "ns" / "net", same_as)


def test_enumerate_a_fake_tree(tmp_path: Path) -> None:
    proc, run = tmp_path / "proc", tmp_path / "netns"
    host = _ns_file(proc / "self" / "ns" / "net")
    _proc(proc, 1, "0::/init.scope\n", same_as=host)
    docker = _proc(proc, 10, f"0::/system.slice/docker-{ID}.scope\n")
    _proc(proc, 11, f"0::/system.slice/docker-{ID}.scope\n", same_as=docker)  # same netns
    blue = _proc(proc, 20, "0::/system.slice/foo.service\n")  # pinned as "blue" too
    _ns_file(run / "blue", same_as=blue)
    _ns_file(run / "attached-host", same_as=host)  # `ip netns attach`: still the host
    unit_a = _proc(proc, 30, "0::/system.slice/build.service\n")
    unit_b = _proc(proc, 31, "0::/system.slice/build.service\n")
    bare = _proc(proc, 40, "0::/\n")
    _ns_file(run / "empty")  # a pinned namespace without processes
    refs = enumerate_namespaces(str(proc), str(run))
    ino = {p: p.stat().st_ino for p in (docker, blue, unit_a, unit_b, bare, run / "empty")}
    got = [(r.name, r.ino, r.pid, r.host) for r in refs]
    assert got == [
        (HOST, host.stat().st_ino, 1, True),
        ("blue", ino[blue], 20, False),
        ("empty", ino[run / "empty"], None, False),
        (f"container:{ID[:12]}", ino[docker], 10, False),
        (f"unit:build.service#{ino[unit_a]}", ino[unit_a], 30, False),
        (f"unit:build.service#{ino[unit_b]}", ino[unit_b], 31, False),
        (f"netns:{ino[bare]}", ino[bare], 40, False),
    ]
    paths = {r.name: r.path for r in refs}
    assert paths["blue"] == str(run / "blue")  # a bind mount outlives any pid
    assert paths[f"container:{ID[:12]}"] == str(proc / "10" / "ns" / "net")


# --- the real kernel ----------------------------------------------------------------------------


@pytest.fixture
def unshared() -> Iterator[subprocess.Popen[bytes]]:
    """A process alone in a network namespace of its own, not pinned in /run/netns."""
    proc = subprocess.Popen(["unshare", "--net", "--", "sleep", "60"])
    try:
        own = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 5
        while os.stat(f"/proc/{proc.pid}/ns/net").st_ino == own:  # until unshare has run
            assert time.monotonic() < deadline, "unshare did not make a namespace"
            time.sleep(0.01)
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=5)


def _by_ino(refs: list[netns.NamespaceRef]) -> dict[int, netns.NamespaceRef]:
    return {r.ino: r for r in refs}


@pytest.mark.kernel
def test_enumerate_real_namespaces(
    lab: netlab.Lab, unshared: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    pinned = lab.netns()
    inside = pinned.spawn(["sleep", "60"])  # pinned in /run/netns and held by a process
    stale = Path(netlab.NETNS_DIR, f"{netlab.PREFIX}{os.getpid()}-{secrets.token_hex(3)}")
    stale.touch()  # what `ip netns add` leaves if the mount goes: no namespace
    try:
        deadline = time.monotonic() + 5
        while inside.pid not in [r.pid for r in enumerate_namespaces()]:
            assert time.monotonic() < deadline, "the process never showed up in its namespace"
            time.sleep(0.02)
        refs = enumerate_namespaces()
    finally:
        stale.unlink()
    host = refs[0]
    assert (host.name, host.host) == (HOST, True)
    assert host.ino == os.stat("/proc/self/ns/net").st_ino
    assert len({(r.dev, r.ino) for r in refs}) == len(refs)
    assert len({r.name for r in refs}) == len(refs)
    assert stale.name not in {r.name for r in refs}
    st = os.stat(pinned.path)
    ours = [r for r in refs if r.ino == st.st_ino]
    assert [(r.name, r.path, r.pid) for r in ours] == [(pinned.name, pinned.path, inside.pid)]
    alone = _by_ino(refs)[os.stat(f"/proc/{unshared.pid}/ns/net").st_ino]
    cgroup = Path(f"/proc/{unshared.pid}/cgroup").read_text()
    assert alone.name in (name_from_cgroup(cgroup_paths(cgroup)), f"netns:{alone.ino}")
    assert (alone.path, alone.pid) == (f"/proc/{unshared.pid}/ns/net", unshared.pid)


@pytest.mark.kernel
def test_namespace_kernel_reads_from_inside(lab: netlab.Lab) -> None:
    ns = lab.netns()
    ns.set_sysctl(KEEPALIVE_TIME, 77)
    listener = ns.listen("127.0.0.1")
    client = ns.make_socket()
    client.connect(listener.getsockname())
    ns.adopt(listener.accept()[0])
    st = os.stat(ns.path)
    kernel = NamespaceKernel(netns.NamespaceRef(st.st_dev, st.st_ino, ns.path, ns.name))
    before = os.stat("/proc/thread-self/ns/net").st_ino
    assert kernel.sysctls().keepalive_time == 77
    assert kernel.counters().keepalive_probes is not None
    socks = list(kernel.sockets(DumpStats()))
    assert sorted(s.sport for s in socks) == sorted(
        [client.getsockname()[1], listener.getsockname()[1]]
    )
    assert os.stat("/proc/thread-self/ns/net").st_ino == before  # this thread never moved
    with pytest.raises(NamespaceGone, match="is another namespace now"):
        call_in_netns(ns.path, lambda: None, expect=(st.st_dev, st.st_ino + 1))
    with pytest.raises(NamespaceGone, match="No such file"):
        call_in_netns(ns.path + "-gone", lambda: None)


def rules_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "version: 1\ndefaults:\n  detection_budget: 1000s\n"
        f"sysctls:\n  {KEEPALIVE_TIME}: {{max: 300}}\n"
    )
    return path


def loopback_pair(ns: netlab.Netns) -> None:
    listener = ns.listen("127.0.0.1")
    client = ns.make_socket()
    client.connect(listener.getsockname())
    ns.adopt(listener.accept()[0])
    listener.close()


@pytest.mark.kernel
def test_cli_audits_every_namespace_with_its_own_sysctls(lab: netlab.Lab, tmp_path: Path) -> None:
    """The CLI runs in ``home`` (its "host", tuned to 300); ``plain`` kept the defaults like a
    fresh container, ``tuned`` matches home, ``half`` is tuned another way."""
    home, plain, tuned, half = (lab.netns() for _ in range(4))
    home.set_sysctl(KEEPALIVE_TIME, 300)
    tuned.set_sysctl(KEEPALIVE_TIME, 300)
    half.set_sysctl(KEEPALIVE_TIME, 600)
    half.set_sysctl("net.ipv4.tcp_keepalive_probes", 3)
    for ns in (plain, tuned, half):
        loopback_pair(ns)
    run = home.audit(rules_yaml(tmp_path), "--netns", "all", "--fail-on", "never")
    assert run.rc == 0 and run.doc is not None, run.stderr
    namespaces = {ns["netns"]: ns for ns in run.doc["namespaces"]}
    assert home.name not in namespaces  # it is "host"
    assert namespaces["host"]["inode"] == os.stat(home.path).st_ino
    assert namespaces["host"]["sysctls"][KEEPALIVE_TIME] == 300
    expected = {  # name: (tcp_keepalive_time, differs_from_host)
        plain.name: (7200, [KEEPALIVE_TIME]),
        tuned.name: (300, []),
        half.name: (600, ["net.ipv4.tcp_keepalive_probes", KEEPALIVE_TIME]),
    }
    for ns in (plain, tuned, half):
        doc = namespaces[ns.name]
        assert doc["inode"] == os.stat(ns.path).st_ino
        assert (doc["sysctls"][KEEPALIVE_TIME], doc["differs_from_host"]) == expected[ns.name]
        assert doc["sockets"]["by_state"] == {"established": 2}
    ours = {"host", plain.name, tuned.name, half.name}
    found = {
        (f["netns"], f["kind"], f["case"]): f["message"]
        for f in run.findings()
        if f["netns"] in ours
    }
    assert set(found) == {
        (half.name, "sysctl", None),
        (plain.name, "sysctl", None),
        (plain.name, "detection_budget", "idle"),  # 7875 s; host 975 s, half 825 s
    }
    host_has = f"(the host has 300: {NOT_INHERITED})"
    assert found[half.name, "sysctl", None].endswith(f"is 600, the rules expect <= 300 {host_has}")
    assert found[plain.name, "sysctl", None].endswith(
        f"is 7200, the rules expect <= 300 {host_has}"
    )
    assert found[plain.name, "detection_budget", "idle"].endswith(
        f"the host has tcp_keepalive_time=300 (975 s): {NOT_INHERITED}"
    )
    skipped = {s["netns"] for s in run.doc["skipped_namespaces"]}
    assert not skipped & ours


@pytest.mark.kernel
def test_cli_attributes_sockets_of_every_namespace(lab: netlab.Lab, tmp_path: Path) -> None:
    """One owner scan (socket inodes are global) serves every namespace of --netns all."""
    home, other = lab.netns(), lab.netns()
    ports = []
    for ns in (home, other):  # keepalive on the 7200 s default: keepalive_too_slow once idle
        listener = ns.listen("127.0.0.1")
        ports.append(listener.getsockname()[1])
        client = ns.make_socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        client.connect(listener.getsockname())
        ns.adopt(listener.accept()[0])
    # A 2 s idle timeout for our clients only (the host's other sockets keep the defaults),
    # critical so that the other tests' sockets on the host never push them out of the list.
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"version: 1\nrules:\n  - name: ours\n    match: {{remote_ports: {ports}}}\n"
        "    idle_timeout: 2s\n    warn_at: 0.5\n    severity: critical\n"
    )
    time.sleep(1.2)  # the path idle past warn_at × idle_timeout
    run = home.audit(rules, "--netns", "all", "--fail-on", "never")
    assert run.rc == 0 and run.doc is not None, run.stderr
    names = ("host", other.name)
    slow = [f for f in run.findings() if f["kind"] == "keepalive_too_slow" and f["netns"] in names]
    assert sorted(f["netns"] for f in slow) == sorted(["host", other.name])
    assert {f["pid"] for f in slow} == {os.getpid()}
    ours = [ns for ns in run.doc["namespaces"] if ns["netns"] in names]
    assert [ns["attribution"] for ns in ours] == [{"wanted": 1, "found": 1, "complete": True}] * 2


@pytest.mark.kernel
def test_a_namespace_that_vanishes_during_the_audit_is_skipped(
    lab: netlab.Lab, unshared: subprocess.Popen[bytes], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    kept, gone = lab.netns(), lab.netns()
    loopback_pair(kept)
    alone_ino = os.stat(f"/proc/{unshared.pid}/ns/net").st_ino
    names: dict[int, str] = {}

    def sources(_: Any) -> list[tuple[str, Any]]:
        # enumerated: then both namespaces go before they are read
        found = all_sources(Attribution())
        names.update({s.ref.ino: n for n, s in found if isinstance(s, NamespaceKernel)})
        assert netlab.destroy_netns(gone.name) == []
        unshared.kill()
        unshared.wait(timeout=5)
        return found

    argv = ["audit", "--config", str(rules_yaml(tmp_path)), "--format", "json",
            "--fail-on", "never"]  # fmt: skip
    assert cli.main(argv, sources=sources) == 0
    doc = json.loads(capsys.readouterr().out)
    skipped = {s["netns"]: s["reason"] for s in doc["skipped_namespaces"]}
    audited = {ns["netns"]: ns for ns in doc["namespaces"]}
    assert skipped[gone.name] == f"cannot open {gone.path}: No such file or directory"
    assert skipped[names[alone_ino]] == (
        f"cannot open /proc/{unshared.pid}/ns/net: No such file or directory"
    )
    assert audited[kept.name]["sockets"]["total"] == 2
    assert "host" in audited


# --- the daemon ---------------------------------------------------------------------------------


@pytest.mark.kernel
def test_daemon_exports_each_namespace_by_name(lab: netlab.Lab, tmp_path: Path) -> None:
    ns = lab.netns()
    host_value = int(Path("/proc/sys/net/ipv4/tcp_keepalive_time").read_text())
    mine = 77 if host_value != 77 else 78  # not the host's: only then has it series of its own
    ns.set_sysctl(KEEPALIVE_TIME, mine)
    loopback_pair(ns)
    agents = Agents(tmp_path, None)
    try:
        agent = agents.start("--audit.netns", "all", config=rules_yaml(tmp_path), host=True)

        def exported() -> Scrape | None:
            got = agent.try_scrape()
            ours = got is not None and ns.name in got.label_values(
                "keepalive_sysctl_differs_from_host", "netns"
            )
            return got if ours else None

        scrape = wait_for("the namespace's series", exported, timeout=20)
        assert scrape.value("keepalive_sysctl_tcp_keepalive_time_seconds", netns=ns.name) == mine
        differs = scrape.value("keepalive_sysctl_differs_from_host", netns=ns.name,
                               sysctl=KEEPALIVE_TIME)  # fmt: skip
        assert differs == 1
        # Its two sockets are not news: socket counts are the host's only (README Metrics).
        assert ns.name not in scrape.label_values("keepalive_tcp_connections", "netns")
        assert scrape.value("keepalive_namespaces") >= 2
        host_off = frozenset({("keepalive", "off"), ("netns", "host"), ("state", "established")})
        assert host_off in scrape.samples["keepalive_tcp_connections"]
        agent.assert_running()
    finally:
        agents.close()
    assert "Traceback" not in agent.log_text()
