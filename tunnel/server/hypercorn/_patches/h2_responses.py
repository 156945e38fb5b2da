"""HTTP/2 responses: buffering bounded by what the visitor reads, unfinished ones reset.

**A visitor that does not read makes Hypercorn buffer the whole response.** Replaces
``StreamBuffer.pop`` (``hypercorn/protocol/h2.py``, Hypercorn 0.17 and 0.18), which
pauses an app's ``send`` while a stream's buffer holds more than two frames, until the
sender takes the buffer below one frame; but when the visitor's flow-control window is
shut, the sender "takes" zero bytes, which counts as a small take and releases the app at
once, and every ``send`` wakes the sender to do so again. A visitor that stops reading (or
reads slowly) thus made the server read the agent's whole response into memory, which
defeats the tunnel's end-to-end flow control and lets any HTTP/2 visitor fill the server's
memory. The replacement releases the app when the buffer, not the take, is small; it is
installed only where ``pop`` has the line it replaces.

**An HTTP/2 response the app leaves unfinished stays open.** Wraps
``H2Protocol.stream_send`` (same file and versions). Hypercorn handles an ASGI app that
returns after ``http.response.start`` but before its last body message (or its trailers)
by forgetting the stream: the visitor's HTTP/2 stream stays open, with neither END_STREAM
nor RST_STREAM, until the visitor's own timeout, if it has one. A tunnel's response is cut
that way whenever the agent or the local service fails mid-body, and HTTP/2's only honest
word for that is RST_STREAM, which a gRPC client reads as the call's status and a browser
as a failed download. With the fix, the stream is reset with the HTTP/2 error code that
the app put in ``scope[RESET_CODE]`` (:data:`tunnel._asgi.RESET_CODE`: the code the agent's
stream was reset with), or ``INTERNAL_ERROR`` when it put none (the app raised).

**A finished HTTP/2 response waits for the sender to let it go.** Also in the
``stream_send`` wrapper, with ``H2Protocol._send_data`` wrapped to say which stream its
task is sending: a closed stream whose sending is over is dropped from the stream buffers
and the priority tree at once, rather than on the sending task's next visit; without it,
a steady load of gRPC calls on one connection piled finished streams up until the
priority tree refused its 1,001st and the connection failed.

All three are pinned to the versions they were verified on, checked here.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import logging
from typing import Any, Final

import h2.exceptions
from h2.errors import ErrorCodes
from h2.stream import StreamState
from hypercorn.protocol import h2 as hypercorn_h2
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h2 import H2Protocol, StreamBuffer
from hypercorn.protocol.http_stream import HTTPStream
from priority.priority import PriorityError

from ...._asgi import RESET_CODE

__all__ = ["fix_http2_responses"]

logger = logging.getLogger("tunnel.server")

_VERIFIED: Final = ("0.17.", "0.18.")
_applied = False


def fix_http2_responses() -> None:
    """Apply the fixes if the installed Hypercorn is one they were verified on (at most once)."""
    global _applied
    if _applied:
        return
    _applied = True
    version = importlib.metadata.version("hypercorn")
    if not version.startswith(_VERIFIED):
        logger.warning(
            "Hypercorn %s: unverified version, so an HTTP/2 response cut short (agent or "
            "local service lost mid-body) leaves the visitor's stream open instead of "
            "resetting it",
            version,
        )
        return
    _fix_buffer_pause()
    original = H2Protocol.stream_send
    original_send_data = H2Protocol._send_data

    async def stream_send(self: H2Protocol, event: Any) -> None:
        if isinstance(event, StreamClosed) and await _reset_if_unfinished(self, event.stream_id):
            await self._flush()
        await original(self, event)
        if isinstance(event, StreamClosed):
            await _forget_if_sent(self, event.stream_id)

    async def _send_data(self: H2Protocol, stream_id: int) -> None:
        self.tunnel_sending = stream_id  # type: ignore[attr-defined]
        try:
            await original_send_data(self, stream_id)
        finally:
            self.tunnel_sending = None  # type: ignore[attr-defined]

    H2Protocol.tunnel_sending = None  # type: ignore[attr-defined]
    H2Protocol.stream_send = stream_send  # type: ignore[method-assign]
    H2Protocol._send_data = _send_data  # type: ignore[method-assign]


async def _forget_if_sent(protocol: H2Protocol, stream_id: int) -> None:
    """Let go of a closed stream whose sending is over, without waiting for the sender.

    Hypercorn drops a stream's buffer and its place in the priority tree only when
    its sending task next visits the stream, and the task visits one stream per
    pass. A response that ends with trailers (every gRPC call) is over once the
    trailers went out, yet stays until that visit, and a tree of finished streams
    makes each pass slower (the tree's scheduler steps over every blocked
    stream): under a steady load of calls the finished ones piled up until the
    1,001st stream in the tree raised ``TooManyStreamsError`` out of the
    connection, failing every call on it.
    """
    buffer = protocol.stream_buffers.get(stream_id)
    if buffer is None or not buffer.complete or protocol.tunnel_sending == stream_id:  # type: ignore[attr-defined]
        return  # still sending, or in the sender's hands right now: it finishes the job
    h2_stream = protocol.connection.streams.get(stream_id)
    if h2_stream is not None and h2_stream.state_machine.state not in _SENT:
        return  # END_STREAM not sent yet: the sender sends it, then lets go
    await buffer.close()
    del protocol.stream_buffers[stream_id]
    with contextlib.suppress(PriorityError):
        protocol.priority.remove_stream(stream_id)


#: h2 stream states in which nothing more is sent.
_SENT: Final = frozenset({StreamState.HALF_CLOSED_LOCAL, StreamState.CLOSED})


async def _reset_if_unfinished(protocol: H2Protocol, stream_id: int) -> bool:
    buffer = protocol.stream_buffers.get(stream_id)
    stream = protocol.streams.get(stream_id)
    # Every finished response set its buffer complete (EndBody) before this
    # StreamClosed; a visitor's own reset removed the stream before it.
    if buffer is None or buffer._complete or not isinstance(stream, HTTPStream):
        return False
    code: int = stream.scope.get(RESET_CODE) or ErrorCodes.INTERNAL_ERROR  # type: ignore[assignment]
    try:
        protocol.connection.reset_stream(stream_id, code)
    except h2.exceptions.ProtocolError:
        return False  # closed at the HTTP/2 level already: nothing to tell
    # What the app sent but the visitor's window held back is of no use now;
    # Hypercorn's sender drops the buffer once sending to the stream fails.
    await buffer.close()
    protocol.priority.unblock(stream_id)
    return True


#: The line of ``StreamBuffer.pop`` that the buffering fix replaces.
_POP_RELEASES_ON_A_SMALL_TAKE: Final = "if len(data) < BUFFER_LOW_WATER"


def _fix_buffer_pause() -> None:
    try:
        source = inspect.getsource(StreamBuffer.pop)
    except (OSError, TypeError):
        source = ""
    if _POP_RELEASES_ON_A_SMALL_TAKE not in source:
        logger.warning(
            "Hypercorn's HTTP/2 StreamBuffer is not the one the buffering fix was written "
            "for; the fix is off, so a visitor that does not read may make the server "
            "buffer whole responses"
        )
        return
    low_water = hypercorn_h2.BUFFER_LOW_WATER

    async def pop(self: StreamBuffer, max_length: int) -> bytes:
        length = min(len(self.buffer), max_length)
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        # Hypercorn's own tests len(data): a take of zero bytes (a shut window)
        # released the app, which then sent more, without end.
        if len(self.buffer) < low_water:
            await self._paused.set()
        if len(self.buffer) == 0:
            await self._is_empty.set()
        return data

    StreamBuffer.pop = pop  # type: ignore[method-assign]
