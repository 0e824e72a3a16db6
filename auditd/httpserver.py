"""The metrics endpoint's server: bounded connections, a pool of handler threads, a fast stop.

What an attacker (or a crowd of slow scrapers) can hold is bounded here (issue 16):

- At most ``max_connections`` connections at once, fewer if the open-files limit is low:
  ``FD_RESERVE`` descriptors stay free for the audit (netlink sockets, /proc files, the owner
  scan's pipes). A connection beyond the cap evicts the one that has waited longest without a
  request (silent, trickling its headers, or idle between keep-alive requests); if every
  connection is busy with a request, the new one is closed at once.
- A connection gets ``idle_timeout`` seconds, from its start or its last answer, to send a
  whole request: a byte every few seconds no longer keeps it forever.
- Handler threads are daemon threads, from a pool of ``workers`` plus one of its own for a
  connection that finds every pooled thread busy. ``stop`` shuts every client socket down, so
  no thread is left waiting on a client and the process exits at once, whatever they do.
- ``accept`` failing for want of descriptors (EMFILE) pauses the accept loop instead of
  spinning a core on a listening socket that stays readable.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import resource
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

FD_RESERVE = 128  # descriptors kept free for the audit
MAX_CONNECTIONS = 512  # and below 1024 descriptors in all: select() elsewhere needs fds < 1024
IDLE_TIMEOUT = 10.0  # seconds a connection may take to send a whole request
ACCEPT_PAUSE = 0.1  # seconds the accept loop rests when out of descriptors


def connection_cap(wanted: int = MAX_CONNECTIONS) -> int:
    """``wanted`` connections, fewer if the open-files limit leaves less after the reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(4, min(wanted, soft - FD_RESERVE))


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a client must never hold up the interpreter's exit
    allow_reuse_address = True
    # The listen backlog (somaxconn caps it): a burst of scrapers' SYNs is queued, not dropped.
    request_queue_size = 4096
    workers = 16
    idle_timeout = IDLE_TIMEOUT
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the base class binds: a failed bind calls server_close.
        self._tasks: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._idle_workers = 0
        self._started_workers = 0
        # socket -> monotonic time it started waiting for a request, None while one is handled
        self._conns: dict[Any, float | None] = {}
        self._lock = threading.Lock()
        self._stopping = False
        super().__init__(*args, **kwargs)

    # -- connections ---------------------------------------------------------------------
    def get_request(self) -> tuple[Any, Any]:
        try:
            conn, addr = super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(ACCEPT_PAUSE)  # the SYNs wait in the backlog meanwhile
            raise
        conn = self.wrap_connection(conn)
        if not self._admit(conn):
            _drop(conn)
            raise ConnectionRefusedError("connection cap reached")  # handled: nothing served
        return conn, addr

    def wrap_connection(self, conn: socket.socket) -> Any:
        """The connection as the handler will use it (a subclass wraps it in TLS)."""
        return conn

    def _admit(self, conn: Any) -> bool:
        with self._lock:
            if self._stopping:
                return False
            if len(self._conns) >= self.max_connections:
                waiting = [(t, c) for c, t in self._conns.items() if t is not None]
                if not waiting:
                    return False
                _, oldest = min(waiting, key=lambda item: item[0])
                del self._conns[oldest]
                _shut(oldest)  # its thread wakes up from recv and ends
            self._conns[conn] = time.monotonic()
        return True

    def mark(self, conn: Any, *, busy: bool) -> None:
        """A handler says its connection is handling a request, or waits for the next one."""
        with self._lock:
            if conn in self._conns:
                self._conns[conn] = None if busy else time.monotonic()

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Called by serve_forever at every poll: ends connections that kept us waiting."""
        limit = time.monotonic() - self.idle_timeout
        with self._lock:
            late = [c for c, t in self._conns.items() if t is not None and t < limit]
        for conn in late:
            _shut(conn)

    @property
    def connections(self) -> int:
        return len(self._conns)

    # -- threads -------------------------------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            pooled = self._idle_workers > 0 or self._started_workers < self.workers
            if pooled and self._idle_workers == 0:
                self._started_workers += 1
                threading.Thread(target=self._work, name="http", daemon=True).start()
            elif pooled:
                self._idle_workers -= 1
        if pooled:
            self._tasks.put((request, client_address))
        else:
            super().process_request(request, client_address)  # a daemon thread of its own

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            self.process_request_thread(*task)
            with self._lock:
                self._idle_workers += 1

    def close_connections(self) -> None:
        """Shut every client socket down: handler threads blocked on a client return."""
        with self._lock:
            self._stopping = True
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            _shut(conn)
        for _ in range(self._started_workers):
            self._tasks.put(None)

    def server_close(self) -> None:
        super().server_close()
        self.close_connections()


def _shut(conn: Any) -> None:
    # The plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown would drop the
    # TLS object under the feet of the thread reading from it. OSError: already gone.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(conn, socket.SHUT_RDWR)  # wakes a thread blocked in recv


def _drop(conn: Any) -> None:
    _shut(conn)
    with contextlib.suppress(OSError):
        conn.close()
