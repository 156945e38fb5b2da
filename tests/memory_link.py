"""Two ends of a link connected in memory, for the tests of the link and of what runs on it.

An opener (the server's end) talks to an answerer (the agent's end) over a
pair of bounded memory channels. Time is virtual in the tests that use it
(autojump_clock), so they are deterministic and timeouts cost nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
import trio.testing

from tunnel._protocol.headers import Headers
from tunnel._transport import TransportClosed
from tunnel.link import Link, Stream

Handler = Callable[[Stream], Awaitable[None]]

#: Messages in flight each way; small, so the transport itself pushes back.
TRANSPORT_BOUND = 4


class MemoryTransport:
    """One end of an in-memory message transport.

    Args:
        send_channel: Where this end's messages go.
        receive_channel: Where the peer's messages come from.
        latency: Seconds each send takes, as on a real network.
    """

    def __init__(
        self,
        send_channel: trio.MemorySendChannel[bytes],
        receive_channel: trio.MemoryReceiveChannel[bytes],
        *,
        latency: float = 0.0,
    ) -> None:
        self._send = send_channel
        self._receive = receive_channel
        self.latency = latency
        #: When set, everything sent or received is silently lost.
        self.dropping = False
        #: When not None, receive() waits for this event first.
        self.hold: trio.Event | None = None
        self.closed = False

    async def send(self, data: bytes) -> None:
        if self.latency:
            await trio.sleep(self.latency)
        if self.dropping:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TransportClosed("the peer closed the transport") from None

    async def receive(self) -> bytes:
        if self.hold is not None:
            await self.hold.wait()
        while True:
            try:
                data = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise TransportClosed("the peer closed the transport") from None
            if not self.dropping:
                return data

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        self.closed = True
        self._send.close()
        self._receive.close()
        await trio.lowlevel.checkpoint()

    def take_pending(self) -> bytes:
        """Everything the peer sent that is waiting here (for a test acting as the peer)."""
        chunks = []
        while True:
            try:
                chunks.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return b"".join(chunks)


def transport_pair(*, latency: float = 0.0) -> tuple[MemoryTransport, MemoryTransport]:
    a_send, b_receive = trio.open_memory_channel[bytes](TRANSPORT_BOUND)
    b_send, a_receive = trio.open_memory_channel[bytes](TRANSPORT_BOUND)
    return (
        MemoryTransport(a_send, a_receive, latency=latency),
        MemoryTransport(b_send, b_receive, latency=latency),
    )


class Pair:
    """A connected opener and answerer, and what their run() returned."""

    def __init__(
        self, opener: Link, answerer: Link, a: MemoryTransport, b: MemoryTransport
    ) -> None:
        #: The end that opens streams (the server's, in the tunnel).
        self.opener = opener
        #: The end that answers them (the agent's).
        self.answerer = answerer
        self.opener_transport = a
        self.answerer_transport = b
        self.opener_reason: str | None = None
        self.answerer_reason: str | None = None
        self.opener_done = trio.Event()
        self.answerer_done = trio.Event()


@asynccontextmanager
async def open_pair(
    handler: Handler,
    *,
    max_concurrent_streams: int = 100,
    keepalive_interval: float = 15.0,
    keepalive_timeout: float = 15.0,
    latency: float = 0.0,
    settle: bool = True,
    hold_opener_receive: bool = False,
) -> AsyncIterator[Pair]:
    """Run an opener and an answerer connected in memory.

    With ``settle``, both have exchanged SETTINGS (and acknowledged them)
    before the body runs; without, the body races the handshake.
    """
    a, b = transport_pair(latency=latency)
    if hold_opener_receive:
        a.hold = trio.Event()
    opener = Link.opener(
        a, keepalive_interval=keepalive_interval, keepalive_timeout=keepalive_timeout
    )
    answerer = Link.answerer(
        b,
        on_stream=handler,
        keepalive_interval=keepalive_interval,
        keepalive_timeout=keepalive_timeout,
        max_concurrent_streams=max_concurrent_streams,
        trusted_peer=True,
    )
    pair = Pair(opener, answerer, a, b)

    async def run_opener(task_status: trio.TaskStatus[None]) -> None:
        pair.opener_reason = await opener.run(task_status=task_status)
        pair.opener_done.set()

    async def run_answerer(task_status: trio.TaskStatus[None]) -> None:
        pair.answerer_reason = await answerer.run(task_status=task_status)
        pair.answerer_done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(run_answerer)
        await nursery.start(run_opener)
        if settle:
            await trio.testing.wait_all_tasks_blocked()
        yield pair
        opener.close("the test is over")
        answerer.close("the test is over")


def request(path: bytes = b"/") -> Headers:
    """A POST request's header block."""
    return [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"myapp.example.com"),
        (b":path", path),
    ]
