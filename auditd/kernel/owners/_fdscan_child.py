"""The ``/proc/*/fd`` scan of ``auditd.kernel.owners.prescan``, run as a child process.

Run as ``python -I -S _fdscan_child.py PROC_ROOT``: standard library only, nothing from
``auditd``, so it starts in milliseconds. It records every socket fd of the host at once
(inode, pid, fd in three arrays: a few MB for 200k sockets, where tuples in a dict would take
tens), while the agent dumps sock_diag on another core; then it answers requests on stdin:

    request:  <budget seconds> <inode> <inode> ...\n
    reply:    <inode> <pid> <fd>\n      each inode found, as it is found
              at <pid> <fd>\n           the first lap reads this pid, every one before it
                                        is read, and in it every fd below <fd>
              done <complete 0|1> <denied> <error, or ->\n

A request arriving before the lap is over makes the rest of the lap stop once every wanted
inode is found. Meanwhile the agent, its dump done, may scan from the highest pid down and say
``upto <pid> <fd>`` (every pid above <pid> is read, and every fd from <fd> up in it: the two
may meet inside a process holding 20k sockets): the lap stops when it gets there, and the two
halves make a full lap in about half the time; ``stop`` says the agent has found the rest.
Inodes still missing after a full lap (sockets opened after their process was looked at) get
a second lap over the processes of that moment. The reply ends by the time the budget, counted
from the request, runs out. ``complete`` is 1 when every wanted inode was found or every
process was looked at; ``denied`` counts processes whose fd table was refused. Socket inodes
are global, so one record serves the requests of every network namespace. EOF on stdin ends
the child; anything unexpected ends it quietly with status 2, and the agent falls back to
scanning in-process.
"""

from __future__ import annotations

import os
import select
import sys
import time
from array import array
from collections.abc import Callable, Generator, Iterator

CHUNK = 1024  # fds read between two looks at stdin and at the clock: about 5 ms
GAP = 64  # fd numbers in a row not open before the rest of a table is listed instead
NAMES = [str(n) for n in range(4096)]  # the usual fd numbers, as readlink takes them
SOCKET = "socket:["
_END = object()

Lap = Generator[None, None, None]  # a walk over the processes, paused every CHUNK fds


def links(dir_fd: int) -> Iterator[tuple[str, str]]:
    """(fd number, link target) of every open fd of one ``/proc/PID/fd`` table, opened as
    ``dir_fd``; raises PermissionError when the links may not be read (no CAP_SYS_PTRACE).

    The fds are read by number, 0, 1, 2... until as many were read as the table holds
    (``st_size`` of the directory, Linux 6.2+): a third cheaper than listing the table first,
    which makes the kernel walk it and build an entry per fd. A sparse table (or an older
    kernel, where the size is 0) gets the rest from a listing. Also used by the agent's own
    scan (``auditd.kernel.owners.scan``)."""
    readlink, names = os.readlink, NAMES
    count = os.fstat(dir_fd).st_size
    seen = gap = fd = 0
    while seen < count and gap < GAP:  # dense part: by number
        name = names[fd] if fd < len(names) else str(fd)
        fd += 1
        try:
            target = readlink(name, dir_fd=dir_fd)
        except FileNotFoundError:  # no such fd (or closed meanwhile)
            gap += 1
            continue
        except PermissionError:
            raise
        except OSError:
            continue
        seen += 1
        gap = 0
        yield name, target
    with os.scandir(dir_fd) as listing:  # the rest: fds from ``fd`` up
        for entry in listing:
            if int(entry.name) < fd:
                continue
            try:
                target = readlink(entry.name, dir_fd=dir_fd)
            except PermissionError:
                raise
            except OSError:
                continue
            yield entry.name, target


class Record:
    """Every socket fd seen on the first lap, and what the current request still misses."""

    def __init__(self, proc_root: str) -> None:
        self.proc_root = proc_root
        self.inodes = array("Q")
        self.pids = array("i")
        self.fds = array("i")
        self.denied: set[int] = set()  # pids whose fd table was refused
        self.error: str | None = None
        self.missing: set[int] = set()  # wanted by the request being answered, not found yet
        self.hits: dict[int, tuple[int, int]] = {}  # the request's finds: inode -> (pid, fd)
        self.current = 0  # the pid the lap is reading: every one before it is read
        self.current_fd = 0  # and in it, every fd below this one
        self.next_pid: int | None = None  # the lap's next pid, between two processes

    def pids_now(self) -> list[int]:
        try:
            pids = sorted(int(e) for e in os.listdir(self.proc_root) if e.isdigit())
        except OSError as exc:
            self.error = f"cannot list {self.proc_root}: {exc.strerror or exc}"
            return []
        self.error = None
        return pids

    def walk(self, pids: list[int], keep: bool) -> Lap:
        """Reads the fd tables of ``pids``, yielding every CHUNK fds and between processes;
        ``keep`` records every socket, otherwise only the missing inodes are looked for."""
        for i, pid in enumerate(pids):
            self.next_pid = None  # inside a process: not a place to stop at
            try:
                dir_fd = os.open(f"{self.proc_root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
            except PermissionError:  # another user's, without CAP_DAC_READ_SEARCH
                self.denied.add(pid)
                dir_fd = -1
            except OSError:  # gone
                dir_fd = -1
            if dir_fd >= 0:
                try:
                    yield from self._process(pid, dir_fd, keep)
                except OSError:  # gone while being listed
                    pass
                finally:
                    os.close(dir_fd)
            self.next_pid = pids[i + 1] if i + 1 < len(pids) else None
            yield

    def _process(self, pid: int, dir_fd: int, keep: bool) -> Lap:
        """One fd table, read by ``links``, yielding every CHUNK fds."""
        missing, hits = self.missing, self.hits
        add_inode, add_pid, add_fd = self.inodes.append, self.pids.append, self.fds.append
        self.current, self.current_fd = pid, 0
        try:
            for n, (name, target) in enumerate(links(dir_fd), 1):
                if n % CHUNK == 0:
                    self.current_fd = int(name)  # every fd below it is read
                    yield
                    if not keep and not missing:
                        return  # nothing more to look for
                if not target.startswith(SOCKET):
                    continue
                try:
                    inode = int(target[8:-1])
                except ValueError:
                    continue
                number = int(name)
                if keep:
                    add_inode(inode)
                    add_pid(pid)
                    add_fd(number)
                if missing and inode in missing:
                    missing.discard(inode)
                    hits[inode] = (pid, number)
        except PermissionError:  # no CAP_SYS_PTRACE: every other fd would be refused too
            self.denied.add(pid)

    def recorded(self) -> None:
        """Moves the missing inodes found in the record into ``hits``."""
        missing, hits, pids, fds = self.missing, self.hits, self.pids, self.fds
        if not missing:
            return
        for i, inode in enumerate(self.inodes):
            if inode in missing:
                missing.discard(inode)
                hits[inode] = (pids[i], fds[i])


class Requests:
    """Lines from stdin, read only when there is something to read: the scan never waits."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.buffer = b""

    def _read(self) -> None:
        data = os.read(self.fd, 65536)
        if not data:  # the agent closed our stdin, or died
            os._exit(0)
        self.buffer += data

    def poll(self) -> bytes | None:
        """A complete line if one has come, without blocking unless one is half-written."""
        if b"\n" not in self.buffer:
            if not select.select([self.fd], [], [], 0)[0]:
                return None
            self._read()
            while self.buffer and b"\n" not in self.buffer:
                self._read()  # the rest of a line being written
        return self.next() if b"\n" in self.buffer else None

    def upto(self, bound: tuple[int, int] | None) -> tuple[int, int] | None:
        """The agent's latest ``upto`` bound, (pid, fd) (else ``bound``): only those lines
        are taken, a request that follows is left for its turn."""
        while True:
            if b"\n" not in self.buffer:
                if not select.select([self.fd], [], [], 0)[0]:
                    return bound
                self._read()
                continue
            if self.buffer.startswith(b"stop\n"):  # the agent has all it wanted
                self.next()
                bound = (-1, 0)
            elif self.buffer.startswith(b"upto "):
                _, pid, fd = self.next().split()
                bound = (int(pid), int(fd))
            else:
                return bound

    def wait(self) -> bytes:
        while b"\n" not in self.buffer:
            self._read()
        return self.next()

    def next(self) -> bytes:
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line


def _write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


class Reply:
    """Streams the reply to one request: each find as it comes, the first lap's progress."""

    def __init__(self, record: Record, write: Callable[[bytes], None]) -> None:
        self.record, self.write = record, write
        self.sent: set[int] = set()
        self.at = (-1, -1)

    def flush(self, progress: bool) -> None:
        new = [(i, hit) for i, hit in self.record.hits.items() if i not in self.sent]
        lines = [f"{inode} {pid} {fd}\n" for inode, (pid, fd) in new]
        self.sent.update(i for i, _ in new)
        at = (self.record.current, self.record.current_fd)
        if progress and at != self.at:
            self.at = at
            lines.append(f"at {at[0]} {at[1]}\n")
        if lines:
            self.write("".join(lines).encode())


def _reached(record: Record, bound: tuple[int, int]) -> bool:
    """Whether the lap has got to where the agent's scan from the top has read down to."""
    pid, fd = bound
    nxt = record.next_pid
    if nxt is not None:  # between two processes
        return nxt > pid or (nxt == pid and fd == 0)
    return record.current > pid or (record.current == pid and record.current_fd >= fd)


def answer(
    record: Record,
    laps: list[Lap | None],
    line: bytes,
    requests: Requests,
    write: Callable[[bytes], None] = _write,
) -> None:
    """Replies to one request; ``laps[0]`` is the first lap, None once it has ended.

    While the first lap goes on, the agent may scan too, from the highest pid down: it says
    ``upto <pid> <fd>`` (every pid above <pid> is read, and in it every fd from <fd> up) and
    this lap stops on reaching it."""
    fields = line.split()
    budget = max(0.0, float(fields[0]))
    deadline = time.monotonic() + budget
    # Filled in place: the suspended first lap holds these very objects.
    record.missing.update(int(f) for f in fields[1:])
    record.missing.discard(0)
    record.recorded()
    reply = Reply(record, write)
    reply.flush(progress=False)
    met = False
    first = laps[0]
    if first is not None and record.missing:
        # Not a full lap yet: go on recording, but stop as soon as all are found.
        bound: tuple[int, int] | None = None
        for _ in first:
            reply.flush(progress=True)
            bound = requests.upto(bound)
            if not record.missing or time.monotonic() >= deadline:
                break
            if bound is not None and _reached(record, bound):
                met = True  # the agent has read the rest
                break
        else:
            laps[0] = None
    complete = met or not record.missing
    if record.missing and laps[0] is None and time.monotonic() < deadline:
        # Opened after their process was looked at (or nobody holds them): look again.
        second = record.walk(record.pids_now(), keep=False)
        for _ in second:
            if not record.missing or time.monotonic() >= deadline:
                break
        else:
            complete = record.error is None
        second.close()  # its open fd directory, at once
        complete = complete or not record.missing
    reply.flush(progress=False)
    error = " ".join((record.error or "-").split())
    write(f"done {int(complete)} {len(record.denied)} {error}\n".encode())
    record.missing.clear()
    record.hits.clear()


def main(argv: list[str]) -> None:
    record = Record(argv[1])
    laps: list[Lap | None] = [record.walk(record.pids_now(), keep=True)]
    requests = Requests()
    while True:
        first = laps[0]
        line = requests.poll() if first is not None else requests.wait()
        if line is None:
            if first is not None and next(first, _END) is _END:
                laps[0] = None
            continue
        if line.startswith((b"upto ", b"stop")):
            continue  # for a request already answered
        answer(record, laps, line, requests)


if __name__ == "__main__":
    try:
        main(sys.argv)
    except BaseException:  # never a traceback: the agent sees EOF and falls back
        os._exit(2)
    os._exit(0)
