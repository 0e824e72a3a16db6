"""Owner identity: real uid, user name (from the process's own /etc/passwd), start time.

Parsers on plain bytes; the reader on a fake procfs tree, hostile files included (a FIFO, a
symlink, a huge file); then live processes against psutil, the oracle: same uid, same
start time, and the same user name where the process shares the host's root.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import netlab
import psutil
import pytest
from agent import wait_for

from auditd.kernel import identity
from auditd.kernel.owners.scan import process_info
from auditd.report import rfc3339

# A name that breaks naive /proc/PID/stat parsing: parentheses and spaces.
HOSTILE_COMM = "x) R 1 2 (y"


def _stat(comm: str, starttime: int) -> bytes:
    fields = ["S", *map(str, range(4, 22)), str(starttime), "0", "0"]
    return f"42 ({comm}) {' '.join(fields)}\n".encode()


def test_parsers() -> None:
    assert identity.real_uid(b"Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t5\n") == 1000
    assert identity.real_uid(b"Name:\tx\n") is None
    assert identity.start_ticks(_stat("plain", 12345)) == 12345
    assert identity.start_ticks(_stat(HOSTILE_COMM, 777)) == 777
    assert identity.start_ticks(b"42 (cut") is None
    passwd = (b"root:x:0:0:root:/root:/bin/sh\nbad line\nalias:x:0:0::/:/bin/sh\n"
              b"pg:x:999:999::/:/bin/sh\n:x:5:5::/:\nev il:x:6:6::/:\n"
              b"\x1b[2J:x:7:7::/:\n" + b"l" * 33 + b":x:8:8::/:\n")  # fmt: skip
    assert identity.parse_passwd(passwd) == {0: "root", 999: "pg"}


def _fake(root: Path, pid: int, passwd: bytes | None = None) -> Path:
    base = root / str(pid)
    (base / "root" / "etc").mkdir(parents=True)
    (base / "comm").write_text(HOSTILE_COMM + "\n")
    (base / "cmdline").write_bytes(b"app\0--flag\0")
    (base / "status").write_text("Name:\tapp\nUid:\t999\t999\t999\t999\n")
    (base / "stat").write_bytes(_stat(HOSTILE_COMM, 250 * os.sysconf("SC_CLK_TCK")))
    if passwd is not None:
        (base / "root" / "etc" / "passwd").write_bytes(passwd)
    return base


def test_process_info_reads_identity_from_a_fake_proc(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu 1 2 3\nbtime 1700000000\nprocesses 5\n")
    _fake(tmp_path, 10, b"postgres:x:999:999::/:/bin/sh\n")
    info = process_info(10, str(tmp_path))
    assert info is not None and info.name == HOSTILE_COMM
    assert (info.uid, info.user, info.started_at) == (999, "postgres", 1700000250.0)
    _fake(tmp_path, 11, b"root:x:0:0::/:/bin/sh\n")  # the uid has no name there
    info = process_info(11, str(tmp_path))
    assert info is not None and (info.uid, info.user) == (999, None)


def test_hostile_passwd_files_are_refused_without_waiting(tmp_path: Path) -> None:
    fifo = _fake(tmp_path, 20) / "root" / "etc" / "passwd"
    os.mkfifo(fifo)  # opened with O_NONBLOCK and refused: not a regular file
    assert identity.user_name(20, 999, str(tmp_path)) is None
    link = _fake(tmp_path, 21) / "root" / "etc" / "passwd"
    (tmp_path / "elsewhere").write_text("evil:x:999:999::/:/bin/sh\n")
    link.symlink_to(tmp_path / "elsewhere")  # resolved outside its root: not followed
    assert identity.user_name(21, 999, str(tmp_path)) is None
    huge = _fake(tmp_path, 22) / "root" / "etc" / "passwd"
    with open(huge, "wb") as f:
        f.truncate(identity.PASSWD_MAX + 1)
    assert identity.user_name(22, 999, str(tmp_path)) is None
    assert identity.user_name(23, 999, str(tmp_path)) is None  # no such process


NOBODY = 65534


# The interpreter may live where nobody cannot reach it (/root/.pyenv): processes become
# nobody once started instead.
# Everything is imported first, for the same reason.
AS_NOBODY = f"os.setgroups([]);os.setgid({NOBODY});os.setuid({NOBODY});"


def _holder(name: str, *, nobody: bool = False) -> subprocess.Popen[bytes]:
    """A process that renames itself (comm) and waits; as nobody if asked."""
    code = f"import os;open('/proc/self/comm','w').write({name!r});"
    code += (AS_NOBODY if nobody else "") + "print(1,flush=True);input()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == b"1\n"
    return proc


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as nobody")
def test_live_processes_match_psutil() -> None:
    procs = [_holder(HOSTILE_COMM), _holder("plain", nobody=True)]
    try:
        for proc in procs:
            info = process_info(proc.pid)
            oracle = psutil.Process(proc.pid)
            assert info is not None
            assert info.uid == oracle.uids().real
            assert info.user == oracle.username()  # same root, same /etc/passwd
            assert info.started_at == pytest.approx(oracle.create_time(), abs=1e-6)
        assert [process_info(p.pid).uid for p in procs] == [0, NOBODY]  # type: ignore[union-attr]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.kernel
def test_audit_json_names_the_owners_user_and_start(lab: netlab.Lab, tmp_path: Path) -> None:
    ns = lab.netns()
    listener = ns.listen("127.0.0.1")
    code = (  # connected as root, then nobody: the interpreter cannot import as nobody here
        "import os,socket,sys;s=socket.create_connection(('127.0.0.1',int(sys.argv[1])));"
        + AS_NOBODY
        + "print(s.getsockname()[1],flush=True);sys.stdin.read()"
    )
    argv = ns.exec_argv([sys.executable, "-c", code, str(listener.getsockname()[1])])
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        ns.adopt(listener.accept()[0])
        rules = tmp_path / "rules.yaml"
        rules.write_text("version: 1\ndefaults:\n  idle_timeout: 1s\n  detection_budget: 1d\n")

        def owned() -> dict[str, object] | None:
            run = ns.audit(rules, "--fail-on", "never")
            found = run.findings("idle_no_keepalive", local=f"127.0.0.1:{port}")
            return found[0] if found and found[0]["pid"] is not None else None

        f = wait_for("the owned finding", owned)
        oracle = psutil.Process(int(str(f["pid"])))
        assert f["uid"] == NOBODY and f["user"] == oracle.username() == "nobody"
        assert f["started_at"] == rfc3339(oracle.create_time())
    finally:
        proc.kill()
        proc.wait()
