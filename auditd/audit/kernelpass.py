"""The parameters of a kernel audit pass (``audit.bpf.c``): the pre-filter of ``Tally`` and
of ``tally._could_flag_exact`` in whole units, so the kernel's integer comparisons decide as
the Python ones do, split by port as ``tally.by_port`` splits them. Pure.
"""

from __future__ import annotations

import math
import sys

from auditd.audit.inference import probe_cadence
from auditd.audit.tally import _IDLE_BOUNDS_MS, ByPort, Tally
from auditd.kernel.bpf.records import AuditParams, PassParams
from auditd.model import Sysctls

# Entries of the pass's map "ports" (audit.bpf.c max_entries): beyond, one set of
# thresholds, the loosest of all, serves every socket (more candidates, same findings).
MAX_PORTS = 4096


def cadence_min(idle_timeout: float) -> int:
    """The least whole ``max(TCP_KEEPIDLE, TCP_KEEPINTVL)`` that is ``> idle_timeout`` (the
    exact pre-filter's ``probe_cadence(...) > t.idle_timeout`` on integer seconds)."""
    if not math.isfinite(idle_timeout):
        return 0xFFFFFFFF if idle_timeout > 0 else 0
    return max(math.floor(idle_timeout) + 1, 0)


def _raw_port(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


def _params(tally: Tally, sysctls: Sysctls, exact: bool, ported: bool = False) -> AuditParams:
    warn_ms, probe_ms, close_wait_ms, retransmits, slow = tally.kernel_limits()
    return AuditParams(
        warn_ms=warn_ms,
        probe_ms=probe_ms,
        close_wait_ms=close_wait_ms,
        retransmits=retransmits,
        cadence_min=cadence_min(tally.limits.idle_timeout),
        sys_idle=sysctls.keepalive_time,
        sys_intvl=sysctls.keepalive_intvl,
        sys_cnt=sysctls.keepalive_probes,
        bounds_ms=tuple(_IDLE_BOUNDS_MS),
        slow_defaults=slow,
        exact=exact,
        ported=ported,
    )


def pass_params(
    tally: Tally, sysctls: Sysctls, exact: bool, ports: ByPort | None = None
) -> PassParams:
    """``tally``'s thresholds (the loosest of all), or with ``ports`` the general ones and
    each port's (every port's, also where its rules are within the general thresholds for
    the inferred pre-filter: the exact one also compares the idle timeout itself)."""
    if ports is None or not (ports.remote or ports.local):
        return PassParams(_params(tally, sysctls, exact))
    if len(ports.remote) + len(ports.local) > MAX_PORTS:
        return PassParams(_params(tally, sysctls, exact))
    silence = probe_cadence(sysctls.keepalive_time, sysctls.keepalive_intvl)
    general = _params(Tally(ports.general, silence), sysctls, exact, ported=True)
    entries = tuple(
        (_raw_port(port), remote, _params(Tally(t, silence), sysctls, exact))
        for remote, table in ((True, ports.remote), (False, ports.local))
        for port, t in table.items()
    )
    return PassParams(general, entries)
