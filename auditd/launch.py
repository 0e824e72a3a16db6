"""The console script, kept light: ``audit`` starts its owner scan before anything else.

The ``/proc/*/fd`` scan that attributes flagged sockets runs in a child process
(``auditd.kernel.prescan``). Started here, before the CLI imports the rest of the program
(a tenth of a second), the child has that much longer to finish while the audit dumps.
"""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel", "_fdscan_child.py")


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


def entry() -> None:
    argv = sys.argv[1:]
    child = spawn_scan(child_command()) if argv[:1] == ["audit"] else None
    from auditd import cli
    from auditd.kernel.prescan import FdPrescan

    sys.exit(cli.main(argv, prescan=FdPrescan(child) if child is not None else None))
