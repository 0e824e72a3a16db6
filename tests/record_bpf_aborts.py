"""Record the BPF abort program's ring buffer records for the decoder tests (root, target kernel).

    PYTHONPATH=. python3 tests/record_bpf_aborts.py tests/data/events/bpf

Stages a keepalive timeout, a retransmission timeout, a user timeout, a peer reset and a
normal close in two network namespaces while ``aborts.bpf.o`` is attached, and writes the
records that came for those connections (``aborts.bin``: u32 length + bytes, one record
each) and ``expected.json``: what the recorder itself knows (4-tuple, the namespace's inode,
what it set on each socket, what it did to it), not what the decoder makes of them. Other
namespaces' aborts that came meanwhile are left out.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import netlab

from auditd.kernel.events.bpfabort import BpfSource, decode


def endpoint(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def stage(lab: netlab.Lab) -> list[dict[str, object]]:
    cases: list[dict[str, object]] = []
    a, b = lab.netns(), lab.netns()
    a.set_sysctl("net.ipv4.tcp_retries2", 3)
    inode = os.stat(a.path).st_ino
    cable = lab.cable(a, b)

    def conn(reason: str | None, **opts: int) -> tuple[socket.socket, socket.socket]:
        client, server = lab.connect(cable, **opts)
        cases.append({"local": endpoint(client.getsockname()),
                      "remote": endpoint(client.getpeername()), "reason": reason,
                      "netns_inode": inode, "set": opts})  # fmt: skip
        return client, server

    conn("keepalive_timeout", SO_KEEPALIVE=1, TCP_KEEPIDLE=1, TCP_KEEPINTVL=1,
         TCP_KEEPCNT=2)  # fmt: skip
    rt, _ = conn("retransmit_timeout")
    ut, _ = conn("user_timeout", TCP_USER_TIMEOUT=2000)
    _, rst_server = conn("peer_reset")
    ok, ok_server = conn(None)
    ok.close()
    ok_server.close()
    rst_server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    rst_server.close()
    time.sleep(0.2)
    b.pull_cable()
    rt.send(b"y" * 100)
    ut.send(b"z" * 100)
    time.sleep(9)  # retries2=3 gives up after about 6.7 s here
    return cases


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    source = BpfSource()
    lab = netlab.Lab()
    records: list[bytes] = []
    try:
        cases = stage(lab)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            records.extend(source._ring.poll(0.2))
    finally:
        lab.close()
        source.close()
    ours = {(c["local"], c["remote"]) for c in cases}
    kept = [r for r in records if (d := decode(r)) is not None and (d.local, d.remote) in ours]
    with open(out / "aborts.bin", "wb") as f:
        for data in kept:
            f.write(struct.pack("=I", len(data)) + data)
    (out / "expected.json").write_text(json.dumps({"cases": cases}, indent=2) + "\n")
    print(f"{len(kept)} of {len(records)} records kept")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
