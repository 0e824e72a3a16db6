"""Benchmark: the agent under the loads of issue 16, with the figures it is judged by.

    python3 bench/attack.py rules [--rules 14047]          # a 1 MiB rules file
    python3 bench/attack.py flood [--clients 50] [--seconds 20] [--cost 10]

``rules`` writes a valid rules file of ``--rules`` rules (about 74 bytes each: 14,047 make
1 MiB) and measures: parsing it (``load_rules`` in this process, median of 3, wall and CPU
time); a real agent started on it, its reload on SIGHUP (from the signal to the ``rules
reloaded`` line) and the scrapes it answered meanwhile, that SIGTERM during such a reload
still stops it at once, and the series and bytes of a scrape.

``flood`` starts an agent with basic auth (one user, bcrypt ``--cost``) and measures the
authorized scraper's latency (10 scrapes a second, p50/p90/p99/max) while ``--clients``
connections send wrong passwords and unknown users as fast as the agent answers them, from
a process of their own (asyncio), and counts the answers the flood got (401, 429, 503; -1
for a connection error or a 15 s wait) and the agent's CPU. The flood comes from the
scraper's address (127.0.0.1), or with ``--addresses N`` from N others (127.0.1.1, ...),
as from many hosts. Its process runs at nice ``--flood-nice`` (19 by default): an attacker
elsewhere does not share our CPUs, here it does (0 to let it compete as an equal). The load
average is printed with the figures. Everything stays on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_rules(path: str, count: int) -> int:
    lines = ["version: 1", "defaults:", "  detection_budget: 30d", "rules:"]
    for i in range(count):
        lines += [f"  - name: r{i:05d}", f"    match: {{remote_ports: [{i % 65535 + 1}]}}",
                  "    idle_timeout: 300s"]  # fmt: skip
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.getsize(path)


Answer = tuple[int, bytes]


class Agent:
    def __init__(self, *args: str) -> None:
        self.port = _free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="keepalive-attack-", suffix=".log")  # noqa: SIM115
        cmd = [
            sys.executable,
            "-m",
            "auditd",
            "run",
            "--web.listen-address",
            f"127.0.0.1:{self.port}",
            "--log.format",
            "json",
            "--audit.interval",
            "5s",
            *args,
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=self.log, stdout=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip

    def lines(self, msg: str) -> list[dict[str, Any]]:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            rows = [json.loads(line) for line in f if line.startswith("{")]
        return [row for row in rows if row.get("msg") == msg]

    def wait_line(self, msg: str, count: int = 1, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while len(self.lines(msg)) < count:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"no {msg!r} line from the agent")
            time.sleep(0.02)
        return time.monotonic()

    def get(
        self, path: str = "/metrics", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        request += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n"
        with socket.create_connection(("127.0.0.1", self.port), timeout=15) as s:
            s.sendall(request.encode())
            data = b""
            while chunk := s.recv(1 << 16):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> float:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return time.monotonic() - started


def _series(body: bytes) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            counts[line.split("{", 1)[0].split(" ", 1)[0]] += 1
    return {"total": sum(counts.values()), "keepalive_findings": counts["keepalive_findings"]}


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def bench_rules(count: int) -> dict[str, Any]:
    from auditd.config import load_rules
    from auditd.config.errors import ConfigError

    tmp = tempfile.mkdtemp(prefix="keepalive-attack-")
    path = os.path.join(tmp, "rules.yaml")
    size = write_rules(path, count)
    os.utime(path, (time.time() - 10, time.time() - 10))  # settled: no re-read wait
    loads, cpu = [], []
    load_before = _load()
    for _ in range(3):
        started, started_cpu = time.perf_counter(), time.thread_time()
        load_rules(path)
        loads.append(time.perf_counter() - started)
        cpu.append(time.thread_time() - started_cpu)
    # The same file cut off in its last line: rejected, with the line, after reading it all.
    bad = os.path.join(tmp, "invalid.yaml")
    with open(path) as f, open(bad, "w") as out:
        out.write(f.read() + "  - name: [cut\n")
    os.utime(bad, (time.time() - 10, time.time() - 10))
    rejected, error = [], ""
    for _ in range(3):
        started_cpu = time.thread_time()
        try:
            load_rules(bad)
        except ConfigError as exc:
            error = str(exc)
        rejected.append(time.thread_time() - started_cpu)
    os.remove(bad)
    agent = Agent("--config.file", path)
    try:
        agent.wait_line("listening")
        agent.wait_line("rules loaded")
        while agent.get()[0] != 200 or b"keepalive_audit_last_success" not in agent.get()[1]:
            time.sleep(0.2)
        status, body = agent.get()
        # The reload runs off the main loop: scrapes (10 a second) are answered meanwhile.
        # The first after start also pays for what the agent loads lazily: three are timed.
        during: list[float] = []
        reloads = []
        for done in range(1, 4):
            sent, sent_wall = time.monotonic(), time.time()
            agent.proc.send_signal(signal.SIGHUP)
            while len(agent.lines("rules reloaded")) < done:
                started = time.perf_counter()
                if agent.get()[0] == 200:
                    during.append(time.perf_counter() - started)
                time.sleep(max(0.0, 0.1 - (time.perf_counter() - started)))
                if time.monotonic() - sent > 120:
                    raise RuntimeError("no 'rules reloaded' line from the agent")
            logged = agent.lines("rules reloaded")[done - 1]["ts"]  # UTC, to the millisecond
            at = datetime.fromisoformat(logged.replace("Z", "+00:00")).timestamp()
            reloads.append(at - sent_wall)
        time.sleep(0.2)
        agent.proc.send_signal(signal.SIGHUP)  # and SIGTERM during this reload
        time.sleep(0.1)
    finally:
        stop_s = agent.stop()
        os.remove(path)
        os.rmdir(tmp)
    return {
        "rules": count, "file_bytes": size, "load_average": load_before,
        "load_seconds_median": round(sorted(loads)[1], 3),
        "load_cpu_seconds_median": round(sorted(cpu)[1], 3),
        "invalid_cpu_seconds_median": round(sorted(rejected)[1], 3), "invalid_error": error,
        "agent_reload_seconds": [round(r, 3) for r in reloads],
        "scrapes_during_reload": len(during),
        "scrape_during_reload_max_ms": round(max(during, default=0) * 1000, 1),
        "sigterm_during_reload_seconds":
        round(stop_s, 3), "scrape_status": status, "series": _series(body),
        "metrics_bytes": len(body),
    }  # fmt: skip


# --- the flood ---------------------------------------------------------------------------------


def flood_address(i: int, addresses: int) -> str:
    """The source address of flood client ``i``: the scraper's own (127.0.0.1) with one
    address, else one of ``addresses`` others (127.0.1.1, ...), as a botnet would be."""
    if addresses <= 1:
        return "127.0.0.1"
    j = i % addresses
    return f"127.0.{1 + j // 250}.{1 + j % 250}"


async def _flooder(port: int, deadline: float, codes: Counter[int], i: int, source: str) -> None:
    n = 0
    while time.monotonic() < deadline:
        user = "prometheus" if n % 2 else f"user{i}-{n}"
        token = base64.b64encode(f"{user}:guess-{i}-{n}".encode()).decode()
        n += 1
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
            writer.write(f"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         f"Authorization: Basic {token}\r\n\r\n".encode())  # fmt: skip
            line = await asyncio.wait_for(reader.readline(), 15)
            codes[int(line.split()[1]) if line else 0] += 1
            writer.close()
        except (OSError, asyncio.TimeoutError, ValueError, IndexError):
            codes[-1] += 1
            await asyncio.sleep(0.05)


def flood_main(port: int, clients: int, seconds: float, addresses: int) -> None:
    codes: Counter[int] = Counter()

    async def run() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(
            *(
                _flooder(port, deadline, codes, i, flood_address(i, addresses))
                for i in range(clients)
            )
        )

    asyncio.run(run())
    print(json.dumps({str(k): v for k, v in codes.items()}))


def bench_flood(
    clients: int, seconds: float, cost: int, addresses: int = 1, nice: int = 19
) -> dict[str, Any]:
    import bcrypt

    password = "correct horse battery staple"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()
    tmp = tempfile.mkdtemp(prefix="keepalive-attack-")
    web = os.path.join(tmp, "web.yml")
    with open(web, "w") as f:
        f.write(f"basic_auth_users:\n  prometheus: {hashed}\n")
    good = {
        "Authorization": "Basic " + base64.b64encode(f"prometheus:{password}".encode()).decode()
    }
    agent = Agent("--web.config.file", web)
    try:
        agent.wait_line("listening")
        while agent.get(headers=good)[0] != 200:  # the scraper's first check: cached after
            time.sleep(0.2)
        cpu = agent.cpu_seconds()
        load_before = _load()
        flood = subprocess.Popen(
            [sys.executable, __file__, "--flood-child", str(agent.port), str(clients),
             str(seconds), str(addresses)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        # An attacker elsewhere does not share our CPUs: on this machine its clients do, so
        # they run at a lower priority (--flood-nice 0 to have them compete as equals).
        os.setpriority(os.PRIO_PROCESS, flood.pid, nice)
        latencies, failures = [], 0
        deadline = time.monotonic() + seconds
        time.sleep(min(1.0, seconds / 10))  # the flood under way
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                status, _ = agent.get(headers=good)
            except OSError:
                status = 0
            latencies.append(time.perf_counter() - started)
            failures += status != 200
            time.sleep(max(0.0, 0.1 - (time.perf_counter() - started)))
        out, _ = flood.communicate(timeout=60)
        cpu = agent.cpu_seconds() - cpu
        load_after = _load()
    finally:
        agent.stop()
        os.remove(web)
        os.rmdir(tmp)
    latencies.sort()

    def pick(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)

    return {
        "clients": clients, "seconds": seconds, "bcrypt_cost": cost, "addresses": addresses,
        "flood_nice": nice, "load_before": load_before, "load_after": load_after,
        "scrapes": len(latencies), "scrape_failures": failures,
        "scrape_p50_ms": pick(0.5), "scrape_p90_ms": pick(0.9), "scrape_p99_ms": pick(0.99),
        "scrape_max_ms": pick(1.0),
        "flood_answers": json.loads(out or "{}"), "agent_cpu_percent": round(100 * cpu / seconds),
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--flood-child"]:
        flood_main(int(argv[1]), int(argv[2]), float(argv[3]), int(argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("rules")
    r.add_argument("--rules", type=int, default=14047)
    f = sub.add_parser("flood")
    f.add_argument("--clients", type=int, default=50)
    f.add_argument("--seconds", type=float, default=20.0)
    f.add_argument("--cost", type=int, default=10)
    f.add_argument("--addresses", type=int, default=1, help="source addresses of the flood")
    f.add_argument("--flood-nice", type=int, default=19, help="the flood clients' nice value")
    args = p.parse_args(argv)
    if args.what == "rules":
        figures = bench_rules(args.rules)
    else:
        figures = bench_flood(
            args.clients, args.seconds, args.cost, args.addresses, args.flood_nice
        )
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
