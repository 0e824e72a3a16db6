"""The console script, kept light: ``audit`` starts its owner scan before anything else.

The ``/proc/*/fd`` scan that attributes flagged sockets runs in a child process
(``auditd.kernel.owners.prescan``). Started here, before the CLI imports the rest of the
program (a tenth of a second), the child has that much longer to finish while the audit
dumps. Only the standard library is imported before it starts (``auditd.kernel`` hands its
names on lazily).
"""

from __future__ import annotations

import contextlib
import os
import sys


def entry() -> None:
    from auditd.kernel.owners.spawn import bpf_likely, child_command, spawn_scan

    argv = sys.argv[1:]
    # With BPF about to load, the owner iterator attributes in one pass: no child then.
    child = spawn_scan(child_command()) if argv[:1] == ["audit"] and not bpf_likely() else None
    from auditd import cli
    from auditd.kernel.owners.prescan import FdPrescan

    code = cli.main(argv, prescan=FdPrescan(child) if child is not None else None)
    if argv[:1] == ["run"]:
        _exit_now(code)
    sys.exit(code)


def _exit_now(code: int) -> None:
    """The agent has stopped (its threads told, its sockets closed, "stopped" logged): exit
    without the interpreter's teardown, which took 1.4 s more with a 14,000-rule set and a
    reload thread still at work; SIGTERM must end the agent within a second."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a full disk: nothing more to say
            stream.flush()
    os._exit(code)
