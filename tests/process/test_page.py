"""The findings page (``/``) and the JSON API (``/api/v1/findings``).

The page is rendered from plain data in the unit tests, and from a real audit in a real
headless chromium (distribution ``chromium`` + ``chromium-driver``, driven by selenium):
an agent behind TLS and basic auth in a lab namespace, an idle connection without keepalive
owned by a process that calls itself ``<script>`` and carries a script in its command line.
Chromedriver is started from a thread inside that namespace, so it and the browser it
starts live there (a child inherits the namespace of the thread that forks it).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import netlab
import pytest
from agent import Agent, Agents, basic_auth, wait_for

from auditd import page
from auditd.abort_records import AbortRecord
from auditd.aborts import Reason
from auditd.events import RECENT, AbortState
from auditd.exporter import ExporterState
from auditd.model import Counters, Finding, Severity, Sysctls
from auditd.results import AuditResult, NamespaceReport

EVIL = "<script>document.title='pwned'</script>"
PASSWORD = "page test password"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
AUTH = basic_auth("reader", PASSWORD)
# The owner: renames itself (comm) to "<script>", connects, holds the socket idle.
OWNER = (
    "import socket,sys,time;open('/proc/self/comm','w').write('<script>');"
    "s=socket.create_connection(('127.0.0.1',int(sys.argv[2])));"
    "print(s.getsockname()[1],flush=True);time.sleep(300)"
)


def _finding(**kw: Any) -> Finding:
    base: dict[str, Any] = dict(
        kind="idle_no_keepalive", severity=Severity.CRITICAL, rule="default", netns="host",
        message="idle for 412.3 s without keepalive", hint="enable keepalive",
        state="established", local="10.0.0.5:43120", remote="[2001:db8::7]:5432",
        idle_seconds=412.3, keepalive="off", pid=1234, process="<b>x", cmdline=f"app {EVIL}",
    )  # fmt: skip
    base.update(kw)
    return Finding(**base)


def _ns(name: str, counts: dict[tuple[str, str, str], int]) -> NamespaceReport:
    return NamespaceReport(
        netns=name, inode=1, sysctls=Sysctls({"net.ipv4.tcp_keepalive_time": 7200}),
        counters=Counters(), detection_idle_seconds=7875, detection_in_flight_seconds=924.6,
        connections={("established", "off"): 1}, sockets=1, finding_counts=counts,
    )  # fmt: skip


def test_page_escapes_everything_and_puts_the_worst_namespace_first() -> None:
    worst = _finding(netns='pod:"><i>', local="<img src=x onerror=alert(1)>:1")
    mild = _finding(netns="host", severity=Severity.WARNING, kind="close_wait")
    result = AuditResult(
        generated_at=0.0, duration_seconds=0.1,
        namespaces=(_ns("host", {("close_wait", "warning", "default"): 1}),
                    _ns('pod:"><i>', {("idle_no_keepalive", "critical", "default"): 1})),
        findings=(worst, mild), skipped_namespaces=(("netns:9", "<gone>"),),
    )  # fmt: skip
    text = page.render(ExporterState(result=result, errors={"dump": 2}, last_success=0.0))
    assert "<script" not in text and "<img" not in text and "<i>" not in text and "<b>x" not in text
    assert html_text(EVIL) in text and "&lt;img src=x onerror=alert(1)&gt;:1" in text
    assert "netns &lt;gone&gt; skipped" not in text and "&lt;gone&gt;" in text
    assert text.index("netns pod:&quot;&gt;&lt;i&gt;") < text.index("netns host</h3>")
    assert "2 findings: 1 critical, 1 warning, 0 info" in text and "dump 2" in text
    assert "<b>why:</b> idle for 412.3 s without keepalive" in text
    assert '<a href="/metrics">' in text and f'<a href="{page.API_PATH}">' in text


def _record(i: int, **kw: Any) -> AbortRecord:
    base: dict[str, Any] = dict(
        time=1000.0 + i, netns="host", local=f"10.0.0.5:{40000 + i}", remote="10.0.0.6:5432",
        reason=Reason.KEEPALIVE_TIMEOUT, state="established", errno=110, predicted=True,
        rule="default", retransmits=0, probes=4, reported_seconds_before=2.5,
        finding="keepalive_probing", keepalive=True, keepidle=2, keepintvl=1, keepcnt=4,
        user_timeout_ms=0, settings="kernel", pid=77, process="psql",
    )  # fmt: skip
    base.update(kw)
    return AbortRecord(**base)


def test_page_shows_the_last_aborts_escaped_newest_first() -> None:
    result = AuditResult(0.0, 0.1, (_ns("host", {}),), ())
    evil = _record(2, netns='pod:"><i>', process="<script>", unit=EVIL, reason=Reason.PEER_RESET)
    aborts = AbortState(source="bpf", recent=(_record(1), evil))
    text = page.render(ExporterState(result=result, aborts=aborts))
    assert "<script" not in text and "<i>" not in text
    assert "pid 77 &lt;script&gt;, unit " + html_text(EVIL) in text
    assert "The last 2 (at most 20), newest first; events from bpf." in text
    assert text.index("10.0.0.5:40002") < text.index("10.0.0.5:40001")
    assert "yes: keepalive_probing, reported 2.5 s before" in text
    assert "keepalive on 2/1/4, user timeout 0 ms (kernel)" in text
    off = page.render(ExporterState(result=result, aborts=AbortState(error="<no perfmon>")))
    assert "Abort events are off: &lt;no perfmon&gt;" in off


def test_the_agent_keeps_only_the_last_aborts() -> None:
    from auditd.events import AbortWatch

    watch = AbortWatch(logging_null())
    for i in range(RECENT + 5):
        watch._add(_record(i))
    assert [r.time for r in watch.state.recent] == [1000.0 + i for i in range(5, RECENT + 5)]


def logging_null() -> Any:
    import logging

    log = logging.getLogger("test-page-aborts")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    return log


def test_page_before_the_first_audit_and_its_style_hash() -> None:
    text = page.render(ExporterState(), metrics_path="/m")
    assert "No audit has finished yet." in text and '<a href="/m">' in text and "never" in text
    style = re.search(r"<style>(.*?)</style>", text, re.S)
    assert style is not None and style.group(1) == page.STYLE  # the one the CSP hash allows
    assert f"style-src '{page.STYLE_HASH}'" in page.CSP and "script-src" not in page.CSP


def html_text(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#x27;")
    )


# --- a real agent, a real audit, a real browser ---------------------------------------------


@dataclass
class Site:
    agent: Agent
    netns: netlab.Netns
    ca: Path
    rules: Path
    owner_pid: int
    owner_port: int  # local port of the owner's idle connection
    peer: socket.socket  # the accepted end of it, held by the test

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.agent.port}{path}"

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def get(self, path: str, auth: bool = True) -> tuple[int, dict[str, str], bytes]:
        return self.agent.get(self.url(path), headers=AUTH if auth else {}, context=self.context())

    def findings(self) -> dict[str, Any] | None:
        status, _, body = self.get(page.API_PATH)
        return json.loads(body) if status == 200 else None


def _owned_finding(site_doc: dict[str, Any] | None, port: int) -> dict[str, Any] | None:
    for f in (site_doc or {}).get("findings", []):
        if f["local"] == f"127.0.0.1:{port}" and f["pid"] is not None:
            return dict(f)
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl (.ci/run installs it)")
    reason = netlab.netns_available()
    if reason is not None:
        pytest.skip(f"kernel test: {reason}")
    tmp = tmp_path_factory.mktemp("page")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "server.key", "-out", "server.crt", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=tmp, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    web = tmp / "web.yml"
    web.write_text(
        f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"basic_auth_users:\n  reader: {HASH}\n"
    )
    rules = tmp / "rules.yaml"
    rules.write_text("version: 1\ndefaults:\n  idle_timeout: 2s\n  detection_budget: 1d\n")
    lab = netlab.Lab()
    agents = Agents(tmp, None)
    try:
        ns = lab.netns()
        agents.netns = ns
        listener = ns.listen("127.0.0.1")
        (tmp / "o.py").write_text(OWNER)  # a short command line: it is cut at 200 characters
        owner = ns.spawn([sys.executable, str(tmp / "o.py"), EVIL, str(listener.getsockname()[1])])
        assert owner.stdout is not None
        port = int(owner.stdout.readline())
        peer = ns.adopt(listener.accept()[0])
        ctx = ssl.create_default_context(cafile=str(tmp / "server.crt"))
        agent = agents.start(
            "--web.config.file", str(web), config=rules, scheme="https",
            scrape_kwargs={"context": ctx, "headers": AUTH},
        )  # fmt: skip
        the_site = Site(agent, ns, tmp / "server.crt", rules, owner.pid, port, peer)
        # Idle past 2 s (critical) and attributed to the owner.
        wait_for(
            "the owner's critical finding",
            lambda: (_owned_finding(the_site.findings(), port) or {}).get("severity") == "critical",
        )
        yield the_site
    finally:
        agents.close()
        errors = lab.close()
        assert not errors, errors


def test_api_is_the_document_of_audit_format_json(site: Site) -> None:
    served = site.findings()
    cli = site.netns.audit(site.rules).doc
    assert served is not None and cli is not None
    assert served.keys() - {"recent_aborts"} == cli.keys()  # the agent's last aborts beyond it
    assert served["schema_version"] == cli["schema_version"] == 1
    assert served["namespaces"][0].keys() == cli["namespaces"][0].keys()
    mine, theirs = _owned_finding(served, site.owner_port), _owned_finding(cli, site.owner_port)
    assert mine is not None and theirs is not None and mine.keys() == theirs.keys()
    for key in ("kind", "severity", "local", "remote", "pid", "process", "cmdline", "keepalive"):
        assert mine[key] == theirs[key], key
    assert mine["kind"] == "idle_no_keepalive" and mine["pid"] == site.owner_pid
    assert mine["process"] == "<script>" and EVIL in mine["cmdline"]
    status, headers, _ = site.get(page.API_PATH)
    assert status == 200 and headers["Content-Type"].startswith("application/json")


def test_page_and_api_are_behind_basic_auth_and_tls(site: Site) -> None:
    for path in ("/", page.API_PATH, "/metrics"):
        assert site.get(path, auth=False)[0] == 401, path
    status, headers, body = site.get("/")
    assert status == 200 and headers["Content-Security-Policy"] == page.CSP
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"<script" not in body and html_text(EVIL).encode() in body
    assert site.get("/nothing")[0] == 404
    with pytest.raises(OSError):  # plain HTTP to the TLS port gets no page
        site.agent.get(site.url("/").replace("https", "http"), headers=AUTH, timeout=3)


def _browse(url: str) -> dict[str, Any]:
    """Load ``url`` in headless chromium; what a reader sees, read back through WebDriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    options.accept_insecure_certs = True  # the test's self-signed certificate
    with tempfile.TemporaryDirectory(prefix="kaud-chromium-") as profile:
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                    f"--user-data-dir={profile}"):  # fmt: skip
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        try:
            token = AUTH["Authorization"]
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd(
                "Network.setExtraHTTPHeaders", {"headers": {"Authorization": token}}
            )
            driver.get(url)
            rows = driver.find_elements(By.CSS_SELECTOR, "tr.critical")
            return {
                "title": driver.title,
                "scripts": len(driver.find_elements(By.TAG_NAME, "script")),
                "body": driver.find_element(By.TAG_NAME, "body").text,
                "critical": [r.text for r in rows],
                "critical_bg": rows[0].value_of_css_property("background-color") if rows else "",
                "links": [a.get_attribute("href") for a in driver.find_elements(By.TAG_NAME, "a")],
            }
        finally:
            driver.quit()


def test_headless_browser_shows_the_real_findings_as_text(site: Site) -> None:
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.skip("needs chromium and chromium-driver (.ci/run installs them)")
    seen: dict[str, Any] = site.netns.call(lambda: _browse(site.url("/")))
    assert seen["title"] == "keepalive-auditd"  # the page's, not the one the script would set
    assert seen["scripts"] == 0
    row = next(r for r in seen["critical"] if f"127.0.0.1:{site.owner_port} ->" in r)
    assert "idle_no_keepalive" in row and f"pid {site.owner_pid} <script>" in row
    assert EVIL in row and "why:" in row and "fix:" in row
    assert seen["critical_bg"] == "rgba(255, 221, 221, 1)"  # the CSP let the hashed style in
    # The namespace's keepalive sysctls at a glance, and all of them.
    assert "7200 / 75 / 9" in seen["body"] and "net.ipv4.tcp_fin_timeout = 60" in seen["body"]
    assert "7875 s" in seen["body"] and "errors since start" in seen["body"]
    assert site.url("/metrics") in seen["links"] and site.url(page.API_PATH) in seen["links"]


def test_the_last_aborts_on_the_api_and_in_the_browser(site: Site) -> None:
    """The owner's connection reset by its peer: the agent's events (BPF here) show it on the
    page and in the API, its owner escaped, behind the same auth. Last: it ends the
    connection the other tests look at."""
    site.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    site.peer.close()  # an RST to the owner, who is not reading: the kernel aborts it

    def mine() -> dict[str, Any] | None:
        doc = site.findings() or {}
        local = f"127.0.0.1:{site.owner_port}"
        return next((a for a in doc.get("recent_aborts", []) if a["local"] == local), None)

    abort = wait_for("the owner's abort in the API", mine, 15)
    assert abort["reason"] == "peer_reset" and abort["predicted"] is True
    assert abort["pid"] == site.owner_pid and abort["process"] == "<script>"
    assert site.get(page.API_PATH, auth=False)[0] == 401
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.skip("needs chromium and chromium-driver (.ci/run installs them)")
    seen: dict[str, Any] = site.netns.call(lambda: _browse(site.url("/")))
    assert seen["scripts"] == 0 and "Connections the kernel aborted" in seen["body"]
    line = next(x for x in seen["body"].splitlines() if f"127.0.0.1:{site.owner_port} ->" in x
                and "peer_reset" in x)  # fmt: skip
    assert f"pid {site.owner_pid} <script>" in line and "yes: idle_no_keepalive" in line
