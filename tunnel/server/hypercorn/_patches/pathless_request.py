"""An HTTP/2 request without ``:path`` or ``:method`` is refused, not a crash of the server.

Replaces ``H2Protocol._create_stream`` (``hypercorn/protocol/h2.py``, Hypercorn 0.17 and
0.18), which reads ``:method`` and ``:path`` into locals and uses ``:path``
unconditionally: a plain ``CONNECT`` (which has none) raises ``UnboundLocalError`` out of
the connection and takes the whole worker down. The replacement refuses such a stream
with ``RST_STREAM(PROTOCOL_ERROR)`` first, then hands the rest to the original.
"""

from __future__ import annotations

from typing import Any

from h2.errors import ErrorCodes
from hypercorn.protocol.h2 import H2Protocol

__all__ = ["refuse_pathless_requests"]


def refuse_pathless_requests() -> None:
    """Install the replacement (the caller checks the version, once)."""
    original = H2Protocol._create_stream

    async def _create_stream(self: Any, request: Any) -> None:
        names = {name for name, _ in request.headers}
        if b":path" not in names or b":method" not in names:
            self.connection.reset_stream(request.stream_id, ErrorCodes.PROTOCOL_ERROR)
            await self._flush()
            return
        await original(self, request)

    H2Protocol._create_stream = _create_stream  # type: ignore[method-assign]
