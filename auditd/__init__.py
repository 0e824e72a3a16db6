"""keepalive-auditd: find TCP connections at risk of going half-open."""

__version__ = "0.1.0"
