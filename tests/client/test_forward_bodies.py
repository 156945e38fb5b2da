"""The agent's ``forward``: a request whose whole body arrived with its head.

The server writes a small request's HEADERS, DATA and END_STREAM in one
message when the visitor sent them in one segment (as curl, browsers and most
HTTP libraries do). The agent's reader then handles all three before the
stream's handler first runs, so the stream has already ended when the handler
looks at it. The body must reach the local service all the same.

Deterministic: the test queues the three frames with no ``await`` between them,
so the server's writer sends them as one message.
"""

from __future__ import annotations

import functools
import hashlib
import json

import pytest
import trio
from memory_link import open_pair

from helpers import LocalService, RecordingService, serve_local
from tunnel import Recorder
from tunnel.client._upstream import LocalPool
from tunnel.client._upstream import relay_local_http as forward
from tunnel.link import Stream


def _post(path: bytes, body: bytes, *, length: bool) -> list[tuple[bytes, bytes]]:
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"shop.localhost"),
        (b":path", path),
        (b"content-type", b"application/json"),
    ]
    if length:
        headers.append((b"content-length", str(len(body)).encode()))
    return headers


async def _read(stream: Stream) -> tuple[bytes, bytes]:
    headers = dict(await stream.receive_headers())
    body = bytearray()
    while data := await stream.receive_data():
        body += data
        stream.acknowledge()
    return headers[b":status"], bytes(body)


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "no-length"])
async def test_body_that_arrived_with_its_head_reaches_the_local_service(length: bool) -> None:
    body = json.dumps({"item": "socks", "qty": 2}).encode()
    service = LocalService()
    # The inspector's record is made from the same head: it must show the
    # headers the local service got and the whole body too.
    recorder = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_local, service)
            pool = LocalPool("127.0.0.1", service.port, max_idle=4, connect_timeout=5)
            handler = functools.partial(forward, pool=pool, observer=recorder)
            async with open_pair(handler) as pair:
                for _ in range(3):  # a fresh local connection, then reused ones
                    stream = pair.opener.open_stream_nowait(
                        _post(b"/sha", body, length=length), end_stream=False
                    )
                    assert stream is not None
                    # No await before the body is queued: one message carries all.
                    await stream.send_data(body, end_stream=True)
                    status, answer = await _read(stream)
                    assert status == b"200", answer
                    assert json.loads(answer) == {
                        "sha256": hashlib.sha256(body).hexdigest(),
                        "length": len(body),
                    }
            await pool.aclose()
            nursery.cancel_scope.cancel()
    assert len(recorder) == 3
    for exchange in recorder:
        assert exchange.request_body.size == len(body), exchange
        assert exchange.request_whole, exchange
        framing = (b"transfer-encoding", b"chunked")
        assert (framing in exchange.request_headers) is not length, exchange.request_headers


async def test_a_body_complete_by_its_length_keeps_the_local_connection() -> None:
    """The local service answers once it has the announced bytes: END_STREAM may come later.

    The server sends a request's last DATA and its END_STREAM apart when the
    visitor's end of message comes in a receive of its own (an HTTP/1.1 body
    with a Content-Length, as Hypercorn hands it over). A local service that has
    read the announced length answers at once; if the agent took the request as
    unfinished until END_STREAM, it closed that keep-alive connection and reset
    the stream, whenever the answer won the race with END_STREAM.
    """
    body = json.dumps({"item": "socks", "qty": 2}).encode()
    service = RecordingService()
    pool = LocalPool("127.0.0.1", service.port, max_idle=4, connect_timeout=5)
    try:
        with trio.fail_after(20):
            async with open_pair(functools.partial(forward, pool=pool)) as pair:
                for n in range(3):
                    path = f"/length/early-{n}?r=10".encode()
                    stream = pair.opener.open_stream_nowait(
                        _post(path, body, length=True), end_stream=False
                    )
                    assert stream is not None
                    await stream.send_data(body)
                    status, answer = await _read(stream)  # the whole answer, before END_STREAM
                    assert status == b"200", answer
                    stream.end()
        records = service.records("/length/early-")
        assert [r.body for r in records] == [body] * 3
        assert [r.index for r in records] == [0, 1, 2], "the local connection was not kept"
    finally:
        await pool.aclose()
        service.close()
