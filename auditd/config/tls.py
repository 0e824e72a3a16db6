"""``tls_server_config`` of the web config: checked, then built into an ``ssl.SSLContext``.

The certificate and key are loaded here, at validation, so a bad key is a start-up (or
reload) error, not a failed handshake later. Every file is opened through
``files.open_regular_file``: a FIFO named as a certificate would otherwise block OpenSSL's
open, and with it the agent's start or reload.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from yaml.nodes import Node

from auditd.config.errors import ConfigError, show
from auditd.config.files import open_regular_file
from auditd.config.nodes import Entries, Invalid, boolean, choice, sequence, string

PREFIX = "tls_server_config"
KEYS = (
    "cert_file", "key_file", "client_auth_type", "client_ca_file", "client_ca",
    "client_allowed_sans", "min_version", "max_version", "cipher_suites",
    "prefer_server_cipher_suites", "curve_preferences", "cert", "key",
)  # fmt: skip

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


@dataclass(frozen=True, slots=True)
class TlsSettings:
    cert_file: str
    key_file: str
    context: ssl.SSLContext  # certificate, key, versions, ciphers and client CAs loaded
    client_auth_type: str = "NoClientCert"
    client_allowed_sans: frozenset[str] = frozenset()  # empty: any verified client


def tls_settings(e: Entries, node: Node, directory: str) -> TlsSettings | None:
    """The TLS of ``tls_server_config`` (its entries ``e``); None when it names no certificate.

    Relative file names are taken from ``directory`` (the web config file's).
    """
    files = _cert_and_key(e, node, directory)
    if files is None:
        return None
    auth = _client_auth(e, node)
    sans = _allowed_sans(e, auth)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _versions(context, e, node)
    _ciphers(context, e)
    prefer = "prefer_server_cipher_suites"
    if prefer in e and not boolean(e[prefer][1], f"{PREFIX}.{prefer}"):
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # on by default, as in the toolkit
    _load_cert_chain(context, e, *files)
    context.verify_mode = CLIENT_AUTH[auth]
    _client_cas(context, e, directory)
    return TlsSettings(*files, context, auth, sans)


def _path(e: Entries, key: str, directory: str) -> str | None:
    if key not in e:
        return None
    name = string(e[key][1], f"{PREFIX}.{key}", "a file name")
    return os.path.join(directory, name)  # an absolute name stays as it is


def _text(e: Entries, key: str, expected: str) -> str | None:
    return string(e[key][1], f"{PREFIX}.{key}", expected) if key in e else None


def _cert_and_key(e: Entries, node: Node, directory: str) -> tuple[str, str] | None:
    cert, key = _path(e, "cert_file", directory), _path(e, "key_file", directory)
    if cert is None and key is None:
        if len(e) == 0:
            return None  # the toolkit's rule: no certificate, no TLS
        raise Invalid(node, f"{PREFIX}.cert_file", "required key missing (with key_file)")
    if cert is None or key is None:
        missing = "cert_file" if cert is None else "key_file"
        raise Invalid(node, f"{PREFIX}.{missing}", "required key missing")
    return cert, key


def _client_auth(e: Entries, node: Node) -> str:
    key, path = "client_auth_type", f"{PREFIX}.client_auth_type"
    auth = _text(e, key, "a client auth type") or "NoClientCert"
    if auth in _UNVERIFIED_AUTH:
        raise Invalid(
            e[key][1],
            path,
            f"{auth} (an unverified client certificate) is not supported; "
            "use RequireAndVerifyClientCert or VerifyClientCertIfGiven with client_ca_file",
        )
    if auth not in CLIENT_AUTH:
        what = f"expected one of: {', '.join(CLIENT_AUTH)}, got {show(auth)}"
        raise Invalid(e[key][1], path, what)
    has_ca = "client_ca_file" in e or "client_ca" in e
    if has_ca and auth == "NoClientCert":
        raise Invalid(
            e["client_ca_file" if "client_ca_file" in e else "client_ca"][1],
            path,
            "a client CA is configured without a client auth policy; set client_auth_type",
        )
    if auth != "NoClientCert" and not has_ca:
        raise Invalid(node, f"{PREFIX}.client_ca_file", f"required with {auth}")
    return auth


def _allowed_sans(e: Entries, auth: str) -> frozenset[str]:
    key = "client_allowed_sans"
    sans = frozenset(
        string(n, f"{PREFIX}.{key}[{i}]", "a subject alternative name")
        for i, n in enumerate(_list(e, key))
    )
    if sans and auth != "RequireAndVerifyClientCert":
        raise Invalid(
            e[key][1],
            f"{PREFIX}.{key}",
            "needs client_auth_type RequireAndVerifyClientCert (else a client may send none)",
        )
    return sans


def _versions(context: ssl.SSLContext, e: Entries, node: Node) -> None:
    for bound, attribute in (
        ("min_version", "minimum_version"),
        ("max_version", "maximum_version"),
    ):
        if bound in e:
            name = choice(e[bound][1], f"{PREFIX}.{bound}", "a TLS version", TLS_VERSIONS)
            setattr(context, attribute, TLS_VERSIONS[name])
    if "min_version" not in e:
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # the toolkit's default
    low, high = _text(e, "min_version", "") or "TLS12", _text(e, "max_version", "") or "TLS13"
    if low > high:  # the names sort in version order
        where = e["min_version"][1] if "min_version" in e else node
        raise Invalid(where, f"{PREFIX}.min_version", f"{low} is above max_version {high}")


def _list(e: Entries, key: str) -> list[Node]:
    return sequence(e[key][1], f"{PREFIX}.{key}", empty_ok=True) if key in e else []


def _ciphers(context: ssl.SSLContext, e: Entries) -> None:
    names = []
    for i, node in enumerate(_list(e, "cipher_suites")):
        path = f"{PREFIX}.cipher_suites[{i}]"
        name = string(node, path, "a cipher suite")
        if name not in CIPHER_SUITES:
            raise Invalid(node, path, f"unknown cipher suite {show(name)} (Go's IANA names)")
        if CIPHER_SUITES[name]:
            names.append(CIPHER_SUITES[name])
    if names:
        context.set_ciphers(":".join(names))


def _load_cert_chain(context: ssl.SSLContext, e: Entries, cert: str, key: str) -> None:
    try:
        with _checked(cert) as cert_name, _checked(key) as key_name:
            context.load_cert_chain(cert_name, key_name)
    except (ConfigError, OSError, ssl.SSLError) as exc:
        what = f"cannot load {cert} with key_file {key}: {exc}"
        raise Invalid(e["cert_file"][1], f"{PREFIX}.cert_file", what) from None


def _client_cas(context: ssl.SSLContext, e: Entries, directory: str) -> None:
    ca = _path(e, "client_ca_file", directory)
    if ca is not None:
        where, path = e["client_ca_file"][1], f"{PREFIX}.client_ca_file"
        try:
            with _checked(ca) as name:
                context.load_verify_locations(cafile=name)
        except (ConfigError, OSError, ssl.SSLError) as exc:
            raise Invalid(where, path, f"cannot load {ca}: {exc}") from None
    if "client_ca" in e:
        try:
            context.load_verify_locations(cadata=_text(e, "client_ca", "PEM certificates"))
        except (ssl.SSLError, ValueError) as exc:
            raise Invalid(e["client_ca"][1], f"{PREFIX}.client_ca", f"not usable: {exc}") from None


@contextmanager
def _checked(path: str) -> Iterator[str]:
    """A name for ``path`` that OpenSSL may open safely (it takes only names, not files).

    The file is opened without blocking and checked to be regular; OpenSSL then opens
    ``/proc/self/fd/N``, which reopens that very file, so no FIFO can be swapped in between.
    """
    fd = open_regular_file(path)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
