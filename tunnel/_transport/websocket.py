"""The agent's side: a trio-websocket client connection as a message transport."""

from __future__ import annotations

import contextlib

import trio
import trio_websocket
from wsproto.events import BytesMessage

from .._compat import TRIO_WEBSOCKET_SEND
from .._exceptions import ServerUnreachableError
from . import ABNORMAL_CLOSURE, TransportClosed, close_reason
from .masking import use_fast_masking

__all__ = ["HandshakeGuard", "WebSocketTransport"]

# How long a close handshake may take before the socket is dropped anyway.
CLOSE_TIMEOUT = 2.0


class HandshakeGuard(trio.abc.Stream):
    """The byte stream to the server, failing at once if it ends mid-handshake.

    trio-websocket (0.12) waits for the handshake's answer forever when the
    connection is closed or reset first, as a restarting server, or a load
    balancer with no server behind it, does: the agent would sit out its whole
    ``connect_timeout`` before retrying. This raises instead, in
    trio-websocket's reader task, which ends the attempt. Once the handshake is
    done (set :attr:`handshaking` to False) it is a plain pass-through.

    Args:
        stream: The connected byte stream.
        where: The server's address, for the error message.
    """

    def __init__(self, stream: trio.abc.Stream, where: str) -> None:
        self._stream = stream
        self._where = where
        self.handshaking = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError:
            if self.handshaking:
                raise self._ended() from None
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            if not self.handshaking:
                raise
            data = b""
        if not data and self.handshaking:
            raise self._ended()
        return data

    def _ended(self) -> ServerUnreachableError:
        return ServerUnreachableError(
            f"{self._where} closed the connection during the WebSocket handshake"
        )

    async def aclose(self) -> None:
        await self._stream.aclose()


class WebSocketTransport:
    """HTTP/2 bytes over a trio-websocket connection."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        # Every byte the agent sends is masked; wsproto's own masker would be
        # the largest cost of a download.
        use_fast_masking()
        self._send_directly = TRIO_WEBSOCKET_SEND.on

    async def send(self, data: bytes) -> None:
        if self._send_directly and not self._ws._stream_lock.locked():
            await self._send_unlocked(data)
            return
        try:
            await self._ws.send_message(data)
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(_describe(exc.reason)) from None

    async def _send_unlocked(self, data: bytes) -> None:
        """trio-websocket's ``send_message`` (0.12), taking its free lock without a yield.

        ``async with`` on trio-websocket's send lock yields even when the lock
        is free, and each yield is a trip through trio's scheduler: at one
        request at a time, one trip in every message the agent sends. The send
        itself still yields. On another trio-websocket release this is off
        (``TRIO_WEBSOCKET_SEND`` in ``tunnel/_compat.py``).
        """
        ws = self._ws
        if ws._close_reason is not None:
            raise TransportClosed(_describe(ws._close_reason))
        frame = ws._wsproto.send(BytesMessage(data=data))
        lock = ws._stream_lock
        lock.acquire_nowait()
        try:
            await ws._stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise TransportClosed(_describe(ws._close_reason)) from None
        finally:
            lock.release()

    async def receive(self) -> bytes:
        try:
            message = await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            code = exc.reason.code if exc.reason is not None else None
            raise TransportClosed(_describe(exc.reason), code) from None
        if isinstance(message, str):
            raise TransportClosed("the server sent a text message; only binary is allowed")
        return message

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        if code == ABNORMAL_CLOSURE:
            # Cancelled at once, trio-websocket skips the handshake and closes
            # the TCP connection.
            with trio.CancelScope() as dropped:
                dropped.cancel()
                await self._ws.aclose()
            return
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            async with trio.open_nursery() as nursery:
                # trio-websocket sees the server's close reply only after the
                # messages queued before it are taken; nobody else reads now.
                nursery.start_soon(self._discard_incoming)
                await self._ws.aclose(code, close_reason(reason) or None)
                nursery.cancel_scope.cancel()

    async def _discard_incoming(self) -> None:
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:
                await self._ws.get_message()


def _describe(reason: trio_websocket.CloseReason | None) -> str:
    if reason is None:
        return "the connection to the server closed"
    text = f" ({reason.reason})" if reason.reason else ""
    return f"the server closed the connection: {reason.code} {reason.name}{text}"
