"""The HTTP endpoint: ``/metrics`` from the last audit, the findings page at ``/`` and the
same findings as JSON at ``/api/v1/findings`` (the document of ``audit --format json``).

Each view is rendered once per state change and then served as bytes, so many concurrent
scrapers or readers cost a dictionary lookup each, not a render.

TLS and basic auth follow ``--web.config.file`` (auditd/config/web.py, auditd/auth.py). The
TLS handshake runs in the connection's own thread, not in the accept loop, so a client that
stalls it holds up nobody else; every connection times out after ``CONNECTION_TIMEOUT`` seconds of
silence. The web config is looked up per connection and per request, so a reload (SIGHUP)
takes effect at the next connection.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from auditd import __version__
from auditd import page as findings_page
from auditd.auth import BasicAuth
from auditd.config import TlsSettings, WebConfig
from auditd.errors import AuditdError
from auditd.exporter import ExporterState, make_registry
from auditd.report import to_json

CONNECTION_TIMEOUT = 10.0  # seconds a client may stay silent, handshake included

JSON_TYPE = "application/json; charset=utf-8"
NO_AUDIT = b'{"error": "no audit has finished yet"}\n'
# The page holds no script; the policy makes sure none could run (see auditd/page.py).
PAGE_HEADERS = (
    ("Content-Security-Policy", findings_page.CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
)


def parse_listen(address: str) -> tuple[str, int]:
    """``:9977`` / ``127.0.0.1:9977`` / ``[::1]:9977`` -> (host, port). Raises ValueError."""
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ValueError(f"listen address {address!r} has no port (like :9977)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(
            f"listen address {address!r}: port {port_text!r} is not a number"
        ) from None
    if not 0 <= port <= 65535:
        raise ValueError(f"listen address {address!r}: port {port} out of range")
    return host, port


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    tls: Callable[[], TlsSettings | None] = staticmethod(lambda: None)
    # Handler threads from a pool instead of a new thread per connection: thread start-up
    # was a good part of each scrape's cost under many concurrent scrapers. When every
    # pooled thread is busy (slow or silent clients), a connection gets a thread of its own
    # as before, so a few stuck clients cannot hold up the scrapes behind them.
    workers = 16

    def server_activate(self) -> None:
        super().server_activate()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="http")
        self._busy = 0
        self._busy_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._busy_lock:
            pooled = self._busy < self.workers
            if pooled:
                self._busy += 1
        if pooled:
            self._pool.submit(self._pooled, request, client_address)
        else:
            super().process_request(request, client_address)

    def _pooled(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._busy_lock:
                self._busy -= 1

    def server_close(self) -> None:
        super().server_close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # ":9977" listens on both stacks, like the Go exporters.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def get_request(self) -> tuple[Any, Any]:
        conn, addr = super().get_request()
        tls = self.tls()
        if tls is not None:  # the handshake happens in the handler's thread (setup)
            conn = tls.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A failed handshake (plain HTTP to the TLS port, a bad client certificate), a client
        # that went silent or away: the client's problem, not worth a traceback on stderr.
        del request, client_address


class _Server4(_Server):
    address_family = socket.AF_INET


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    def __init__(
        self,
        listen: str,
        path: str,
        get_state: Callable[[], ExporterState],
        log: logging.Logger,
        web: WebConfig | None = None,
    ) -> None:
        self.listen = listen
        self.path = path
        self.get_state = get_state
        self.log = log
        self.web = web or WebConfig()  # replaced whole on reload; read once per request
        self.auth = BasicAuth()
        self.registry = make_registry(get_state)
        self._cache: tuple[ExporterState, bytes] | None = None
        self._views: dict[str, tuple[ExporterState, bytes | None]] = {}
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def exposition(self) -> bytes:
        state = self.get_state()
        cached = self._cache
        if cached is not None and cached[0] is state:
            return cached[1]
        with self._lock:
            cached = self._cache
            if cached is not None and cached[0] is state:
                return cached[1]
            body = generate_latest(self.registry)
            self._cache = (state, body)
            return body

    def _view(self, name: str, render: Callable[[ExporterState], bytes | None]) -> bytes | None:
        """``render(state)``, once per state: the page and the JSON, like the exposition."""
        state = self.get_state()
        cached = self._views.get(name)
        if cached is not None and cached[0] is state:
            return cached[1]
        with self._lock:
            cached = self._views.get(name)
            if cached is None or cached[0] is not state:
                cached = (state, render(state))
                self._views[name] = cached
            return cached[1]

    def page(self) -> bytes:
        body = self._view("page", lambda state: findings_page.render(state, self.path).encode())
        assert body is not None
        return body

    def findings_json(self) -> bytes | None:
        """``audit --format json`` of the last audit; None before the first one."""
        return self._view(
            "json", lambda state: None if state.result is None else to_json(state.result).encode()
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = f"keepalive-auditd/{__version__}"
            timeout = CONNECTION_TIMEOUT

            def setup(self) -> None:
                if isinstance(self.request, ssl.SSLSocket):
                    self.request.settimeout(self.timeout)
                    self.request.do_handshake()
                    tls = server.web.tls
                    if tls is not None and not _san_allowed(self.request, tls):
                        raise ConnectionRefusedError("client certificate SAN not allowed")
                super().setup()

            def do_GET(self) -> None:
                web = server.web
                if not server.auth.check(web.users, self.headers.get("Authorization")):
                    challenge = (("WWW-Authenticate", 'Basic realm="keepalive-auditd"'),)
                    self._send(401, "text/plain; charset=utf-8", b"Unauthorized\n", challenge)
                    return
                route = self.path.split("?", 1)[0]
                if route == server.path:
                    self._send(200, CONTENT_TYPE_LATEST, server.exposition())
                elif route == "/":
                    self._send(200, "text/html; charset=utf-8", server.page(), PAGE_HEADERS)
                elif route == findings_page.API_PATH:
                    body = server.findings_json()
                    if body is None:
                        self._send(503, JSON_TYPE, NO_AUDIT)
                    else:
                        self._send(200, JSON_TYPE, body, (("Cache-Control", "no-store"),))
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def _send(
                self, code: int, ctype: str, body: bytes, extra: tuple[tuple[str, str], ...] = ()
            ) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in (*server.web.headers, *extra):
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the scraper went away (or its TLS session broke)

            def log_message(self, format: str, *args: object) -> None:
                del format, args  # access logs would flood journald at every scrape

        return Handler

    def start(self) -> None:
        """Binds and serves; raises AuditdError if the address cannot be bound (yet)."""
        try:
            host, port = parse_listen(self.listen)
        except ValueError as exc:
            raise AuditdError(str(exc)) from None
        cls: type[_Server] = _Server6 if (":" in host or host == "") else _Server4
        try:
            self._httpd = cls(("::" if host == "" else host, port), self._handler())
        except OSError as exc:
            if host != "" or cls is _Server4:
                raise AuditdError(f"cannot listen on {self.listen}: {exc.strerror}") from None
            try:  # ":port" on a host without IPv6
                self._httpd = _Server4(("0.0.0.0", port), self._handler())
            except OSError as exc4:
                raise AuditdError(f"cannot listen on {self.listen}: {exc4.strerror}") from None
        self._httpd.tls = lambda: self.web.tls
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="http",
            daemon=True,
        )
        self._thread.start()

    @property
    def address_text(self) -> str:
        if self._httpd is None:
            return self.listen
        host, port = self._httpd.server_address[:2]
        text = host.decode() if isinstance(host, bytes) else str(host)
        return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"

    @property
    def listening(self) -> bool:
        return self._httpd is not None

    @property
    def scheme(self) -> str:
        return "https" if self.web.tls is not None else "http"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


def _san_allowed(conn: ssl.SSLSocket, tls: TlsSettings) -> bool:
    """The client certificate names one of ``client_allowed_sans`` (DNS, IP, email or URI)."""
    if not tls.client_allowed_sans:
        return True
    cert = conn.getpeercert() or {}
    names = {str(pair[1]) for pair in cert.get("subjectAltName", ()) if len(pair) == 2}
    return bool(names & tls.client_allowed_sans)
