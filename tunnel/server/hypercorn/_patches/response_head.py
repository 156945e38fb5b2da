"""An HTTP/1.1 response's head leaves with its first body chunk, in one write, when the app says so.

Hypercorn's HTTP/1.1 protocol (``hypercorn/protocol/h11.py``, Hypercorn 0.18) writes each
h11 event as it comes: the head at ``http.response.start``, then each body chunk, then
the end of a chunked body. At one request at a time every write is a system call and a
trip through trio's scheduler paid by that request, and for a small response the head,
the body and its end could all have left together (benchmarks/README.rst, "Trips through
the scheduler (issue 14)").

Holding a head for a body that comes later would delay what a visitor sees (a streaming
response whose first chunk is slow, server-sent events, a response with no body), and
only the app knows whether its body is in hand. So the head is held only when the app
marks its ``http.response.start`` with :data:`tunnel._asgi.BODY_FOLLOWS`, promising to
send its first ``http.response.body`` at once, with nothing to wait for in between. It
is then kept until that next message has been handled, and written together with the
bytes it produced (the chunk, and the end if ``more_body`` is false): before the
connection moves on to its next request, as soon as the response is complete, and at
the latest when the app's ``send`` returns. A chunk too large to be worth a copy goes
out by itself after the head. An informational (1xx) start is never held, nor is
anything in HTTP/2, whose streams Hypercorn writes from a task of their own.

Two pieces: :class:`_HeadHoldingStream`, Hypercorn's ``HTTPStream`` for HTTP/1.1 only
(it replaces the name ``HTTPStream`` in ``hypercorn.protocol.h11``, where
``H11Protocol._create_stream`` looks it up for each request), decides when to hold and
when to let go; the replaced ``H11Protocol._send_h11_event`` keeps the bytes meanwhile.
Pinned by ``HYPERCORN_HEAD_WITH_BODY`` in ``tunnel/_compat.py``.
"""

from __future__ import annotations

from typing import Any, Final

import h11
from hypercorn.events import RawData
from hypercorn.protocol import h11 as hypercorn_h11
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream

from ...._asgi import BODY_FOLLOWS

__all__ = ["HELD_LIMIT", "write_head_with_body"]

#: The most bytes joined to a held head: a larger chunk is written apart, since
#: copying it would cost more than the system call it saves.
HELD_LIMIT: Final = 64 * 1024


class _HeadHoldingStream(HTTPStream):
    """An HTTP/1.1 stream that holds its response's head when the app marks it."""

    async def app_send(self, message: Any) -> None:
        protocol: Any = self.send.__self__  # type: ignore[attr-defined]  # H11Protocol.stream_send
        if protocol.tunnel_held is not None:
            # The head waits for this message: let go of both once it is handled,
            # or first if the app ended without it (Hypercorn would close the
            # connection before the head left).
            if message is None:
                await _release(protocol)
                await super().app_send(message)
                return
            try:
                await super().app_send(message)
            finally:
                await _release(protocol)
            return
        if (
            message is not None
            and message["type"] == "http.response.start"
            and message.get(BODY_FOLLOWS)
            and self.state is ASGIHTTPState.REQUEST
            and int(message["status"]) >= 200
        ):
            protocol.tunnel_held = bytearray()
            try:
                await super().app_send(message)
            except BaseException:
                protocol.tunnel_held = None
                raise
            return
        await super().app_send(message)


async def _release(protocol: Any) -> None:
    held = protocol.tunnel_held
    protocol.tunnel_held = None
    if held:
        await protocol.send(RawData(data=bytes(held)))


def write_head_with_body() -> None:
    """Install both pieces (the caller checks the version, once)."""
    original = H11Protocol._send_h11_event

    async def _send_h11_event(self: Any, event: Any) -> None:
        held: bytearray | None = self.tunnel_held
        if held is None:
            await original(self, event)
            return
        # Hypercorn's own, but for where the bytes go.
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if len(data) > HELD_LIMIT:
            await _release(self)
            await self.send(RawData(data=data))
            return
        held += data
        if type(event) is h11.EndOfMessage:
            # Complete: out before Hypercorn readies the connection for the
            # next request, or closes it.
            await _release(self)

    # None: nothing held (the class's default, so no instance needs setting up).
    H11Protocol.tunnel_held = None  # type: ignore[attr-defined]
    H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]
    # ``_create_stream`` reads the name from its module's globals for each request.
    vars(hypercorn_h11)["HTTPStream"] = _HeadHoldingStream
