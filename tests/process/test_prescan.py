"""The fd scan run ahead in a child process: real sockets of this process and of another one,
a socket opened after the child started, failures of the child, and its text protocol on a
fake /proc tree.

Lookups wait for the child without a deadline, so nothing depends on how fast the host is; the
one lookup with a deadline has it already passed, which only allows two outcomes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import fake_process

from auditd.kernel import LocalKernel, OwnerFinder
from auditd.kernel.owners import _fdscan_child
from auditd.kernel.owners import scan as procs
from auditd.kernel.owners.prescan import FdPrescan, PrescanAnswer
from auditd.kernel.owners.scan import OwnerCache, find_owners
from auditd.kernel.owners.spawn import CHILD

NOBODY = 2**40 + 7  # socket inodes are 32-bit: nobody holds this one


def inode_of(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def reaped(pid: int) -> bool:
    """True once ``pid`` is no child of ours any more (no zombie left)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.fixture
def own_sockets() -> Iterator[list[socket.socket]]:
    """A listening socket and three connected pairs on loopback, held by this process."""
    socks: list[socket.socket] = []
    try:
        srv = socket.socket()
        socks.append(srv)
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        for _ in range(3):
            socks.append(socket.create_connection(srv.getsockname()))
            socks.append(srv.accept()[0])
        yield socks
    finally:
        for sock in socks:
            sock.close()


HOLDER = textwrap.dedent(
    """
    import json, os, socket, sys
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    socks = [srv]
    for _ in range(2):
        socks.append(socket.create_connection(srv.getsockname()))
        socks.append(srv.accept()[0])
    print(json.dumps({os.fstat(s.fileno()).st_ino: s.fileno() for s in socks}), flush=True)
    sys.stdin.readline()  # until the test closes our stdin
    """
)


@pytest.fixture
def holder() -> Iterator[tuple[int, dict[int, int]]]:
    """Another process holding loopback sockets: (its pid, inode -> fd)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        held = {int(inode): fd for inode, fd in json.loads(proc.stdout.readline()).items()}
        yield proc.pid, held
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def prescan() -> Iterator[FdPrescan]:
    started = FdPrescan.start()
    assert started is not None
    with started:
        yield started
    assert reaped(started.pid)


def test_finds_sockets_of_this_process_and_another(
    prescan: FdPrescan, own_sockets: list[socket.socket], holder: tuple[int, dict[int, int]]
) -> None:
    holder_pid, held = holder
    own = {inode_of(s): s.fileno() for s in own_sockets}
    answer = prescan.lookup([*own, *held], None)
    assert answer is not None
    assert answer.complete and answer.error is None
    assert answer.fds == {
        **{inode: (os.getpid(), fd) for inode, fd in own.items()},
        **{inode: (holder_pid, fd) for inode, fd in held.items()},
    }


SPARSE = textwrap.dedent(
    """
    import json, os, resource, socket, sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = {}
    for target in (200, 15000):  # gaps far longer than the child reads by number
        sock = socket.create_connection(srv.getsockname())
        os.dup2(sock.fileno(), target)
        held[os.fstat(target).st_ino] = target
        sock.close()
    print(json.dumps(held), flush=True)
    sys.stdin.readline()
    """
)


def test_sparse_fd_table_is_read_to_its_last_fd(prescan: FdPrescan) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SPARSE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        held = {int(k): v for k, v in json.loads(proc.stdout.readline()).items()}
        answer = prescan.lookup(held, None)
        assert answer is not None and answer.complete
        assert answer.fds == {inode: (proc.pid, fd) for inode, fd in held.items()}
    finally:
        proc.kill()
        proc.wait()


def test_inode_nobody_holds_is_absent_and_the_answer_complete(
    prescan: FdPrescan, own_sockets: list[socket.socket]
) -> None:
    listener = inode_of(own_sockets[0])
    answer = prescan.lookup([listener, NOBODY], None)
    assert answer is not None and answer.complete
    assert answer.fds == {listener: (os.getpid(), own_sockets[0].fileno())}


def test_socket_opened_after_the_first_lap_is_found(prescan: FdPrescan) -> None:
    # Asking for an inode nobody holds, without deadline, makes the child finish its first
    # lap (and a second one): the socket opened next is in no record, only a new lap finds it.
    first = prescan.lookup([NOBODY], None)
    assert first is not None and first.complete and first.fds == {}
    with socket.socket() as late:
        late.bind(("127.0.0.1", 0))
        late.listen(1)
        answer = prescan.lookup([inode_of(late)], None)
        assert answer is not None and answer.complete
        assert answer.fds == {inode_of(late): (os.getpid(), late.fileno())}


def test_lookups_in_a_row(prescan: FdPrescan, own_sockets: list[socket.socket]) -> None:
    a, b = inode_of(own_sockets[1]), inode_of(own_sockets[2])
    for inodes in ([a], [b], [a, b], [], [a]):
        answer = prescan.lookup(inodes, None)
        assert answer is not None and answer.complete
        assert set(answer.fds) == set(inodes)


def test_passed_deadline_answers_from_the_record_at_once(prescan: FdPrescan) -> None:
    # The child has no time left for a lap: it answers from what it recorded, which cannot
    # make an inode nobody holds complete; or, on a host too busy to answer within the grace,
    # nothing at all (and the child is gone).
    answer = prescan.lookup([NOBODY], time.monotonic() - 10)
    if answer is None:
        assert reaped(prescan.pid) and prescan.lookup([NOBODY], None) is None
    else:
        assert not answer.complete and answer.fds == {}


def test_killed_child_gives_none_and_find_owners_falls_back(
    prescan: FdPrescan, own_sockets: list[socket.socket]
) -> None:
    os.kill(prescan.pid, signal.SIGKILL)
    listener = inode_of(own_sockets[0])
    assert prescan.lookup([listener], None) is None
    assert reaped(prescan.pid)
    assert prescan.lookup([listener], None) is None  # at once: the child is known gone
    scan = find_owners([listener, NOBODY], prescan=prescan)
    assert scan.complete and set(scan.found) == {listener}
    assert scan.found[listener].pid == os.getpid()
    assert scan.fds == {listener: own_sockets[0].fileno()}


def test_find_owners_through_the_prescan(
    prescan: FdPrescan, own_sockets: list[socket.socket], holder: tuple[int, dict[int, int]]
) -> None:
    holder_pid, held = holder
    own = {inode_of(s): s.fileno() for s in own_sockets}
    cache = OwnerCache()
    scan = find_owners([*own, *held, NOBODY], cache=cache, prescan=prescan)
    assert scan.complete and scan.error is None
    assert scan.fds == {**own, **held}
    assert {inode: info.pid for inode, info in scan.found.items()} == {
        **dict.fromkeys(own, os.getpid()),
        **dict.fromkeys(held, holder_pid),
    }
    assert scan.found[next(iter(own))].cmdline == find_owners(own).found[next(iter(own))].cmdline
    assert set(cache.entries) == {*own, *held}
    # Cached owners are re-checked here; the rest is asked of the child again.
    again = LocalKernel(owners=OwnerFinder(cache=cache, prescan=prescan)).owners([*own, NOBODY])
    assert again.complete and again.fds == own


def test_close_reaps_the_child_and_can_be_repeated() -> None:
    prescan = FdPrescan.start()
    assert prescan is not None
    prescan.close()
    assert reaped(prescan.pid)
    prescan.close()
    assert prescan.lookup([NOBODY], None) is None


def test_child_that_cannot_start() -> None:
    assert FdPrescan.start(argv=["/nonexistent/fdscan"]) is None


@pytest.mark.parametrize(
    "reply",
    [
        "hello world\n",
        "12 34\ndone 1 0 -\n",  # a hit without its fd
        "done 2 0 -\n",
        "done 1 x -\n",
        "done 1 0\n",
        "12 34 5\ndone 1 0 -\nextra\n",  # more after the end
        "",  # exits without a word
    ],
)
def test_garbage_from_the_child_gives_none(reply: str) -> None:
    # One write (atomic on a pipe), then the fake waits for EOF: None comes from the parsing,
    # not from the end of the child; except for the child that exits.
    fake = f"import sys; sys.stdin.readline(); sys.stdout.write({reply!r}); sys.stdout.flush()"
    if reply:
        fake += "; sys.stdin.readline()"
    prescan = FdPrescan.start(argv=[sys.executable, "-c", fake])
    assert prescan is not None
    try:
        assert prescan.lookup([1, 2], None) is None
        assert reaped(prescan.pid)
    finally:
        prescan.close()


def fake_proc_fds(root: Path, pid: int, fds: dict[int, str]) -> None:
    fake_process(root, pid, fds)


def run_child(proc_root: Path, requests: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-S", CHILD, str(proc_root)],
        input=requests,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_child_protocol_on_a_fake_proc_tree(tmp_path: Path) -> None:
    fake_proc_fds(tmp_path, 123, {0: "/dev/null", 3: "socket:[777]", 4: "pipe:[55]"})
    fake_proc_fds(tmp_path, 124, {10: "socket:[888]", 11: "socket:[777]"})
    (tmp_path / "125").mkdir()  # a process gone before its fd directory was read
    (tmp_path / "self").mkdir()  # not a pid
    # No time: what the record holds, never complete with 999 missing. Then 777 (held twice:
    # the first process wins) and 999 (a second lap, in vain), 888 from the record, nothing.
    run = run_child(tmp_path, "0 999\n5 777 999\n0 888\n5\n")
    assert run.returncode == 0 and run.stderr == ""
    # The first lap says how far it has got while a request waits ("at <pid>").
    assert run.stdout == ("at 123 0\ndone 0 0 -\n777 123 3\nat 124 0\ndone 1 0 -\n"
                          "888 124 10\ndone 1 0 -\ndone 1 0 -\n")  # fmt: skip


def test_request_during_the_first_lap_is_answered_by_the_rest_of_it(tmp_path: Path) -> None:
    # In-process, step by step: the request comes after the first process was read; the rest
    # of the first lap must find 888 (the second lap is made to see no process at all).
    fake_proc_fds(tmp_path, 123, {3: "socket:[777]"})
    fake_proc_fds(tmp_path, 124, {10: "socket:[888]"})
    record = _fdscan_child.Record(str(tmp_path))
    laps: list[_fdscan_child.Lap | None] = [record.walk(record.pids_now(), keep=True)]
    first = laps[0]
    assert first is not None
    next(first)
    assert list(record.inodes) == [777]
    record.pids_now = list  # type: ignore[method-assign]
    read_end, write_end = os.pipe()  # the agent's side: nothing sent during the answers
    try:
        requests = _fdscan_child.Requests(read_end)
        out: list[bytes] = []
        _fdscan_child.answer(record, laps, b"5 888", requests, out.append)
        assert b"".join(out) == b"888 124 10\nat 124 0\ndone 1 0 -\n"
        assert list(record.inodes) == [777, 888]  # and it went on recording
        out.clear()
        _fdscan_child.answer(record, laps, b"5 999", requests, out.append)
        assert b"".join(out) == b"done 1 0 -\n"
        assert not record.missing and not record.hits
    finally:
        os.close(read_end)
        os.close(write_end)


def test_first_lap_stops_where_the_agent_scanning_down_has_been(tmp_path: Path) -> None:
    # The agent, scanning from the highest pid down, says it has read 124 and up: the child's
    # lap stops before 124, answers complete (between them every process was read), leaves
    # the next request in the pipe, and goes on recording afterwards.
    for pid, inode in ((123, 777), (124, 888), (125, 999)):
        fake_proc_fds(tmp_path, pid, {3: f"socket:[{inode}]"})
    record = _fdscan_child.Record(str(tmp_path))
    laps: list[_fdscan_child.Lap | None] = [record.walk(record.pids_now(), keep=True)]
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"upto 124 0\n5 777\n")
        requests = _fdscan_child.Requests(read_end)
        out: list[bytes] = []
        _fdscan_child.answer(record, laps, b"5 888 999", requests, out.append)
        assert b"".join(out) == b"at 123 0\ndone 1 0 -\n"
        assert list(record.inodes) == [777] and laps[0] is not None
        assert requests.poll() == b"5 777"
        _fdscan_child.answer(record, laps, b"5 999", requests, out.append)
        assert list(record.inodes) == [777, 888, 999]  # the lap resumed
    finally:
        os.close(read_end)
        os.close(write_end)


def test_child_on_a_proc_root_it_cannot_list(tmp_path: Path) -> None:
    run = run_child(tmp_path / "missing", "5 777\n")
    assert run.returncode == 0 and run.stderr == ""
    assert run.stdout == f"done 0 0 cannot list {tmp_path / 'missing'}: No such file or directory\n"


def test_child_ends_quietly_on_a_bad_request(tmp_path: Path) -> None:
    fake_proc_fds(tmp_path, 123, {3: "socket:[777]"})
    run = run_child(tmp_path, "soon 777\n")
    assert run.returncode == 2 and run.stdout == "" and run.stderr == ""


# A child that never scans: it waits for the agent to have read every pid down to 1 (or to
# have found everything: "stop"), then answers complete. All owners come from the agent's
# own scan from the highest pid down.
IDLE_CHILD = textwrap.dedent(
    """
    import sys
    sys.stdin.readline()
    for line in sys.stdin:
        if line == "stop\\n" or (line.startswith("upto ") and int(line.split()[1]) <= 1):
            break
    sys.stdout.write("done 1 0 -\\n")
    sys.stdout.flush()
    sys.stdin.readline()
    """
)


def test_agent_scans_down_to_meet_the_child(
    own_sockets: list[socket.socket], holder: tuple[int, dict[int, int]]
) -> None:
    holder_pid, held = holder
    own = {inode_of(s): s.fileno() for s in own_sockets}
    prescan = FdPrescan.start(argv=[sys.executable, "-c", IDLE_CHILD])
    assert prescan is not None
    with prescan:
        scan = find_owners([*own, *held, NOBODY], prescan=prescan)
        assert scan.complete
        assert scan.fds == {**own, **held}
        assert {inode: info.pid for inode, info in scan.found.items()} == {
            **dict.fromkeys(own, os.getpid()),
            **dict.fromkeys(held, holder_pid),
        }
        # Everything found, nothing left to scan: "stop", and the child answers at once.
        assert find_owners(list(own), prescan=prescan).fds == own


# A process with 3000 socket fds (unix socketpairs: "socket:[N]" like TCP ones), for the
# two scans to meet inside it.
BIG = textwrap.dedent(
    """
    import json, os, resource, socket, sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
    pairs = [socket.socketpair() for _ in range(1500)]
    socks = [s for pair in pairs for s in pair]
    print(json.dumps({os.fstat(s.fileno()).st_ino: s.fileno() for s in socks}), flush=True)
    sys.stdin.readline()
    """
)


@pytest.fixture
def big() -> Iterator[tuple[int, dict[int, int]]]:
    proc = subprocess.Popen([sys.executable, "-c", BIG], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        yield proc.pid, {int(k): v for k, v in json.loads(proc.stdout.readline()).items()}
    finally:
        proc.kill()
        proc.wait()


def test_lap_stops_inside_a_process_where_the_agent_has_read_down_to(
    big: tuple[int, dict[int, int]],
) -> None:
    pid, held = big
    by_fd = {fd: inode for inode, fd in held.items()}
    record = _fdscan_child.Record("/proc")
    laps: list[_fdscan_child.Lap | None] = [record.walk([pid], keep=True)]
    read_end, write_end = os.pipe()
    try:
        # The agent has read fds 1024 and up of this process; the child wants fd 2500's socket.
        # The lap looks at the bound every 1024 fds: it stops after fd 2047.
        os.write(write_end, f"upto {pid} 1024\n".encode())
        out: list[bytes] = []
        request = f"60 {by_fd[2500]}".encode()
        _fdscan_child.answer(record, laps, request, _fdscan_child.Requests(read_end), out.append)
        assert b"".join(out).endswith(b"done 1 0 -\n")  # met: between them all was read
        assert by_fd[2500] not in record.inodes and max(by_fd) > 2500  # not read twice
        assert by_fd[2000] in record.inodes and laps[0] is not None
    finally:
        os.close(read_end)
        os.close(write_end)


# A child whose lap sits in one process ("at <pid> 0") and answers once the agent says it has
# read that process down to fd 0 (or found everything).
STUCK_CHILD = textwrap.dedent(
    """
    import sys
    pid = sys.argv[1]
    sys.stdin.readline()
    sys.stdout.write(f"at {pid} 0\\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if line == "stop\\n" or line == f"upto {pid} 0\\n":
            break
    sys.stdout.write("done 1 0 -\\n")
    sys.stdout.flush()
    sys.stdin.readline()
    """
)


def test_agent_reads_the_childs_process_from_the_top_down(
    big: tuple[int, dict[int, int]],
) -> None:
    pid, held = big
    wanted = sorted(held, key=held.__getitem__)[::500]  # fds 3, 503, ..., spread over chunks
    prescan = FdPrescan.start(argv=[sys.executable, "-c", STUCK_CHILD, str(pid)])
    assert prescan is not None
    with prescan:
        # A deadline only so that a broken scan fails instead of waiting for ever.
        scan = find_owners(wanted, deadline=time.monotonic() + 20, prescan=prescan)
        assert scan.complete
        assert scan.fds == {inode: held[inode] for inode in wanted}
        assert {info.pid for info in scan.found.values()} == {pid}


class ChildAt:
    """The session as ``_look_down`` sees it: the child's lap in ``pid`` at fd ``fd``."""

    def __init__(self, pid: int, fd: int) -> None:
        self.position, self.position_fd = pid, fd
        self.bounds: list[tuple[int, int]] = []

    def poll(self) -> bool:
        return True

    def covered(self, pid: int, fd: int = 0) -> None:
        self.bounds.append((pid, fd))


@pytest.mark.parametrize("child_fd", [0, 1100])
def test_look_down_reads_from_the_top_to_where_the_child_is(
    big: tuple[int, dict[int, int]], child_fd: int
) -> None:
    pid, held = big
    wanted = {f"socket:[{inode}]": inode for inode in held}
    session = ChildAt(pid, child_fd)
    search = procs._Search(wanted, {}, {}, "/proc", None, time.monotonic, None)
    hits = procs._look_down(pid, search, session)  # type: ignore[arg-type]
    top = max(held.values())  # fds 0..top: stdio, then the sockets
    lows, high = [], top  # the chunks read: 1024 fds each from the top, while the child is below
    while high >= 0 and child_fd <= high:
        lows.append(max(high - 1023, 0))
        high = lows[-1] - 1
    assert session.bounds == [(pid, low) for low in lows]
    assert sorted(int(fd) for _, fd in hits) == [fd for fd in held.values() if fd >= lows[-1]]
    assert len(lows) == (3 if child_fd == 0 else 2)


class ScriptedSession:
    """A session whose child reports ``late`` (inode -> (pid, fd)) once the agent has said
    it read a first process: the agent finds the rest meanwhile."""

    def __init__(self, late: dict[int, tuple[int, int]]) -> None:
        self.late = late
        self.fds: dict[int, tuple[int, int]] = {}
        self.position, self.position_fd = -1, 0
        self.said: list[str] = []

    def poll(self) -> bool:
        return "stop" not in self.said

    def covered(self, pid: int, fd: int = 0) -> None:
        self.said.append(f"upto {pid} {fd}")
        self.fds.update(self.late)

    def stop(self) -> None:
        self.said.append("stop")

    def finish(self) -> PrescanAnswer:
        return PrescanAnswer(dict(self.fds), complete="stop" in self.said, denied=0, error=None)

    def fail(self) -> None:
        pass


def test_agent_stops_the_child_once_the_two_have_found_everything(tmp_path: Path) -> None:
    # The agent reads 300 and finds 1; the child then reports 2: nothing is left, and the
    # agent must say "stop" (the child would go on until the deadline otherwise).
    fake_proc_fds(tmp_path, 300, {3: "socket:[1]"})
    fake_proc_fds(tmp_path, 200, {3: "pipe:[5]"})
    fake_proc_fds(tmp_path, 100, {3: "pipe:[6]"})
    for pid in (100, 200, 300):
        (tmp_path / str(pid) / "comm").write_text("db\n")
    session = ScriptedSession({2: (100, 9)})

    class Prescan:
        def begin(self, *args: object) -> ScriptedSession:
            return session

    scan = find_owners([1, 2], str(tmp_path), deadline=None, prescan=Prescan())  # type: ignore[arg-type]
    assert session.said == ["upto 300 0", "stop"]
    assert scan.complete and scan.fds == {1: 3, 2: 9}


def test_scan_out_of_time_leaves_the_cache_where_neither_scan_read(tmp_path: Path) -> None:
    # The child's lap is in pid 150 when the agent, reading down from 300, gets there: the
    # owner of 2 was in neither part, and the next in-process scan starts at the gap.
    fake_proc_fds(tmp_path, 300, {3: "socket:[1]"})
    fake_proc_fds(tmp_path, 200, {3: "pipe:[5]"})
    fake_proc_fds(tmp_path, 100, {3: "pipe:[6]"})
    (tmp_path / "300" / "comm").write_text("db\n")
    session = ScriptedSession({})
    session.position = 150

    class Prescan:
        def begin(self, *args: object) -> ScriptedSession:
            return session

    cache = OwnerCache()
    scan = find_owners([1, 2], str(tmp_path), prescan=Prescan(), cache=cache)  # type: ignore[arg-type]
    assert session.said == ["upto 300 0", "upto 200 0"]
    assert not scan.complete and scan.fds == {1: 3}
    assert cache.resume_after == 149


def test_a_process_cut_short_by_the_deadline_is_not_said_to_be_read(tmp_path: Path) -> None:
    fake_proc_fds(tmp_path, 300, {fd: f"pipe:[{fd}]" for fd in range(3, 2003)})
    fake_proc_fds(tmp_path, 200, {3: "socket:[1]"})
    session = ScriptedSession({})

    class Prescan:
        def begin(self, *args: object) -> ScriptedSession:
            return session

    times = iter([0.0, 2.0])  # before 300; after its first 1024 fds: past the deadline
    scan = find_owners([1], str(tmp_path), deadline=1.0, clock=lambda: next(times, 2.0),
                       prescan=Prescan())  # type: ignore[arg-type]  # fmt: skip
    assert session.said == [] and not scan.complete
