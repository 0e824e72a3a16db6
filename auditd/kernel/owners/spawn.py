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


def spawn_scan(command: list[str]) -> subprocess.Popen[bytes] | None:
    """The scan's child process with its pipes, or None if it cannot be started."""
    try:
        return subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
