"""Real podman containers, and the agent run in one with the DaemonSet's security context.

No image registry is reachable, so the containers run from root filesystems made here
(``podman run --rootfs``): a busybox one (``busybox-static``) for the workload, each
container in its own network namespace with its own sysctls and two idle TCP connections
(busybox ``nc``) inside; and for the agent, the same busybox root with this machine's Python
and the checkout mounted read-only, run with the flags deploy/kubernetes/daemonset.yaml asks
of Kubernetes (host pid and network namespaces, uid 0, only its capabilities, no new
privileges, read-only root, /run/netns, a tmpfs /tmp). podman has its own storage and
runtime directories and its own containers.conf in the test's temporary directory: on this
machine it needs runc, cgroupfs and a file event log, and resource limits below the
current ones (it raises them by default, which this environment refuses).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
# The workloads' server ports: the containers' namespaces have every port free, but the rules
# below see every namespace of the host, so the ports are drawn per run below the ephemeral
# range, where no other test's sockets are likely to sit.
PORT = 20000 + secrets.randbelow(9000)
# Only the workloads' connections are judged: on a busy host (another test's 200k idle
# sockets) theirs would otherwise fall out of the worst --max-findings.
RULES = f"""\
version: 1
defaults: {{idle_timeout: 2s, detection_budget: 1d}}
rules:
  - {{name: workload-server, match: {{local_ports: [{PORT}, {PORT + 1}]}}}}
  - {{name: workload-client, match: {{remote_ports: [{PORT}, {PORT + 1}]}}}}
  - {{name: others, match: {{}}, ignore: true}}
"""
CONF = """\
[containers]
log_driver = "k8s-file"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
# Two containers, each with its own sysctls and a listener plus an idle client on loopback;
# one runs as root, one as nobody, so that attributing both needs each of the agent's three
# capabilities. busybox nc ends a connection when its stdin ends: both ends read a sleep.
WORKLOADS = (
    (PORT, "0:0", {"net.ipv4.tcp_keepalive_time": 600}),
    (PORT + 1, "65534:65534", {"net.ipv4.tcp_keepalive_time": 900, "net.ipv4.tcp_retries2": 8}),
)
# The containers' own user database, where uid 65534 has another name than on the host: the
# owners' names come from it.
PASSWD = "root:x:0:0:root:/:/bin/sh\nworkload:x:65534:65534::/:/bin/sh\n"
USERS = {"0:0": (0, "root"), "65534:65534": (65534, "workload")}
CAP_BITS = {"DAC_READ_SEARCH": 2, "SYS_PTRACE": 19, "SYS_ADMIN": 21}  # linux/capability.h

pytestmark = pytest.mark.kernel


@dataclass
class Podman:
    tmp: Path

    def argv(self, *args: str) -> list[str]:
        # vfs: no image layers are used (--rootfs), and overlay would leave a mount behind.
        dirs = ("--storage-driver", "vfs", "--root", self.tmp / "storage",
                "--runroot", self.tmp / "run", "--tmpdir", self.tmp / "libpod")  # fmt: skip
        return ["podman", *map(str, dirs), *args]

    def __call__(self, *args: str, timeout: float = 60) -> str:
        env = {**os.environ, "CONTAINERS_CONF": str(self.tmp / "containers.conf")}
        proc = subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=timeout, env=env
        )
        assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr.strip()}"
        return proc.stdout.strip()

    def logs(self, cid: str) -> str:
        """The container's stdout and stderr (``podman logs`` replays each on its own)."""
        env = {**os.environ, "CONTAINERS_CONF": str(self.tmp / "containers.conf")}
        proc = subprocess.run(self.argv("logs", cid), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=60, env=env)  # fmt: skip
        return proc.stdout


@dataclass(frozen=True)
class Workload:
    id: str  # 64 hex
    port: int
    user: str  # uid:gid
    sysctls: dict[str, int]


def _rootfs(d: Path) -> Path:
    for sub in ("bin", "proc", "sys", "dev", "etc", "tmp", "run/netns"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    assert busybox is not None
    shutil.copy2(busybox, d / "bin" / "busybox")
    for applet in ("sh", "nc", "sleep"):
        (d / "bin" / applet).symlink_to("busybox")
    (d / "etc" / "passwd").write_text(PASSWD)
    for link in ("lib", "lib64"):  # merged /usr, as on the host: /usr is mounted for Python
        if os.path.islink(f"/{link}"):
            (d / link).symlink_to(os.readlink(f"/{link}"))
    return d


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    missing = [t for t in ("podman", "runc", "busybox") if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and podman, runc, busybox-static (missing: {missing})")
    tmp = tmp_path_factory.mktemp("podman")
    (tmp / "containers.conf").write_text(CONF)
    _rootfs(tmp / "rootfs")
    pm = Podman(tmp)
    try:
        yield pm
    finally:
        pm("rm", "--all", "--force", "--time", "0")


@pytest.fixture(scope="module")
def workloads(podman: Podman) -> list[Workload]:
    started = []
    for port, user, sysctls in WORKLOADS:
        script = f"sleep 600 | nc -l -p {port} & sleep 0.2; sleep 600 | nc 127.0.0.1 {port}"
        flags = ["--user", user, *(f"--sysctl={k}={v}" for k, v in sysctls.items())]
        cid = podman("run", "-d", "--network", "none", *flags,
                     "--rootfs", str(podman.tmp / "rootfs"), "/bin/sh", "-c", script)  # fmt: skip
        started.append(Workload(cid, port, user, sysctls))
    return started


def _audit(rules: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "auditd", "audit", "--netns", "all", "--format", "json",
            "--max-findings", "0", "--fail-on", "never", "--config", str(rules)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def _check(doc: dict[str, Any], workloads: list[Workload]) -> None:
    """Each container is its own namespace, with its sysctls and its owners."""
    spaces = {ns["netns"]: ns for ns in doc["namespaces"]}
    host = spaces["host"]["sysctls"]
    for w in workloads:
        name = f"container:{w.id[:12]}"
        assert name in spaces, sorted(spaces)
        ns = spaces[name]
        for key, value in w.sysctls.items():
            assert ns["sysctls"][key] == value
            assert (key in ns["differs_from_host"]) == (host[key] != value)
        assert ns["sockets"]["by_keepalive"]["off"] == 2
        found = [f for f in doc["findings"] if f["netns"] == name]
        assert {f["kind"] for f in found} == {"idle_no_keepalive"} and len(found) == 2
        for f in found:
            assert f["container"] == w.id[:12] and f["process"] == "nc"
            assert (f["uid"], f["user"]) == USERS[w.user] and f["started_at"] is not None
            assert w.id in Path(f"/proc/{f['pid']}/cgroup").read_text()
        assert {f["cmdline"] for f in found} == {f"nc -l -p {w.port}", f"nc 127.0.0.1 {w.port}"}


def test_audit_names_each_container_with_its_sysctls_and_owners(
    workloads: list[Workload], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)

    def flagged() -> dict[str, Any] | None:  # idle past 1 s (warn_at 0.5 of 2 s) on each
        doc = _audit(rules)
        names = {f"container:{w.id[:12]}" for w in workloads}
        got = {f["netns"] for f in doc["findings"] if f["kind"] == "idle_no_keepalive"}
        return doc if names <= got else None

    _check(wait_for("idle findings in both containers", flagged), workloads)


def _daemonset_flags() -> tuple[list[str], list[str]]:
    """podman flags for the DaemonSet's pod and container security context, and its args."""
    ds = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "daemonset.yaml").read_text())
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ctx = container["securityContext"]
    flags = ["--pid", "host"] if pod["hostPID"] else []
    flags += ["--network", "host"] if pod["hostNetwork"] else []
    flags += ["--user", f"{ctx['runAsUser']}:{ctx['runAsGroup']}"]
    flags += ["--read-only"] if ctx["readOnlyRootFilesystem"] else []
    flags += [] if ctx["allowPrivilegeEscalation"] else ["--security-opt", "no-new-privileges"]
    flags += [f"--cap-drop={c}" for c in ctx["capabilities"]["drop"]]
    flags += [f"--cap-add={c}" for c in ctx["capabilities"]["add"]]
    if ctx.get("appArmorProfile", {}).get("type") == "Unconfined":
        flags += ["--security-opt", "apparmor=unconfined"]
    for mount in container["volumeMounts"]:
        if mount["mountPath"] == "/run/netns" and os.path.isdir("/run/netns"):
            flags += ["-v", "/run/netns:/run/netns:ro,rslave"]
        elif mount["mountPath"] == "/tmp":
            flags += ["--tmpfs", "/tmp"]
    return flags, list(container["args"])


def _libbpf() -> str | None:
    """The file behind this machine's libbpf.so.1, if there is one."""
    found = sorted(glob.glob("/usr/lib/*/libbpf.so.1"))
    return os.path.realpath(found[0]) if found else None


def _start_agent(podman: Podman, conf: Path, drop: str | None, bpf: bool = True) -> tuple[str, int]:
    """The agent in a container with the DaemonSet's security context (less ``drop``); with
    ``bpf`` False, libbpf is hidden (an empty file over it) and owners come from /proc."""
    flags, args = _daemonset_flags()
    flags = [f for f in flags if f != f"--cap-add={drop}"]
    port = free_port()
    mounts = []
    libbpf = _libbpf()
    if not bpf and libbpf is not None:
        mounts += ["-v", f"/dev/null:{libbpf}:ro"]
    for path in sorted({sys.base_prefix, sys.prefix, "/usr"}):
        mounts += ["-v", f"{path}:{path}:ro"]
    mounts += ["-v", f"{ROOT}:/src:ro", "-v", f"{conf}:/etc/keepalive-auditd:ro"]
    cid = podman("run", "-d", *flags, *mounts, "-e", "PYTHONPATH=/src",
                 "-e", "PYTHONDONTWRITEBYTECODE=1", "--rootfs", str(podman.tmp / "rootfs"),
                 sys.executable, "-m", "auditd", *args, "--audit.interval=1s",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.format=json")  # fmt: skip
    pid = int(podman("inspect", "--format", "{{.State.Pid}}", cid))
    status = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    wanted = [f.split("=", 1)[1] for f in flags if f.startswith("--cap-add=")]
    assert int(status["CapEff"], 16) == sum(1 << CAP_BITS[c] for c in wanted)
    assert status["NoNewPrivs"].strip() == "1" and status["Uid"].split()[0] == "0"
    return cid, port


def _served(podman: Podman, cid: str, port: int) -> dict[str, Any] | None:
    try:
        url = f"http://127.0.0.1:{port}/api/v1/findings"
        with urllib.request.urlopen(url, timeout=5) as r:
            doc: dict[str, Any] = json.load(r)
            return doc
    except OSError:
        if podman("inspect", "--format", "{{.State.Running}}", cid) != "true":
            raise AssertionError(podman.logs(cid)) from None
        return None


def _owned(doc: dict[str, Any], w: Workload) -> bool:
    """Both of the container's connections flagged, each with its owner."""
    found = [f for f in doc["findings"] if f["netns"] == f"container:{w.id[:12]}"]
    return len(found) == 2 and all(f["pid"] is not None for f in found)


# What each capability of the DaemonSet buys, seen from the two containers (root, nobody),
# with owners from the BPF owner iterator (libbpf in the image) or from /proc (without).
# Without one, the agent still runs, and says what it misses when that shows.
WITHOUT = {
    # setns into their namespaces (and loading BPF: CAP_SYS_ADMIN stands for CAP_BPF here)
    ("SYS_ADMIN", True): (False, False),
    ("SYS_ADMIN", False): (False, False),
    # /proc/PID/ns/net of processes of another uid, or with more capabilities: not found
    ("SYS_PTRACE", True): (False, False),
    ("SYS_PTRACE", False): (False, False),
    # listing nobody's 0500 /proc/PID/fd; the owner iterator needs no file permission
    ("DAC_READ_SEARCH", True): (True, True),
    ("DAC_READ_SEARCH", False): (True, False),
}


@pytest.mark.parametrize("bpf", [True, False], ids=["bpf-owners", "proc-owners"])
@pytest.mark.parametrize("drop", [None, "SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"])
def test_agent_in_a_container_with_the_daemonset_privileges(
    podman: Podman, workloads: list[Workload], tmp_path: Path, drop: str | None, bpf: bool
) -> None:
    if bpf and _libbpf() is None:
        pytest.skip("no libbpf.so.1 on this machine")
    (tmp_path / "rules.yaml").write_text(RULES)
    cid, port = _start_agent(podman, tmp_path, drop, bpf)
    try:
        if drop is None:
            want = {f"container:{w.id[:12]}" for w in workloads}

            def complete() -> dict[str, Any] | None:
                doc = _served(podman, cid, port)
                return doc if doc and want <= {f["netns"] for f in doc["findings"]} else None

            doc = wait_for("the containerized agent's findings", complete, timeout=60)
            _check(doc, workloads)
            assert all(ns["attribution"]["complete"] for ns in doc["namespaces"])
            assert not [s for s in doc["skipped_namespaces"] if s["netns"] in want]
            logs = podman.logs(cid)
            assert "attribution limited" not in logs and "Traceback" not in logs, logs
            assert ("BPF iterators unavailable" in logs) is not bpf, logs
            return
        root_ok, nobody_ok = WITHOUT[(drop, bpf)]
        # Seen in an audit after the first served one (the containers' sockets are idle by
        # then), and again in the next: not a scan cut short once on a busy host.
        expected = [root_ok, nobody_ok]
        first = wait_for("a first audit", lambda: _served(podman, cid, port), timeout=60)
        seen: list[list[bool]] = []

        def settled(after: str) -> str | None:
            doc = _served(podman, cid, port)
            if doc is None or doc["generated_at"] <= after:
                return None
            seen.append([_owned(doc, w) for w in workloads])
            return str(doc["generated_at"]) if seen[-1] == expected else None

        try:
            again = wait_for("the owners expected", lambda: settled(first["generated_at"]), 60)
            wait_for("the same in the next audit", lambda: settled(again), 30)
        except AssertionError:
            raise AssertionError(f"owned per container {seen[-3:]}, expected {expected}") from None
        logs = podman.logs(cid)
        assert "Traceback" not in logs, logs
        # Named where it shows. Not CAP_SYS_PTRACE: the namespaces of processes it may not
        # look into are not found at all, and the agent does not say so (README Privileges).
        if not (root_ok and nobody_ok) and drop != "SYS_PTRACE":
            assert f"CAP_{drop}" in logs, logs
    finally:
        podman("rm", "--force", "--time", "0", cid)
