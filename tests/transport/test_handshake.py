"""The agent's own WebSocket handshake and its transport (tunnel/_transport/handshake.py).

Over trio's in-memory stream pair, with a wsproto server connection as the
server: what the agent asks, how each answer ends, and the link's messages after.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
)

from tunnel import ServerUnreachableError
from tunnel._transport import TransportClosed
from tunnel._transport.handshake import (
    MAX_REJECTION_BODY,
    ClientHandshake,
    HandshakeFailed,
    HandshakeRejected,
    open_client_websocket,
)


class Server:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)

    async def next_event(self) -> object:
        while True:
            for event in self.ws.events():
                return event
            self.ws.receive_data(await self.stream.receive_some(65536) or None)

    async def send(self, *events: object) -> None:
        await self.stream.send_all(b"".join(self.ws.send(e) for e in events))  # type: ignore[arg-type]


async def _connect(stream: trio.abc.Stream, max_message: int = 1 << 20) -> ClientHandshake:
    return await open_client_websocket(
        stream,
        authority="example.com:8443",
        path="/_tunnel",
        subprotocols=["tunnel.v1"],
        headers=[(b"authorization", b"Bearer t")],
        max_message=max_message,
        where="example.com:8443",
    )


async def _accepted(
    server: Server, client_stream: trio.abc.Stream, accept: AcceptConnection, *after: object
) -> tuple[Request, ClientHandshake]:
    """The agent's handshake on ``client_stream``, answered by ``server`` with ``accept``.

    ``after``: events the server sends in the same write as its ``101``. Returns
    the request the agent sent and the agent's side of the connection.
    """
    async with trio.open_nursery() as nursery:
        done: list[ClientHandshake] = []

        async def connect() -> None:
            done.append(await _connect(client_stream))

        nursery.start_soon(connect)
        request = await server.next_event()
        assert isinstance(request, Request)
        await server.send(accept, *after)
    return request, done[0]


async def test_an_accepted_handshake_then_messages_both_ways() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server = Server(server_stream)
    with trio.fail_after(5):
        # The first message follows the 101 in the same write, as the
        # server's HTTP/2 preface does: it must not be lost.
        request, ws = await _accepted(
            server,
            client_stream,
            AcceptConnection(subprotocol="tunnel.v1", extra_headers=[(b"x-worker", b"7")]),
            BytesMessage(data=b"preface"),
        )
        assert (request.host, request.target) == ("example.com:8443", "/_tunnel")
        assert request.subprotocols == ["tunnel.v1"]
        assert (b"authorization", b"Bearer t") in request.extra_headers
        assert ws.subprotocol == "tunnel.v1"
        assert (b"x-worker", b"7") in ws.headers
        transport = ws.transport
        assert await transport.receive() == b"preface"
        await transport.send(b"from the agent")
        event = await server.next_event()
        assert isinstance(event, BytesMessage), "the agent's frames are masked, as wsproto demands"
        assert event.data == b"from the agent"
        await server.send(Ping(b"there?"), BytesMessage(data=b"next"))
        assert await transport.receive() == b"next"
        pong = await server.next_event()
        assert isinstance(pong, Pong)
        assert pong.payload == b"there?"
        await server.send(CloseConnection(code=4001, reason="replaced"))
        with pytest.raises(TransportClosed) as closed:
            await transport.receive()
        assert closed.value.code == 4001
        assert closed.value.reason == "the server disconnected (4001 replaced)"
        echo = await server.next_event()
        assert isinstance(echo, CloseConnection)
        assert echo.code == 4001


async def test_the_agent_closes_with_a_handshake() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server = Server(server_stream)
    with trio.fail_after(5):
        _, ws = await _accepted(server, client_stream, AcceptConnection(subprotocol="tunnel.v1"))
        transport = ws.transport
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.aclose, 1001, "going away")
            close = await server.next_event()
            assert isinstance(close, CloseConnection)
            assert (close.code, close.reason) == (1001, "going away")
            await server.send(close.response())
        with pytest.raises(TransportClosed) as closed:
            await transport.send(b"late")
        assert closed.value.reason == "closed by the agent (1001 going away)"


async def _answer(raw: bytes) -> BaseException:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            errors: list[BaseException] = []

            async def connect() -> None:
                try:
                    await _connect(client_stream)
                except Exception as exc:
                    errors.append(exc)

            nursery.start_soon(connect)
            await server_stream.receive_some()
            if raw:
                await server_stream.send_all(raw)
            await server_stream.aclose()
    (error,) = errors
    return error


async def test_a_refusal_carries_its_status_headers_and_body() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server = Server(server_stream)

    async def refuse() -> None:
        await server.next_event()
        await server.send(
            RejectConnection(
                status_code=421,
                headers=[(b"x-nodes", b"3"), (b"content-length", b"9")],
                has_body=True,
            ),
            RejectData(data=b"not here\n"),
        )

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refuse)
            with pytest.raises(HandshakeRejected) as refused:
                await _connect(client_stream)
    assert refused.value.status_code == 421
    assert (b"x-nodes", b"3") in refused.value.headers
    assert refused.value.body == b"not here\n"


async def test_a_long_refusal_body_is_cut() -> None:
    body = b"x" * (MAX_REJECTION_BODY * 2)
    error = await _answer(
        b"HTTP/1.1 403 Forbidden\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert isinstance(error, HandshakeRejected)
    assert error.body == body[:MAX_REJECTION_BODY]


async def test_a_refusal_delimited_by_the_connections_end() -> None:
    error = await _answer(b"HTTP/1.1 502 Bad Gateway\r\n\r\nno upstream")
    assert isinstance(error, HandshakeRejected)
    assert (error.status_code, error.body) == (502, b"no upstream")


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
            b"connection: upgrade\r\nsec-websocket-accept: wrong\r\n\r\n",
            "Sec-WebSocket-Accept",
        ),
        (b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\r\n", "Upgrade"),
        (b"NOT HTTP AT ALL\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\n" + b"x-long: " + b"y" * (32 << 10), "malformed"),
    ],
)
async def test_an_answer_that_is_no_websockets_fails(raw: bytes, said: str) -> None:
    error = await _answer(raw)
    assert isinstance(error, HandshakeFailed)
    assert said in str(error)


async def test_a_connection_closed_before_the_answer() -> None:
    error = await _answer(b"")
    assert isinstance(error, ServerUnreachableError)
    assert str(error) == "example.com:8443 closed the connection during the WebSocket handshake"
