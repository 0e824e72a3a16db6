"""The HTTP endpoint: ``/metrics`` from the last audit, the findings page at ``/`` and the
same findings as JSON at ``/api/v1/findings`` (the document of ``audit --format json``).

Each view is rendered once per state change and then served as bytes, so many concurrent
scrapers or readers cost a dictionary lookup each, not a render.

TLS and basic auth follow ``--web.config.file`` (auditd/config/web.py, auditd/auth.py). The
TLS handshake runs in the connection's own thread, not in the accept loop, so a client that
stalls it holds up nobody else; a connection has ``CONNECTION_TIMEOUT`` seconds to send a
whole request (auditd/httpserver.py bounds connections and threads). The web config is looked
up per connection and per request, so a reload (SIGHUP) takes effect at the next connection.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from auditd import __version__
from auditd import page as findings_page
from auditd.abort_records import record_dict
from auditd.auth import BasicAuth, Verdict
from auditd.config import TlsSettings, WebConfig
from auditd.config.errors import one_line
from auditd.errors import AuditdError
from auditd.exporter import ExporterState, make_registry
from auditd.httpserver import IDLE_TIMEOUT, MAX_CONNECTIONS, Server, connection_cap
from auditd.report import to_json

CONNECTION_TIMEOUT = IDLE_TIMEOUT  # seconds a client may take to send a request, TLS included

JSON_TYPE = "application/json; charset=utf-8"
NO_AUDIT = b'{"error": "no audit has finished yet"}\n'
# The page holds no script; the policy makes sure none could run (see auditd/page.py).
PAGE_HEADERS = (
    ("Content-Security-Policy", findings_page.CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
)


# A host name as getaddrinfo takes it: RFC 1123 labels, ASCII only (a non-ASCII or undecodable
# name ended in "TypeError: encoding of hostname failed" at bind time, issue 16).
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def parse_listen(address: str) -> tuple[str, int]:
    """``:9977`` / ``127.0.0.1:9977`` / ``[::1]:9977`` -> (host, port). Raises ValueError."""
    shown = one_line(address[:80] + ("…" if len(address) > 80 else ""))
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ValueError(f"listen address {shown!r} has no port (like :9977)")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(
            f"listen address {shown!r}: port {one_line(port_text[:8])!r} is not a number"
        )
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"listen address {shown!r}: port {port} out of range")
    if host and not _valid_host(host, bracketed):
        raise ValueError(
            f"listen address {shown!r}: host is not an IP address or an ASCII host name"
        )
    return host, port


def _valid_host(host: str, bracketed: bool) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return not bracketed and len(host) <= 253 and _HOSTNAME.fullmatch(host) is not None
    return ip.version == 6 or not bracketed  # brackets hold an IPv6 address only


class _Server(Server):
    tls: Callable[[], TlsSettings | None] = staticmethod(lambda: None)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # ":9977" listens on both stacks, like the Go exporters.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def wrap_connection(self, conn: socket.socket) -> Any:
        tls = self.tls()
        if tls is None:
            return conn
        # The handshake happens in the handler's thread (setup), not in the accept loop.
        return tls.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)

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
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.listen = listen
        self.max_connections = max_connections
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
        """``audit --format json`` of the last audit, with ``recent_aborts``; None before
        the first audit."""

        def render(state: ExporterState) -> bytes | None:
            if state.result is None:
                return None
            recent = [record_dict(r) for r in reversed(state.aborts.recent)]  # newest first
            return to_json(state.result, recent).encode()

        return self._view("json", render)

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

            def parse_request(self) -> bool:
                ok = super().parse_request()
                self.server.mark(self.request, busy=True)  # type: ignore[attr-defined]
                return ok

            def handle_one_request(self) -> None:
                super().handle_one_request()
                self.server.mark(self.request, busy=False)  # type: ignore[attr-defined]

            def do_GET(self) -> None:
                web = server.web
                client = str(self.client_address[0])
                verdict = server.auth.verdict(web.users, self.headers.get("Authorization"), client)
                if verdict is not Verdict.OK:
                    self._refuse(verdict)
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

            def _refuse(self, verdict: Verdict) -> None:
                text = "text/plain; charset=utf-8"
                if verdict is Verdict.DENIED:
                    challenge = (("WWW-Authenticate", 'Basic realm="keepalive-auditd"'),)
                    self._send(401, text, b"Unauthorized\n", challenge)
                elif verdict is Verdict.BACKOFF:
                    self._send(429, text, b"Too many failed logins\n", (("Retry-After", "5"),))
                else:
                    self._send(503, text, b"Too many logins at once\n", (("Retry-After", "1"),))

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
        except (OSError, UnicodeError, TypeError, ValueError) as exc:  # Unicode..: IDNA
            if host != "" or cls is _Server4:
                reason = getattr(exc, "strerror", None) or exc
                raise AuditdError(f"cannot listen on {self.listen}: {reason}") from None
            try:  # ":port" on a host without IPv6
                self._httpd = _Server4(("0.0.0.0", port), self._handler())
            except OSError as exc4:
                raise AuditdError(f"cannot listen on {self.listen}: {exc4.strerror}") from None
        self._httpd.tls = lambda: self.web.tls
        self._httpd.max_connections = connection_cap(self.max_connections)
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
