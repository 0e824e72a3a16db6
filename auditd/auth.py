"""Basic auth for ``/metrics``: the users and bcrypt hashes of the ``--web.config.file``.

Passwords are checked with the ``bcrypt`` package (a well-kept binding of the reference
implementation; writing our own bcrypt would be unwise). bcrypt is slow by design (cost 10:
~60 ms), so what a client without a password may cost is bounded (issue 16: 50 clients
sending wrong passwords kept the agent at 95 % CPU and the real scraper's p99 at 5.8 s):

- Credentials that passed are cached, as the toolkit does, under an HMAC of user, hash and
  password with a per-process key (the cache never holds a password, a changed hash misses
  it), and looked up before anything else: the authorized scraper never waits for a bcrypt.
  Only a correct password enters that cache, so no flood of wrong ones can evict it; wrong
  ones have a cache of their own (a repeated guess costs no bcrypt).
- bcrypt runs on ``workers`` threads of its own (half the CPUs: the other half serves), with
  at most ``queue_limit`` checks waiting; beyond that a request gets 503 at once. Checks of
  the same credentials at the same time share one bcrypt. Those threads run at the lowest
  priority (nice 19): when the CPUs are busy, the threads that serve requests, the
  authorized scraper's among them, run first. bcrypt (the package) releases the GIL while it
  hashes (two checks on two threads take the time of one), so a check holds up no Python code.
- An address that sent ``FREE_FAILURES`` wrong credentials in a row waits, doubling from
  ``BACKOFF_FIRST`` to ``BACKOFF_MAX`` seconds, and meanwhile gets 429 without a bcrypt (IPv6
  by /64: a host has that many addresses).

Timing tells nothing: bcrypt compares in constant time, and an unknown user costs a bcrypt of
a decoy hash of the cost the configured hashes have (a fixed cost-10 decoy told users of a
cost-5 file apart, 6 ms against 126 ms); with hashes of several costs, each unknown name gets
one of them, always the same, so no name answers differently from a known one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import os
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum

import bcrypt

CACHE_SIZE = 100  # credentials that passed
DENIED_SIZE = 1000  # credentials that failed
CLIENTS_SIZE = 10_000  # addresses whose failures are counted
FREE_FAILURES = 5
BACKOFF_FIRST = 0.5  # seconds
BACKOFF_MAX = 60.0
QUEUE_LIMIT = 8
WORKERS = max(1, (os.cpu_count() or 2) // 2)
CHECK_NICE = 19  # the password-check threads' nice value: the lowest priority
_UNKNOWN = b"unknown user"  # in the cache key of a user not configured


class Verdict(Enum):
    OK = 200
    DENIED = 401
    BACKOFF = 429  # this address failed too often: wait
    BUSY = 503  # too many password checks queued


class BasicAuth:
    """Checks ``Authorization: Basic ...`` headers against a WebConfig's users."""

    def __init__(
        self,
        workers: int = WORKERS,
        queue_limit: int = QUEUE_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key = secrets.token_bytes(32)
        self._granted: OrderedDict[bytes, None] = OrderedDict()
        self._denied: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()  # the caches, the flights, the counters; never a bcrypt
        self._workers = _Workers(workers)
        self._capacity = workers + queue_limit
        self._pending = 0
        self._flights: dict[bytes, _Flight] = {}
        self._decoys = _Decoys()
        self.backoff = Backoff(clock)

    def check(self, users: dict[str, bytes], header: str | None) -> bool:
        return self.verdict(users, header) is Verdict.OK

    def verdict(
        self, users: dict[str, bytes], header: str | None, client: str | None = None
    ) -> Verdict:
        """What to answer; ``client`` (the peer's address) is subject to the failure backoff."""
        if not users:
            return Verdict.OK
        credentials = _parse_basic(header)
        if credentials is None:
            return Verdict.DENIED
        user, password = credentials
        known = users.get(user)
        key = self._cache_key(user, known if known is not None else _UNKNOWN, password)
        if key in self._granted:  # first: the authorized scraper waits for nothing
            with self._lock:
                if key in self._granted:
                    self._granted.move_to_end(key)
            return Verdict.OK
        if client is not None and self.backoff.waiting(client):
            return Verdict.BACKOFF
        if key in self._denied:
            ok: bool | None = False
        else:
            hashed = known if known is not None else self._decoys.get(users, user, self._key)
            ok = self._bcrypt(key, password, hashed)
        if ok is None:
            return Verdict.BUSY
        if client is not None:
            self.backoff.record(client, ok)
        return Verdict.OK if ok and known is not None else Verdict.DENIED

    def _cache_key(self, user: str, hashed: bytes, password: bytes) -> bytes:
        digest = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (user.encode(), hashed, password):
            digest.update(len(part).to_bytes(4, "big") + part)
        return digest.digest()

    def _bcrypt(self, key: bytes, password: bytes, hashed: bytes) -> bool | None:
        """The check's result, shared with other requests for the same key; None if full."""
        with self._lock:
            flight = self._flights.get(key)
            mine = flight is None
            if flight is None:
                if self._pending >= self._capacity:
                    return None
                self._pending += 1
                flight = self._flights[key] = _Flight()
        if not mine:
            flight.done.wait()
            return flight.ok
        try:
            self._workers.run(password, hashed, flight)
            self._remember(key, flight.ok)
        finally:
            with self._lock:
                self._pending -= 1
                del self._flights[key]
            flight.done.set()
        return flight.ok

    def _remember(self, key: bytes, ok: bool) -> None:
        cache, size = (self._granted, CACHE_SIZE) if ok else (self._denied, DENIED_SIZE)
        with self._lock:
            cache[key] = None
            while len(cache) > size:
                cache.popitem(last=False)  # the least recently used


class _Flight:
    """One bcrypt in progress; requests for the same credentials wait for its result."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


class _Workers:
    """The threads that run bcrypt, started when first needed, at nice ``CHECK_NICE``."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._started = 0
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[bytes, bytes, _Flight]] = queue.SimpleQueue()

    def run(self, password: bytes, hashed: bytes, flight: _Flight) -> None:
        """Sets ``flight.ok`` and ``flight.done``, on one of the workers; returns then."""
        with self._lock:
            start = self._started < self._count
            self._started += start
        if start:
            threading.Thread(target=self._work, name="bcrypt", daemon=True).start()
        self._jobs.put((password, hashed, flight))
        flight.done.wait()

    def _work(self) -> None:
        # This thread only: on Linux a thread id is a PRIO_PROCESS target of its own. If it
        # cannot be lowered (a seccomp filter?), the checks are still bounded.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHECK_NICE)
        while True:
            password, hashed, flight = self._jobs.get()
            try:
                flight.ok = _checkpw(password, hashed)
            except Exception:  # a bug: the answer is no, and the worker stays
                flight.ok = False
            flight.done.set()


class _Decoys:
    """Hashes of passwords nobody knows, one per bcrypt cost the configured users have.

    Made once per users table (a reload makes a new one), each costing one bcrypt at that
    cost: the first unknown user after a reload pays it, later ones do not."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[str, bytes] | None = None
        self._costs: list[int] = []
        self._by_cost: dict[int, bytes] = {}

    def get(self, users: dict[str, bytes], user: str, key: bytes) -> bytes:
        with self._lock:
            if users is not self._users:
                self._users = users
                self._costs = sorted({_cost(h) for h in users.values()})
            costs = self._costs
        # The same name always gets the same cost: hashed with the process key, not guessable.
        pick = hmac.new(key, b"decoy " + user.encode(), hashlib.sha256).digest()
        cost = costs[int.from_bytes(pick[:4], "big") % len(costs)]
        with self._lock:
            decoy = self._by_cost.get(cost)
            if decoy is None:
                secret = secrets.token_bytes(16).hex().encode()
                decoy = self._by_cost[cost] = bcrypt.hashpw(secret, bcrypt.gensalt(cost))
        return decoy


def _cost(hashed: bytes) -> int:
    """The cost factor of a bcrypt hash ``$2y$NN$...`` (checked by config.web)."""
    try:
        return min(31, max(4, int(hashed.split(b"$")[2])))
    except (IndexError, ValueError):
        return 10


class Backoff:
    """Failed attempts per client address, and how long each must wait before the next."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, tuple[int, float]] = OrderedDict()  # failures, until

    def waiting(self, client: str) -> bool:
        entry = self._clients.get(_client_key(client))
        return entry is not None and self._clock() < entry[1]

    def record(self, client: str, ok: bool) -> None:
        key = _client_key(client)
        with self._lock:
            if ok:
                self._clients.pop(key, None)
                return
            failures = self._clients.pop(key, (0, 0.0))[0] + 1
            until = 0.0
            if failures >= FREE_FAILURES:
                delay = BACKOFF_FIRST * 2 ** min(failures - FREE_FAILURES, 16)
                until = self._clock() + min(BACKOFF_MAX, delay)
            self._clients[key] = (failures, until)
            while len(self._clients) > CLIENTS_SIZE:
                self._clients.popitem(last=False)


def _client_key(client: str) -> str:
    try:
        address = ipaddress.ip_address(client.split("%")[0])
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d from a dual-stack listener
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


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
