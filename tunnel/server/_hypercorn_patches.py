"""Fixes for Hypercorn defects that a tunnel server cannot live with.

Each fix is pinned to the Hypercorn versions it was verified on, applied once
(idempotent) when a :class:`~tunnel.TunnelApp` is created, so it holds both
under :func:`tunnel.serve` and under a user's own ``hypercorn`` command.

**An HTTP/2 request without ``:path`` crashes the server.** Hypercorn 0.17
and 0.18 read ``:method`` and ``:path`` into locals and use ``:path``
unconditionally; a plain ``CONNECT`` (which has none) raises
``UnboundLocalError`` out of the connection and takes the whole worker down.
The fix refuses such a stream with ``RST_STREAM(PROTOCOL_ERROR)`` first.

**An app learns that a visitor left only from a task waiting in receive().**
ASGI reports a disconnect solely as ``http.disconnect`` from ``receive()``, so
relaying a response needed a second task per request, whose start,
cancellation and join were a tenth of the server's task switches. With the fix
(Hypercorn 0.17 and 0.18's trio worker), an HTTP app's ``receive`` is a
:class:`NotifyingReceive`, whose ``on_disconnect`` callback Hypercorn calls as
it queues ``http.disconnect``; apps that don't look see the plain ``receive``.

**A WebSocket message is copied many times over as it arrives.** Hypercorn
0.17 and 0.18 gather each message's pieces in a ``BytesIO``, which grows in
steps of an eighth and copies what it holds each time: 11 % of the server's
CPU in a download through the tunnel, whose agent sends 1 MiB messages. The
fix gathers binary messages as a list of pieces, joined once (not at all for a
message that came in one piece, as most do).

**Hypercorn reads a connection 64 KiB at a time** (``MAX_RECV`` in its trio
worker), and each read goes through its whole protocol stack: one ASGI
message per 64 KiB of an upload, 16 WebSocket reads per MiB an agent sends.
Reading up to 256 KiB at once took an upload through the tunnel from 42 to
117 MiB/s and cut the server's CPU per MiB of a download by a quarter.

**An HTTP/2 frame for a stream Hypercorn has forgotten stops the server.**
Hypercorn 0.17 and 0.18 (``protocol/h2.py``, ``H2Protocol._handle_events``)
look a DATA frame's stream up with ``self.streams[event.stream_id]``. Once a
stream is answered Hypercorn forgets it, while the client may still be
sending its body (it may: RFC 9113 section 8.1), so the next DATA frame
raises ``KeyError`` out of the connection and ``serve`` ends. The fix makes
``H2Protocol.streams`` answer a lookup of a forgotten stream with a stand-in
that tells the client to stop sending (``RST_STREAM(NO_ERROR)``, as section
8.1 has it); Hypercorn then returns the flow-control credit as it would.

**A thousand PRIORITY frames stop the server.** Hypercorn 0.17 and 0.18
(``H2Protocol._priority_updated``) insert every stream a PRIORITY frame names
into their priority tree, known or not, and never take the unknown ones out;
the 1001st raises ``priority.TooManyStreamsError`` out of the connection. The
fix ignores priority for streams Hypercorn is not sending on (RFC 9113
deprecates these signals; section 5.3.2 lets a server ignore them) and puts a
stream whose named parent is unknown at the root.

**A visitor's WebSocket close code is lost.** Hypercorn 0.17 and 0.18 tell the app
``websocket.disconnect`` with code 1006 whenever the client starts the closing
handshake, whatever code the client sent. A tunnel must carry that code to the
local service, so the fix passes the client's code and reason on instead.

**A WebSocket's app may be sent 10 whole messages ahead.** Hypercorn 0.18
queues up to ``max_app_queue_size`` messages of up to
``websocket_max_message_size`` each for a WebSocket's app, hundreds of MiB per
visitor towards a slow local service. The fix (the same ``spawn_app``) bounds
the queue in bytes (``set_websocket_buffer``), counting the message the app
holds until it asks for the next one.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from typing import Any

import h2.events
import h2.exceptions
import trio
from h2.errors import ErrorCodes
from hypercorn.protocol import ws_stream
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.ws_stream import FrameTooLargeError, WebsocketBuffer, WSStream
from hypercorn.trio import task_group, tcp_server
from priority.priority import PriorityError
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Message, Ping
from wsproto.frame_protocol import CloseReason

from .._compat import HYPERCORN_DISCONNECT_NOTICE, HYPERCORN_FIXES
from ._hypercorn_h2 import fix_http2_responses

__all__ = [
    "DEFAULT_WEBSOCKET_BUFFER",
    "NotifyingReceive",
    "apply_hypercorn_patches",
    "set_websocket_buffer",
]

logger = logging.getLogger("tunnel.server")

#: Versions whose code the fixes below were written against and tested on.
_VERIFIED = HYPERCORN_FIXES.verified
#: What Hypercorn's trio worker reads from a connection at once (it reads 64 KiB).
READ_SIZE = 256 << 10
#: Those whose ``TaskGroup.spawn_app`` the disconnect notice replaces.
_VERIFIED_SPAWN_APP = HYPERCORN_DISCONNECT_NOTICE.verified
_applied = False


def apply_hypercorn_patches() -> None:
    """Apply the fixes if the installed Hypercorn needs them (at most once)."""
    global _applied
    if _applied:
        return
    _applied = True
    # Off on other versions; warn_fixes_off() says so.
    if not HYPERCORN_FIXES.on:
        return
    _fix_websocket_close_code()
    _fix_pathless_http2_request()
    _fix_forgotten_streams()
    _fix_priority_of_unknown_streams()
    # Upstream: hypercorn/trio/tcp_server.py, MAX_RECV.
    if getattr(tcp_server, "MAX_RECV", None) == 1 << 16:
        tcp_server.MAX_RECV = READ_SIZE
    ws_stream.WebsocketBuffer = _JoiningBuffer  # type: ignore[misc]
    if HYPERCORN_DISCONNECT_NOTICE.on:
        _notify_disconnect()
        _bound_websocket_queues()
    fix_http2_responses()


class NotifyingReceive:
    """Hypercorn's ``receive`` for one HTTP request, which also tells of the visitor leaving.

    Set :attr:`on_disconnect` to a function (synchronous, must not raise) and
    Hypercorn calls it when the visitor's connection or stream closes, even if
    no task waits in ``receive()``. Set it back to None when done: Hypercorn
    also closes the stream after a complete response.
    """

    __slots__ = ("_receive", "gone", "on_disconnect")

    def __init__(self, receive: Any) -> None:
        self._receive = receive
        self.on_disconnect: Any = None
        #: Whether Hypercorn has queued ``http.disconnect`` (perhaps before
        #: :attr:`on_disconnect` was set).
        self.gone = False

    async def __call__(self) -> Any:
        return await self._receive()


def _notify_disconnect() -> None:
    # Upstream: hypercorn/trio/task_group.py, TaskGroup.spawn_app.
    original = task_group.TaskGroup.spawn_app

    async def spawn_app(self: Any, app: Any, config: Any, scope: Any, send: Any) -> Any:
        if scope["type"] != "http":
            return await original(self, app, config, scope, send)
        # Hypercorn 0.18's spawn_app, but for the receive and put it hands out.
        put, get = trio.open_memory_channel[Any](config.max_app_queue_size)
        receive = NotifyingReceive(get.receive)
        self._nursery.start_soon(
            task_group._handle,
            *(app, config, scope, receive, send),
            *(trio.to_thread.run_sync, trio.from_thread.run),
        )

        async def app_put(message: Any) -> None:
            if message["type"] == "http.disconnect":
                receive.gone = True
                if receive.on_disconnect is not None:
                    receive.on_disconnect()
            await put.send(message)

        return app_put

    task_group.TaskGroup.spawn_app = spawn_app  # type: ignore[method-assign]


class _JoiningBuffer(WebsocketBuffer):
    """Hypercorn's buffer of one incoming WebSocket message, binary ones kept as pieces.

    Upstream: hypercorn/protocol/ws_stream.py, WebsocketBuffer.
    """

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


def _fix_pathless_http2_request() -> None:
    # Upstream: hypercorn/protocol/h2.py, H2Protocol._create_stream.
    original = H2Protocol._create_stream

    async def _create_stream(self: Any, request: Any) -> None:
        names = {name for name, _ in request.headers}
        if b":path" not in names or b":method" not in names:
            self.connection.reset_stream(request.stream_id, ErrorCodes.PROTOCOL_ERROR)
            await self._flush()
            return
        await original(self, request)

    H2Protocol._create_stream = _create_stream  # type: ignore[method-assign]


class _ForgottenStream:
    """What Hypercorn's ``H2Protocol`` finds for a stream it no longer knows."""

    __slots__ = ("_connection", "_stream_id")

    def __init__(self, connection: Any, stream_id: int) -> None:
        self._connection = connection
        self._stream_id = stream_id

    async def handle(self, event: Any) -> None:
        # Only DATA (and END_STREAM) reach here: the stream was answered and
        # Hypercorn forgot it while the client still sends. NO_ERROR asks it
        # to stop without failing the answer it has (RFC 9113 section 8.1);
        # Hypercorn's caller flushes the frame. A stream h2 has closed needs
        # no answer.
        with contextlib.suppress(h2.exceptions.H2Error):
            self._connection.reset_stream(self._stream_id, ErrorCodes.NO_ERROR)


class _Streams(dict[int, Any]):
    """``H2Protocol.streams``, where a stream Hypercorn forgot is a :class:`_ForgottenStream`.

    ``__missing__`` runs only for a lookup that would have raised ``KeyError``,
    so Hypercorn's own lookups of live streams cost what they did.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: H2Protocol) -> None:
        super().__init__()
        self._protocol = protocol

    def __missing__(self, stream_id: int) -> _ForgottenStream:
        return _ForgottenStream(self._protocol.connection, stream_id)


def _fix_forgotten_streams() -> None:
    # Upstream: hypercorn/protocol/h2.py, H2Protocol._handle_events (its
    # DataReceived branch). This replaces the dict that H2Protocol.__init__
    # sets up (``self.streams = {}``), leaving _handle_events as it is.
    original_init = H2Protocol.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.streams = _Streams(self)

    H2Protocol.__init__ = __init__  # type: ignore[method-assign]


def _fix_priority_of_unknown_streams() -> None:
    async def _priority_updated(self: Any, event: h2.events.PriorityUpdated) -> None:
        # Hypercorn 0.18's H2Protocol._priority_updated (hypercorn/protocol/
        # h2.py), but for streams it is not sending on: those it inserted into
        # the tree (without bound, and never removed), and this ignores. The
        # tree holds exactly the streams of ``stream_buffers``.
        if event.stream_id not in self.stream_buffers:
            return
        depends_on = event.depends_on if event.depends_on in self.stream_buffers else None
        try:
            self.priority.reprioritize(
                stream_id=event.stream_id,
                depends_on=depends_on,
                weight=event.weight,
                exclusive=event.exclusive,
            )
        except PriorityError:
            return
        await self.has_data.set()

    H2Protocol._priority_updated = _priority_updated  # type: ignore[method-assign]


def _fix_websocket_close_code() -> None:
    # Upstream: hypercorn/protocol/ws_stream.py, WSStream._handle_events and handle.
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


# -- WebSocket messages held for the app, bounded in bytes -------------------------
#
# Hypercorn 0.18 queues up to ``max_app_queue_size`` (10) whole messages for a
# WebSocket's app, each up to ``websocket_max_message_size``: hundreds of MiB
# per visitor when the app (the tunnel, towards a slow local service) reads
# slower than the visitor sends. The fix bounds the bytes queued instead, and
# counts the message the app took until it asks for the next, so that what
# the app still holds is counted too. Hypercorn's reading of the connection
# waits meanwhile, so a visitor that sends faster is read slower.

#: What one WebSocket may hold when :func:`set_websocket_buffer` was not called.
DEFAULT_WEBSOCKET_BUFFER = 4 << 20
#: What a queued message costs beyond its data, so empty messages count too.
_MESSAGE_OVERHEAD = 64
_BUFFER_ATTRIBUTE = "tunnel_websocket_buffer"


def set_websocket_buffer(config: Any, size: int) -> None:
    """Let each WebSocket served with Hypercorn ``config`` hold ``size`` bytes of messages."""
    setattr(config, _BUFFER_ATTRIBUTE, size)


class _MessageQueue:
    """Messages for one WebSocket's app, at most ``limit`` bytes of them (one always fits)."""

    __slots__ = ("_bytes", "_changed", "_closed", "_held", "_limit", "_messages")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._messages: deque[tuple[Any, int]] = deque()
        self._bytes = 0  # queued, and held by the app (its last message)
        self._held = 0
        self._changed = trio.Event()
        self._closed = False

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def put(self, message: Any) -> None:
        size = 0
        if message.get("type") == "websocket.receive":
            data = message.get("bytes") or message.get("text") or b""
            size = len(data) + _MESSAGE_OVERHEAD
        # Connect and disconnect always go through; data waits for room.
        while not self._closed and size and self._bytes and self._bytes + size > self._limit:
            await self._changed.wait()
        if self._closed:
            # The app has returned: nobody will read this. (Hypercorn's own
            # queue would hold the connection up for good once full.)
            return
        self._messages.append((message, size))
        self._bytes += size
        self._wake()

    async def get(self) -> Any:
        # Asking for the next message means the app is done with the last.
        self._bytes -= self._held
        self._held = 0
        self._wake()
        while not self._messages:
            await self._changed.wait()
        message, self._held = self._messages.popleft()
        return message

    def close(self) -> None:
        self._closed = True
        self._messages.clear()
        self._wake()


def _bound_websocket_queues() -> None:
    original = task_group.TaskGroup.spawn_app

    async def spawn_app(self: Any, app: Any, config: Any, scope: Any, send: Any) -> Any:
        if scope["type"] != "websocket":
            return await original(self, app, config, scope, send)
        # Hypercorn 0.18's spawn_app, with the queue above for its channel.
        queue = _MessageQueue(getattr(config, _BUFFER_ATTRIBUTE, DEFAULT_WEBSOCKET_BUFFER))

        async def run() -> None:
            try:
                await task_group._handle(
                    *(app, config, scope, queue.get, send),
                    *(trio.to_thread.run_sync, trio.from_thread.run),
                )
            finally:
                queue.close()

        self._nursery.start_soon(run)
        return queue.put

    task_group.TaskGroup.spawn_app = spawn_app  # type: ignore[method-assign]
