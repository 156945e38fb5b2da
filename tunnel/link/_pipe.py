"""Raw byte streams through the tunnel: an HTTP/2 stream joined to a TCP socket.

A WebSocket after its upgrade and a TCP tunnel (SSH) are the same thing here:
bytes copied both ways, each direction ending on its own (half-close), with
backpressure both ways — a chunk from the stream is acknowledged only once the
socket took it, and the socket is read only as fast as the peer's flow-control
window allows. The agent joins streams to the local service with it; the
server joins a TCP tunnel's public connections to their streams.
"""

from __future__ import annotations

import contextlib

import h2.errors
import trio

from ._state import StreamError
from ._trio import Stream

__all__ = ["pipe"]

RECEIVE_SIZE = 256 * 1024


async def pipe(stream: Stream, socket: trio.SocketStream, initial: bytes = b"") -> None:
    """Copy bytes between ``stream`` and ``socket`` until both directions have ended.

    ``initial`` is what the local side sent already (read past an HTTP upgrade).
    A failure either way resets the stream and closes the socket.
    """
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_to_local, stream, socket)
            await _to_stream(socket, stream, initial)
    except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        if not stream.done:
            stream.cancel(h2.errors.ErrorCodes.CONNECT_ERROR)
    except* StreamError:
        pass  # the server reset the stream or the connection is gone
    finally:
        with trio.CancelScope(shield=True):
            await socket.aclose()


async def _to_stream(socket: trio.SocketStream, stream: Stream, initial: bytes) -> None:
    if initial:
        await stream.send_data(initial)
    while True:
        data = await socket.receive_some(RECEIVE_SIZE)
        if not data:
            stream.end()
            return
        await stream.send_data(data)


async def _to_local(stream: Stream, socket: trio.SocketStream) -> None:
    while True:
        data = await stream.receive_data()
        if not data:
            # The far end finished sending; tell the local side the same way.
            with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                await socket.send_eof()
            return
        await socket.send_all(data)
        stream.acknowledge()
