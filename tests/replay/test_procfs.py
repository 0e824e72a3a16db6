"""procfs and procs against fake /proc trees, plus live checks on this process.

tests/data/procfs/ holds /proc/net/netstat and /proc/net/snmp as read on a 6.18 kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DATA, fake_process, fd_inode

from auditd.kernel import LocalKernel, procfs
from auditd.kernel.owners import scan as procs
from auditd.model import SYSCTL_NAMES, Counters, ProcessInfo

# --- sysctls ----------------------------------------------------------------------------------


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def sysctl_file(root: Path, name: str) -> Path:
    return Path(procfs.sysctl_path(str(root), name))


def test_sysctl_path() -> None:
    assert procfs.sysctl_path("/proc", "net.ipv4.tcp_keepalive_time") == (
        "/proc/sys/net/ipv4/tcp_keepalive_time"
    )


def test_read_sysctls_from_a_fake_tree(tmp_path: Path) -> None:
    write(sysctl_file(tmp_path, "net.ipv4.tcp_keepalive_time"), "600\n")
    write(sysctl_file(tmp_path, "net.ipv4.tcp_keepalive_intvl"), "  30  \n")
    write(sysctl_file(tmp_path, "net.ipv4.tcp_keepalive_probes"), "garbage\n")
    write(sysctl_file(tmp_path, "net.ipv4.tcp_retries2"), "")  # empty: ignored
    write(sysctl_file(tmp_path, "net.ipv4.tcp_fin_timeout"), "60 60\n")  # two numbers: ignored
    write(sysctl_file(tmp_path, "net.ipv4.tcp_syn_retries"), b"\xff\xfe\n")  # not ASCII
    (sysctl_file(tmp_path, "net.ipv4.tcp_orphan_retries")).mkdir(parents=True)  # unreadable
    write(sysctl_file(tmp_path, "net.netfilter.nf_conntrack_tcp_timeout_established"), "432000")
    s = procfs.read_sysctls(str(tmp_path))
    assert s.values == {
        "net.ipv4.tcp_keepalive_time": 600,
        "net.ipv4.tcp_keepalive_intvl": 30,
        "net.netfilter.nf_conntrack_tcp_timeout_established": 432000,
    }
    # Missing ones fall back to the kernel defaults in the model's accessors.
    assert (s.keepalive_time, s.keepalive_intvl, s.keepalive_probes, s.retries2) == (
        600, 30, 9, 15,
    )  # fmt: skip
    assert s.get("net.ipv4.tcp_rto_max_ms") is None and s.rto_max_ms == 120000


def test_read_sysctls_of_a_missing_root_is_empty(tmp_path: Path) -> None:
    assert procfs.read_sysctls(str(tmp_path / "nowhere")).values == {}


def test_read_sysctls_only_the_names_asked(tmp_path: Path) -> None:
    write(sysctl_file(tmp_path, "net.ipv4.tcp_keepalive_time"), "600\n")
    write(sysctl_file(tmp_path, "net.ipv4.tcp_retries2"), "8\n")
    s = procfs.read_sysctls(str(tmp_path), names=["net.ipv4.tcp_retries2"])
    assert s.values == {"net.ipv4.tcp_retries2": 8}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7200\n", 7200), ("0", 0), ("-1\n", -1), (" 15 \n", 15), ("", None), ("x", None),
     ("1.5", None), ("4096\t87380\t6291456\n", None)],
)  # fmt: skip
def test_parse_sysctl(text: str, expected: int | None) -> None:
    assert procfs.parse_sysctl(text) == expected


# --- counters ---------------------------------------------------------------------------------

NETSTAT = """\
TcpExt: SyncookiesSent TCPTimeouts TCPKeepAlive TCPAbortOnTimeout
TcpExt: 0 17 42 3
IpExt: InNoRoutes InOctets
IpExt: 0 123456
"""
SNMP = """\
Ip: Forwarding DefaultTTL
Ip: 1 64
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens RetransSegs
Tcp: 1 200 120000 -1 10 99
"""


def test_parse_snmp_table() -> None:
    assert procfs.parse_snmp_table(SNMP) == {
        "Ip": {"Forwarding": 1, "DefaultTTL": 64},
        "Tcp": {"RtoAlgorithm": 1, "RtoMin": 200, "RtoMax": 120000, "MaxConn": -1,
                "ActiveOpens": 10, "RetransSegs": 99},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("Tcp: A B\n", {}),  # a header without values
        ("Tcp: A B\nTcp: 1\n", {}),  # counts differ
        ("Tcp: A B\nUdp: 1 2\n", {}),  # prefixes differ
        ("Tcp: A B\nTcp: 1 x\n", {"Tcp": {"A": 1}}),  # a value that is not a number
        ("Tcp: A\nTcp: 1\nbroken\nline\nUdp: B\nUdp: 2\n", {"Tcp": {"A": 1}, "Udp": {"B": 2}}),
        (": A\n: 1\n", {}),  # no prefix
    ],
)
def test_parse_snmp_table_skips_malformed_pairs(
    text: str, expected: dict[str, dict[str, int]]
) -> None:
    assert procfs.parse_snmp_table(text) == expected


def test_parse_snmp_table_of_a_real_kernel() -> None:
    netstat = procfs.parse_snmp_table((DATA / "procfs" / "netstat").read_text())
    snmp = procfs.parse_snmp_table((DATA / "procfs" / "snmp").read_text())
    assert set(netstat) == {"TcpExt", "IpExt", "MPTcpExt"}
    assert set(snmp) == {"Ip", "Icmp", "IcmpMsg", "Tcp", "Udp", "UdpLite"}
    header = (DATA / "procfs" / "netstat").read_text().splitlines()[0].split()[1:]
    assert list(netstat["TcpExt"]) == header  # every key, in the kernel's order
    assert {"TCPKeepAlive", "TCPAbortOnTimeout", "TCPTimeouts"} <= set(netstat["TcpExt"])
    assert snmp["Tcp"]["MaxConn"] == -1 and snmp["Tcp"]["RtoMax"] == 120000


def test_read_counters_from_net(tmp_path: Path) -> None:
    write(tmp_path / "net" / "netstat", NETSTAT)
    write(tmp_path / "net" / "snmp", SNMP)
    assert procfs.read_counters(str(tmp_path)) == Counters(
        keepalive_probes=42, abort_on_timeout=3, timeouts=17, retrans_segs=99
    )


def test_read_counters_prefers_thread_self(tmp_path: Path) -> None:
    # /proc/net follows the main thread's namespace; thread-self/net the calling thread's.
    write(tmp_path / "net" / "netstat", NETSTAT)
    write(tmp_path / "net" / "snmp", SNMP)
    write(tmp_path / "thread-self" / "net" / "netstat", NETSTAT.replace("0 17 42 3", "0 1 2 3"))
    counters = procfs.read_counters(str(tmp_path))
    assert (counters.timeouts, counters.keepalive_probes) == (1, 2)
    assert counters.retrans_segs is None  # no snmp under thread-self: not mixed with /proc/net


def test_read_counters_missing_files_are_none(tmp_path: Path) -> None:
    assert procfs.read_counters(str(tmp_path)) == Counters()
    write(tmp_path / "net" / "netstat", "TcpExt: TCPTimeouts\nTcpExt: 5\n")
    assert procfs.read_counters(str(tmp_path)) == Counters(timeouts=5)


def test_read_counters_from_a_real_capture(tmp_path: Path) -> None:
    for name in ("netstat", "snmp"):
        shutil.copy(DATA / "procfs" / name, write(tmp_path / "net" / name, ""))
    counters = procfs.read_counters(str(tmp_path))
    assert counters == Counters(keepalive_probes=0, abort_on_timeout=0, timeouts=2, retrans_segs=4)


def test_live_sysctls_and_counters() -> None:
    s = procfs.read_sysctls()
    assert set(s.values) <= set(SYSCTL_NAMES)
    assert s.get("net.ipv4.tcp_keepalive_time") is not None  # per netns since Linux 4.5
    with open("/proc/sys/net/ipv4/tcp_retries2") as f:
        assert s.retries2 == int(f.read())
    c = procfs.read_counters()
    assert all(isinstance(v, int) for v in (c.keepalive_probes, c.timeouts, c.retrans_segs))


# --- socket owners ----------------------------------------------------------------------------


def fake_owner(root: Path, pid: int, name: str, cmdline: bytes, fds: dict[int, str]) -> Path:
    return fake_process(root, pid, fds, name, cmdline)


@pytest.fixture
def proc_tree() -> Iterator[Path]:
    """A fake /proc that other users can traverse (the permission case runs as nobody)."""
    root = Path(tempfile.mkdtemp(prefix="kaud-proc-"))
    root.chmod(0o755)
    fake_owner(
        root,
        100,
        "nginx",
        b"nginx: master process\0-g\0daemon off;\0",
        {0: "/dev/null", 3: "socket:[5001]", 4: "pipe:[77]", 5: "socket:[5002]"},
    )
    fake_owner(root, 200, "postgres", b"postgres\0-D\0/var/lib/pg\0",
                 {7: "socket:[6001]", 8: "anon_inode:[eventpoll]"})  # fmt: skip
    # Same inode also held by a child (after fork): the first process found wins.
    fake_owner(root, 300, "nginx", b"nginx: worker process\0", {3: "socket:[5001]"})
    # Vanished between listdir and reading fd/: no fd directory.
    write(root / "400" / "comm", "ghost\n")
    # fd/ is not a directory (as good as unreadable).
    write(root / "500" / "comm", "odd\n")
    write(root / "500" / "fd", "")
    # Holds a wanted socket but exits before comm is read: no owner rather than a wrong one.
    (root / "600" / "fd").mkdir(parents=True)
    os.symlink("socket:[7001]", root / "600" / "fd" / "3")
    # An fd entry that is not a symlink (readlink fails): skipped.
    fake_owner(root, 700, "weird", b"", {})
    write(root / "700" / "fd" / "9", "")
    # Not pids.
    (root / "self").mkdir()
    (root / "net").mkdir()
    write(root / "uptime", "1.0 1.0\n")
    yield root
    shutil.rmtree(root)


def test_find_owners(proc_tree: Path) -> None:
    scan = procs.find_owners([5001, 5002, 6001, 7001, 9999], str(proc_tree))
    owners = scan.found
    assert scan.complete
    assert set(owners) == {5001, 5002, 6001}
    assert owners[5002] == ProcessInfo(100, "nginx", "nginx: master process -g daemon off;")
    assert owners[5001].name == "nginx" and owners[5001].pid in (100, 300)
    assert owners[6001] == ProcessInfo(200, "postgres", "postgres -D /var/lib/pg")


@pytest.mark.parametrize("inodes", [[], [0], [9999]])
def test_find_owners_nothing_to_find(proc_tree: Path, inodes: list[int]) -> None:
    assert procs.find_owners(inodes, str(proc_tree)).found == {}


def test_find_owners_of_a_missing_root(tmp_path: Path) -> None:
    scan = procs.find_owners([1], str(tmp_path / "nowhere"))
    assert scan.found == {} and not scan.complete


def test_find_owners_stops_at_its_deadline(proc_tree: Path) -> None:
    ticks = iter(range(100))
    scan = procs.find_owners(
        [5001, 5002, 6001], str(proc_tree), deadline=0.5, clock=lambda: next(ticks)
    )
    assert not scan.complete  # the first process is looked at (clock 0), then time is up
    assert len(scan.found) <= 2


def _find_owners_as_nobody(root: Path, inodes: list[int]) -> dict[int, int]:
    """find_owners run by an unprivileged user: in a forked child when we are root."""
    if os.geteuid() != 0:
        return {i: p.pid for i, p in procs.find_owners(inodes, str(root)).found.items()}
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, look, report, never return into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            found = procs.find_owners(inodes, str(root)).found
            os.write(write_end, json.dumps({i: p.pid for i, p in found.items()}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return {int(k): v for k, v in json.loads(data).items()}


def test_find_owners_skips_an_fd_table_it_may_not_read(proc_tree: Path) -> None:
    (proc_tree / "200" / "fd").chmod(0o700)  # root's, like another user's process
    (proc_tree / "100" / "fd").chmod(0o755)
    (proc_tree / "300" / "fd").chmod(0o755)
    assert _find_owners_as_nobody(proc_tree, [5002, 6001]) == {5002: 100}


def test_process_info(proc_tree: Path) -> None:
    assert procs.process_info(200, str(proc_tree)) == ProcessInfo(
        200, "postgres", "postgres -D /var/lib/pg"
    )
    assert procs.process_info(600, str(proc_tree)) is None  # no comm: gone
    assert procs.process_info(4242, str(proc_tree)) is None


def test_process_info_kernel_thread_and_long_cmdline(tmp_path: Path) -> None:
    write(tmp_path / "2" / "comm", "kthreadd\n")
    write(tmp_path / "2" / "cmdline", b"")  # kernel threads have an empty cmdline
    assert procs.process_info(2, str(tmp_path)) == ProcessInfo(2, "kthreadd", "")
    write(tmp_path / "3" / "comm", "java\n")
    write(tmp_path / "3" / "cmdline", b"java\0" + b"-Dx=" + b"y" * 500 + b"\0")
    info = procs.process_info(3, str(tmp_path))
    assert info is not None and len(info.cmdline) == procs.CMDLINE_MAX
    assert info.cmdline.startswith("java -Dx=yyy") and info.cmdline.endswith("...")
    write(tmp_path / "4" / "comm", "nocmd\n")  # cmdline unreadable: still a process
    assert procs.process_info(4, str(tmp_path)) == ProcessInfo(4, "nocmd", "")


def test_live_socket_of_this_process_is_attributed_to_it() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        inode = fd_inode(sock)
        owners = procs.find_owners([inode]).found
        with open(f"/proc/{os.getpid()}/comm") as f:
            comm = f.read().strip()
        assert owners[inode].pid == os.getpid()
        assert owners[inode].name == comm
        assert LocalKernel().owners([inode]).found[inode].pid == os.getpid()


def test_owner_cache_rechecks_and_resumes(proc_tree: Path) -> None:
    """A scan cut short resumes after the pid it stopped at; known owners are re-checked."""
    cache = procs.OwnerCache()
    ticks = iter(range(1000))
    first = procs.find_owners(
        [5002, 6001], str(proc_tree), deadline=0.5, clock=lambda: next(ticks), cache=cache
    )
    assert not first.complete  # time for one process only
    assert cache.resume_after == 100 and set(first.found) == {5002}
    second = procs.find_owners([5002, 6001], str(proc_tree), cache=cache)
    assert second.complete and set(second.found) == {5002, 6001}
    assert set(cache.entries) == {5002, 6001}
    # The socket moves away from pid 200: the remembered owner no longer holds it.
    (proc_tree / "200" / "fd" / "7").unlink()
    third = procs.find_owners([5002, 6001], str(proc_tree), cache=cache)
    assert set(third.found) == {5002} and set(cache.entries) == {5002}
    # Only the sockets asked for are remembered.
    procs.find_owners([5002], str(proc_tree), cache=cache)
    assert set(cache.entries) == {5002}


def test_process_info_cmdline_is_one_line(tmp_path: Path) -> None:
    write(tmp_path / "5" / "comm", "python3\n")
    write(tmp_path / "5" / "cmdline", b"python3\0-c\0import os\n\tprint(1)\r\n\0")
    info = procs.process_info(5, str(tmp_path))
    assert info is not None and info.cmdline == "python3 -c import os print(1)"
