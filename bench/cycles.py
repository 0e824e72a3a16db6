"""The CPU of an agent's audit cycles: one AuditSession audits the bench's sockets again and
again, as the agent does every interval (warm owner caches, BPF loaded once), with the
kernel's audit pass and with the sock_diag dump.

    sudo python3 bench/cycles.py --sockets 200000 --audits 4

Prints each audit's wall, user and system CPU (system: the kernel's walk of the socket
table, in the pass or the dump) and where its counts came from; the first audit of each
session also loads BPF and runs the owner pass. Traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench
from auditd.config import parse_rules
from auditd.session import AuditOptions, AuditSession


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sockets", type=int, default=200_000)
    p.add_argument("--audits", type=int, default=4, help="audits per session (default 4)")
    args = p.parse_args()
    rules = parse_rules(
        "version: 1\ndefaults:\n  idle_timeout: 1h\nrules:\n  - name: flagged\n"
        f"    match: {{remote_ports: [{bench.FLAGGED_PORT}]}}\n    idle_timeout: 200ms\n",
        "bench",
    )
    with bench.Holders(args.sockets, 0.01):
        time.sleep(1)
        for kernel_pass in (True, False):
            session = AuditSession(options=AuditOptions(kernel_pass=kernel_pass))
            for i in range(args.audits):
                (u0, s0), t0 = _cpu(), time.perf_counter()
                run = session.audit(rules)
                (u1, s1), t1 = _cpu(), time.perf_counter()
                ns = run.result.namespaces[0]
                print(f"{'kernel pass' if kernel_pass else 'sock_diag  '} audit {i}: wall "
                      f"{t1 - t0:.3f} s, user {u1 - u0:.3f} s, system {s1 - s0:.3f} s, "
                      f"counted by {ns.source}, {run.result.findings_total} findings, "
                      f"{ns.attribution_found}/{ns.attribution_wanted} owners",
                      flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
