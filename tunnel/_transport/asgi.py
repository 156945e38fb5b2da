"""The server's side: an accepted ASGI WebSocket as a message transport."""

from __future__ import annotations

import contextlib

import trio

from .._asgi import Receive, Send
from . import ABNORMAL_CLOSURE, TransportClosed, close_reason

__all__ = ["ASGIWebSocketTransport"]


CLOSE_TIMEOUT = 2.0


class ASGIWebSocketTransport:
    """HTTP/2 bytes over the ASGI ``websocket.send`` / ``websocket.receive`` calls."""

    def __init__(self, receive: Receive, send: Send, *, peer: str = "the agent") -> None:
        self._receive = receive
        self._send = send
        self._closed = False
        #: Who is at the other end, in the reasons given (an agent, or another node).
        self._peer = peer

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise TransportClosed(f"{self._peer}'s connection is closed")
        try:
            await self._send({"type": "websocket.send", "bytes": data})
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._closed = True
            raise TransportClosed(f"{self._peer}'s connection broke: {exc}") from None

    async def receive(self) -> bytes:
        if self._closed:
            raise TransportClosed(f"{self._peer}'s connection is closed")
        message = await self._receive()
        if message["type"] == "websocket.receive":
            data = message.get("bytes")
            if data is None:
                raise TransportClosed(f"{self._peer} sent a text message; only binary is allowed")
            return bytes(data)
        self._closed = True
        code = message.get("code", 1005)
        return_reason = message.get("reason") or ""
        raise TransportClosed(f"{self._peer} disconnected ({code} {return_reason})".strip())

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        if code == ABNORMAL_CLOSURE:
            # Returning without a close makes Hypercorn drop the connection.
            return
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            # The peer may be gone already; closing is best effort.
            with contextlib.suppress(Exception):
                await self._send(
                    {"type": "websocket.close", "code": code, "reason": close_reason(reason)}
                )
