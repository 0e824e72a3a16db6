"""SIGHUP, SIGTERM and SIGINT as flags that the agent's main loop polls, without locks.

A Python signal handler runs in the main thread between two bytecodes, possibly in the middle
of ``threading.Event.set`` of an earlier handler: a handler that takes a lock (``Event.set``
takes the Condition's) can wait forever on the lock its own thread holds. At 300 SIGHUPs/s
that wedged the agent after about 1,860 signals (issue 16). So the handler only stores a
flag; ``signal.set_wakeup_fd`` makes the C-level handler write a byte to a pipe, which wakes
the main loop's ``select`` at once (CPython's Modules/signalmodule.c, ``trip_signal``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from types import FrameType


class Signals:
    """The signals the agent was sent since the main loop last looked."""

    def __init__(self) -> None:
        self.stop_requested = False
        self.reload_pending = False
        self.received = 0  # every signal handled, for the log on stop
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self) -> None:
        """Handle SIGHUP, SIGTERM and SIGINT; only from the main thread (Python's rule)."""
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame  # plain stores only: see the module docstring
        self.received += 1
        if signum == signal.SIGHUP:
            self.reload_pending = True
        else:
            self.stop_requested = True

    def request_stop(self) -> None:
        """Stop the main loop from any thread (as SIGTERM does)."""
        self.stop_requested = True
        self._poke()

    def take_reload(self) -> bool:
        """True once per burst of SIGHUPs: those that came before the reload starts share it."""
        if not self.reload_pending:
            return False
        self.reload_pending = False
        return True

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, less if a signal comes (or came since the last wait)."""
        if self.stop_requested:
            return
        with contextlib.suppress(InterruptedError):
            select.select([self._read], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._write, b"\0")
