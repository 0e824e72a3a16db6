"""Record the kernel's abort events for the decoding tests (run as root on the target kernel).

    PYTHONPATH=. python3 tests/record_events.py tests/data/events

Writes the tracefs ``format`` file of each tracepoint read (``<system>.<name>.format``), the
bytes drained from the perf rings while three aborts and one normal close are staged in
network namespaces (``rings.bin``: u32 length + bytes, one chunk per ring per read), and
``expected.json``: what the recorder itself knows of each connection (4-tuple and what was
done to it), not what the decoder makes of it. Other traffic of the machine is recorded too,
as it comes.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import netlab

from auditd.kernel.events import EventSource, Kind, read_formats
from auditd.kernel.events.tracefs import tracefs_root


def endpoint(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def stage(lab: netlab.Lab) -> list[dict[str, object]]:
    cases: list[dict[str, object]] = []

    def note(client: socket.socket, reason: str | None) -> None:
        local, remote = endpoint(client.getsockname()), endpoint(client.getpeername())
        cases.append({"local": local, "remote": remote, "reason": reason})

    a, b = lab.netns(), lab.netns()
    a.set_sysctl("net.ipv4.tcp_retries2", 3)
    cable = lab.cable(a, b)
    ka, _ = lab.connect(cable, SO_KEEPALIVE=1, TCP_KEEPIDLE=1, TCP_KEEPINTVL=1, TCP_KEEPCNT=2)
    note(ka, "keepalive_timeout")
    rt, _ = lab.connect(cable)
    note(rt, "retransmit_timeout")
    rst, rst_server = lab.connect(cable)
    note(rst, "peer_reset")
    ok, ok_server = lab.connect(cable)
    note(ok, None)
    ok.close()
    ok_server.close()
    rst_server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    rst_server.close()
    time.sleep(0.2)
    # the RST is on its way: the client learns of it without sending
    b.pull_cable()
    rt.send(b"y" * 100)
    time.sleep(9)  # retries2=3 gives up after about 6.7 s here
    return cases


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    root = tracefs_root()
    formats = read_formats(root)
    for kind in formats:
        system, name = kind.value
        text = (Path(root) / "events" / system / name / "format").read_text()
        (out / f"{system}.{name}.format").write_text(text)
    source = EventSource(formats)
    chunks: list[bytes] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            source.perf.wait(0.1)
            chunks.extend(data for data in source.perf.drain() if data)

    thread = threading.Thread(target=reader)
    thread.start()
    lab = netlab.Lab()
    try:
        cases = stage(lab)
    finally:
        lab.close()
        done.set()
        thread.join()
        source.close()
    with open(out / "rings.bin", "wb") as f:
        for data in chunks:
            f.write(struct.pack("=I", len(data)) + data)
    (out / "expected.json").write_text(json.dumps({"cases": cases}, indent=2) + "\n")
    print(f"{len(chunks)} chunks, {sum(map(len, chunks))} bytes, kinds {[k.name for k in Kind]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
