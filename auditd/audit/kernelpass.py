"""The parameters of a kernel audit pass (``audit.bpf.c``): the pre-filter of ``Tally`` and
of ``tally._could_flag_exact`` in whole units, so the kernel's integer comparisons decide as
the Python ones do. Pure.
"""

from __future__ import annotations

import math

from auditd.audit.tally import _IDLE_BOUNDS_MS, Tally
from auditd.kernel.bpf.records import AuditParams
from auditd.model import Sysctls


def cadence_min(idle_timeout: float) -> int:
    """The least whole ``max(TCP_KEEPIDLE, TCP_KEEPINTVL)`` that is ``> idle_timeout`` (the
    exact pre-filter's ``probe_cadence(...) > t.idle_timeout`` on integer seconds)."""
    if not math.isfinite(idle_timeout):
        return 0xFFFFFFFF if idle_timeout > 0 else 0
    return max(math.floor(idle_timeout) + 1, 0)


def pass_params(tally: Tally, sysctls: Sysctls, exact: bool) -> AuditParams:
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
    )
