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

Passwords are checked with the ``bcrypt`` package (a well-kept binding of the reference
implementation; writing our own bcrypt would be unwise). bcrypt is slow by design (cost 10:
~60 ms), so results are cached as the toolkit does, under an HMAC of user, hash and password
with a per-process key: the cache never holds a password, and a changed hash misses it.
Timing tells nothing either: bcrypt compares in constant time, an unknown user costs a bcrypt
of a decoy hash like a known one, and a cache lookup hashes an HMAC nobody else can compute.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import ssl
import threading
from dataclasses import dataclass, field

import bcrypt
from yaml.nodes import MappingNode, Node, ScalarNode

from auditd.config import (
    ConfigError,
    _bool,
    _describe,
    _Invalid,
    _mapping,
    _one_line,
    _sequence,
    _show,
    _string,
    compose_yaml,
    read_config_file,
)

_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_TLS_KEYS = (
    "cert_file", "key_file", "client_auth_type", "client_ca_file", "client_ca",
    "client_allowed_sans", "min_version", "max_version", "cipher_suites",
    "prefer_server_cipher_suites", "curve_preferences", "cert", "key",
)  # fmt: skip
_HTTP_KEYS = ("http2", "headers")
_UNSUPPORTED = {
    "rate_limit": "is not supported by keepalive-auditd; put a reverse proxy in front",
    "tls_server_config.cert": "(inline certificate) is not supported; use cert_file",
    "tls_server_config.key": "(inline key) is not supported; use key_file",
    "tls_server_config.curve_preferences": "is not supported (Python's ssl cannot order "
    "curves); remove it to use OpenSSL's defaults",
}

# Go's tls.ClientAuthType names -> Python's verify mode. The two modes that take a client
# certificate without verifying it have no equivalent in Python's ssl module.
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_AUTH = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's tls.CipherSuites() (the ones the toolkit accepts) by IANA name -> OpenSSL name. The
# TLS 1.3 suites are not configurable, in Go as in OpenSSL's cipher list: accepted, no effect.
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": "",
    "TLS_AES_256_GCM_SHA384": "",
    "TLS_CHACHA20_POLY1305_SHA256": "",
}
# The toolkit's extraHTTPHeaders: the only headers it lets a config set, some with fixed values.
HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
_NULL = "tag:yaml.org,2002:null"
_BCRYPT = re.compile(r"\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}")


@dataclass(frozen=True, slots=True)
class TlsSettings:
    cert_file: str
    key_file: str
    context: ssl.SSLContext  # certificate, key, versions, ciphers and client CAs loaded
    client_auth_type: str = "NoClientCert"
    client_allowed_sans: frozenset[str] = frozenset()  # empty: any verified client


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
        data = read_config_file(path)
    except ConfigError as exc:  # the missing-file flavour means nothing here
        raise ConfigError(str(exc)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{_one_line(path)}:{line}: invalid UTF-8: {exc.reason}") from None
    return parse_web_config(text, path)


def parse_web_config(text: str, source: str) -> WebConfig:
    """The web config in ``text``; relative file names are taken from ``source``'s directory."""
    root = compose_yaml(text, source)
    if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL):
        return WebConfig(source=source)
    try:
        return _web_config(root, source)
    except _Invalid as exc:
        raise ConfigError(_one_line(f"{source}:{exc.line}: {exc.path}: {exc.what}")) from None


def _check_supported(entries: dict[str, tuple[Node, Node]], prefix: str) -> None:
    for key, (key_node, _) in entries.items():
        path = f"{prefix}{key}"
        if path in _UNSUPPORTED:
            raise _Invalid(key_node, path, _UNSUPPORTED[path])


def _web_config(root: Node, source: str) -> WebConfig:
    entries = _mapping(root, "", _TOP_KEYS)
    _check_supported(entries, "")
    directory = os.path.dirname(os.path.abspath(source))
    tls = None
    if "tls_server_config" in entries:
        tls = _tls(entries["tls_server_config"][1], directory)
    headers: tuple[tuple[str, str], ...] = ()
    if "http_server_config" in entries:
        http = _mapping(entries["http_server_config"][1], "http_server_config", _HTTP_KEYS)
        if "http2" in http:  # accepted for compatibility; HTTP/1.1 is all the agent speaks
            _bool(http["http2"][1], "http_server_config.http2")
        if "headers" in http:
            headers = _headers(http["headers"][1])
    users = _users(entries["basic_auth_users"][1]) if "basic_auth_users" in entries else {}
    return WebConfig(tls=tls, users=users, headers=headers, source=source)


def _path(node: Node, path: str, directory: str) -> str:
    name = _string(node, path, "a file name")
    return os.path.join(directory, name)  # an absolute name stays as it is


def _tls(node: Node, directory: str) -> TlsSettings | None:
    prefix = "tls_server_config"
    e = _mapping(node, prefix, _TLS_KEYS)
    _check_supported(e, f"{prefix}.")

    def text(key: str, expected: str) -> str | None:
        return _string(e[key][1], f"{prefix}.{key}", expected) if key in e else None

    cert = _path(e["cert_file"][1], f"{prefix}.cert_file", directory) if "cert_file" in e else None
    key = _path(e["key_file"][1], f"{prefix}.key_file", directory) if "key_file" in e else None
    if cert is None and key is None:
        if len(e) == 0:
            return None  # the toolkit's rule: no certificate, no TLS
        raise _Invalid(node, f"{prefix}.cert_file", "required key missing (with key_file)")
    if cert is None or key is None:
        missing = "cert_file" if cert is None else "key_file"
        raise _Invalid(node, f"{prefix}.{missing}", "required key missing")
    auth = text("client_auth_type", "a client auth type") or "NoClientCert"
    if auth in _UNVERIFIED_AUTH:
        raise _Invalid(
            e["client_auth_type"][1],
            f"{prefix}.client_auth_type",
            f"{auth} (an unverified client certificate) is not supported; "
            "use RequireAndVerifyClientCert or VerifyClientCertIfGiven with client_ca_file",
        )
    if auth not in CLIENT_AUTH:
        raise _Invalid(
            e["client_auth_type"][1],
            f"{prefix}.client_auth_type",
            f"expected one of: {', '.join(CLIENT_AUTH)}, got {_show(auth)}",
        )
    has_ca = "client_ca_file" in e or "client_ca" in e
    if has_ca and auth == "NoClientCert":
        raise _Invalid(
            e["client_ca_file" if "client_ca_file" in e else "client_ca"][1],
            f"{prefix}.client_auth_type",
            "a client CA is configured without a client auth policy; set client_auth_type",
        )
    if auth != "NoClientCert" and not has_ca:
        raise _Invalid(node, f"{prefix}.client_ca_file", f"required with {auth}")
    sans = frozenset(
        _string(n, f"{prefix}.client_allowed_sans[{i}]", "a subject alternative name")
        for i, n in enumerate(_list(e, "client_allowed_sans", prefix))
    )
    if sans and auth != "RequireAndVerifyClientCert":
        raise _Invalid(
            e["client_allowed_sans"][1],
            f"{prefix}.client_allowed_sans",
            "needs client_auth_type RequireAndVerifyClientCert (else a client may send none)",
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for bound, attribute in (
        ("min_version", "minimum_version"),
        ("max_version", "maximum_version"),
    ):
        name = text(bound, "a TLS version")
        if name is None:
            continue
        if name not in TLS_VERSIONS:
            what = f"expected one of: {', '.join(TLS_VERSIONS)}, got {_show(name)}"
            raise _Invalid(e[bound][1], f"{prefix}.{bound}", what)
        setattr(context, attribute, TLS_VERSIONS[name])
    if "min_version" not in e:
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # the toolkit's default
    low, high = text("min_version", "") or "TLS12", text("max_version", "") or "TLS13"
    if low > high:  # the names sort in version order
        raise _Invalid(e.get("min_version", (node, node))[1], f"{prefix}.min_version",
                       f"{low} is above max_version {high}")  # fmt: skip
    _ciphers(context, e, prefix)
    prefer = "prefer_server_cipher_suites"
    if prefer in e and not _bool(e[prefer][1], f"{prefix}.{prefer}"):
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # on by default, as in the toolkit
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        where = e["cert_file"][1]
        what = f"cannot load {cert} with key_file {key}: {exc}"
        raise _Invalid(where, f"{prefix}.cert_file", what) from None
    context.verify_mode = CLIENT_AUTH[auth]
    if "client_ca_file" in e:
        ca = _path(e["client_ca_file"][1], f"{prefix}.client_ca_file", directory)
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            what = f"cannot load {ca}: {exc}"
            raise _Invalid(e["client_ca_file"][1], f"{prefix}.client_ca_file", what) from None
    if "client_ca" in e:
        try:
            context.load_verify_locations(cadata=text("client_ca", "PEM certificates"))
        except (ssl.SSLError, ValueError) as exc:
            what = f"not usable: {exc}"
            raise _Invalid(e["client_ca"][1], f"{prefix}.client_ca", what) from None
    return TlsSettings(cert, key, context, auth, sans)


def _list(entries: dict[str, tuple[Node, Node]], key: str, prefix: str) -> list[Node]:
    if key not in entries:
        return []
    return _sequence(entries[key][1], f"{prefix}.{key}", empty_ok=True)


def _ciphers(context: ssl.SSLContext, e: dict[str, tuple[Node, Node]], prefix: str) -> None:
    names = []
    for i, node in enumerate(_list(e, "cipher_suites", prefix)):
        path = f"{prefix}.cipher_suites[{i}]"
        name = _string(node, path, "a cipher suite")
        if name not in CIPHER_SUITES:
            raise _Invalid(node, path, f"unknown cipher suite {_show(name)} (Go's IANA names)")
        if CIPHER_SUITES[name]:
            names.append(CIPHER_SUITES[name])
    if names:
        context.set_ciphers(":".join(names))


def _headers(node: Node) -> tuple[tuple[str, str], ...]:
    out = []
    for name, (_, value) in _mapping(node, "http_server_config.headers", tuple(HEADERS)).items():
        path = f"http_server_config.headers.{name}"
        text = _string(value, path, "a header value")
        if not text.isprintable():  # CR or LF would let the file inject headers
            raise _Invalid(value, path, "must be one line of printable characters")
        allowed = HEADERS[name]
        if allowed and text not in allowed:
            raise _Invalid(value, path, f"expected one of: {', '.join(allowed)}, got {_show(text)}")
        out.append((name, text))
    return tuple(out)


def _users(node: Node) -> dict[str, bytes]:
    path = "basic_auth_users"
    if isinstance(node, ScalarNode) and node.tag == _NULL:
        return {}
    if not isinstance(node, MappingNode):
        what = f"expected a mapping of user: bcrypt hash, got {_describe(node)}"
        raise _Invalid(node, path, what)
    users: dict[str, bytes] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode):
            raise _Invalid(key_node, path, f"expected a user name, got {_describe(key_node)}")
        user = str(key_node.value)
        user_path = f"{path}.{user}"
        if user in users:
            raise _Invalid(key_node, user_path, "duplicate user")
        if ":" in user or not user.isprintable():
            # Basic auth sends "user:password": a colon in the name could never log in.
            what = "a user name must not contain ':' or control characters"
            raise _Invalid(key_node, user_path, what)
        # The value is a secret: never echo it in an error.
        hashed = str(value_node.value) if isinstance(value_node, ScalarNode) else ""
        match = _BCRYPT.fullmatch(hashed)
        if match is None or not 4 <= int(match.group(1)) <= 31:
            what = 'expected a bcrypt hash like "$2y$10$" + 53 characters (value not shown)'
            raise _Invalid(value_node, user_path, what)
        users[user] = hashed.encode("ascii")
    return users


# --- checking credentials ----------------------------------------------------------------------

# bcrypt of a password nobody knows, checked for unknown users so that the time of an answer
# does not tell which user names exist (the toolkit does the same).
_DECOY = bcrypt.hashpw(secrets.token_bytes(16).hex().encode(), bcrypt.gensalt(10))
CACHE_SIZE = 100


class BasicAuth:
    """Checks ``Authorization: Basic ...`` headers against a WebConfig's users."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._cache: dict[bytes, bool] = {}
        self._lock = threading.Lock()  # one bcrypt at a time: it is CPU-bound by design

    def check(self, users: dict[str, bytes], header: str | None) -> bool:
        if not users:
            return True
        credentials = _parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        known = users.get(user)
        hashed = known if known is not None else _DECOY
        digest = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (user.encode(), hashed, password):
            digest.update(len(part).to_bytes(4, "big") + part)
        key = digest.digest()
        ok = self._cache.get(key)
        if ok is None:
            with self._lock:
                ok = self._cache.get(key)  # another thread may have just checked the same
                if ok is None:
                    ok = _checkpw(password, hashed)
                    if len(self._cache) >= CACHE_SIZE:
                        self._cache.clear()
                    self._cache[key] = ok
        return ok and known is not None


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # bcrypt 5 refuses passwords over 72 bytes; a hash it cannot use
        return False


def _parse_basic(header: str | None) -> tuple[str, bytes] | None:
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None
