"""Benchmark: the full audit cycle against ``ss -tinoe`` and the raw netlink dump.

    python3 bench/bench.py --sockets 200000 [--rounds 5] [--scrapers 20] [--daemon-cpu 65]
    python3 bench/bench.py --namespaces 100 [--rules 1000]   # series count (bench/series.py)

Opens ``--sockets`` ESTABLISHED loopback sockets (``--sockets / 2`` connections, both ends
count, spread over 127.x addresses and several holder processes to pass the per-address
ephemeral port range and the open-files limit). Half of the client ends set SO_KEEPALIVE
with TCP_KEEPIDLE 300 s (healthy for the rules), and ``--flagged`` of the connections use
keepalive on the 7200 s default, which the audit reports as ``keepalive_too_slow`` (under a
rule with a 0.2 s idle timeout for their server port: the finding needs the path idle for
``warn_at × idle_timeout``) and attributes to their process. The rules use
``--idle-timeout`` (default 1h) so idle connections without keepalive are not flagged during
the run: the figures are for an audit with a known number of findings. (A short keepidle would
be a bad bench: probes of sockets opened together fire in the same tick and overflow the
loopback backlog, KERNEL.md.)
Then, alternating in each round:

- floor: the raw sock_diag dump, received and not decoded;
- audit: one full cycle in a fresh process (dump, decode, inference, rules, attribution,
  metrics rendering), with its CPU time and peak RSS;
- ss: ``ss -tinoe state established`` printing every socket (to /dev/null);
- cli: ``python -m auditd audit --format json`` and ``ss`` as whole processes.

As the CLI does, the audit takes owners from the BPF owner iterator when it loads (else the
/proc scan, in a child during the dump). With ``--inspect-sockets`` the audit (and the CLI)
read the sockets' options with one pass of the BPF socket iterator (else through
``pidfd_getfd``), and the report adds the time spent inspecting.

Prints medians and the ratios the targets are written in. Traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PER_ADDRESS = 10_000  # connections per 127.x server address (ephemeral range is ~28k)
# keepalive_too_slow needs the path idle for warn_at × idle_timeout (auditd/audit/cadence.py):
# the flagged connections talk to this port, under a rule with a 0.2 s idle timeout.
FLAGGED_PORT = 5001


# --------------------------------------------------------------------------------------
# Holders: child processes that own the sockets.
# --------------------------------------------------------------------------------------
def holder_main(connections: int, first_address: int, flagged_every: int) -> None:
    """Child: open ``connections`` loopback connections, print "ready N", then sleep."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    keep: list[socket.socket] = []
    made = 0
    addr_index = first_address
    while made < connections:
        a = addr_index
        addr_index += 1
        host = f"127.{1 + a // 62500}.{a // 250 % 250}.{a % 250 + 1}"
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, 5000))
        srv.listen(4096)
        flagged_srv = socket.socket()  # the flagged connections' port: a rule of their own
        flagged_srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        flagged_srv.bind((host, FLAGGED_PORT))
        flagged_srv.listen(4096)
        keep += [srv, flagged_srv]
        for _ in range(min(PER_ADDRESS, connections - made)):
            client = socket.socket()
            listener = srv
            if made % 2 == 0:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if flagged_every and made % flagged_every == 0:
                    listener = flagged_srv
                else:
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 300)
            client.connect(listener.getsockname())
            server_end, _ = listener.accept()
            keep += [client, server_end]
            made += 1
    print(f"ready {made}", flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        for s in keep:
            s.close()


class Holders:
    """Starts enough holder processes for ``sockets`` sockets; always cleaned up."""

    def __init__(self, sockets: int, flagged: float) -> None:
        self.sockets = sockets
        self.flagged_every = int(1 / flagged) if flagged > 0 else 0
        self.procs: list[subprocess.Popen[str]] = []
        self.connections = 0

    def __enter__(self) -> Holders:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        per_proc = max((hard - 200) // 2, 100)  # both ends of each connection, some spare
        want = self.sockets // 2
        first = 0
        try:
            while want > 0:
                n = min(per_proc, want)
                cmd = [sys.executable, __file__, "--child", "holder", str(n), str(first),
                       str(self.flagged_every)]  # fmt: skip
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)  # fmt: skip
                self.procs.append(proc)
                first += (n + PER_ADDRESS - 1) // PER_ADDRESS
                want -= n
            for proc in self.procs:
                assert proc.stdout is not None
                line = proc.stdout.readline().split()
                if len(line) != 2 or line[0] != "ready":
                    raise RuntimeError(f"holder {proc.pid} failed to open its connections")
                self.connections += int(line[1])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            try:
                if proc.stdin:
                    proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


# --------------------------------------------------------------------------------------
# Measured children: each measurement in a fresh process, for an honest peak RSS.
# --------------------------------------------------------------------------------------
def child_floor() -> dict[str, Any]:
    from auditd.kernel import sockdiag

    t0, c0 = time.perf_counter(), time.process_time()
    sock = sockdiag.netlink_socket()
    buf = memoryview(bytearray(sockdiag.RECV_BUFFER))
    total = 0
    for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
        sock.send(sockdiag.build_request(family, sockdiag.DEFAULT_STATES, seq))
        while True:
            n = sock.recv_into(buf)
            total += n
            if _has_done(buf[:n]):
                break
    sock.close()
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "bytes": total}


def _has_done(chunk: memoryview) -> bool:
    # NLMSG_DONE may share the last datagram; scanning headers is part of any receive loop.
    off, end = 0, len(chunk)
    while off + 16 <= end:
        length = int.from_bytes(chunk[off : off + 4], sys.byteorder)
        mtype = int.from_bytes(chunk[off + 4 : off + 6], sys.byteorder)
        if mtype in (2, 3) or length < 16:
            return True
        off += (length + 3) & ~3
    return False


def _timed_kernel(prescan: Any, bpf: Any) -> Any:
    """LocalKernel with the time spent in attribution recorded."""
    from auditd.kernel import LocalKernel, OwnerFinder

    class TimedKernel(LocalKernel):
        owners_seconds = 0.0
        owners_wanted = 0

        def owners(self, inodes: Any, deadline: float | None = None) -> Any:
            t0 = time.perf_counter()
            try:
                return super().owners(inodes, deadline)
            finally:
                self.owners_seconds += time.perf_counter() - t0
                self.owners_wanted += len(inodes)

    return TimedKernel(owners=OwnerFinder(prescan=prescan, bpf=bpf))


class _Timer:
    seconds = 0.0


class _TimedInspector:
    """The CLI's exact-mode inspector (BPF, else pidfd_getfd) with the time spent reading
    socket options recorded: the socket iterator's pass happens in ``for_namespace``."""

    def __init__(self, inner: Any, timer: _Timer) -> None:
        self.inner, self.timer = inner, timer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def for_namespace(self, source: Any, sysctls: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return _TimedInspector(self.inner.for_namespace(source, sysctls), self.timer)
        finally:
            self.timer.seconds += time.perf_counter() - t0

    def inspect(self, targets: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.inner.inspect(targets)
        finally:
            self.timer.seconds += time.perf_counter() - t0


def child_audit(rules_file: str, inspect: bool = False, kernel_pass: bool = True) -> dict[str, Any]:
    from prometheus_client import generate_latest

    from auditd.audit.run import audit
    from auditd.config import load_rules
    from auditd.exporter import ExporterState, make_registry
    from auditd.kernel.bpf.exact import BpfAudit, BpfKernelAudit, ExactInspector
    from auditd.kernel.bpf.iterators import Iterators
    from auditd.kernel.inspect import SocketInspector
    from auditd.kernel.owners.prescan import FdPrescan

    rules = load_rules(rules_file)
    t0, c0 = time.perf_counter(), time.process_time()
    # As the CLI does: the BPF iterators when they load (owners from one pass, and in exact
    # mode every socket's options), else the owner scan in a child during the dump.
    bpf = BpfAudit(Iterators())
    bpf_load = time.perf_counter() - t0
    timer = _Timer()
    inspector = _TimedInspector(ExactInspector(bpf, SocketInspector()), timer) if inspect else None
    prescan = None if bpf.loaded else FdPrescan.start()
    kernel = _timed_kernel(prescan, bpf if bpf.loaded else None)
    scan_child_peak_mb = 0.0
    try:
        # As the session does: counts and candidates from the kernel's audit pass.
        passes = BpfKernelAudit(bpf.iterators) if bpf.loaded and kernel_pass else None
        result = audit(rules, [("host", kernel)], inspector=inspector, kernel=passes)
    finally:
        if prescan is not None:
            scan_child_peak_mb = _peak_rss_mb(prescan.pid)
            prescan.close()
    state = ExporterState(result=result, rules=rules, last_success=time.time())
    body = generate_latest(make_registry(lambda: state))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    child = resource.getrusage(resource.RUSAGE_CHILDREN)  # the scan child, once reaped
    ns = result.namespaces[0]
    return {
        "wall": wall,
        "cpu": cpu,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sockets": ns.sockets,
        "established": sum(n for (st, _), n in ns.connections.items() if st == "established"),
        "keepalive_on": sum(n for (_, ka), n in ns.connections.items() if ka == "on"),
        "findings": len(result.findings),
        "findings_total": result.findings_total,
        "scan_child_cpu": child.ru_utime + child.ru_stime,
        "scan_child_maxrss_mb": scan_child_peak_mb,
        "too_slow": sum(1 for f in result.findings if f.kind == "keepalive_too_slow"),
        "attributed": sum(1 for f in result.findings if f.pid is not None),
        "attribution_seconds": kernel.owners_seconds,
        "attribution_wanted": kernel.owners_wanted,
        "attribution_found": ns.attribution_found,
        "bpf_load_seconds": bpf_load,
        "bpf_note": bpf.note,
        "inspection_seconds": timer.seconds,
        "inspected": ns.inspection.read if ns.inspection is not None else 0,
        "inspection_error": ns.inspection.error if ns.inspection is not None else None,
        "inspection_method": ns.inspection.method if ns.inspection is not None else None,
        "metrics_bytes": len(body),
        "source": ns.source,
        "source_note": ns.source_note,
    }


def _peak_rss_mb(pid: int) -> float:
    """VmHWM of a live process. (Its rusage would count the parent's pages it had between
    fork and exec.)"""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(*args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return dict(json.loads(proc.stdout))


def run_process(
    cmd: Sequence[str], stdout: Any = subprocess.DEVNULL, cwd: str | None = None
) -> dict[str, Any]:
    """Wall, CPU and peak RSS of a whole process (its children included), its output thrown
    away or written to the file ``stdout``."""
    # stderr to a file, not a pipe read after the wait: ss under `ip netns exec` (no cgroup2
    # mount there) warns once per socket, and 200k warnings would fill a pipe and hang it.
    with tempfile.TemporaryFile() as errors:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=errors, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        err = errors.read(4096).decode(errors="replace")
    if proc.returncode not in (0, 1):  # the audit exits 1 when it has critical findings
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err.strip()}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "maxrss_mb": usage.ru_maxrss / 1024}  # fmt: skip


# --------------------------------------------------------------------------------------
# The daemon: CPU at an interval, and /metrics latency under concurrent scrapers.
# --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Daemon:
    def __init__(self, interval: str, rules_file: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        listen = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "auditd", "run", "--web.listen-address", listen,
               "--audit.interval", interval, "--log.level", "error",
               "--config.file", rules_file]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if b"keepalive_audit_last_success_timestamp_seconds " in r.read():
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the daemon did not finish its first audit")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _scrape_once(port: int, request: bytes) -> int:
    """One plain HTTP/1.0 GET; the status code. A raw socket rather than urllib: 20 urllib
    clients in one process measure their own interpreter's contention, not the agent."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head = b"".join(chunks[:1])[:12].split()
    return int(head[1]) if len(head) > 1 else 0


def scrape_latency(url: str, scrapers: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    parsed = urllib.parse.urlsplit(url)
    port = parsed.port or 80
    request = f"GET {parsed.path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()

    def worker() -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                ok = _scrape_once(port, request) == 200
            except OSError:
                ok = False
            elapsed = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors += 1

    threads = [threading.Thread(target=worker) for _ in range(scrapers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    if not latencies:
        return {"scrapes": 0, "errors": errors}
    return {
        "scrapes": len(latencies),
        "errors": errors,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


# --------------------------------------------------------------------------------------
def _median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sockets", type=int, default=20_000, help="ESTABLISHED sockets (20000)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument(
        "--flagged",
        type=float,
        default=0.01,
        help="fraction of connections on the 7200 s keepalive default (default 0.01)",
    )
    p.add_argument("--scrapers", type=int, default=0, help="concurrent /metrics scrapers (0: skip)")
    p.add_argument("--scrape-seconds", type=float, default=5.0)
    p.add_argument(
        "--daemon-cpu",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="measure the daemon's CPU over this window at a 30s interval, its /metrics, "
        "findings page and API read every 10 s (0: skip)",
    )
    p.add_argument("--idle-timeout", default="1h",
                   help="idle_timeout of the rules used (default 1h, see above)")  # fmt: skip
    p.add_argument("--inspect-sockets", action="store_true",
                   help="audit with socket inspection, as audit --inspect-sockets")  # fmt: skip
    p.add_argument(
        "--namespaces",
        type=int,
        default=0,
        metavar="N",
        help="instead: count the series of an agent with N empty namespaces",
    )
    p.add_argument(
        "--rules",
        type=int,
        default=0,
        metavar="M",
        help="with --namespaces: M rules matching nothing (default 0)",
    )
    p.add_argument("--sock-diag", action="store_true",
                   help="the audit cycle by the sock_diag dump even when the BPF audit pass "
                   "loads (the CLI and agent still use it)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)  # fmt: skip

    if args.child:
        kind = args.child[0]
        if kind == "holder":
            holder_main(int(args.child[1]), int(args.child[2]), int(args.child[3]))
            return 0
        inspect = "inspect" in args.child[2:]
        kernel_pass = "sockdiag" not in args.child[2:]
        out = child_floor() if kind == "floor" else child_audit(args.child[1], inspect, kernel_pass)
        print(json.dumps(out))
        return 0
    if args.namespaces:
        import series  # bench/series.py, next to this script

        figures = series.measure(args.namespaces, args.rules, _free_port(), ROOT)
        if args.json:
            print(json.dumps(figures, indent=2))
        else:
            series.report(figures)
        return 0
    if args.sockets < 2 or args.rounds < 1:
        p.error("--sockets must be >= 2 and --rounds >= 1")

    report: dict[str, Any] = {"sockets_requested": args.sockets}
    # Bytecode, as a pip install leaves it (an editable install under PYTHONDONTWRITEBYTECODE
    # would compile every module at every start of the CLI).
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "auditd")],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    rules_dir = tempfile.mkdtemp(prefix="keepalive-bench-")
    rules_file = os.path.join(rules_dir, "rules.yaml")
    with open(rules_file, "w") as f:
        f.write(f"version: 1\ndefaults:\n  idle_timeout: {args.idle_timeout}\nrules:\n"
                f"  - name: flagged\n    match: {{remote_ports: [{FLAGGED_PORT}]}}\n"
                "    idle_timeout: 200ms\n")  # fmt: skip
    t0 = time.perf_counter()
    try:
        with Holders(args.sockets, args.flagged) as holders:
            _measure(args, holders, rules_file, report, t0)
    finally:
        shutil.rmtree(rules_dir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def _measure(
    args: argparse.Namespace, holders: Holders, rules_file: str, report: dict[str, Any],
    t0: float,
) -> None:  # fmt: skip
    report["connections_opened"] = holders.connections
    report["setup_seconds"] = round(time.perf_counter() - t0, 1)
    floor, audits, ss, cli = [], [], [], []
    ss_cmd = ["ss", "-tinoe", "state", "established"]
    cli_cmd = [sys.executable, "-m", "auditd", "audit", "--format", "json",
               "--config", rules_file]  # fmt: skip
    audit_args = ["audit", rules_file]
    if args.inspect_sockets:
        cli_cmd.append("--inspect-sockets")
        audit_args.append("inspect")
    if args.sock_diag:
        audit_args.append("sockdiag")
    for _ in range(args.rounds):
        floor.append(run_child("floor"))
        audits.append(run_child(*audit_args))
        ss.append(run_process(ss_cmd))
        with tempfile.TemporaryFile() as out:
            # From the checkout: `-m auditd` imports the package of the current directory
            # first, whichever checkout the bench was started from.
            cli.append(run_process(cli_cmd, out, cwd=ROOT))
            out.seek(0)
            doc = json.load(out)
        cli[-1]["attribution"] = doc["namespaces"][0]["attribution"]
    last = audits[-1]
    report.update({
        "sockets_seen": last["sockets"],
        "established_seen": last["established"],
        "keepalive_on_seen": last["keepalive_on"],
        "findings": last["findings"],
        "findings_total": last["findings_total"],
        "too_slow_findings": last["too_slow"],
        "attributed_findings": last["attributed"],
        "floor_wall_s": _median(floor, "wall"),
        "audit_wall_s": _median(audits, "wall"),
        "audit_cpu_s": _median(audits, "cpu"),
        "audit_peak_rss_mb": max(a["maxrss_mb"] for a in audits),
        "attribution_s": _median(audits, "attribution_seconds"),
        "attribution_wanted": last["attribution_wanted"],
        "attribution_found": last["attribution_found"],
        "attribution_found_min": min(a["attribution_found"] for a in audits),
        "scan_child_cpu_s": _median(audits, "scan_child_cpu"),
        "scan_child_peak_rss_mb": max(a["scan_child_maxrss_mb"] for a in audits),
        "cli_attribution_found_min": min(c["attribution"]["found"] for c in cli),
        "inspection_s": _median(audits, "inspection_seconds"),
        "inspected": last["inspected"],
        "inspection_error": last["inspection_error"],
        "inspection_method": last["inspection_method"],
        "bpf_load_s": _median(audits, "bpf_load_seconds"),
        "bpf_note": last["bpf_note"],
        "ss_wall_s": _median(ss, "wall"),
        "ss_cpu_s": _median(ss, "cpu"),
        "cli_process_wall_s": _median(cli, "wall"),
        "cli_process_cpu_s": _median(cli, "cpu"),
        "cli_process_peak_rss_mb": max(c["maxrss_mb"] for c in cli),
        "metrics_bytes": last["metrics_bytes"],
        "source": last["source"],
        "source_note": last["source_note"],
        "cli_source": doc["namespaces"][0]["source"],
    })  # fmt: skip
    report["audit_vs_ss"] = report["audit_wall_s"] / report["ss_wall_s"]
    report["audit_vs_floor"] = report["audit_wall_s"] / report["floor_wall_s"]
    report["cli_vs_ss_process"] = report["cli_process_wall_s"] / report["ss_wall_s"]

    if args.scrapers:
        d = Daemon("30s", rules_file)
        try:
            d.wait_ready()
            report["scrape"] = scrape_latency(d.url, args.scrapers, args.scrape_seconds)
        finally:
            d.stop()
    if args.daemon_cpu:
        d = Daemon("30s", rules_file)
        try:
            d.wait_ready()
            c0, w0 = _cpu_seconds(d.proc.pid), time.monotonic()
            # Looked at as in production: /metrics scraped (and the findings page and API
            # read) every 10 s, so each audit's result is rendered once in each view.
            views = [d.url, d.url.replace("/metrics", "/"),
                     d.url.replace("/metrics", "/api/v1/findings")]  # fmt: skip
            end = w0 + args.daemon_cpu
            while (left := end - time.monotonic()) > 0:
                time.sleep(min(10.0, left))
                for url in views:
                    with urllib.request.urlopen(url, timeout=10) as r:
                        r.read()
            used = _cpu_seconds(d.proc.pid) - c0
            report["daemon_cpu_percent"] = 100 * used / (time.monotonic() - w0)
        finally:
            d.stop()


def print_report(r: dict[str, Any]) -> None:
    print(f"sockets: {r['sockets_seen']} seen ({r['established_seen']} established, "
          f"{r['keepalive_on_seen']} keepalive on), {r['connections_opened']} connections "
          f"opened in {r['setup_seconds']} s")  # fmt: skip
    print(f"findings: {r['findings_total']}, {r['findings']} described "
          f"({r['too_slow_findings']} keepalive_too_slow, {r['attributed_findings']} "
          f"attributed)")  # fmt: skip
    print(f"{'':28}{'wall s':>9}{'cpu s':>9}{'peak MB':>9}")
    print(f"{'raw dump (floor)':28}{r['floor_wall_s']:9.3f}")
    print(f"{'audit cycle':28}{r['audit_wall_s']:9.3f}{r['audit_cpu_s']:9.3f}"
          f"{r['audit_peak_rss_mb']:9.1f}")  # fmt: skip
    print(f"{'  of which attribution':28}{r['attribution_s']:9.3f}"
          f"   ({r['attribution_found_min']} of {r['attribution_wanted']} owners found, "
          f"the worst round)")  # fmt: skip
    print(f"{'  owner scan child':28}{'':9}{r['scan_child_cpu_s']:9.3f}"
          f"{r['scan_child_peak_rss_mb']:9.1f}   (on the other core, during the dump)")  # fmt: skip
    if r["inspected"] or r["inspection_error"]:
        print(f"{'  of which inspection':28}{r['inspection_s']:9.3f}   ({r['inspected']} sockets"
              f" read{': ' + r['inspection_error'] if r['inspection_error'] else ''})")  # fmt: skip
    if r["bpf_note"] is None:
        how = f", options by {r['inspection_method']}" if r["inspected"] else ""
        print(f"{'  of which BPF load':28}{r['bpf_load_s']:9.3f}   (owners by the owner "
              f"iterator{how})")  # fmt: skip
    else:
        print(f"BPF unavailable, owners by the /proc scan: {r['bpf_note']}")
    print(f"counted by: {r['source']} in the audit cycle"
          f"{' (' + r['source_note'] + ')' if r['source_note'] else ''}, {r['cli_source']} "
          "in the CLI")  # fmt: skip
    print(f"{'ss -tinoe (process)':28}{r['ss_wall_s']:9.3f}{r['ss_cpu_s']:9.3f}")
    print(f"{'audit --format json (proc)':28}{r['cli_process_wall_s']:9.3f}"
          f"{r['cli_process_cpu_s']:9.3f}{r['cli_process_peak_rss_mb']:9.1f}"
          f"   ({r['cli_attribution_found_min']} owners found, the worst round)")  # fmt: skip
    print(f"audit/ss {r['audit_vs_ss']:.2f} (target <= 1.0), audit/floor "
          f"{r['audit_vs_floor']:.2f} (target <= 3.0), cli/ss {r['cli_vs_ss_process']:.2f} "
          f"(target < 1.0)")  # fmt: skip
    if "scrape" in r:
        s = r["scrape"]
        print(f"/metrics: {s['scrapes']} scrapes, {s['errors']} errors, "
              f"p50 {s.get('p50_ms', 0):.1f} ms, "
              f"p99 {s.get('p99_ms', 0):.1f} ms (target < 20)")  # fmt: skip
    if "daemon_cpu_percent" in r:
        cpu = r["daemon_cpu_percent"]
        print(f"daemon CPU at a 30 s interval, its views read every 10 s: {cpu:.2f} % of a core "
              f"(targets <= 1.5 with BPF, <= 3 without)")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
