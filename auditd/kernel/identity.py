"""Who runs a process and since when: its real uid, its user name and its start time.

Read from procfs like the rest of the owner details (``/proc/PID/status``, ``/proc/PID/stat``,
``/proc/stat``), with the procfs root a parameter. psutil computes the same figures (the test
suite uses it as the oracle) but reads a global ``PROCFS_PATH``, costs 13 ms to import and
about 60 us per process here, and resolves user names in the agent's own user database.

The user name comes from the process's own root filesystem, ``/proc/PID/root/etc/passwd``:
a container's users are its own (uid 999 may be ``postgres`` in one image and nobody in
another), and an agent running in a container would otherwise name the host's processes
from its image. That file belongs to whoever controls the container: it is opened without
following a final symlink and without blocking, must be a regular file, is read up to
``PASSWD_MAX`` bytes, and only printable names up to 32 characters are taken. Names from
other sources (LDAP through NSS) are not looked up: the audit must not wait on a directory
server. Parsed files are cached by (device, inode, mtime, size).
"""

from __future__ import annotations

import os
import stat
from functools import lru_cache

PASSWD_MAX = 1 << 20
NAME_MAX = 32  # useradd's limit
_passwd: dict[tuple[int, int, int, int], dict[int, str]] = {}


def real_uid(status: bytes) -> int | None:
    """The real uid of ``Uid:\\treal\\teffective\\tsaved\\tfs`` in /proc/PID/status."""
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            fields = line.split()
            return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
    return None


def start_ticks(stat_text: bytes) -> int | None:
    """Field 22 (starttime, clock ticks after boot) of /proc/PID/stat (proc(5)).

    The name (field 2) is in parentheses and may itself hold ``)`` and spaces (a process
    names itself), so the fields are counted from the last ``)``: field 3 is the first."""
    tail = stat_text[stat_text.rfind(b")") + 1 :].split()
    return int(tail[19]) if len(tail) > 19 and tail[19].isdigit() else None


@lru_cache(maxsize=8)
def boot_time(proc_root: str) -> int | None:
    """``btime`` of /proc/stat: boot, as unix seconds (in the reader's time namespace)."""
    try:
        with open(os.path.join(proc_root, "stat"), "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def start_time(stat_text: bytes, proc_root: str) -> float | None:
    """Unix time the process started, from /proc/PID/stat and the boot time."""
    ticks, boot = start_ticks(stat_text), boot_time(proc_root)
    if ticks is None or boot is None:
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def parse_passwd(text: bytes) -> dict[int, str]:
    """uid -> name of a passwd file; the first entry of a uid wins, as getpwuid's does."""
    names: dict[int, str] = {}
    for line in text.splitlines():
        fields = line.split(b":")
        if len(fields) < 3 or not fields[2].isdigit():
            continue
        name = fields[0].decode(errors="replace")
        if 0 < len(name) <= NAME_MAX and name.isprintable() and " " not in name:
            names.setdefault(int(fields[2]), name)
    return names


def user_name(pid: int, uid: int, proc_root: str = "/proc") -> str | None:
    """The name of ``uid`` in the passwd file of the process's own root, or None."""
    path = os.path.join(proc_root, str(pid), "root", "etc", "passwd")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > PASSWD_MAX:
            return None
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        names = _passwd.get(key)
        if names is None:
            names = parse_passwd(os.read(fd, PASSWD_MAX))
            if len(_passwd) >= 256:  # images come and go: keep the cache bounded
                _passwd.clear()
            _passwd[key] = names
        return names.get(uid)
    except OSError:
        return None
    finally:
        os.close(fd)
