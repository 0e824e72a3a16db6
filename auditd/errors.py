"""The project's own exceptions; the kernel layer translates OSError into these."""

from __future__ import annotations

import errno as _errno


class AuditdError(Exception):
    """Base class; ``str()`` is a one-line message for the user."""


class KernelError(AuditdError):
    """The kernel could not be read (netlink refused, /proc missing, ...)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @property
    def transient(self) -> bool:
        """Worth one more try: the receive queue overflowed or a call was interrupted."""
        return self.errno in (_errno.ENOBUFS, _errno.EAGAIN, _errno.EINTR)


class NamespaceGone(KernelError):
    """A network namespace disappeared or could not be entered."""


class BpfUnavailable(KernelError):
    """A BPF program could not be opened, loaded, attached or run (no libbpf 1.x, no
    CAP_BPF/CAP_PERFMON, no BTF, a verifier refusal, lockdown): callers fall back."""
