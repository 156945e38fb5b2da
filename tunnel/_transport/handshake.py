"""The agent's WebSocket handshake, done on its byte stream with h11.

The agent sends the ``GET`` upgrade request itself and reads the answer's head
(bounded in size): a ``101`` with the right ``Sec-WebSocket-Accept`` gives a
:class:`~.stream.StreamWebSocketTransport` on the same stream, fed first with
whatever the server sent after the head (its HTTP/2 preface follows the ``101``
at once). Any other answer is :class:`HandshakeRejected`, with the status,
headers and the start of the body that says why; an answer that is no
WebSocket's is :class:`HandshakeFailed`.

The caller bounds the whole exchange in time; only the body of a refusal has
a deadline of its own, since the refusal counts even when its reason is slow.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from typing import Final

import h11
import trio

from .._exceptions import ServerUnreachableError
from .stream import READ_SIZE, StreamWebSocketTransport

__all__ = [
    "ClientHandshake",
    "HandshakeFailed",
    "HandshakeRejected",
    "open_client_websocket",
]

#: The largest response head accepted, as h11's default bound on a request's.
MAX_HEAD: Final = 16 << 10
#: How much of a refusal's body is kept: its reason, for the agent's user.
MAX_REJECTION_BODY: Final = 16 << 10
#: How long a refusal's body may take to arrive; the status is known already.
REJECTION_BODY_TIMEOUT: Final = 2.0

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

Headers = list[tuple[bytes, bytes]]


class HandshakeRejected(Exception):
    """The server answered the upgrade with another status than ``101``.

    Args:
        status_code: The answer's status.
        headers: The answer's headers, names lower-cased.
        body: The start of the answer's body (up to a small bound).
    """

    def __init__(self, status_code: int, headers: Headers, body: bytes) -> None:
        super().__init__(f"the server answered {status_code}")
        self.status_code = status_code
        self.headers = headers
        self.body = body


class HandshakeFailed(Exception):
    """The server's answer to the upgrade is no WebSocket's (the message says why)."""


class ClientHandshake:
    """An accepted handshake: the transport on the connection and the server's headers.

    Args:
        transport: The link's transport, owning the connection.
        headers: The ``101``'s headers, names lower-cased.
        subprotocol: The subprotocol the server chose, if any.
    """

    __slots__ = ("headers", "subprotocol", "transport")

    def __init__(
        self, transport: StreamWebSocketTransport, headers: Headers, subprotocol: str | None
    ) -> None:
        self.transport = transport
        self.headers = headers
        self.subprotocol = subprotocol


def accept_token(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` that answers a ``Sec-WebSocket-Key`` of ``key``."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


async def open_client_websocket(
    stream: trio.abc.Stream,
    *,
    authority: str,
    path: str,
    subprotocols: Sequence[str],
    headers: Headers,
    max_message: int,
    where: str,
    peer: str = "server",
) -> ClientHandshake:
    """Shake hands as a WebSocket client on ``stream``; the caller sets the deadline.

    The stream stays the caller's if this raises.

    Args:
        stream: The connection to the server (TLS done).
        authority: The ``Host`` header's value.
        path: The request's target.
        subprotocols: The subprotocols offered.
        headers: More headers for the request.
        max_message: The largest message accepted from the server afterwards.
        where: The server's address, for the error messages.
        peer: What the server is, for the reasons the connection ends with.

    Raises:
        HandshakeRejected: The server refused the upgrade.
        HandshakeFailed: The server's answer was malformed or not a WebSocket's.
        ServerUnreachableError: The connection ended before the answer did.
    """
    key = base64.b64encode(os.urandom(16))
    request = [
        (b"Host", authority.encode("idna")),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", key),
        (b"Sec-WebSocket-Version", b"13"),
    ]
    if subprotocols:
        request.append((b"Sec-WebSocket-Protocol", ", ".join(subprotocols).encode("ascii")))
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    wire = conn.send(
        h11.Request(method=b"GET", target=path.encode("ascii"), headers=request + headers)
    )
    wire += conn.send(h11.EndOfMessage())
    try:
        await stream.send_all(wire)
    except trio.BrokenResourceError:
        raise _cut_short(where) from None
    event = await _next_event(conn, stream, where)
    if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
        answer = list(event.headers)
        subprotocol = _check_accept(answer, key, subprotocols)
        received, _ = conn.trailing_data
        transport = StreamWebSocketTransport(
            stream, max_message=max_message, client=True, received=bytes(received), peer=peer
        )
        return ClientHandshake(transport, answer, subprotocol)
    if isinstance(event, h11.Response):
        body = await _rejection_body(conn, stream)
        raise HandshakeRejected(event.status_code, list(event.headers), body)
    raise HandshakeFailed(f"unexpected answer {event!r}")


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream, where: str) -> h11.Event:
    """The next event of the answer, reading as needed; a ``1xx`` other than 101 skipped."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HandshakeFailed(f"a malformed answer ({exc})") from None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(READ_SIZE)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                raise _cut_short(where)
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
            continue
        assert not isinstance(event, type)  # h11's sentinels are classes
        return event


async def _rejection_body(conn: h11.Connection, stream: trio.abc.Stream) -> bytes:
    """The start of a refusal's body: what arrives within the bound and the deadline."""
    body = bytearray()
    with trio.move_on_after(REJECTION_BODY_TIMEOUT):
        while len(body) < MAX_REJECTION_BODY:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                break
            if isinstance(event, h11.Data):
                body += event.data
            elif event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                conn.receive_data(bytes(data))
                if not data:
                    # h11 ends a body delimited by the connection's end.
                    continue
            else:
                break
    return bytes(body[:MAX_REJECTION_BODY])


def _check_accept(answer: Headers, key: bytes, offered: Sequence[str]) -> str | None:
    """The chosen subprotocol, once the ``101`` is checked to answer our request."""
    fields: dict[bytes, bytes] = {}
    for name, value in answer:
        fields[name] = value
    connection = fields.get(b"connection", b"")
    if b"upgrade" not in (token.strip().lower() for token in connection.split(b",")):
        raise HandshakeFailed("the answer lacks 'Connection: Upgrade'")
    if fields.get(b"upgrade", b"").lower() != b"websocket":
        raise HandshakeFailed("the answer lacks 'Upgrade: websocket'")
    if fields.get(b"sec-websocket-accept") != accept_token(key):
        raise HandshakeFailed("the answer's Sec-WebSocket-Accept does not match the key")
    if fields.get(b"sec-websocket-extensions"):
        raise HandshakeFailed("the server chose an extension none was offered")
    chosen = fields.get(b"sec-websocket-protocol")
    if chosen is None:
        return None
    subprotocol = chosen.decode("ascii", "replace")
    if subprotocol not in offered:
        raise HandshakeFailed(f"the server chose a subprotocol not offered ({subprotocol})")
    return subprotocol


def _cut_short(where: str) -> ServerUnreachableError:
    return ServerUnreachableError(f"{where} closed the connection during the WebSocket handshake")
