"""Message transports: how the HTTP/2 bytes between server and agent travel.

Both ends carry HTTP/2 inside WebSocket binary messages: the server through the
ASGI WebSocket it accepted or on the connection it took over, the agent on the
connection it shook hands on itself. All look the same to
:class:`tunnel.link.Link`: send bytes, receive bytes, close.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["ABNORMAL_CLOSURE", "MessageTransport", "TransportClosed", "close_reason"]

#: The close code that means "no close handshake": ``aclose(ABNORMAL_CLOSURE)``
#: drops the connection at once, for a peer that is known to be dead.
ABNORMAL_CLOSURE = 1006


def close_reason(text: str) -> str:
    """``text`` cut to fit a WebSocket close frame (123 bytes of UTF-8)."""
    return text.encode("utf-8")[:123].decode("utf-8", "ignore")


class TransportClosed(Exception):
    """The transport ended; ``reason`` says how, for logs and error pages.

    ``code`` is the peer's WebSocket close code, when it sent one.
    """

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class MessageTransport(Protocol):
    """A bidirectional stream of binary messages."""

    async def send(self, data: bytes) -> None:
        """Send one message; raise TransportClosed if the transport has ended."""
        ...

    async def receive(self) -> bytes:
        """Receive one message; raise TransportClosed once the peer has gone."""
        ...

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the transport; never raises, returns promptly.

        With ``code`` :data:`ABNORMAL_CLOSURE` no close handshake is attempted.
        """
        ...
