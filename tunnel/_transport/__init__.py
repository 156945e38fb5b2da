"""Message transports: how the HTTP/2 bytes between server and agent travel.

Both ends carry HTTP/2 inside WebSocket binary messages: the server through the
ASGI WebSocket it accepted, the agent through a trio-websocket connection. Both
look the same to :class:`tunnel._mux.Mux`: send bytes, receive bytes, close.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["MessageTransport", "TransportClosed"]


class TransportClosed(Exception):
    """The transport ended; ``reason`` says how, for logs and error pages."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MessageTransport(Protocol):
    """A bidirectional stream of binary messages."""

    async def send(self, data: bytes) -> None:
        """Send one message; raise TransportClosed if the transport has ended."""
        ...

    async def receive(self) -> bytes:
        """Receive one message; raise TransportClosed once the peer has gone."""
        ...

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the transport; never raises, returns promptly."""
        ...
