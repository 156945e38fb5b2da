"""A visitor's WebSocket close code reaches the app, to be carried to the local service.

Replaces ``WSStream._handle_events`` and wraps ``WSStream.handle``
(``hypercorn/protocol/ws_stream.py``, Hypercorn 0.17 and 0.18), which tell the app
``websocket.disconnect`` with code 1006 whenever the client starts the closing handshake,
whatever code the client sent. The replacement remembers the client's code and reason and
passes them on instead.
"""

from __future__ import annotations

from typing import Any

from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.ws_stream import FrameTooLargeError, WSStream
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping
from wsproto.frame_protocol import CloseReason

__all__ = ["pass_on_close_codes"]


def pass_on_close_codes() -> None:
    """Install the replacements (the caller checks the version, once)."""
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
