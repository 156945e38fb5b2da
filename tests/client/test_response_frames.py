"""The agent's frames for a small response: one message, END_STREAM on the body's DATA.

A local service usually writes a small response at once, and the agent reads its head,
body and end together. Sent as HEADERS, DATA and an empty DATA with END_STREAM, the
server would parse a frame that carries nothing; the end rides on the body's frame.
"""

from __future__ import annotations

import functools
import struct

import h11
import trio
from memory_link import open_pair

from tunnel.client._upstream import LocalPool
from tunnel.client._upstream import relay_local_http as forward

DATA, HEADERS, END_STREAM = 0x0, 0x1, 0x1


def _frames(message: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream ID, payload) of each HTTP/2 frame in ``message``."""
    frames = []
    while message:
        length = int.from_bytes(message[:3], "big")
        kind, flags, stream_id = struct.unpack(">BBL", message[3:9])
        frames.append((kind, flags, stream_id & 0x7FFFFFFF, message[9 : 9 + length]))
        message = message[9 + length :]
    return frames


async def _origin(body: bytes, chunked: bool, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(4096))
        headers = [] if chunked else [(b"content-length", str(len(body)).encode())]
        head = conn.send(h11.Response(status_code=200, headers=headers))
        await stream.send_all(head + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await stream.receive_some(4096)  # until the agent closes or reuses it


async def _sent_for_one_get(chunked: bool) -> list[bytes]:
    body = b"small and complete"
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, functools.partial(_origin, body, chunked), 0)
        )
        pool = LocalPool(
            "127.0.0.1", listeners[0].socket.getsockname()[1], max_idle=1, connect_timeout=5
        )
        try:
            async with open_pair(functools.partial(forward, pool=pool)) as pair:
                sent: list[bytes] = []
                original = pair.answerer_transport.send

                async def send(data: bytes) -> None:
                    sent.append(data)
                    await original(data)

                pair.answerer_transport.send = send  # type: ignore[method-assign]
                headers = [
                    (b":method", b"GET"),
                    (b":scheme", b"http"),
                    (b":authority", b"a.localhost"),
                    (b":path", b"/"),
                ]
                stream = pair.opener.open_stream_nowait(headers, end_stream=True)
                assert stream is not None
                await stream.receive_headers()
                assert await stream.receive_data() == body
                assert await stream.receive_data() == b""
        finally:
            await pool.aclose()
        nursery.cancel_scope.cancel()
    return [message for message in sent if any(f[2] == 1 for f in _frames(message))]


async def test_a_small_response_is_one_message_with_end_stream_on_its_data() -> None:
    for chunked in (False, True):
        with trio.fail_after(10):
            messages = await _sent_for_one_get(chunked)
        assert len(messages) == 1, messages
        frames = [(kind, flags, payload) for kind, flags, _, payload in _frames(messages[0])]
        assert [kind for kind, _, _ in frames] == [HEADERS, DATA]
        assert frames[1] == (DATA, END_STREAM, b"small and complete")
