"""``python -m auditd`` runs the keepalive-auditd CLI."""

from auditd.cli import entry

entry()
