"""The link's trio shell: one HTTP/2 connection over a message transport, tested in memory.

An opener (the server's end) talks to an answerer (the agent's end) over a
pair of bounded memory channels (tests/memory_link.py). Time is virtual
(autojump_clock), so every test is deterministic and timeouts cost nothing.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from hyperframe.frame import Frame, GoAwayFrame
from memory_link import MemoryTransport, open_pair, request, transport_pair

from tunnel._protocol.headers import Headers
from tunnel.link import Link, Stream, StreamError
from tunnel.link._hpack import LinkEncoder


async def echo(stream: Stream) -> None:
    """Answer 200 with the request's path in ``x-path`` and its body echoed."""
    try:
        headers = await stream.receive_headers()
        path = dict(headers)[b":path"]
        stream.send_headers([(b":status", b"200"), (b"x-path", path)])
        while data := await stream.receive_data():
            await stream.send_data(data)
            stream.acknowledge()
        stream.end()
    except StreamError:
        pass


async def exchange(link: Link, body: bytes, path: bytes = b"/") -> tuple[Headers, bytes]:
    """One request: send ``body`` while reading the response, as a proxy would."""
    stream = await link.open_stream(request(path), end_stream=False)
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(stream.send_data, body, end_stream=True))
        headers = await stream.receive_headers()
        while data := await stream.receive_data():
            received += data
            stream.acknowledge()
    return headers, bytes(received)


async def test_round_trip(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        async with open_pair(echo) as pair:
            headers, body = await exchange(pair.opener, b"hello", b"/greet?x=1")
            assert headers == [(b":status", b"200"), (b"x-path", b"/greet?x=1")]
            assert body == b"hello"
            assert pair.opener.open_streams == 0
            await trio.testing.wait_all_tasks_blocked()
            assert pair.answerer.open_streams == 0
            assert pair.opener.streams_opened == pair.answerer.streams_opened == 1


async def test_request_without_body(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        async with open_pair(echo) as pair:
            stream = await pair.opener.open_stream(request(b"/empty"), end_stream=True)
            assert (await stream.receive_headers())[0] == (b":status", b"200")
            assert await stream.receive_data() == b""
            assert stream.done


async def test_large_body_is_flow_controlled(autojump_clock: trio.testing.MockClock) -> None:
    # 3 MiB: three times a stream's window, so it only arrives if both sides
    # acknowledge what they consumed and senders wait for WINDOW_UPDATEs.
    body = bytes(range(256)) * (3 * 4096)
    with trio.fail_after(60):
        async with open_pair(echo) as pair:
            start = trio.current_time()
            headers, echoed = await exchange(pair.opener, body)
            assert headers[0] == (b":status", b"200")
            assert len(echoed) == len(body)
            assert echoed == body
            # Flow control waits on the peer, never on the clock.
            assert trio.current_time() == start
            assert pair.opener.bytes_sent > len(body)
            assert pair.opener.bytes_received > len(body)


async def test_concurrent_streams_wait_for_capacity(
    autojump_clock: trio.testing.MockClock,
) -> None:
    active = peak = 0

    async def slow_echo(stream: Stream) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await trio.sleep(1)
            await echo(stream)
        finally:
            active -= 1

    results: dict[int, tuple[Headers, bytes]] = {}

    async def one(link: Link, n: int) -> None:
        results[n] = await exchange(link, b"body %d" % n, b"/%d" % n)

    with trio.fail_after(60):
        async with open_pair(slow_echo, max_concurrent_streams=50) as pair:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for n in range(300):
                    nursery.start_soon(one, pair.opener, n)
            elapsed = trio.current_time() - start
            assert pair.answerer_reason is None, pair.answerer_reason

    assert sorted(results) == list(range(300))
    for n, (headers, body) in results.items():
        assert headers == [(b":status", b"200"), (b"x-path", b"/%d" % n)]
        assert body == b"body %d" % n
    assert peak == 50
    # Six rounds of 50 streams, one virtual second each.
    assert elapsed == 6


async def test_streams_opened_before_peer_settings_respect_its_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Visitors that waited for a reconnecting agent all open their streams the
    # moment the connection is up, before the agent's SETTINGS (with its
    # stream limit) have arrived. None of that may cost the connection.
    results: list[bytes] = []
    errors: list[StreamError] = []

    async def one(link: Link, n: int) -> None:
        try:
            results.append((await exchange(link, b"%d" % n))[1])
        except* StreamError as group:
            errors.extend(group.exceptions)  # type: ignore[arg-type]

    with trio.fail_after(60):
        async with open_pair(
            echo, max_concurrent_streams=5, settle=False, hold_opener_receive=True
        ) as pair:
            async with trio.open_nursery() as nursery:
                for n in range(8):
                    nursery.start_soon(one, pair.opener, n)
                await trio.testing.wait_all_tasks_blocked()
                assert pair.opener_transport.hold is not None
                pair.opener_transport.hold.set()
            await trio.testing.wait_all_tasks_blocked()
            assert pair.answerer_reason is None, pair.answerer_reason
    assert errors == []
    assert sorted(results) == sorted(b"%d" % n for n in range(8))


async def test_large_frame_right_after_settings_ack(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The link announces a 1 MiB MAX_FRAME_SIZE. A peer may use it as soon as it
    # has acknowledged that SETTINGS, so the ACK and a large DATA frame can
    # arrive in one message. Here the peer is a bare h2 connection, so the
    # frames are exactly that.
    a, b = transport_pair()
    opener = Link.opener(a, keepalive_interval=15, keepalive_timeout=15)
    peer = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    peer.initiate_connection()
    body = b"x" * 100_000
    received: list[bytes] = []

    async def fetch() -> None:
        stream = await opener.open_stream(request(), end_stream=True)
        await stream.receive_headers()
        while data := await stream.receive_data():
            received.append(data)
            stream.acknowledge()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(opener.run)
            await b.send(peer.data_to_send())  # the peer's SETTINGS alone
            await trio.testing.wait_all_tasks_blocked()
            peer.receive_data(b.take_pending())  # preface, SETTINGS, WINDOW_UPDATE
            nursery.start_soon(fetch)
            await trio.testing.wait_all_tasks_blocked()
            events = peer.receive_data(b.take_pending())  # SETTINGS ACK, HEADERS
            assert any(e.stream_id == 1 for e in events if isinstance(e, h2.events.RequestReceived))
            peer.send_headers(1, [(b":status", b"200")])
            peer.send_data(1, body, end_stream=True)
            assert peer.max_outbound_frame_size >= len(body)  # so one DATA frame
            await b.send(peer.data_to_send())  # ACK, HEADERS and DATA together
            await trio.testing.wait_all_tasks_blocked()
            assert opener.closed_reason is None, opener.closed_reason
            assert b"".join(received) == body
            opener.close("the test is over")


async def test_reset_cancels_handler_scope(autojump_clock: trio.testing.MockClock) -> None:
    started = trio.Event()
    finished = trio.Event()
    outcome: list[str] = []

    async def handler(stream: Stream) -> None:
        if dict(stream.headers or [])[b":path"] != b"/hang":
            await echo(stream)
            return
        with trio.CancelScope() as scope:
            stream.cancel_scope = scope
            started.set()
            await trio.sleep_forever()
        outcome.append("cancelled" if scope.cancelled_caught else "not cancelled")
        finished.set()

    with trio.fail_after(10):
        async with open_pair(handler) as pair:
            stream = await pair.opener.open_stream(request(b"/hang"), end_stream=False)
            await started.wait()
            start = trio.current_time()
            stream.cancel()
            await finished.wait()
            assert trio.current_time() == start
            assert outcome == ["cancelled"]
            assert pair.opener.open_streams == 0
            await trio.testing.wait_all_tasks_blocked()
            assert pair.answerer.open_streams == 0
            # The connection itself is unharmed.
            assert (await exchange(pair.opener, b"again"))[1] == b"again"


async def test_reset_fails_handler_receive(autojump_clock: trio.testing.MockClock) -> None:
    started = trio.Event()
    errors: list[StreamError] = []
    finished = trio.Event()

    async def handler(stream: Stream) -> None:
        started.set()
        try:
            await stream.receive_data()
        except StreamError as error:
            errors.append(error)
        finished.set()

    with trio.fail_after(10):
        async with open_pair(handler) as pair:
            stream = await pair.opener.open_stream(request(), end_stream=False)
            await started.wait()
            stream.cancel()
            await finished.wait()
            assert len(errors) == 1
            assert errors[0].code == h2.errors.ErrorCodes.CANCEL
            # Our own side refuses further use too.
            with pytest.raises(StreamError):
                await stream.send_data(b"late")


@pytest.mark.parametrize("side", ["opener", "answerer"])
async def test_transport_close_fails_open_streams(
    autojump_clock: trio.testing.MockClock, side: str
) -> None:
    handlers_started = 0
    handlers_cancelled = 0
    all_started = trio.Event()

    async def handler(stream: Stream) -> None:
        nonlocal handlers_started, handlers_cancelled
        handlers_started += 1
        if handlers_started == 5:
            all_started.set()
        try:
            await stream.receive_data()
            await trio.sleep_forever()
        finally:
            handlers_cancelled += 1

    errors: list[StreamError] = []

    async def wait_response(stream: Stream) -> None:
        try:
            await stream.receive_headers()
        except StreamError as error:
            errors.append(error)

    with trio.fail_after(10):
        async with open_pair(handler) as pair:
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    stream = await pair.opener.open_stream(request(), end_stream=False)
                    nursery.start_soon(wait_response, stream)
                await all_started.wait()
                start = trio.current_time()
                closing = pair.opener_transport if side == "opener" else pair.answerer_transport
                await closing.aclose()
            await pair.opener_done.wait()
            await pair.answerer_done.wait()
            assert trio.current_time() == start

    assert len(errors) == 5
    assert all(error.code == h2.errors.ErrorCodes.INTERNAL_ERROR for error in errors)
    assert pair.opener_reason is not None
    assert "closed" in pair.opener_reason
    assert handlers_cancelled == 5
    assert pair.opener.open_streams == pair.answerer.open_streams == 0
    with pytest.raises(StreamError):
        await pair.opener.open_stream(request(), end_stream=True)


async def test_keepalive_declares_silent_peer_dead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(100):
        async with open_pair(echo, keepalive_interval=10, keepalive_timeout=7) as pair:
            start = trio.current_time()
            # The first PING, at 10s, is answered.
            await trio.sleep(12)
            assert pair.opener.rtt == 0
            assert pair.opener_reason is None
            # From now on the network swallows everything, both ways.
            pair.opener_transport.dropping = True
            await pair.opener_done.wait()
            # The next PING goes out at 20s and is given up on at 27s.
            assert trio.current_time() - start == 27
            assert pair.opener_reason is not None
            assert "keepalive" in pair.opener_reason
            assert "7s" in pair.opener_reason
            assert pair.opener_transport.closed


async def test_keepalive_fails_open_streams(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(100):
        async with open_pair(echo, keepalive_interval=10, keepalive_timeout=5) as pair:
            start = trio.current_time()
            stream = await pair.opener.open_stream(request(), end_stream=False)
            await stream.receive_headers()
            pair.opener_transport.dropping = True
            with pytest.raises(StreamError, match="keepalive"):
                await stream.receive_data()
            assert trio.current_time() - start == 15


async def test_drain_lets_open_stream_finish(autojump_clock: trio.testing.MockClock) -> None:
    started = trio.Event()

    async def handler(stream: Stream) -> None:
        started.set()
        await echo(stream)

    with trio.fail_after(60):
        async with open_pair(handler) as pair:
            stream = await pair.opener.open_stream(request(b"/slow"), end_stream=False)
            await started.wait()
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.answerer.drain, 30)
                await trio.testing.wait_all_tasks_blocked()
                # GOAWAY arrived: no new streams, but the open one goes on.
                assert not pair.answerer.accepting
                assert not pair.opener.accepting
                with pytest.raises(StreamError):
                    await pair.opener.open_stream(request(), end_stream=True)
                await stream.send_data(b"last words", end_stream=True)
                assert (await stream.receive_headers())[0] == (b":status", b"200")
                assert await stream.receive_data() == b"last words"
                assert await stream.receive_data() == b""
            await pair.answerer_done.wait()
            await pair.opener_done.wait()
            # It ended when the stream did, not at the drain timeout.
            assert trio.current_time() == start
            assert pair.answerer_reason == "the connection was drained and closed"
            assert pair.opener_reason is not None
            assert "GOAWAY" in pair.opener_reason


async def test_drain_with_no_streams_closes_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with open_pair(echo) as pair:
            start = trio.current_time()
            await pair.answerer.drain(30)
            await pair.answerer_done.wait()
            await pair.opener_done.wait()
            assert trio.current_time() == start
            assert pair.answerer_reason == "the connection was drained and closed"


async def test_drain_flushes_final_frames_over_slow_network(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # On a real network a send takes time. The last frames of a response that
    # ends with its headers (a 204) must still reach the peer before the
    # transport closes.
    started = trio.Event()
    respond = trio.Event()

    async def handler(stream: Stream) -> None:
        started.set()
        await respond.wait()
        stream.send_headers([(b":status", b"204")], end_stream=True)

    with trio.fail_after(60):
        async with open_pair(handler, latency=0.01) as pair:
            stream = await pair.opener.open_stream(request(), end_stream=True)
            await started.wait()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.answerer.drain, 30)
                await trio.testing.wait_all_tasks_blocked()
                respond.set()
                assert (await stream.receive_headers()) == [(b":status", b"204")]
                assert await stream.receive_data() == b""


async def test_unacknowledged_data_of_finished_streams_gives_the_window_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A consumer cancelled between taking a chunk and acknowledging it (a
    # visitor leaving just as the response ends) must not leak the connection
    # window: after enough such requests the tunnel would stall for good.
    body = b"x" * 100_000

    async def answer(stream: Stream) -> None:
        await stream.receive_headers()
        stream.send_headers([(b":status", b"200")])
        await stream.send_data(body, end_stream=True)

    with trio.fail_after(60):
        async with open_pair(answer) as pair:
            window = pair.opener._core._conn.inbound_flow_control_window
            for _ in range(400):  # 40 MB: far beyond the 16 MiB window
                stream = await pair.opener.open_stream(request(), end_stream=True)
                received = 0
                while chunk := await stream.receive_data():
                    received += len(chunk)  # never acknowledged
                assert received == len(body)
            await trio.testing.wait_all_tasks_blocked()
            # h2 returns window in steps of half of it, so up to half may be
            # pending; a leak would have emptied it (and stalled the loop).
            assert pair.opener._core._conn.inbound_flow_control_window > window // 2


async def test_a_reset_before_the_handler_starts_stops_it_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[str] = []

    async def slow_to_start(stream: Stream) -> None:
        with stream.cancel_scope:
            seen.append("entered")
            await trio.sleep_forever()
        seen.append("stopped")

    with trio.fail_after(60):
        async with open_pair(slow_to_start) as pair:
            # HEADERS and RST_STREAM reach the server in one message, before
            # its handler task has run.
            pair.answerer_transport.hold = trio.Event()
            stream = await pair.opener.open_stream(request(), end_stream=False)
            stream.cancel()
            await trio.testing.wait_all_tasks_blocked()
            pair.answerer_transport.hold.set()
            await trio.testing.wait_all_tasks_blocked()
            assert pair.answerer.open_streams == 0
            assert seen == ["entered", "stopped"]


async def test_a_peers_huge_header_table_is_not_honoured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer announcing SETTINGS_HEADER_TABLE_SIZE = 1 GiB gets a 4 KiB table.

    h2 would size our HPACK encoder's table to whatever the peer allows, so it
    would keep every header it ever sent (each insert shifting them all). The
    peer (plain h2) must still decode every header block right.
    """
    a, b = transport_pair()
    link = Link.opener(a, keepalive_interval=15.0, keepalive_timeout=15.0)
    peer = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    peer.initiate_connection()
    peer.update_settings(
        {
            h2.settings.SettingCodes.HEADER_TABLE_SIZE: 1 << 30,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10_000,
        }
    )
    paths: list[bytes] = []

    async def serve_peer() -> None:
        await b.send(peer.data_to_send())
        while True:
            for event in peer.receive_data(await b.receive()):
                if isinstance(event, h2.events.RequestReceived):
                    assert event.stream_id is not None
                    paths.append(dict(event.headers or [])[b":path"])
                    peer.send_headers(event.stream_id, [(b":status", b"204")], end_stream=True)
            if data := peer.data_to_send():
                await b.send(data)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_peer)
            await nursery.start(link.run)
            assert await link.wait_peer_settings()
            sent = [f"/item/{i}".encode() for i in range(2000)]
            for path in sent:
                stream = await link.open_stream(request(path), end_stream=True)
                await stream.receive_headers()
            encoder = link._core._conn.encoder
            if isinstance(encoder, LinkEncoder):
                # No table at all, at the size the peer's decoder started with.
                assert encoder.header_table_size == 4096
            else:
                table = encoder.header_table
                assert len(table.dynamic_entries) <= 4096 // 32, len(table.dynamic_entries)
                assert table.maxsize == 4096
            assert paths == sent
            nursery.cancel_scope.cancel()


# -- GOAWAY and drain: h2 sends nothing but GOAWAY once one was sent ------------


class BarePeer:
    """The agent's end as a bare h2 connection, driven frame by frame by the test.

    Its GOAWAYs are written as raw frames, so that its own h2 stays open and can
    still answer streams, as RFC 9113 allows a GOAWAY's sender to.
    """

    def __init__(self, transport: MemoryTransport) -> None:
        self.transport = transport
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.conn.initiate_connection()

    async def flush(self, extra: bytes = b"") -> None:
        await self.transport.send(self.conn.data_to_send() + extra)
        await trio.testing.wait_all_tasks_blocked()

    def receive(self) -> list[h2.events.Event]:
        return self.conn.receive_data(self.transport.take_pending())

    def frames(self) -> list[Frame]:
        """The frames the link sent since the last look, unparsed by h2."""
        data = self.transport.take_pending()
        frames = []
        while data:
            frame, length = Frame.parse_frame_header(memoryview(data[:9]))
            frame.parse_body(memoryview(data[9 : 9 + length]))
            frames.append(frame)
            data = data[9 + length :]
        return frames


def goaway(last_stream_id: int) -> bytes:
    return bytes(GoAwayFrame(0, last_stream_id=last_stream_id).serialize())


@asynccontextmanager
async def open_bare(**link_options: Any) -> AsyncIterator[tuple[Link, BarePeer]]:
    """An opener (the server's end) whose peer is a :class:`BarePeer`, settled."""
    a, b = transport_pair()
    options = {"keepalive_interval": 15.0, "keepalive_timeout": 15.0, **link_options}
    link = Link.opener(a, **options)
    peer = BarePeer(b)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await peer.flush()  # the peer's SETTINGS
        peer.receive()  # preface, SETTINGS, WINDOW_UPDATE
        await peer.flush()  # SETTINGS ACK
        peer.receive()  # the link's SETTINGS ACK, its MAX_FRAME_SIZE
        await peer.flush()
        yield link, peer
        link.close("the test is over")


async def test_streams_up_to_the_last_id_of_a_goaway_finish_and_the_rest_are_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with open_bare(keepalive_interval=10, keepalive_timeout=5) as (link, peer):
            first = await link.open_stream(request(b"/1"), end_stream=True)
            second = await link.open_stream(request(b"/3"), end_stream=True)
            await trio.testing.wait_all_tasks_blocked()
            peer.receive()
            start = trio.current_time()
            # The agent goes away having taken stream 1 only; a WINDOW_UPDATE
            # it sent just after crosses the GOAWAY.
            peer.conn.increment_flow_control_window(1000)
            await peer.flush(goaway(1) + peer.conn.data_to_send())
            assert not link.accepting
            with pytest.raises(StreamError) as refused:
                await second.receive_headers()
            assert refused.value.code == h2.errors.ErrorCodes.REFUSED_STREAM
            assert trio.current_time() == start
            # Stream 1 finishes, keepalive PINGs and all, 25 s later.
            for _ in range(25):
                await trio.sleep(1)
                peer.receive()  # a PING, answered
                await peer.flush()
            peer.conn.send_headers(1, [(b":status", b"200")])
            peer.conn.send_data(1, b"done", end_stream=True)
            await peer.flush()
            assert (await first.receive_headers()) == [(b":status", b"200")]
            assert await first.receive_data() == b"done"
            assert await first.receive_data() == b""
            await link.wait_closed()
            assert link.closed_reason == "the peer went away (GOAWAY) and every stream has finished"
            assert link._close_code == 1000
            assert trio.current_time() == start + 25


async def test_drain_after_the_peers_goaway_sends_goaway_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The server's drain began as the agent's GOAWAY arrived (both stopped by
    # SIGTERM at once): h2 refused the SETTINGS frame the server's drain sent.
    with trio.fail_after(60):
        async with open_bare() as (link, peer):
            stream = await link.open_stream(request(), end_stream=True)
            await trio.testing.wait_all_tasks_blocked()
            peer.receive()
            await peer.flush(goaway(1))
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.drain, 30)
                await trio.testing.wait_all_tasks_blocked()
                assert peer.frames() == []  # no SETTINGS: the server takes no streams
                peer.conn.send_headers(1, [(b":status", b"204")], end_stream=True)
                await peer.flush()
            assert (await stream.receive_headers()) == [(b":status", b"204")]
            assert trio.current_time() == start
            assert link.closed_reason is not None
            assert "protocol error" not in link.closed_reason


async def test_the_servers_drain_sends_no_settings(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with open_bare() as (link, peer):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.drain, 30)
                await trio.testing.wait_all_tasks_blocked()
                frames = peer.frames()
            assert [type(frame) for frame in frames] == [GoAwayFrame]


async def test_a_second_drain_waits_for_the_first(autojump_clock: trio.testing.MockClock) -> None:
    # A second SIGTERM (or aclose) while the first drain waits for the peer
    # to close after our GOAWAY: h2 refused its SETTINGS frame.
    ended: list[float] = []

    async def drain(link: Link) -> None:
        await link.drain(30)
        ended.append(trio.current_time())

    with trio.fail_after(60):
        async with open_pair(echo) as pair:
            pair.opener_transport.dropping = True  # so the answerer's end never closes
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, pair.answerer)
                await trio.sleep(0.5)
                nursery.start_soon(drain, pair.answerer)
            # Once more, after it ended: nothing to do, and no error either.
            await pair.answerer.drain(30)
            # The first waited a second for the peer to close, the second with it.
            assert ended == [start + 1, start + 1]
            await pair.answerer_done.wait()
            assert pair.answerer_reason == "the connection was drained and closed"


async def test_streams_the_peer_gave_up_on_fail_at_once_in_plain_words(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The server's graceful timeout ran out with the agent still answering:
    # the server's GOAWAY must stop that handler at once (not at the close a
    # second later), and what the handler is told must not be h2's internals.
    answering = trio.Event()
    errors: list[StreamError] = []
    stopped_at: list[float] = []

    async def handler(stream: Stream) -> None:
        stream.send_headers([(b":status", b"200")])
        answering.set()
        try:
            while True:
                await stream.send_data(b"more")
                await trio.sleep(0.5)
        except StreamError as error:
            errors.append(error)
        finally:
            stopped_at.append(trio.current_time())

    with trio.fail_after(60):
        async with open_pair(handler) as pair:
            await pair.opener.open_stream(request(), end_stream=True)
            await answering.wait()
            start = trio.current_time()
            await pair.opener.drain(5)
            await pair.answerer_done.wait()
    assert stopped_at == [start + 5]
    assert pair.answerer_reason is not None
    for error in errors:
        assert "Invalid input" not in error.reason
        assert "State" not in error.reason


async def test_our_goaway_stops_the_keepalive(autojump_clock: trio.testing.MockClock) -> None:
    # A drain waits up to a second for the peer to close; a PING due then
    # was refused by h2 and reported as the peer's protocol error (close 1002).
    with trio.fail_after(60):
        async with open_bare(keepalive_interval=10, keepalive_timeout=5) as (link, peer):
            await trio.sleep(9.5)
            await link.drain(30)
            assert [type(frame) for frame in peer.frames()] == [GoAwayFrame]
            assert link.closed_reason == "the connection was drained and closed"
            assert link._close_code == 1000
