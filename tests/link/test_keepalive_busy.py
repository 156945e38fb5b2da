"""Keepalive on a busy connection: a late PING answer is not a dead peer while data flows.

With 10,000 streams answering at once, one side's event loop took longer than
the keepalive timeout to get to a PING, and the server dropped the agent with
every stream on it (benchmarks/README.rst, "Thousands of requests in flight").
Here the network holds back only the PING answers, as such a loop would, while
the stream's data keeps arriving.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from memory_link import MemoryTransport, open_pair, request

from tunnel.link import KEEPALIVE_BUSY_PERIODS, Stream, StreamError

PING = 0x6
ACK = 0x1


def _split_ping_acks(message: bytes) -> tuple[bytes, bytes]:
    """(the message without its PING ACK frames, those frames)."""
    rest, acks = bytearray(), bytearray()
    at = 0
    while at < len(message):
        length = int.from_bytes(message[at : at + 3], "big")
        frame = message[at : at + 9 + length]
        is_ack = message[at + 3] == PING and message[at + 4] & ACK
        (acks if is_ack else rest).extend(frame)
        at += 9 + length
    return bytes(rest), bytes(acks)


def delay_ping_answers(transport: MemoryTransport, delay: float, nursery: trio.Nursery) -> None:
    """Deliver PING ACKs ``delay`` seconds late, everything else at once."""
    receive = transport.receive
    deliver, delivered = trio.open_memory_channel[bytes](16)

    async def late(frames: bytes) -> None:
        await trio.sleep(delay)
        await deliver.send(frames)

    async def sort() -> None:
        while True:
            rest, acks = _split_ping_acks(await receive())
            if acks:
                nursery.start_soon(late, acks)
            if rest:
                await deliver.send(rest)

    nursery.start_soon(sort)
    transport.receive = delivered.receive  # type: ignore[method-assign]


async def trickle(stream: Stream) -> None:
    """Answer 200, then 10 bytes a second for 40 s."""
    try:
        await stream.receive_headers()
        stream.send_headers([(b":status", b"200")])
        for _ in range(40):
            await stream.send_data(b"x" * 10)
            await trio.sleep(1)
        stream.end()
    except StreamError:
        pass


async def test_late_ping_answers_keep_a_sending_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(100):
        async with (
            trio.open_nursery() as nursery,
            open_pair(trickle, keepalive_interval=10, keepalive_timeout=5) as pair,
        ):
            delay_ping_answers(pair.opener_transport, 8, nursery)
            start = trio.current_time()
            stream = await pair.opener.open_stream(request(), end_stream=True)
            await stream.receive_headers()
            received = b""
            while data := await stream.receive_data():
                received += data
                stream.acknowledge()
            # Every PING was answered 8 s late, past the 5 s timeout, and the
            # connection carried the whole response all the same.
            assert received == b"x" * 400
            assert trio.current_time() - start >= 39
            assert pair.opener_reason is None
            assert pair.opener.rtt == 8
            nursery.cancel_scope.cancel()


async def test_a_sending_peer_that_never_answers_is_given_up_on_in_bounded_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(100):
        async with (
            trio.open_nursery() as nursery,
            open_pair(trickle, keepalive_interval=10, keepalive_timeout=5) as pair,
        ):
            delay_ping_answers(pair.opener_transport, 1000, nursery)
            start = trio.current_time()
            stream = await pair.opener.open_stream(request(), end_stream=True)
            await stream.receive_headers()

            async def read_all() -> None:
                while await stream.receive_data():
                    stream.acknowledge()

            with pytest.raises(StreamError, match="keepalive"):
                await read_all()
            # The PING at 10 s, its timeout and the extra periods while the
            # data kept coming: 10 + 5 * (1 + KEEPALIVE_BUSY_PERIODS).
            assert trio.current_time() - start == 10 + 5 * (1 + KEEPALIVE_BUSY_PERIODS)
            nursery.cancel_scope.cancel()
