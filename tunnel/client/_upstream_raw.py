"""The agent's raw streams: WebSockets and TCP tunnels, joined to the local service.

For a WebSocket (an extended CONNECT stream) the agent makes its own HTTP/1.1
upgrade handshake with the local service. If
the service accepts (101), the stream answers 200 and from then on carries the
WebSocket's frames as raw bytes, copied both ways; if it refuses, its status,
headers and body go back as they are, so the visitor sees the refusal.
"""

from __future__ import annotations

import base64
import hashlib
import os

import h2.errors
import h11
import trio

from .._protocol.headers import header_value, local_request_headers, response_headers_from_local
from ..link import Stream, StreamError, answer_error, pipe
from ._upstream import LocalConnection, LocalFailure, LocalPool, relay_body

__all__ = ["relay_local_tcp", "relay_local_websocket"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())  # RFC 6455 names SHA-1


async def relay_local_websocket(stream: Stream, pool: LocalPool) -> None:
    """Serve one WebSocket stream; never raises for what a peer did."""
    with stream.cancel_scope as scope:
        try:
            await _open_and_relay_websocket(stream, pool)
        except LocalFailure as failure:
            await answer_error(stream, failure.status, failure.detail)
        except StreamError:
            pass
    if scope.cancelled_caught and not stream.done:
        stream.cancel()


async def _open_and_relay_websocket(stream: Stream, pool: LocalPool) -> None:
    assert stream.headers is not None
    _, target, headers = local_request_headers(stream.headers, has_body=False)
    key = base64.b64encode(os.urandom(16))
    headers += [
        (b"connection", b"Upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-key", key),
    ]
    socket: trio.SocketStream | None = await pool.connect()
    assert socket is not None
    try:
        conn = LocalConnection(socket)
        await conn.send(h11.Request(method=b"GET", target=target, headers=headers))
        await conn.send(h11.EndOfMessage())
        event = await conn.next_event()
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            accept = header_value(list(event.headers), b"sec-websocket-accept")
            if accept != _accept_key(key):
                raise LocalFailure(
                    502, f"The local service at {pool.label} sent a wrong Sec-WebSocket-Accept."
                )
            answer = [(b":status", b"200")]
            protocol = header_value(list(event.headers), b"sec-websocket-protocol")
            if protocol is not None:
                answer.append((b"sec-websocket-protocol", protocol))
            stream.send_headers(answer)
            initial, _ = conn.h11.trailing_data
            # pipe() owns the socket from here and closes it.
            owned, socket = socket, None
            await pipe(stream, owned, bytes(initial))
            return
        if not isinstance(event, h11.Response):
            raise LocalFailure(
                502, f"The local service at {pool.label} did not answer the WebSocket upgrade."
            )
        # A refusal: relay it as an ordinary response.
        stream.send_headers(response_headers_from_local(event.status_code, event.headers))
        await relay_body(stream, conn)
        if not stream.done:
            stream.cancel(h2.errors.ErrorCodes.NO_ERROR)
    except (h11.ProtocolError, OSError, trio.BrokenResourceError) as exc:
        raise LocalFailure(
            502, f"The local service at {pool.label} failed the WebSocket upgrade: {exc}"
        ) from None
    finally:
        if socket is not None:
            with trio.CancelScope(shield=True):
                await socket.aclose()


async def relay_local_tcp(stream: Stream, pool: LocalPool) -> None:
    """Serve one TCP tunnel connection: join the stream to the local port."""
    with stream.cancel_scope as scope:
        try:
            socket = await pool.connect()
        except LocalFailure as failure:
            await answer_error(stream, failure.status, failure.detail)
            return
        try:
            stream.send_headers([(b":status", b"200")])
        except StreamError:
            await trio.aclose_forcefully(socket)
            return
        await pipe(stream, socket)
    if scope.cancelled_caught and not stream.done:
        stream.cancel()
