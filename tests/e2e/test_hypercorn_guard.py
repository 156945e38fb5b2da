"""HTTP/2 visitors that leave in the middle of a response must not stop the server.

On Hypercorn 0.17 and 0.18, a cleartext HTTP/2 visitor that sends GOAWAY and
closes while a response streams makes ``send_all`` race ``send_eof`` on the
connection's socket. The ``trio.BusyResourceError`` then escapes into the
nursery that runs every connection, and ``hypercorn.trio.serve`` (so
``tunnel.serve``) raises. ``tunnel/server/hypercorn/_guard.py`` explains the
bug and the guard; this test fails without the guard.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio

import tunnel
from helpers import free_port

CHUNK = b"x" * 16384
CHUNKS = 64  # 1 MiB per response: far more than a visitor reads before it leaves
STREAMS = 8  # concurrent responses on each visitor's connection
VISITORS = 16  # visitors at once
ROUNDS = 10  # without the guard the server is down within the first round or two
EMBEDDED_ROUNDS = 3  # through a tunnel, each round costs far more


async def streaming_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A long response, the fallback for every host: one 16 KiB chunk at a time."""
    if scope["type"] == "lifespan":
        # The fallback gets the server's lifespan too.
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for _ in range(CHUNKS):
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def leave_mid_response(port: int, read_bytes: int, host: str = "nobody.localhost") -> None:
    """Start ``STREAMS`` requests, read ``read_bytes`` of responses, then send GOAWAY and go.

    Like a browser or curl closing its connection: a GOAWAY and a TCP FIN,
    while the server is still sending.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for _ in range(STREAMS):
            conn.send_headers(
                conn.get_next_available_stream_id(),
                [
                    (":method", "GET"),
                    (":path", "/"),
                    (":scheme", "http"),
                    (":authority", host),
                ],
                end_stream=True,
            )
        await stream.send_all(conn.data_to_send())
        received = 0
        while received < read_bytes:
            data = await stream.receive_some()
            if not data:
                return
            received += len(data)
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    # Keep the windows open, so the server is busy sending when we go.
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            await stream.send_all(conn.data_to_send())
        conn.close_connection()
        await stream.send_all(conn.data_to_send())


async def test_server_survives_http2_visitors_leaving_mid_response(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        config = tunnel.ServerConfig(address="127.0.0.1:0", tokens=frozenset({"s3cret"}))
        urls = await nursery.start(partial(tunnel.serve, config, fallback=streaming_app))
        port = int(urls[0].rsplit(":", 1)[1])

        for round_ in range(ROUNDS):
            async with trio.open_nursery() as visitors:
                for i in range(VISITORS):
                    # Leave at different points of the responses.
                    read_bytes = 16384 * (1 + (round_ * VISITORS + i) % 16)
                    visitors.start_soon(leave_mid_response, port, read_bytes)

        # Without the guard the server's crash has already failed the test (it
        # raises into the test's nursery); with it, it still answers, over
        # HTTP/2 too.
        async with httpx.AsyncClient(
            base_url=urls[0], http1=False, http2=True, headers={"host": "nobody.localhost"}
        ) as http:
            response = await http.get("/")
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"
        assert response.content == CHUNK * CHUNKS
        # A visitor leaving is not a server error: without the guard the same
        # race, hit from a response's own task, is logged as "Error in ASGI
        # Framework".
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []


async def send_data_after_the_answer(port: int, host: str = "nobody.localhost") -> int:
    """A POST without END_STREAM to ``host``; once the answer is in, one more DATA
    frame on that stream (as a client still streaming its body does).

    Returns the status it was answered with.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        request = [(":method", "POST"), (":path", "/"), (":scheme", "http")]
        conn.send_headers(1, [*request, (":authority", host)])
        await stream.send_all(conn.data_to_send())
        status, ended = 0, False
        while not ended:
            data = await stream.receive_some()
            assert data, "the server closed the connection before it answered"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                ended = ended or isinstance(event, h2.events.StreamEnded)
        conn.send_data(1, b"the rest of the body")
        await stream.send_all(conn.data_to_send())
        # Whatever the server answers (RST_STREAM, or nothing), it must not go down.
        with trio.move_on_after(0.2):
            while await stream.receive_some():
                pass
    return status


async def test_server_survives_data_after_its_answer(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Hypercorn 0.17/0.18 look a DATA frame's stream up with ``self.streams[...]``;
    for a stream already answered that raised ``KeyError`` out of ``serve``.
    """
    with trio.fail_after(10):
        config = tunnel.ServerConfig(address="127.0.0.1:0", tokens=frozenset({"s3cret"}))
        urls = await nursery.start(tunnel.serve, config)
        port = int(urls[0].rsplit(":", 1)[1])
        for _ in range(3):
            assert await send_data_after_the_answer(port) == 404
        async with httpx.AsyncClient(
            base_url=urls[0], http1=False, http2=True, headers={"host": "nobody.localhost"}
        ) as http:
            response = await http.get("/")
        assert response.status_code == 404
        assert "nobody.localhost" in response.text
    # Not even a connection failed (the guard would have logged it).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_the_readme_deployment_under_the_hypercorn_command_survives(
    nursery: trio.Nursery, tmp_path: Path, agent_config: Any
) -> None:
    """README's "Embedding in a Hypercorn deployment", run as it says (the real
    ``hypercorn`` command, so no ``tunnel.serve``): the visitors of the two
    tests above, through a real tunnel, must not stop it.
    """
    from test_readme import PYTHON_EXAMPLES, command, example, run

    local = hypercorn.config.Config()
    local.bind = ["127.0.0.1:0"]
    local.accesslog = None
    (local_url,) = await nursery.start(hypercorn.trio.serve, streaming_app, local)
    (tmp_path / "mytunnel.py").write_text(example("python", PYTHON_EXAMPLES["embedding"]).code)
    port = free_port()
    (line,) = example("literal", "hypercorn --worker-class trio").code.splitlines()
    async with run(command(line, server=port), "hypercorn", cwd=tmp_path) as server:
        await server.line("Running on")
        agent = agent_config(port, int(local_url.rsplit(":", 1)[1]), host="emb.localhost")
        # Some 5 s a round on a quiet machine, through a real tunnel.
        with trio.fail_after(60):
            async with tunnel.open_tunnel(agent):
                for round_ in range(EMBEDDED_ROUNDS):
                    async with trio.open_nursery() as visitors:
                        for i in range(VISITORS):
                            read_bytes = 16384 * (1 + (round_ * VISITORS + i) % 16)
                            visitors.start_soon(
                                leave_mid_response, port, read_bytes, "emb.localhost"
                            )
                            visitors.start_soon(send_data_after_the_answer, port, "nobody.test")
                    assert server.process.returncode is None, "\n".join(server.lines)
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}",
                    http1=False,
                    http2=True,
                    headers={"host": "emb.localhost"},
                    trust_env=False,
                ) as http:
                    response = await http.get("/")
        assert response.status_code == 200
        assert response.content == CHUNK * CHUNKS
        assert server.process.returncode is None


async def test_server_survives_priority_for_streams_never_opened(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Hypercorn 0.17/0.18 put every stream a PRIORITY frame names in their priority
    tree and never take it out; the 1001st raised ``TooManyStreamsError`` out of
    ``serve``. One visitor, 1,100 frames of 14 bytes.
    """
    with trio.fail_after(10):
        config = tunnel.ServerConfig(address="127.0.0.1:0", tokens=frozenset({"s3cret"}))
        urls = await nursery.start(tunnel.serve, config)
        port = int(urls[0].rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            for stream_id in range(1, 2201, 2):
                conn.prioritize(stream_id, weight=16, depends_on=stream_id + 2)
            await stream.send_all(conn.data_to_send())
            with trio.move_on_after(0.5):
                while await stream.receive_some():
                    pass
        async with httpx.AsyncClient(
            base_url=urls[0], http1=False, http2=True, headers={"host": "nobody.localhost"}
        ) as http:
            response = await http.get("/")
        assert response.status_code == 404
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_failure_inside_hypercorn_ends_only_its_connection(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard's safety net, for Hypercorn bugs not yet found: an exception out
    of one connection is logged and closes that connection, and nothing else.
    """
    from hypercorn.protocol.h11 import H11Protocol

    original = H11Protocol.handle

    async def handle(self: Any, event: Any) -> None:
        if getattr(event, "data", b"").startswith(b"BOOM"):
            raise RuntimeError("a bug in Hypercorn")
        await original(self, event)

    monkeypatch.setattr(H11Protocol, "handle", handle)
    with trio.fail_after(10):
        config = tunnel.ServerConfig(address="127.0.0.1:0", tokens=frozenset({"s3cret"}))
        urls = await nursery.start(tunnel.serve, config)
        port = int(urls[0].rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"BOOM / HTTP/1.1\r\n\r\n")
            assert await stream.receive_some() == b""  # closed, unanswered
        async with httpx.AsyncClient(base_url=urls[0], headers={"host": "x.localhost"}) as http:
            assert (await http.get("/")).status_code == 404
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage().startswith("an HTTP connection failed inside Hypercorn")
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "a bug in Hypercorn"
