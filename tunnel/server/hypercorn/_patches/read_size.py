"""Hypercorn reads a connection in larger pieces.

Replaces ``MAX_RECV`` (``hypercorn/trio/tcp_server.py``, Hypercorn 0.17 and 0.18): the
trio worker reads 64 KiB at a time, and each read goes through Hypercorn's whole protocol
stack, which makes one ASGI message per 64 KiB of an upload and 16 WebSocket reads per MiB
an agent sends. Larger reads speed uploads through the tunnel up several times and cut the
server's CPU per MiB of a download (benchmarks/README.rst, "Hypercorn reads 256 KiB at a
time").
"""

from __future__ import annotations

from typing import Final

from hypercorn.trio import tcp_server

__all__ = ["READ_SIZE", "read_in_larger_pieces"]

#: What Hypercorn's trio worker reads from a connection at once (it reads 64 KiB).
READ_SIZE: Final = 256 << 10


def read_in_larger_pieces() -> None:
    """Raise the read size, if it is still Hypercorn's own."""
    if getattr(tcp_server, "MAX_RECV", None) == 1 << 16:
        tcp_server.MAX_RECV = READ_SIZE
