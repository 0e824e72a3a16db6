"""The project's own exceptions; the kernel layer translates OSError into these."""

from __future__ import annotations


class AuditdError(Exception):
    """Base class; ``str()`` is a one-line message for the user."""


class KernelError(AuditdError):
    """The kernel could not be read (netlink refused, /proc missing, ...)."""


class NamespaceGone(KernelError):
    """A network namespace disappeared or could not be entered."""
