"""``python -m auditd`` runs the keepalive-auditd CLI."""

from auditd.launch import entry

entry()
