"""An agent's WebSocket taken out of Hypercorn's hands once its handshake is answered.

Through Hypercorn, every message of an agent's link costs a second connection's worth
of Hypercorn: its reading loop, wsproto's parser, its ``WSStream``, the ASGI queue,
then the link's reader task (benchmarks/README.rst, "Trips through the scheduler
(issue 14)"). :func:`take_over_websocket` answers the handshake itself and gives the
connection's byte stream (plain or TLS) to the app, which frames the messages itself
(``tunnel/_transport/stream.py``).

How, on Hypercorn 0.18 (``HYPERCORN_TAKEOVER`` in ``tunnel/_compat.py``):

1. The connection's reading loop (the guard's ``_read_data``, ``_guard.py``) is asked
   to stop: a read in progress is cancelled, which loses nothing (trio's socket and
   TLS reads take no data when cancelled), and the loop parks.
2. With the loop parked, nothing moves in Hypercorn: if the handshake is still
   unanswered, HTTP/1.1, without extensions, and nothing was read past the request,
   the ``101`` goes out as ``WSStream._accept`` sends it (without Hypercorn's pings:
   the link has its own), and the ``WSStream`` is marked closed, so that nothing of
   Hypercorn's writes on the connection again. Otherwise the loop is given back and
   the app carries on through ASGI as before.
3. The app runs the link on the stream. When it is done (:meth:`TakenWebSocket.release`)
   the loop ends the connection as if the peer had closed it: Hypercorn's task for
   the connection ends as ever, and its graceful shutdown waits for it, and cancels
   it at its deadline, as it does any connection.

Kept on the old path: HTTP/2 (an extended CONNECT WebSocket is one stream of many
on its connection), a handshake offering extensions (permessage-deflate), a server
without the guard (someone else's ``TCPServer``), another Hypercorn release.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Final

import trio
from hypercorn.protocol.events import Response
from hypercorn.protocol.h11 import H11Protocol, H11WSConnection
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream

from ..._compat import HYPERCORN_TAKEOVER
from ._guard import Handover, _GuardedTCPServer, current_connection

__all__ = ["TakenWebSocket", "take_over_websocket"]

#: The reading loop parks at its next step; this only bounds a Hypercorn that would not.
PARK_TIMEOUT: Final = 5.0


class TakenWebSocket:
    """An accepted WebSocket's byte stream, the app's until :meth:`release`."""

    __slots__ = ("_handover", "_server", "max_message", "stream")

    def __init__(self, server: _GuardedTCPServer, handover: Handover) -> None:
        self._server = server
        self._handover = handover
        #: The connection (``trio.SocketStream`` or ``trio.SSLStream``).
        self.stream: trio.abc.Stream = server.stream
        #: Hypercorn's limit on a received message, which the taker keeps.
        self.max_message: int = server.config.websocket_max_message_size

    def release(self) -> None:
        """Done with the connection: Hypercorn ends it (call from the taking task)."""
        if self._handover.done.is_set():
            return
        # Held since the handshake, so that a stray Hypercorn write would wait
        # instead of landing between two of the app's frames.
        self._server.send_lock.release()
        self._handover.done.set()


def _give_back(server: _GuardedTCPServer, handover: Handover) -> None:
    handover.taken = False
    handover.done.set()
    if server.handover is handover and handover.reader_ended:
        server.handover = None


def _eligible(server: _GuardedTCPServer, scope: Any) -> WSStream | None:
    protocol = getattr(server, "protocol", None)
    inner = getattr(protocol, "protocol", None)
    if not isinstance(inner, H11Protocol) or not isinstance(inner.connection, H11WSConnection):
        return None
    stream = inner.stream
    if (
        not isinstance(stream, WSStream)
        or stream.scope is not scope
        or stream.closed
        or stream.state is not ASGIWebsocketState.HANDSHAKE
        or stream.handshake.extensions
        or inner.connection.buffer
    ):
        return None
    return stream


async def take_over_websocket(
    scope: Any, subprotocol: str | None, headers: Iterable[tuple[bytes, bytes]]
) -> TakenWebSocket | None:
    """Accept the WebSocket of ``scope`` and take its connection from Hypercorn.

    Call from the app's task in place of sending ``websocket.accept`` (with the
    same subprotocol and headers). Returns None where the connection cannot be
    taken: then nothing was sent, and the app accepts through ASGI as usual. On
    success the caller must call :meth:`TakenWebSocket.release` when done, from
    the same task (a ``finally``).
    """
    if not HYPERCORN_TAKEOVER.on:
        return None
    server = current_connection.get()
    if server is None or server.handover is not None or _eligible(server, scope) is None:
        return None
    handover = server.handover = Handover()
    receiving = server._receiving
    if receiving is not None:
        receiving.cancel()
    try:
        with trio.fail_after(PARK_TIMEOUT):
            await handover.parked.wait()
    except trio.TooSlowError:
        _give_back(server, handover)
        return None
    except BaseException:
        _give_back(server, handover)
        raise
    ws = _eligible(server, scope)
    if handover.reader_ended or ws is None or server.send_lock.locked():
        _give_back(server, handover)
        return None
    try:
        # Hypercorn 0.18's WSStream._accept, without its pings, and without
        # keeping the wsproto connection it makes (a few KiB per idle agent),
        # which nothing uses once the stream is closed to Hypercorn below.
        ws.state = ASGIWebsocketState.CONNECTED
        status, response_headers, _ = ws.handshake.accept(subprotocol, headers)
        await ws.send(
            Response(stream_id=ws.stream_id, status_code=status, headers=response_headers)
        )
        await ws.config.log.access(
            ws.scope, {"status": status, "headers": []}, time.time() - ws.start_time
        )
    except BaseException:
        _give_back(server, handover)
        raise
    if ws.closed:
        # The peer left as the 101 went out; Hypercorn has seen it.
        _give_back(server, handover)
        return None
    # From here on Hypercorn's stream object ignores the app and the connection.
    ws.closed = True
    handover.taken = True
    # No keep-alive timeout applies to the connection from here on, and its
    # timer's task would live as long as the agent does.
    server.idle_timer.end()
    taken = TakenWebSocket(server, handover)
    try:
        # Free (nothing of Hypercorn's sends now), so this does not wait.
        await server.send_lock.acquire()
    except BaseException:
        handover.done.set()  # taken: the read loop ends the connection
        raise
    return taken
