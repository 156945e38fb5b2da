"""An empty DATA frame is not the end of a body (issue 11's audit).

HTTP/2 lets a peer send DATA frames with nothing in them, or with padding only
(RFC 9113 section 6.1); only END_STREAM ends the body. ``Stream.receive_data``
says "ended" with ``b""``, and every reader of a stream (the agent's request
body, the server's response relay, WebSocket and TCP pipes) stops there. If an
empty frame was queued as a chunk, the body ended early whenever that frame
happened to arrive alone, and went on fine when it came in one read with the
next: a race on the timing of reads, like the one issue 11 fixed.

Deterministic: the test writes the frames itself and waits until every task is
blocked between them.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from memory_link import open_pair

from tunnel.link import Stream

HEADERS = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"app.localhost"),
    (b":path", b"/upload"),
]


@pytest.mark.parametrize("padding", [0, 8], ids=["empty", "padding-only"])
async def test_an_empty_data_frame_does_not_end_the_body(
    autojump_clock: trio.testing.MockClock, padding: int
) -> None:
    received: list[bytes] = []
    done = trio.Event()

    async def handler(stream: Stream) -> None:
        body = bytearray()
        while data := await stream.receive_data():
            body += data
            stream.acknowledge()
        received.append(bytes(body))
        stream.send_headers([(b":status", b"200")], end_stream=True)
        done.set()

    with trio.fail_after(10):
        async with open_pair(handler) as pair:
            opener = pair.opener
            stream = opener.open_stream_nowait(HEADERS, end_stream=False)
            assert stream is not None
            await stream.send_data(b"first ")
            await trio.testing.wait_all_tasks_blocked()
            # Only the peer's h2 can write an empty frame: the link never does.
            opener._core._conn.send_data(stream.id, b"", pad_length=padding or None)
            opener._kick()
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_data(b"and last", end_stream=True)
            await done.wait()
            window = pair.answerer._core._conn._inbound_flow_control_window_manager
            assert received == [b"first and last"]
            # What padding took of the window was given back, though no
            # consumer ever saw it (h2 batches its WINDOW_UPDATEs, so what it
            # holds back counts as given).
            given = window.current_window_size + window._bytes_processed
            assert given == window.max_window_size
