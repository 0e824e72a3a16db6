"""The ``--web.config.file``: TLS and basic auth for ``/metrics``, in the Prometheus
exporter-toolkit format (docs/web-configuration.md of prometheus/exporter-toolkit).

```yaml
tls_server_config:
  cert_file: server.crt            # relative paths are relative to this file's directory
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: clients-ca.crt
  min_version: TLS12
http_server_config:
  headers: {X-Content-Type-Options: nosniff}
basic_auth_users:
  prometheus: $2y$10$...           # bcrypt hash, e.g. from htpasswd -nBC 10 "" | tr -d ':\\n'
```

Validated like the rules file (one line naming file, line and key path); the certificate and
key are loaded at validation, so a bad key is a start-up error, not a failed handshake later.
Options the toolkit has and Python's ``ssl`` cannot honour (``RequestClientCert``,
``RequireAnyClientCert``: accepting a client certificate without verifying it;
``curve_preferences``; inline ``cert``/``key``) are rejected by name, never silently ignored.
``rate_limit`` is rejected too. ``http2`` is accepted and has no effect: the agent serves
HTTP/1.1.
The users' hashes are checked by ``auditd.auth``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from yaml.nodes import MappingNode, Node, ScalarNode

from auditd.config.errors import ConfigError, show
from auditd.config.files import read_config_text
from auditd.config.nodes import (
    Entries,
    Invalid,
    boolean,
    describe,
    is_null,
    mapping,
    parse_document,
    string,
)
from auditd.config.tls import KEYS as TLS_KEYS
from auditd.config.tls import PREFIX as TLS_PREFIX
from auditd.config.tls import TlsSettings, tls_settings

_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_HTTP_KEYS = ("http2", "headers")
_UNSUPPORTED = {
    "rate_limit": "is not supported by keepalive-auditd; put a reverse proxy in front",
    "tls_server_config.cert": "(inline certificate) is not supported; use cert_file",
    "tls_server_config.key": "(inline key) is not supported; use key_file",
    "tls_server_config.curve_preferences": "is not supported (Python's ssl cannot order "
    "curves); remove it to use OpenSSL's defaults",
}
# The toolkit's extraHTTPHeaders: the only headers it lets a config set, some with fixed values.
HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
_BCRYPT = re.compile(r"\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}")


@dataclass(frozen=True, slots=True)
class WebConfig:
    """What ``/metrics`` demands of a client; the default demands nothing (plain HTTP)."""

    tls: TlsSettings | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: tuple[tuple[str, str], ...] = ()
    source: str = "<none>"


def load_web_config(path: str) -> WebConfig:
    """Parse and check the file at ``path``; raises ConfigError (one line) if unusable."""
    try:
        text = read_config_text(path)
    except ConfigError as exc:  # the missing-file flavour means nothing here
        raise ConfigError(str(exc)) from None
    return parse_web_config(text, path)


def parse_web_config(text: str, source: str) -> WebConfig:
    """The web config in ``text``; relative file names are taken from ``source``'s directory."""
    return parse_document(
        text, source, lambda root: _web_config(root, source), WebConfig(source=source)
    )


def _check_supported(entries: Entries, prefix: str) -> None:
    for key, (key_node, _) in entries.items():
        path = f"{prefix}{key}"
        if path in _UNSUPPORTED:
            raise Invalid(key_node, path, _UNSUPPORTED[path])


def _web_config(root: Node, source: str) -> WebConfig:
    entries = mapping(root, "", _TOP_KEYS)
    _check_supported(entries, "")
    directory = os.path.dirname(os.path.abspath(source))
    tls = None
    if "tls_server_config" in entries:
        tls_entries = mapping(entries["tls_server_config"][1], TLS_PREFIX, TLS_KEYS)
        _check_supported(tls_entries, f"{TLS_PREFIX}.")
        tls = tls_settings(tls_entries, entries["tls_server_config"][1], directory)
    headers: tuple[tuple[str, str], ...] = ()
    if "http_server_config" in entries:
        http = mapping(entries["http_server_config"][1], "http_server_config", _HTTP_KEYS)
        if "http2" in http:  # accepted for compatibility; HTTP/1.1 is all the agent speaks
            boolean(http["http2"][1], "http_server_config.http2")
        if "headers" in http:
            headers = _headers(http["headers"][1])
    users = _users(entries["basic_auth_users"][1]) if "basic_auth_users" in entries else {}
    return WebConfig(tls=tls, users=users, headers=headers, source=source)


def _headers(node: Node) -> tuple[tuple[str, str], ...]:
    out = []
    for name, (_, value) in mapping(node, "http_server_config.headers", tuple(HEADERS)).items():
        path = f"http_server_config.headers.{name}"
        text = string(value, path, "a header value")
        if not text.isprintable():  # CR or LF would let the file inject headers
            raise Invalid(value, path, "must be one line of printable characters")
        allowed = HEADERS[name]
        if allowed and text not in allowed:
            raise Invalid(value, path, f"expected one of: {', '.join(allowed)}, got {show(text)}")
        out.append((name, text))
    return tuple(out)


def _users(node: Node) -> dict[str, bytes]:
    path = "basic_auth_users"
    if is_null(node):
        return {}
    if not isinstance(node, MappingNode):
        what = f"expected a mapping of user: bcrypt hash, got {describe(node)}"
        raise Invalid(node, path, what)
    users: dict[str, bytes] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode):
            raise Invalid(key_node, path, f"expected a user name, got {describe(key_node)}")
        user = str(key_node.value)
        user_path = f"{path}.{user}"
        if user in users:
            raise Invalid(key_node, user_path, "duplicate user")
        if ":" in user or not user.isprintable():
            # Basic auth sends "user:password": a colon in the name could never log in.
            what = "a user name must not contain ':' or control characters"
            raise Invalid(key_node, user_path, what)
        # The value is a secret: never echo it in an error.
        hashed = str(value_node.value) if isinstance(value_node, ScalarNode) else ""
        match = _BCRYPT.fullmatch(hashed)
        if match is None or not 4 <= int(match.group(1)) <= 31:
            what = 'expected a bcrypt hash like "$2y$10$" + 53 characters (value not shown)'
            raise Invalid(value_node, user_path, what)
        users[user] = hashed.encode("ascii")
    return users
