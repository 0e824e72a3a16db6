"""Basic auth for ``/metrics``: the users and bcrypt hashes of the ``--web.config.file``.

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
import secrets
import threading

import bcrypt

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
