"""Which process owns a socket: the ``/proc/*/fd`` scan (``scan``), the same scan run ahead
in a child process (``prescan``, ``_fdscan_child``, ``spawn``), and the lookups of a session
(``attribution``)."""
