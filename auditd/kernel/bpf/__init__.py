"""BPF iterators: a socket's exact keepalive settings and the owners of every socket.

``libbpf`` is a generic ctypes loader over the system libbpf 1.x; ``records`` decodes what
the iterators write (pure); ``iterators`` loads the shipped objects (``*.bpf.o``, built by
``build.sh`` from the ``*.bpf.c`` sources next to them) and reads them per namespace.
"""
