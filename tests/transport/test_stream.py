"""The server's transport on a taken-over connection (tunnel/_transport/stream.py).

Over trio's in-memory stream pair, with a wsproto client connection as the agent:
what it reads, what it answers, how it closes.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong

from tunnel._transport import ABNORMAL_CLOSURE, TransportClosed
from tunnel._transport.stream import StreamWebSocketTransport


class Agent:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = Connection(ConnectionType.CLIENT)

    async def send(self, event: object) -> None:
        await self.stream.send_all(self.ws.send(event))  # type: ignore[arg-type]

    async def next_event(self) -> object:
        while True:
            for event in self.ws.events():
                return event
            self.ws.receive_data(await self.stream.receive_some(65536) or None)


def pair(max_message: int = 1 << 20) -> tuple[StreamWebSocketTransport, Agent]:
    server, client = trio.testing.memory_stream_pair()
    return StreamWebSocketTransport(server, max_message=max_message), Agent(client)


async def test_messages_both_ways_and_batched() -> None:
    transport, agent = pair()
    with trio.fail_after(5):
        wire = b"".join(agent.ws.send(BytesMessage(data=bytes([i]) * 300)) for i in range(5))
        await agent.stream.send_all(wire)  # five frames in one read
        assert [await transport.receive() for _ in range(5)] == [bytes([i]) * 300 for i in range(5)]
        await transport.send(b"to the agent")
        event = await agent.next_event()
        assert isinstance(event, BytesMessage)
        assert event.data == b"to the agent"


async def test_a_ping_is_answered_while_waiting_for_a_message() -> None:
    transport, agent = pair()
    with trio.fail_after(5):
        await agent.send(Ping(b"are you there"))
        await agent.send(BytesMessage(data=b"after"))
        assert await transport.receive() == b"after"
        event = await agent.next_event()
        assert isinstance(event, Pong)
        assert event.payload == b"are you there"


async def test_the_agents_close_is_answered_and_reported() -> None:
    transport, agent = pair()
    with trio.fail_after(5):
        await agent.send(CloseConnection(code=4001, reason="going"))
        with pytest.raises(TransportClosed) as caught:
            await transport.receive()
        assert caught.value.code == 4001
        assert caught.value.reason == "the agent disconnected (4001 going)"
        answer = await agent.next_event()
        assert isinstance(answer, CloseConnection)
        assert answer.code == 4001
        # The writer, told after the reader, hears the same story.
        with pytest.raises(TransportClosed, match=r"\(4001 going\)"):
            await transport.send(b"late")


async def test_an_oversize_message_is_refused_with_1009() -> None:
    transport, agent = pair(max_message=1000)
    with trio.fail_after(5):
        await agent.send(BytesMessage(data=b"x" * 1001))
        with pytest.raises(TransportClosed, match="message over 1000 bytes"):
            await transport.receive()
        closed = await agent.next_event()
        assert isinstance(closed, CloseConnection)
        assert closed.code == 1009


async def test_the_servers_close_waits_for_the_reply_then_ends_the_stream() -> None:
    transport, agent = pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.aclose, 4000, "replaced")
            closed = await agent.next_event()
            assert isinstance(closed, CloseConnection)
            assert (closed.code, closed.reason) == (4000, "replaced")
            await agent.send(closed.response())
        assert await agent.stream.receive_some(10) == b""


async def test_a_dead_peer_is_dropped_without_a_close() -> None:
    transport, agent = pair()
    with trio.fail_after(5):
        await transport.aclose(ABNORMAL_CLOSURE)
        assert await agent.stream.receive_some(10) == b""


async def test_an_eof_without_close_is_reported() -> None:
    transport, agent = pair()
    with trio.fail_after(5):
        await agent.stream.send_all(agent.ws.send(BytesMessage(data=b"half"))[:3])
        await agent.stream.aclose()
        with pytest.raises(TransportClosed, match="1006"):
            await transport.receive()
