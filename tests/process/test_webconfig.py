"""``--web.config.file``: the exporter-toolkit format, TLS and basic auth on a real agent.

Certificates are made with the ``openssl`` command in a temporary directory: a CA, a server
certificate for 127.0.0.1 and a client certificate, all signed by it. The agent is scraped
with urllib over a client context that trusts only that CA.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from agent import Agents, agents_fixture, basic_auth, wait_for

from auditd import auth as auth_module
from auditd.auth import BasicAuth
from auditd.config import ConfigError, load_web_config

PASSWORD = "correct horse battery staple"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode().replace("$2b$", "$2y$", 1)


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_pki(d: Path) -> Pki:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "2", "-subj", f"/CN=kaud test {ca}", cwd=d)  # fmt: skip
    for name, san in (("server", "IP:127.0.0.1,DNS:localhost"), ("client", "DNS:scraper")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                 "-out", f"{name}.crt", cwd=d)  # fmt: skip
    return Pki(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
               d / "client.key", d / "other-ca.crt")  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command (Debian package openssl; .ci/run installs it)")
    return _make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def agents(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Agents]:
    yield from agents_fixture(request, tmp_path)


def client_context(pki: Pki, cert: bool = False, ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or pki.ca))
    if cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


# --- parsing -----------------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "web.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_full_config_with_relative_paths(pki: Pki) -> None:
    path = write(pki.dir, f"""\
tls_server_config:
  cert_file: server.crt
  key_file: {pki.server_key}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: ca.crt
  client_allowed_sans: [scraper]
  min_version: TLS12
  max_version: TLS13
  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]
  prefer_server_cipher_suites: false
http_server_config:
  http2: true
  headers:
    X-Frame-Options: deny
    Content-Security-Policy: "default-src 'none'"
basic_auth_users:
  prometheus: {HASH}
  "1234": {HASH}
""", "full.yml")  # fmt: skip
    web = load_web_config(str(path))
    assert web.tls is not None
    assert web.tls.cert_file == str(pki.server_cert)  # relative to the file's directory
    assert web.tls.key_file == str(pki.server_key)
    assert web.tls.context.verify_mode == ssl.CERT_REQUIRED
    assert web.tls.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert web.tls.client_allowed_sans == {"scraper"}
    assert not web.tls.context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert set(web.users) == {"prometheus", "1234"}
    assert web.headers == (
        ("X-Frame-Options", "deny"), ("Content-Security-Policy", "default-src 'none'"),
    )  # fmt: skip


@pytest.mark.parametrize("text", ["", "# nothing\n", "tls_server_config:\n", "basic_auth_users:\n"])
def test_empty_means_plain_http_without_auth(tmp_path: Path, text: str) -> None:
    web = load_web_config(str(write(tmp_path, text)))
    assert web.tls is None and web.users == {} and web.headers == ()


BAD = [
    ("tls: {}\n", 1, "tls: unknown key, expected one of: tls_server_config, "),
    ("tls_server_config:\n  cert_file: server.crt\n", 2,
     "tls_server_config.key_file: required key missing"),
    ("tls_server_config:\n  min_version: TLS12\n", 2,
     "tls_server_config.cert_file: required key missing (with key_file)"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
     "  client_auth_type: Sometimes\n", 4,
     'tls_server_config.client_auth_type: expected one of: NoClientCert, '
     'VerifyClientCertIfGiven, RequireAndVerifyClientCert, got "Sometimes"'),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
     "  client_auth_type: RequireAnyClientCert\n", 4,
     "tls_server_config.client_auth_type: RequireAnyClientCert (an unverified client "
     "certificate) is not supported"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
     "  client_ca_file: ca.crt\n", 4,
     "tls_server_config.client_auth_type: a client CA is configured without a client auth"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
     "  client_auth_type: RequireAndVerifyClientCert\n", 2,
     "tls_server_config.client_ca_file: required with RequireAndVerifyClientCert"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
     "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.crt\n"
     "  client_allowed_sans: [x]\n", 6,
     "tls_server_config.client_allowed_sans: needs client_auth_type RequireAndVerifyClientCert"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
     "  min_version: TLS1.2\n", 4,
     'tls_server_config.min_version: expected one of: TLS10, TLS11, TLS12, TLS13, got "TLS1.2"'),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
     "  min_version: TLS13\n  max_version: TLS12\n", 4,
     "tls_server_config.min_version: TLS13 is above max_version TLS12"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
     "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n", 4,
     'tls_server_config.cipher_suites[0]: unknown cipher suite "TLS_RSA_WITH_RC4_128_SHA"'),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
     "  curve_preferences: [X25519]\n", 4,
     "tls_server_config.curve_preferences: is not supported"),
    ("tls_server_config:\n  cert: |\n    -----BEGIN CERTIFICATE-----\n", 2,
     "tls_server_config.cert: (inline certificate) is not supported; use cert_file"),
    ("tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n", 2,
     "tls_server_config.cert_file: cannot load "),
    ("http_server_config:\n  headers:\n    Server: nginx\n", 3,
     "http_server_config.headers.Server: unknown key, expected one of: Strict-Transport-"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", 3,
     'http_server_config.headers.X-Frame-Options: expected one of: deny, sameorigin, got "allow"'),
    ('http_server_config:\n  headers:\n    Content-Security-Policy: "a\\r\\nSet-Cookie: x"\n', 3,
     "http_server_config.headers.Content-Security-Policy: must be one line of printable"),
    ("http_server_config:\n  http2: maybe\n", 2,
     'http_server_config.http2: expected true or false, got "maybe"'),
    ("basic_auth_users:\n  alice: hunter2\n", 2,
     'basic_auth_users.alice: expected a bcrypt hash like "$2y$10$" + 53 characters'),
    (f"basic_auth_users:\n  alice: {HASH}\n  alice: {HASH}\n", 3,
     "basic_auth_users.alice: duplicate user"),
    (f"basic_auth_users:\n  'a:b': {HASH}\n", 2,
     "basic_auth_users.a:b: a user name must not contain ':'"),
    ("basic_auth_users: [alice]\n", 1,
     "basic_auth_users: expected a mapping of user: bcrypt hash, got a list"),
    ("rate_limit:\n  interval: 1s\n", 1, "rate_limit: is not supported by keepalive-auditd"),
    ("basic_auth_users: {alice: [\n", 2, "invalid YAML: "),
    ("- 1\n", 1, "(top level): expected a mapping, got a list"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "what"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_config_is_one_precise_line(pki: Pki, text: str, line: int, what: str) -> None:
    path = write(pki.dir, text, "bad.yml")
    with pytest.raises(ConfigError) as info:
        load_web_config(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: {what}"), message
    assert "hunter2" not in message  # a secret is never echoed


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"web\.yml: cannot read: No such file or directory"):
        load_web_config(str(tmp_path / "web.yml"))


# --- basic auth ----------------------------------------------------------------------------------


def test_basic_auth_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    users = {"prometheus": HASH.encode()}
    auth = BasicAuth()
    header = basic_auth("prometheus", PASSWORD)["Authorization"]
    assert auth.check({}, None)  # no users configured: no auth
    assert auth.check(users, header)
    assert auth.check(users, header.replace("Basic", "basic"))
    for bad in (
        None, "", "Basic", "Bearer abc", "Basic !!!notbase64", "Basic " + "cHJvbWV0aGV1cw==",
        basic_auth("prometheus", "wrong")["Authorization"],
        basic_auth("nobody", PASSWORD)["Authorization"],
        basic_auth("prometheus", PASSWORD + "x" * 100)["Authorization"],  # > 72 bytes
        basic_auth("Prometheus", PASSWORD)["Authorization"],
    ):  # fmt: skip
        assert not auth.check(users, bad), bad


def test_basic_auth_caches_and_a_new_hash_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = auth_module._checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(auth_module, "_checkpw", counting)
    auth = BasicAuth()
    header = basic_auth("prometheus", PASSWORD)["Authorization"]
    users = {"prometheus": HASH.encode()}
    # 20 scrapers at once: one bcrypt, the others wait for it and hit the cache.
    with ThreadPoolExecutor(20) as pool:
        assert all(pool.map(lambda _: auth.check(users, header), range(20)))
    assert len(calls) == 1
    started = time.perf_counter()
    for _ in range(1000):
        assert auth.check(users, header)
    assert time.perf_counter() - started < 0.5, "cached checks must not run bcrypt"
    assert len(calls) == 1
    other = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4))
    assert auth.check({"prometheus": other}, header)  # a reload with a new hash: checked anew
    assert len(calls) == 2
    assert not auth.check({"prometheus": other}, basic_auth("prometheus", "x")["Authorization"])


def recording(
    calls: list[bytes], check: Callable[[bytes, bytes], bool]
) -> Callable[[bytes, bytes], bool]:
    """A stand-in for ``auth._checkpw`` that notes each hash it is asked about, then checks."""

    def checkpw(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return check(password, hashed)

    return checkpw


def test_unknown_user_costs_a_bcrypt_too(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    monkeypatch.setattr(auth_module, "_checkpw", recording(calls, lambda p, h: False))
    BasicAuth().check({"prometheus": HASH.encode()}, basic_auth("eve", "x")["Authorization"])
    [decoy] = calls
    assert decoy != HASH.encode() and decoy.split(b"$")[2] == b"10"  # the configured cost


def _check_seconds(auth: BasicAuth, users: dict[str, bytes], user: str, i: int) -> float:
    header = basic_auth(user, f"wrong {i}")["Authorization"]  # a new one: no cache answers
    started = time.perf_counter()
    assert not auth.check(users, header)
    return time.perf_counter() - started


@pytest.mark.parametrize("cost", [5, 12])
def test_unknown_and_known_users_take_the_same_time(cost: int) -> None:
    """The decoy has the configured hashes' cost. With a fixed cost-10 decoy, at cost 5
    (htpasswd -B's default) an unknown user took 20 times as long as a known one, at cost 12
    a quarter of the time. Interleaved checks, so that load elsewhere hits both alike."""
    users = {"prometheus": bcrypt.hashpw(b"secret", bcrypt.gensalt(cost))}
    auth = BasicAuth()
    auth.check(users, basic_auth("warm-up", "x")["Authorization"])  # makes the decoy
    known, unknown = [], []
    for i in range(15 if cost < 10 else 3):
        known.append(_check_seconds(auth, users, "prometheus", i))
        unknown.append(_check_seconds(auth, users, "eve", i))
    ratio = min(unknown) / min(known)  # the least disturbed of each: load only adds time
    assert 0.4 < ratio < 2.5, (known, unknown)


def test_each_unknown_name_gets_one_of_the_configured_costs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[bytes] = []
    monkeypatch.setattr(auth_module, "_checkpw", recording(calls, lambda p, h: False))
    users = {
        "a": bcrypt.hashpw(b"x", bcrypt.gensalt(4)),
        "b": bcrypt.hashpw(b"x", bcrypt.gensalt(5)),
    }
    auth = BasicAuth()
    for name in ("eve", "mallory", "eve", *(f"user{i}" for i in range(30))):
        auth.check(users, basic_auth(name, f"pw {len(calls)}")["Authorization"])
    costs = [h.split(b"$")[2] for h in calls]
    assert costs[0] == costs[2]  # the same name, the same cost, every time
    assert set(costs) == {b"04", b"05"}


def test_a_flood_of_wrong_passwords_never_evicts_the_scraper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[bytes] = []
    monkeypatch.setattr(auth_module, "_checkpw", recording(calls, auth_module._checkpw))
    users = {"prometheus": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4))}
    auth = BasicAuth()
    good = basic_auth("prometheus", PASSWORD)["Authorization"]
    assert auth.check(users, good)
    for i in range(3 * auth_module.DENIED_SIZE // 2):  # more wrong ones than both caches hold
        auth._remember(auth._cache_key("prometheus", users["prometheus"], b"%d" % i), False)
    calls.clear()
    assert auth.verdict(users, good, "127.0.0.1") is auth_module.Verdict.OK
    assert calls == []  # answered from the cache, before any backoff or queue


def test_failed_attempts_back_off_per_address() -> None:
    now = [1000.0]
    auth = BasicAuth(clock=lambda: now[0])
    users = {"prometheus": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4))}
    good = basic_auth("prometheus", PASSWORD)["Authorization"]
    assert auth.verdict(users, good, "10.0.0.9") is auth_module.Verdict.OK  # cached from now on
    verdicts = [
        auth.verdict(users, basic_auth("prometheus", f"guess {i}")["Authorization"], "10.0.0.1")
        for i in range(auth_module.FREE_FAILURES + 2)
    ]
    free = auth_module.FREE_FAILURES
    assert verdicts == [auth_module.Verdict.DENIED] * free + [auth_module.Verdict.BACKOFF] * 2
    # Another address, and the authorized scraper from the same one, are not held up.
    assert auth.verdict(users, basic_auth("x", "y")["Authorization"], "10.0.0.2").name == "DENIED"
    assert auth.verdict(users, good, "10.0.0.1") is auth_module.Verdict.OK
    # IPv6 clients are counted by /64; the wait doubles, up to BACKOFF_MAX.
    for i in range(free):
        auth.verdict(users, basic_auth("p", f"{i}")["Authorization"], f"2001:db8::{i + 1}")
    assert auth.backoff.waiting("2001:db8::ffff")
    assert not auth.backoff.waiting("2001:db8:0:1::1")
    now[0] += auth_module.BACKOFF_FIRST + 0.01
    assert auth.verdict(users, basic_auth("p", "q")["Authorization"], "10.0.0.1").name == "DENIED"
    assert auth.backoff.waiting("10.0.0.1")  # the next failure waits twice as long
    now[0] += auth_module.BACKOFF_FIRST + 0.01
    assert auth.backoff.waiting("10.0.0.1")


def test_password_checks_beyond_the_queue_are_refused_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    monkeypatch.setattr(auth_module, "_checkpw", lambda p, h: release.wait(10) and False)
    auth = BasicAuth(workers=1, queue_limit=2)
    users = {"prometheus": HASH.encode()}
    headers = [basic_auth("prometheus", f"guess {i}")["Authorization"] for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(auth.verdict, users, h) for h in headers]
        wait_for("three checks in flight", lambda: auth._pending == 3)
        started = time.monotonic()
        assert auth.verdict(users, basic_auth("prometheus", "4th")["Authorization"]).name == "BUSY"
        assert time.monotonic() - started < 1  # not queued behind the others
        # The same credentials as one in flight share its bcrypt instead of taking a place.
        twin = pool.submit(auth.verdict, users, headers[0])
        release.set()
        assert [f.result().name for f in [*held, twin]] == ["DENIED"] * 4


def test_password_checks_run_on_threads_of_the_lowest_priority() -> None:
    before = os.getpriority(os.PRIO_PROCESS, 0)  # 0: this thread
    auth = BasicAuth(workers=2)
    users = {"prometheus": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4))}
    checks = [basic_auth("prometheus", f"guess {i}")["Authorization"] for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        assert not any(pool.map(lambda h: auth.check(users, h), checks))
    mine = auth._workers._count
    workers = [t for t in threading.enumerate() if t.name == "bcrypt"]
    assert len(workers) >= mine == 2
    niceness = {os.getpriority(os.PRIO_PROCESS, t.native_id or 0) for t in workers}
    assert niceness == {auth_module.CHECK_NICE}
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the threads that serve: unchanged


# --- a real agent -------------------------------------------------------------------------


def tls_config(pki: Pki, extra: str = "") -> str:
    return f"""\
tls_server_config:
  cert_file: {pki.server_cert}
  key_file: {pki.server_key}
{extra}http_server_config:
  headers: {{X-Content-Type-Options: nosniff}}
basic_auth_users:
  prometheus: {HASH}
"""


def test_tls_and_basic_auth_with_a_real_client(agents: Agents, pki: Pki, tmp_path: Path) -> None:
    web = write(tmp_path, tls_config(pki))
    good: dict[str, Any] = {"context": client_context(pki),
                            "headers": basic_auth("prometheus", PASSWORD)}  # fmt: skip
    agent = agents.start("--web.config.file", str(web), scheme="https", scrape_kwargs=good)

    status, headers, _ = agent.get(context=client_context(pki))
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Basic")
    assert headers["X-Content-Type-Options"] == "nosniff"
    wrong = basic_auth("prometheus", "guess")
    assert agent.get(context=client_context(pki), headers=wrong)[0] == 401
    assert agent.get(context=client_context(pki), headers=basic_auth("eve", PASSWORD))[0] == 401
    landing = agent.get(agent.url.replace("/metrics", "/"), context=client_context(pki))
    assert landing[0] == 401  # the landing page is behind the same door

    status, headers, body = agent.get(**good)
    assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    assert b"keepalive_build_info" in body

    # The handshake is verified against the test CA: a client trusting another CA refuses it.
    with pytest.raises(urllib.error.URLError) as refused:
        agent.get(context=client_context(pki, ca=pki.other_ca))
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)

    # Plain HTTP to the TLS port gets no answer, and the agent keeps serving.
    with pytest.raises((OSError, http.client.HTTPException)):
        agent.get(agent.url.replace("https://", "http://"), timeout=3)
    assert agent.get(**good)[0] == 200

    # 20 scrapers at once, all authenticated, quickly (one bcrypt, then the cache).
    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: agent.get(**good)[0], range(40)))
    assert answers == [200] * 40
    assert time.monotonic() - started < 10

    errors = [line for line in agent.log() if line["level"] == "error"]
    assert errors == []
    listening = [line for line in agent.log() if line["msg"] == "listening"]
    assert listening[0]["scheme"] == "https" and listening[0]["auth"] is True


def test_client_certificates_and_reload(agents: Agents, pki: Pki, tmp_path: Path) -> None:
    web = write(tmp_path, tls_config(pki))
    auth = basic_auth("prometheus", PASSWORD)
    start = {"context": client_context(pki), "headers": auth}
    agent = agents.start("--web.config.file", str(web), scheme="https", scrape_kwargs=start)
    mtls = "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
    web.write_text(tls_config(pki, mtls).replace("ca.crt", str(pki.ca)))
    agent.proc.send_signal(signal.SIGHUP)
    wait_for("the reload", lambda: any(x["msg"] == "rules reloaded" for x in agent.log()))

    # No client certificate: the handshake fails. With one signed by the CA: served.
    with pytest.raises((OSError, http.client.HTTPException)):
        agent.get(context=client_context(pki), headers=auth)
    assert agent.get(context=client_context(pki, cert=True), headers=auth)[0] == 200

    # A broken file on reload keeps the running config and counts a config error.
    web.write_text("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n")
    agent.proc.send_signal(signal.SIGHUP)

    def failed() -> Any:
        got = agent.try_scrape(context=client_context(pki, cert=True), headers=auth)
        return got is not None and got.errors("config") == 1

    wait_for("the failed reload to be counted", failed)
    line = [x for x in agent.log() if x["msg"].startswith("reload failed")][-1]
    assert line["error"].startswith(f"{web}:2: tls_server_config.cert_file: cannot load ")
    assert agent.get(context=client_context(pki, cert=True), headers=auth)[0] == 200


def test_bad_web_config_at_start_is_exit_2(tmp_path: Path) -> None:
    web = write(tmp_path, "basic_auth_users:\n  alice: hunter2\n")
    argv = [sys.executable, "-m", "auditd", "run", "--web.config.file", str(web)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert proc.stderr == (
        f'keepalive-auditd: {web}:2: basic_auth_users.alice: expected a bcrypt hash like "$2y$10$"'
        " + 53 characters (value not shown)\n"
    )


# --- nothing about a connection in a label -------------------------------------------------------


def test_no_connection_detail_in_any_label_of_a_real_scrape(agents: Agents, tmp_path: Path) -> None:
    """A flagged connection (idle, no keepalive) owned by this process: its addresses, ports,
    inode, pid and command line appear in the log (that is the point of the log) and in no
    label value of /metrics."""
    config = tmp_path / "short.yaml"
    config.write_text("version: 1\ndefaults:\n  idle_timeout: 1s\n  detection_budget: 1d\n")
    agent = agents.start(config=config)

    def pair() -> tuple[Any, Any, Any]:
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        return listener, client, listener.accept()[0]

    listener, client, server = agent.call(pair)
    try:
        idle = wait_for(
            "idle_no_keepalive findings",
            lambda: (s := agent.try_scrape()) and s.total("keepalive_findings",
                                                          kind="idle_no_keepalive") >= 2 and s,
        )  # fmt: skip
        details = {
            str(client.getsockname()[1]), str(server.getsockname()[1]), str(os.getpid()),
            str(os.fstat(client.fileno()).st_ino), "pytest", "python",
        }  # fmt: skip
        for name, samples in idle.samples.items():
            for labels in samples:
                for key, value in labels:
                    assert not any(d in value for d in details), (name, key, value)
                    with pytest.raises(ValueError):
                        ipaddress.ip_address(value.split(":")[0].strip("[]"))
        logged = {line.get("local") for line in agent.log() if "local" in line}
        assert "{}:{}".format(*client.getsockname()) in logged  # the log does carry it
    finally:
        for s in (client, server, listener):
            s.close()


def test_threads_do_not_pile_up_on_silent_clients(agents: Agents) -> None:
    """Connections that never send a request are dropped after the connection timeout;
    meanwhile the agent serves others (the TLS handshake is not in the accept loop). More
    silent clients than pooled handler threads get threads of their own, which end."""
    from auditd.http import _Server

    agent = agents.start()
    baseline = agent.stats().threads
    count = _Server.workers + 4
    silent = [agent.call(lambda: socket.create_connection(("127.0.0.1", agent.port)))
              for _ in range(count)]  # fmt: skip
    try:
        assert agent.get()[0] == 200  # served although every pooled thread is stuck
        # A thread per silent client, pooled or not; one pooled thread may already be in the
        # baseline (it served the readiness scrape).
        wait_for(
            "a handler thread per silent client",
            lambda: agent.stats().threads >= baseline + count - 1,
        )
    finally:
        for s in silent:
            s.close()
    # The overflow threads end; the pool keeps at most its own threads.
    wait_for(
        "the handler threads to end",
        lambda: agent.stats().threads <= baseline + _Server.workers + 1,
    )


# --- files that are not regular files (issue 16) -----------------------------------------------


@pytest.mark.parametrize("key", ["cert_file", "key_file", "client_ca_file"])
def test_a_fifo_as_a_tls_file_is_refused_at_start(pki: Pki, tmp_path: Path, key: str) -> None:
    """OpenSSL opened a FIFO and waited for a writer forever: the agent hung at start."""
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    files = {"cert_file": pki.server_cert, "key_file": pki.server_key}
    text = (
        f"tls_server_config:\n  cert_file: {files['cert_file']}\n  key_file: {files['key_file']}\n"
    )
    if key == "client_ca_file":
        text += f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {fifo}\n"
    else:
        text = text.replace(str(files[key]), str(fifo))
    web = write(tmp_path, text)
    argv = [sys.executable, "-m", "auditd", "run", "--web.config.file", str(web)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.splitlines()
    assert f"tls_server_config.{'cert_file' if key != 'client_ca_file' else key}" in line
    assert f"{fifo}: cannot read: not a regular file" in line


def test_a_fifo_on_reload_is_logged_and_the_old_config_kept(
    agents: Agents, pki: Pki, tmp_path: Path
) -> None:
    web = write(tmp_path, tls_config(pki))
    good: dict[str, Any] = {"context": client_context(pki),
                            "headers": basic_auth("prometheus", PASSWORD)}  # fmt: skip
    agent = agents.start("--web.config.file", str(web), scheme="https", scrape_kwargs=good)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo)
    web.write_text(tls_config(pki).replace(str(pki.server_key), str(fifo)))
    agent.proc.send_signal(signal.SIGHUP)
    failed = wait_for(
        "the failed reload in the log",
        lambda: [x for x in agent.log() if x["msg"].startswith("reload failed")],
    )
    assert f"{fifo}: cannot read: not a regular file" in failed[0]["error"]
    scrape = agent.scrape(**good)  # the main loop is not blocked, the old TLS config serves
    assert scrape.errors("config") == 1
    agent.proc.send_signal(signal.SIGHUP)  # and it keeps answering SIGHUPs
    wait_for("a second answer", lambda: len([x for x in agent.log() if "reload" in x["msg"]]) >= 2)
    assert agent.stop() == 0
