"""Re-record an audit pass (audit.bpf.c), for tests/replay/test_bpf_audit_records.py.

    sudo python tests/record_bpf_audit.py            # writes tests/data/bpf/mix.audit.*
    sudo python tests/record_bpf_audit.py --out DIR  # somewhere else, to compare

Builds the socket mix of tests/bpfmix.py in lab namespaces, runs the pass there in exact
mode and saves its raw bytes (``mix.audit.bin``); ``mix.audit.json`` holds what the socket
API and sock_diag said about the same sockets, independent of the decoder: sock_diag's
fields of each socket from dumps just before and just after the pass (keyed by inode), the
getsockopt values, and the namespace's keepalive sysctls.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bpfmix
import netlab

from auditd.audit.inference import probe_cadence
from auditd.audit.kernelpass import pass_params
from auditd.audit.tally import Tally, loosest
from auditd.kernel import netns, sockdiag
from auditd.kernel.bpf.iterators import Iterators
from auditd.kernel.inspect import read_options
from auditd.kernel.procfs import read_sysctls


def _dump(ns: netlab.Netns) -> dict[str, dict[str, object]]:
    stats = sockdiag.DumpStats()
    socks = ns.call(lambda: list(sockdiag.dump(stats)))
    return {
        str(s.inode): {k: (v.hex() if isinstance(v, bytes) else v) for k, v in s._asdict().items()}
        for s in socks
        if s.inode
    }


def main(out: Path) -> None:
    lab = netlab.Lab()
    iters = Iterators()
    try:
        mix = bpfmix.build(lab)
        ns = mix.a
        sysctls = ns.call(read_sysctls)
        tally = Tally(loosest(bpfmix.RULES), probe_cadence(sysctls.keepalive_time,
                                                           sysctls.keepalive_intvl))  # fmt: skip
        params = pass_params(tally, sysctls, True).general.pack()
        before = _dump(ns)
        data = iters.audit_pass(
            os.stat(ns.path).st_ino, params, lambda fn: netns.call_in_netns(ns.path, fn)
        )
        after = _dump(ns)
        facts = {
            "sysctls": {
                "net.ipv4.tcp_keepalive_time": sysctls.keepalive_time,
                "net.ipv4.tcp_keepalive_intvl": sysctls.keepalive_intvl,
                "net.ipv4.tcp_keepalive_probes": sysctls.keepalive_probes,
            },
            "before": before,
            "after": after,
            "options": {
                str(os.fstat(s.fileno()).st_ino): list(read_options(s))[:5]
                for s in mix.socks.values()
            },
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "mix.audit.bin").write_bytes(data)
        (out / "mix.audit.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    finally:
        iters.close()
        lab.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[1]) if args[:1] == ["--out"] else Path(__file__).parent / "data" / "bpf")
