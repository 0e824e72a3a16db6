"""The ``/proc/*/fd`` scan started ahead, in a child process, while the audit dumps sockets.

Finding owners costs one ``readlink`` per open fd on the host, about 4 µs of kernel time each:
close to a second with 200k sockets, more than an audit can spend, so an in-process scan
(``auditd.kernel.owners.scan``) only finds part of them. Started when the audit starts, the child
(``_fdscan_child.py``, run with ``python -I -S``: no site-packages, no ``auditd``) does that
work on another core while this process dumps and decodes sock_diag, and has recorded nearly
every socket fd by the time the flagged inodes are known; asking it then costs a round trip.

Best effort like the scan it replaces: a child that cannot start, dies, answers garbage or
misses the deadline is killed and every later lookup returns None at once, for the caller to
fall back to the in-process scan. The child's protocol is described in its module.
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from types import TracebackType

from auditd.kernel.owners.spawn import child_command, spawn_scan

GRACE = 0.2  # seconds past the deadline for the reply to come through
NO_DEADLINE_BUDGET = 3600.0


@dataclass(frozen=True, slots=True)
class PrescanAnswer:
    """What the child knew of the inodes asked for, as ``OwnerScan`` tells it."""

    fds: dict[int, tuple[int, int]]  # inode -> (pid, fd number in that process)
    complete: bool  # every inode found, or every process looked at
    denied: int  # processes whose fd table the child was not allowed to read
    error: str | None  # why /proc itself could not be listed


class FdPrescan:
    """A running child scan; ``lookup`` as many times as there are namespaces, then ``close``."""

    def __init__(self, proc: subprocess.Popen[bytes], proc_root: str = "/proc") -> None:
        self._proc: subprocess.Popen[bytes] | None = proc
        self.pid = proc.pid
        self.proc_root = proc_root  # the /proc it scans: only sources on the same one ask it
        # One request at a time on the pipes; reentrant, so that close() from the thread of
        # an unfinished session does not wait for itself.
        self._lock = threading.RLock()

    @classmethod
    def start(cls, proc_root: str = "/proc", argv: Sequence[str] | None = None) -> FdPrescan | None:
        """Spawns the child on ``proc_root``, or None if it cannot be. ``argv`` replaces the
        command (tests)."""
        command = [*argv, proc_root] if argv is not None else child_command(proc_root)
        proc = spawn_scan(command)
        return cls(proc, proc_root) if proc is not None else None

    def lookup(
        self,
        inodes: Collection[int],
        deadline: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> PrescanAnswer | None:
        """Where the child saw each of ``inodes`` (those it found), or None if it failed.

        The child gets until ``deadline`` (a ``clock`` time) and this waits ``GRACE`` more for
        its reply. A deadline already passed still gets what the child has recorded, at once:
        usually most owners, with ``complete`` False unless all of them were among it.
        """
        session = self.begin(inodes, deadline, clock)
        return None if session is None else session.finish()

    def begin(
        self,
        inodes: Collection[int],
        deadline: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Session | None:
        """Sends a request and returns at once: the caller may scan from the highest pid down
        meanwhile (``Session``), then ``finish``. None if the child has failed."""
        self._lock.acquire()  # released by the session's finish
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            self._lock.release()
            return None
        now = clock()
        budget = NO_DEADLINE_BUDGET if deadline is None else max(0.0, deadline - now)
        until = None if deadline is None else max(deadline, now) + GRACE
        request = " ".join([f"{budget:.3f}", *(str(int(i)) for i in inodes)]) + "\n"
        session = Session(self, proc.stdin.fileno(), proc.stdout.fileno(), until, clock)
        if not session.send(request.encode()):
            session.fail()
            return None
        return session

    def close(self) -> None:
        """Ends the child and reaps it at once (it holds nothing worth a goodbye); safe to
        call again."""
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        """Kills and reaps the child, closes the pipes; later lookups get None at once."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        proc.kill()  # no-op for a child that has exited already
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> FdPrescan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _left(until: float | None, clock: Callable[[], float]) -> float | None:
    return None if until is None else max(0.0, until - clock())


class Session:
    """One request to the child, its reply read as it streams in: the owners found so far
    (``fds``) and how far the child's first lap has got (``position``), so that the caller
    can scan the other end of the process list and say how far it has got (``covered``)."""

    def __init__(
        self, owner: FdPrescan, out_fd: int, in_fd: int, until: float | None,
        clock: Callable[[], float],
    ) -> None:  # fmt: skip
        self._owner, self._out, self._in = owner, out_fd, in_fd
        self._until, self._clock = until, clock
        self._pending = b""
        self.fds: dict[int, tuple[int, int]] = {}  # inode -> (pid, fd)
        # The child's first lap reads pid ``position``: every pid below it is read, and in it
        # every fd below ``position_fd``.
        self.position = -1
        self.position_fd = 0
        self.answer: PrescanAnswer | None = None
        self.failed = False
        self._open = True

    def send(self, data: bytes) -> bool:
        """Writes without blocking past the deadline: a long request may exceed the pipe
        buffer while the child is busy between two looks at its stdin."""
        fd = self._out
        try:
            os.set_blocking(fd, False)
            view = memoryview(data)
            while view:
                left = _left(self._until, self._clock)
                if not select.select([], [fd], [], left)[1]:
                    return False
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    continue
        except OSError:  # a broken pipe: the child died
            return False
        return True

    def poll(self, wait: float | None = 0.0) -> bool:
        """Reads what the child has sent, waiting at most ``wait`` seconds (None: until the
        deadline) for something; False once the reply is over or the child failed."""
        if not self._open:
            return False
        try:
            if not select.select([self._in], [], [], wait)[0]:
                if wait != 0.0:  # waited for the end of the reply, in vain
                    self.fail()
                return self._open
            data = os.read(self._in, 65536)
        except OSError:
            data = b""
        if not data:
            self.fail()
            return False
        *lines, self._pending = (self._pending + data).split(b"\n")
        for i, line in enumerate(lines):
            if line.startswith(b"done "):
                answer = None if self._pending or i != len(lines) - 1 else _done(line, self.fds)
                if answer is None:  # more after the end, or a bad end: not our protocol
                    self.fail()
                    return False
                self.answer = answer
                self._close()
                return False
            if not self._line(line):
                self.fail()
                return False
        return True

    def _line(self, line: bytes) -> bool:
        fields = line.split()
        if len(fields) == 3 and fields[0] == b"at" and fields[1].isdigit() and fields[2].isdigit():
            self.position, self.position_fd = int(fields[1]), int(fields[2])
            return True
        if len(fields) != 3 or not all(f.isdigit() for f in fields):
            return False
        self.fds[int(fields[0])] = (int(fields[1]), int(fields[2]))
        return True

    def covered(self, pid: int, fd: int = 0) -> None:
        """Tells the child that every pid above ``pid`` has been read here, and in ``pid``
        every fd from ``fd`` up."""
        if self._open and not self.send(f"upto {pid} {fd}\n".encode()):
            self.fail()

    def stop(self) -> None:
        """Tells the child that nothing more is wanted: it replies at once."""
        if self._open and not self.send(b"stop\n"):
            self.fail()

    def finish(self) -> PrescanAnswer | None:
        """Waits for the end of the reply (not past the deadline and its grace)."""
        while self._open:
            self.poll(wait=_left(self._until, self._clock))
        return self.answer

    def fail(self) -> None:
        """The child is of no more use: killed, and every later lookup is None at once."""
        if self._open:
            self._owner._stop()
            self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._owner._lock.release()


def _done(line: bytes, fds: dict[int, tuple[int, int]]) -> PrescanAnswer | None:
    fields = line.decode(errors="replace").split(" ", 3)
    if len(fields) != 4 or fields[1] not in ("0", "1") or not fields[2].isdigit():
        return None
    error = None if fields[3] == "-" else fields[3]
    return PrescanAnswer(dict(fds), fields[1] == "1", int(fields[2]), error)
