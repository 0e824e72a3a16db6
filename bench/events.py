"""Benchmark of the abort-event path: its CPU at a connection churn, and losses at an abort rate.

    python3 bench/events.py [--rate 2000] [--seconds 10] [--abort-rate 200] [--abort-seconds 10]
                            [--source auto|bpf|perf]

Root only (system-wide tracepoints; a network namespace ``kbench-ev-<pid>`` of its own,
deleted at the end; traffic on its loopback only). Two phases:

- churn: ``--rate`` new connections a second for ``--seconds``, each opened, accepted and
  closed normally (the client first), with and without the event reader running. The reader
  is the agent's own path (``auditd.events.open_pipeline``: perf rings, kernel filters,
  decoding, correlation) in a child process, which reports its CPU time from the moment it
  is reading (not its start-up), from ``--source`` (auto: the BPF program when it loads, as
  the agent does; the report names the one used); a normal close is no
  abort, so the filters drop every event in the kernel. The churn's own CPU is printed with
  and without the reader: the difference is the filters' cost in the kernel (noisy on a busy
  machine).
- aborts: ``--abort-rate`` connections a second for ``--abort-seconds`` are reset by their
  server (SO_LINGER 0 close: the client gets an RST while it still holds the fd, a
  ``peer_reset`` abort). The reader counts the aborts to the bench's server and the events the
  kernel lost; every abort must be seen and none lost.

Prints the figures (``--json`` for JSON); asserts nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLONE_NEWNET = 0x40000000


def reader_main(server: str, which: str) -> None:
    """Child: read abort events until stdin closes; print what it saw and its CPU time."""
    sys.path.insert(0, ROOT)
    from auditd.events import open_pipeline, wall_offset

    source, pipeline = open_pipeline(which)
    done = threading.Event()

    def until_stdin_ends() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=until_stdin_ends, daemon=True).start()
    print("ready", flush=True)
    begin = resource.getrusage(resource.RUSAGE_SELF)  # after the imports and the setup
    seen = lost = other = events = 0
    while not done.is_set():
        batch = source.read(0.2)
        lost += batch.lost
        events += len(batch.events) + len(batch.aborts)
        for record in pipeline.records(batch, wall_offset()):
            if record.remote == server and record.reason.value == "peer_reset":
                seen += 1
            else:
                other += 1
    source.close()
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = end.ru_utime + end.ru_stime - begin.ru_utime - begin.ru_stime
    print(json.dumps({"seen": seen, "lost": lost, "other_aborts": other, "events": events,
                      "cpu_s": cpu, "source": source.name}), flush=True)  # fmt: skip


class Reader:
    def __init__(self, server: str, which: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child-reader", server, "--source", which],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("event reader did not start (needs root or CAP_PERFMON)")

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out: dict[str, Any] = json.loads(self.proc.stdout.readline())
        self.proc.wait(10)
        return out


def _enter(name: str) -> None:
    """This thread into netns ``name`` (setns moves only the calling thread)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def _thread_cpu() -> float:
    return time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID)


def _paced(rate: float, seconds: float, step: Callable[[], None]) -> tuple[int, float]:
    """``step()`` ``rate`` times a second for ``seconds``; returns (done, thread CPU s)."""
    start, cpu, done = time.monotonic(), _thread_cpu(), 0
    total = int(rate * seconds)
    while done < total:
        due = start + done / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        step()
        done += 1
    return done, _thread_cpu() - cpu


LINGER0 = struct.pack("ii", 1, 0)


def run_load(netns: str, rate: float, seconds: float, reset: bool) -> dict[str, Any]:
    """Connections on the namespace's loopback: closed normally, or reset by the server."""
    result: dict[str, Any] = {}

    def body() -> None:
        _enter(netns)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        result["server"] = f"127.0.0.1:{listener.getsockname()[1]}"
        held: list[socket.socket] = []

        def step() -> None:
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            if reset:
                server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
                server.close()  # RST: the client, still open, aborts with ECONNRESET
                held.append(client)
            else:
                client.close()
                server.close()

        ready.set()
        go.wait()
        started = time.monotonic()
        done, cpu = _paced(rate, seconds, step)
        result.update(done=done, wall_s=time.monotonic() - started, cpu_s=cpu)
        time.sleep(0.5)  # the last RSTs arrive
        for c in held:
            c.close()
        listener.close()

    ready, go = threading.Event(), threading.Event()
    thread = threading.Thread(target=body)
    thread.start()
    ready.wait()
    result["go"], result["thread"] = go, thread
    return result


def phase(netns: str, rate: float, seconds: float, reset: bool, read: str | None) -> dict[str, Any]:
    """``read``: the event source of a reader to run meanwhile, None for none."""
    load = run_load(netns, rate, seconds, reset)
    reader = Reader(load["server"], read) if read else None
    load["go"].set()
    load["thread"].join()
    out = {k: load[k] for k in ("done", "wall_s", "cpu_s")}
    out["rate"] = out["done"] / out["wall_s"]
    if reader is not None:
        got = reader.stop()
        out["reader"] = got
        out["reader_cpu_pct"] = 100 * got["cpu_s"] / out["wall_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--abort-rate", type=float, default=200.0)
    p.add_argument("--abort-seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3, help="churn rounds without/with (3)")
    p.add_argument("--source", choices=("auto", "bpf", "perf"), default="auto")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child-reader", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_reader:
        reader_main(args.child_reader, args.source)
        return 0
    netns = f"kbench-ev-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        off, on = [], []
        for _ in range(args.rounds):  # alternating, so the machine's other load hits both
            off.append(phase(netns, args.rate, args.seconds, False, None))
            on.append(phase(netns, args.rate, args.seconds, False, args.source))
        report = {
            "netns": netns,
            "churn_without_reader": off,
            "churn_with_reader": on,
            "aborts": phase(netns, args.abort_rate, args.abort_seconds, True, args.source),
        }
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def _pct(rows: list[dict[str, Any]], key: str = "cpu_s") -> float:
    return float(statistics.median(100 * r[key] / r["wall_s"] for r in rows))


def print_report(r: dict[str, Any]) -> None:
    off, on, ab = r["churn_without_reader"], r["churn_with_reader"], r["aborts"]
    rate = statistics.median(x["rate"] for x in on)
    print(
        f"churn: {rate:.0f} connections/s, {len(on)} rounds of {on[0]['wall_s']:.1f} s "
        f"without and with the reader (medians); events from {on[0]['reader']['source']}"
    )
    reader = statistics.median(x["reader_cpu_pct"] for x in on)
    passed = sum(x["reader"]["events"] for x in on)
    elsewhere = sum(x["reader"]["other_aborts"] for x in on)
    print(f"  event reader CPU: {reader:.2f} % of a core ({passed} events passed the kernel "
          f"filters in all, {elsewhere} aborts elsewhere on the machine)")  # fmt: skip
    print(f"  churn CPU (its thread, kernel work included): {_pct(off):.1f} % of a core "
          f"without the reader, {_pct(on):.1f} % with it")  # fmt: skip
    got = ab["reader"]
    print(f"aborts: {ab['rate']:.0f}/s for {ab['wall_s']:.1f} s: {ab['done']} made, "
          f"{got['seen']} seen, {got['lost']} events lost; reader CPU "
          f"{ab['reader_cpu_pct']:.2f} % of a core")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
