"""Starting the owner scan's child process: standard library only, so that the console
script (``auditd.launch``) can start it before it imports the rest of the program."""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fdscan_child.py")


def child_command(proc_root: str = "/proc") -> list[str]:
    """``python -I -S`` skips site-packages: the child needs the standard library only."""
    return [sys.executable, "-I", "-S", CHILD, proc_root]


# Capability bits (include/uapi/linux/capability.h): loading the BPF iterators needs CAP_BPF
# and CAP_PERFMON, or CAP_SYS_ADMIN.
_CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 38, 39
KERNEL_BTF = "/sys/kernel/btf/vmlinux"


def bpf_likely(status: str = "/proc/self/status", btf: str = KERNEL_BTF) -> bool:
    """Whether the BPF iterators will most likely load (the capabilities and kernel BTF are
    there): then their owner pass does the scan child's work, and starting the child would
    only cost its CPU. A wrong guess costs the child's head start: the session starts it
    when BPF fails."""
    try:
        with open(status, encoding="ascii", errors="replace") as f:
            eff = next((line for line in f if line.startswith("CapEff:")), "")
        caps = int(eff.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return False
    if not os.path.exists(btf):
        return False
    admin, bpf, perfmon = (
        bool(caps >> bit & 1) for bit in (_CAP_SYS_ADMIN, _CAP_BPF, _CAP_PERFMON)
    )
    return admin or (bpf and perfmon)


def spawn_scan(command: list[str]) -> subprocess.Popen[bytes] | None:
    """The scan's child process with its pipes, or None if it cannot be started."""
    try:
        return subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
