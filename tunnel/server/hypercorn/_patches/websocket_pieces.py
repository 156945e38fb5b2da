"""An incoming binary WebSocket message is gathered as a list of pieces, joined once.

Replaces ``WebsocketBuffer`` (``hypercorn/protocol/ws_stream.py``, Hypercorn 0.17 and
0.18), which gathers each message's pieces in a ``BytesIO`` that grows in steps of an
eighth and copies what it holds each time: a large share of the server's CPU in a download
through the tunnel, whose agent sends 1 MiB messages (benchmarks/README.rst has the
figures). A message that came in one piece, as most do, is not copied at all.
"""

from __future__ import annotations

from typing import Any

from hypercorn.protocol import ws_stream
from hypercorn.protocol.ws_stream import FrameTooLargeError, WebsocketBuffer
from wsproto.events import BytesMessage, Message

__all__ = ["join_websocket_pieces_once"]


class _JoiningBuffer(WebsocketBuffer):
    """Hypercorn's buffer of one incoming WebSocket message, binary ones kept as pieces."""

    def __init__(self, max_length: int) -> None:
        super().__init__(max_length)
        self.parts: list[bytes] = []

    def extend(self, event: Message) -> None:  # type: ignore[type-arg]
        if not isinstance(event, BytesMessage) or self.value is not None:
            super().extend(event)
            return
        data = event.data
        self.parts.append(data if isinstance(data, bytes) else bytes(data))
        self.length += len(data)
        if self.length > self.max_length:
            raise FrameTooLargeError()

    def clear(self) -> None:
        super().clear()
        self.parts = []

    def to_message(self) -> dict[str, Any]:
        parts = self.parts
        if not parts:
            return super().to_message()
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        return {"type": "websocket.receive", "bytes": data, "text": None}


def join_websocket_pieces_once() -> None:
    """Install the replacement (the caller checks the version, once)."""
    ws_stream.WebsocketBuffer = _JoiningBuffer  # type: ignore[misc]
