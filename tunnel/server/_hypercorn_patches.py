"""Fixes for Hypercorn defects that a tunnel server cannot live with.

Each fix is pinned to the Hypercorn versions it was verified on, applied once
(idempotent) when a :class:`~tunnel.TunnelApp` is created, so it holds both
under :func:`tunnel.serve` and under a user's own ``hypercorn`` command.

**An HTTP/2 request without ``:path`` crashes the server.** Hypercorn 0.17
and 0.18 read ``:method`` and ``:path`` into locals and use ``:path``
unconditionally; a plain ``CONNECT`` (which has none) raises
``UnboundLocalError`` out of the connection and takes the whole worker down.
The fix refuses such a stream with ``RST_STREAM(PROTOCOL_ERROR)`` first.

**A visitor's WebSocket close code is lost.** Hypercorn 0.17 and 0.18 tell the app
``websocket.disconnect`` with code 1006 whenever the client starts the closing
handshake, whatever code the client sent. A tunnel must carry that code to the
local service, so the fix passes the client's code and reason on instead.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

from h2.errors import ErrorCodes
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.ws_stream import FrameTooLargeError, WSStream
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping
from wsproto.frame_protocol import CloseReason

__all__ = ["apply_hypercorn_patches"]

logger = logging.getLogger("tunnel.server")

#: Versions whose code the fix below was written against and tested on.
_VERIFIED = ("0.17.", "0.18.")
_applied = False


def apply_hypercorn_patches() -> None:
    """Apply the fixes if the installed Hypercorn needs them (at most once)."""
    global _applied
    if _applied:
        return
    _applied = True
    version = importlib.metadata.version("hypercorn")
    if not version.startswith(_VERIFIED):
        logger.debug("Hypercorn %s: WebSocket close-code fix not applied", version)
        return
    _fix_websocket_close_code()
    _fix_pathless_http2_request()


def _fix_pathless_http2_request() -> None:
    original = H2Protocol._create_stream

    async def _create_stream(self: Any, request: Any) -> None:
        names = {name for name, _ in request.headers}
        if b":path" not in names or b":method" not in names:
            self.connection.reset_stream(request.stream_id, ErrorCodes.PROTOCOL_ERROR)
            await self._flush()
            return
        await original(self, request)

    H2Protocol._create_stream = _create_stream  # type: ignore[method-assign]


def _fix_websocket_close_code() -> None:
    original_handle = WSStream.handle

    async def _handle_events(self: Any) -> None:
        # Hypercorn 0.18's WSStream._handle_events, but for the close branch,
        # which remembers the client's close code and reason.
        for event in self.connection.events():
            if isinstance(event, Message):
                try:
                    self.buffer.extend(event)
                except FrameTooLargeError:
                    await self._send_wsproto_event(
                        CloseConnection(code=CloseReason.MESSAGE_TOO_BIG)
                    )
                    break
                if event.message_finished:
                    await self.app_put(self.buffer.to_message())
                    self.buffer.clear()
            elif isinstance(event, Ping):
                await self._send_wsproto_event(event.response())
            elif isinstance(event, CloseConnection):
                self._tunnel_close = (event.code, event.reason or "")
                if self.connection.state == ConnectionState.REMOTE_CLOSING:
                    await self._send_wsproto_event(event.response())
                await self.send(StreamClosed(stream_id=self.stream_id))

    async def handle(self: Any, event: Any) -> None:
        close = getattr(self, "_tunnel_close", None)
        if isinstance(event, StreamClosed) and close is not None and self.app_put is not None:
            self.closed = True
            code, reason = close
            await self.app_put({"type": "websocket.disconnect", "code": code, "reason": reason})
            return
        await original_handle(self, event)

    WSStream._handle_events = _handle_events  # type: ignore[method-assign]
    WSStream.handle = handle  # type: ignore[method-assign]
