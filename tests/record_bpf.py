"""Re-record what the BPF iterators wrote, for tests/replay/test_bpf_records.py.

    sudo python tests/record_bpf.py            # writes tests/data/bpf/zoo.*
    sudo python tests/record_bpf.py --out DIR  # somewhere else, to compare

In a fresh lab namespace with its own keepalive sysctls it builds the socket zoo
(tests/bpfzoo.py), runs the socket iterator there and the owner iterator over the host, and
saves the raw bytes: ``zoo.sockets.bin`` (every record of the namespace) and
``zoo.owners.bin`` (the records of this process's sockets only: the others belong to
whatever else runs on the host). ``zoo.json`` holds what the socket API says about each
socket, independent of the decoder: inode, family, getsockopt values, owner pid and fd.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bpfzoo
import netlab

from auditd.kernel import netns
from auditd.kernel.bpf.iterators import Iterators
from auditd.kernel.bpf.records import OWNER_REC
from auditd.kernel.inspect import read_options

SYSCTLS = {"net.ipv4.tcp_keepalive_time": 900, "net.ipv4.tcp_keepalive_intvl": 45,
           "net.ipv4.tcp_keepalive_probes": 6}  # fmt: skip


def main(out: Path) -> None:
    lab = netlab.Lab()
    iters = Iterators()
    try:
        ns = lab.netns()
        for name, value in SYSCTLS.items():
            ns.set_sysctl(name, value)
        zoo = bpfzoo.build(ns)
        sockets = iters.sockets(lambda fn: netns.call_in_netns(ns.path, fn))
        inodes = {os.fstat(s.fileno()).st_ino for s in zoo.values()}
        owners = iters.owners()
        size = OWNER_REC.size
        mine = b"".join(
            rec
            for rec in (owners[i : i + size] for i in range(0, len(owners), size))
            if OWNER_REC.unpack(rec)[0] in inodes
        )
        facts = {
            name: {
                "inode": os.fstat(s.fileno()).st_ino,
                "family": s.family,
                "listening": name in ("listener", "v6/listener"),
                "options": list(read_options(s))[:5],
                "fd": s.fileno(),
            }
            for name, s in zoo.items()
        }
        expected = {"sysctls": SYSCTLS, "pid": os.getpid(), "comm": _comm(), "sockets": facts}
        out.mkdir(parents=True, exist_ok=True)
        (out / "zoo.sockets.bin").write_bytes(sockets)
        (out / "zoo.owners.bin").write_bytes(mine)
        (out / "zoo.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    finally:
        iters.close()
        lab.close()


def _comm() -> str:
    return Path(f"/proc/{os.getpid()}/comm").read_text().strip()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[1]) if args[:1] == ["--out"] else Path(__file__).parent / "data" / "bpf")
