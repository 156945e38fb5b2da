"""A visitor's HTTP requests through a real tunnel: server, agent and local service
on real sockets, the visitor an ``httpx.AsyncClient``."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from contextlib import aclosing
from functools import partial
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import pytest
import trio

from helpers import FIXED_BODY, STREAM_CHUNK_1, STREAM_CHUNK_2, free_port


def header_values(seen: dict, name: str) -> list[str]:
    """Every value of header ``name`` the local service received, in order."""
    return [value for key, value in seen["headers"] if key == name]


async def read_at_least(chunks, size: int) -> bytes:
    """Read from an ``aiter_raw()`` iterator until ``size`` bytes arrived."""
    received = b""
    while len(received) < size:
        received += await anext(chunks)
    return received


async def test_methods_paths_queries_and_bodies(tunnel_server, local_service, open_agent, visitor):
    with trio.fail_after(10):
        async with (
            open_agent(tunnel_server.port, local_service.port),
            visitor(tunnel_server.port) as http,
        ):
            for method in ("GET", "POST", "PUT", "DELETE"):
                body = b"" if method == "GET" else f"{method} body \xff".encode("latin-1")
                response = await http.request(
                    method, "/some/deep%20path?q=1&r=two%20words&q=3", content=body
                )
                assert response.status_code == 200, response.text
                seen = response.json()
                assert seen["method"] == method
                assert seen["path"] == "/some/deep path"
                assert seen["query"] == "q=1&r=two%20words&q=3"
                assert seen["body"] == body.decode("latin-1")
                assert header_values(seen, "host") == ["app.localhost"]
                # Repeated response headers arrive, both and in order.
                assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]

            get = await http.get("/fixed")
            assert get.content == FIXED_BODY
            head = await http.head("/fixed")
            assert head.status_code == 200
            assert head.content == b""
            assert head.headers["content-length"] == str(len(FIXED_BODY))

            no_content = await http.get("/status/204")
            assert no_content.status_code == 204
            assert no_content.content == b""
            not_modified = await http.get("/status/304", headers={"if-none-match": '"v1"'})
            assert not_modified.status_code == 304
            assert not_modified.content == b""
            assert not_modified.headers["etag"] == '"v1"'

            # A stray body after 204/304 would corrupt the visitor's keep-alive
            # connection; the next request on it must still be clean.
            after = await http.get("/after")
            assert after.status_code == 200
            assert after.json()["path"] == "/after"
            assert [m for m, _ in local_service.requests].count("HEAD") == 1


async def test_five_mib_upload_arrives_intact(tunnel_server, local_service, open_agent, visitor):
    data = os.urandom(5 << 20)
    with trio.fail_after(20):
        async with (
            open_agent(tunnel_server.port, local_service.port),
            visitor(tunnel_server.port) as http,
        ):
            response = await http.post("/sha", content=data)
    assert response.status_code == 200, response.text
    assert response.json() == {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}


async def test_response_streams_before_the_service_finishes(
    tunnel_server, local_service, open_agent, visitor
):
    with trio.fail_after(5):
        async with (
            open_agent(tunnel_server.port, local_service.port),
            visitor(tunnel_server.port) as http,
            http.stream("GET", "/stream") as response,
        ):
            assert response.status_code == 200
            async with aclosing(response.aiter_raw()) as chunks:
                # The local handler is parked until release_stream is set, so
                # this only completes if the tunnel forwards chunk 1 on its own.
                received = await read_at_least(chunks, len(STREAM_CHUNK_1))
                assert received == STREAM_CHUNK_1
                assert not local_service.stream_finished.is_set()
                local_service.release_stream.set()
                async for chunk in chunks:
                    received += chunk
    assert received == STREAM_CHUNK_1 + STREAM_CHUNK_2
    assert local_service.stream_finished.is_set()


async def test_request_body_streams_before_the_visitor_finishes(
    tunnel_server, local_service, open_agent, visitor
):
    sent_last = False

    async def body():
        nonlocal sent_last
        yield b"part one;"
        # Only the local service seeing part one lets the visitor go on.
        await local_service.body_started.wait()
        sent_last = True
        yield b"part two"

    with trio.fail_after(5):
        async with (
            open_agent(tunnel_server.port, local_service.port),
            visitor(tunnel_server.port) as http,
        ):
            response = await http.post("/upload-stream", content=body())
    assert sent_last
    assert response.status_code == 200, response.text
    seen = response.json()
    assert seen["body"] == "part one;part two"
    assert seen["method"] == "POST"


async def test_unknown_host_is_404_naming_the_host(
    tunnel_server, local_service, open_agent, visitor
):
    with trio.fail_after(5):
        async with (
            open_agent(tunnel_server.port, local_service.port),
            visitor(tunnel_server.port, host="nope.localhost:8080") as http,
        ):
            response = await http.get("/anything")
    assert response.status_code == 404
    assert "nope.localhost" in response.text
    assert local_service.requests == []


async def test_forwarded_headers_are_set_and_not_spoofable(
    tunnel_server, local_service, open_agent, visitor
):
    with trio.fail_after(5):
        async with (
            open_agent(tunnel_server.port, local_service.port),
            visitor(tunnel_server.port) as http,
        ):
            honest = (await http.get("/honest")).json()
            forged = (
                await http.get(
                    "/forged",
                    headers={
                        "x-forwarded-for": "6.6.6.6",
                        "x-forwarded-proto": "https",
                        "x-forwarded-host": "evil.example",
                    },
                )
            ).json()
    for seen in (honest, forged):
        assert header_values(seen, "x-forwarded-for") == ["127.0.0.1"]
        assert header_values(seen, "x-forwarded-proto") == ["http"]
        assert header_values(seen, "x-forwarded-host") == ["app.localhost"]


async def test_two_hundred_concurrent_requests_on_one_agent(
    tunnel_server, local_service, open_agent, visitor
):
    count = 200
    local_service.gather_target = count
    answers: dict[int, tuple[int, str]] = {}

    async def one(http: httpx.AsyncClient, i: int) -> None:
        response = await http.get(f"/gather/{i}", params={"i": str(i)})
        answers[i] = (response.status_code, response.text)

    with trio.fail_after(20):
        async with (
            open_agent(tunnel_server.port, local_service.port),
            visitor(tunnel_server.port, limits=httpx.Limits(max_connections=count)) as http,
            # The local handler holds every request until all 200 are inside
            # it at once, so they really are concurrent on the one agent.
            trio.open_nursery() as nursery,
        ):
            for i in range(count):
                nursery.start_soon(one, http, i)
    assert sorted(answers) == list(range(count))
    for i, (status, text) in answers.items():
        assert status == 200, text
        seen = json.loads(text)
        assert (seen["path"], seen["query"]) == (f"/gather/{i}", f"i={i}")


def _open_without_yielding(port: int, count: int) -> list[socket.socket]:
    """Open ``count`` connections while trio's loop (and so the server) cannot accept."""
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            # A full accept queue drops the SYN: connect would wait 1 s for a retransmit.
            opened.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
    except OSError:
        for sock in opened:
            sock.close()
        raise
    return opened


def _somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return 0


@pytest.mark.skipif(_somaxconn() < 1024, reason="the kernel caps listen backlogs below 1024")
async def test_a_burst_of_600_new_visitors_fits_in_the_listen_queue(
    tunnel_server, local_service, open_agent, visitor
):
    # Hypercorn's default backlog (100) would leave the 102nd waiting for a SYN
    # retransmit; thousands of requests in flight each come on a connection.
    # 600, not thousands: a soft limit of 1024 open files must do.
    sockets = _open_without_yielding(tunnel_server.port, 600)
    try:
        with trio.fail_after(20):
            async with (
                open_agent(tunnel_server.port, local_service.port),
                visitor(tunnel_server.port) as http,
            ):
                response = await http.get("/after-the-burst")
        assert response.status_code == 200
    finally:
        for sock in sockets:
            sock.close()


async def test_slow_local_service_gets_504(start_tunnel_server, local_service, open_agent, visitor):
    server = await start_tunnel_server(response_timeout=0.5)
    with trio.fail_after(5):
        async with (
            open_agent(server.port, local_service.port),
            visitor(server.port) as http,
        ):
            started = trio.current_time()
            response = await http.get("/hang")
            elapsed = trio.current_time() - started
            assert response.status_code == 504
            assert "app.localhost" in response.text
            assert "0.5 seconds" in response.text
            assert 0.5 <= elapsed < 3
            # The abandoned request does not linger at the local service.
            await local_service.hang_abandoned.wait()
            # The tunnel is still fine for the next request.
            assert (await http.get("/next")).status_code == 200


async def test_hop_by_hop_headers_do_not_cross(tunnel_server, local_service, open_agent, visitor):
    with trio.fail_after(5):
        async with (
            open_agent(tunnel_server.port, local_service.port),
            visitor(tunnel_server.port) as http,
        ):
            response = await http.get(
                "/hop",
                headers={
                    "connection": "x-custom",
                    "x-custom": "1",
                    "keep-alive": "timeout=9",
                    "proxy-connection": "keep-alive",
                    "x-plain": "kept",
                },
            )
    assert response.status_code == 200, response.text
    seen = response.json()
    names = {key for key, _ in seen["headers"]}
    assert "x-custom" not in names
    assert "keep-alive" not in names
    assert "proxy-connection" not in names
    assert all("x-custom" not in v for v in header_values(seen, "connection"))
    assert header_values(seen, "x-plain") == ["kept"]

    # The local service's hop-by-hop headers stay on its own hop.
    assert "x-local-hop" not in response.headers
    assert "keep-alive" not in response.headers
    assert "proxy-connection" not in response.headers
    assert "x-local-hop" not in response.headers.get("connection", "").lower()
    assert response.headers["x-end-to-end"] == "kept"


async def test_visitor_leaving_mid_stream_reaches_the_local_service(
    tunnel_server, local_service, open_agent, visitor
):
    with trio.fail_after(8):
        async with open_agent(tunnel_server.port, local_service.port):
            async with (
                visitor(tunnel_server.port) as http,
                http.stream("GET", "/watch") as response,
            ):
                assert response.status_code == 200
                received = b""
                # Stop reading by cancelling a read that is blocked inside
                # httpx, which finishes its generators; the unfinished
                # response's connection is then closed when the block ends.
                with trio.CancelScope() as reading:
                    async for chunk in response.aiter_raw():
                        received += chunk
                        if len(received) >= len(STREAM_CHUNK_1):
                            reading.cancel()
                assert received == STREAM_CHUNK_1
                assert not local_service.disconnected.is_set()
            with trio.fail_after(2):
                await local_service.disconnected.wait()


#: A Date no clock would give now: proof that the one a visitor sees is the origin's.
ORIGIN_DATE = b"Tue, 01 Jan 2030 00:00:00 GMT"


async def _raw_origin(stream: trio.SocketStream) -> None:
    """A local service that dates its answers (``/dated``) or not (any other path)."""
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        request += chunk
    dated = request.startswith(b"GET /dated ")
    await stream.send_all(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
        + (b"Date: " + ORIGIN_DATE + b"\r\n" if dated else b"")
        + b"connection: close\r\n\r\nok"
    )
    await stream.aclose()


async def _raw_head(port: int, host: str, path: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The status line and header fields of ``GET path``, read off a plain socket."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            assert chunk, data
            data += chunk
    status, *lines = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    fields = [tuple(part.strip() for part in line.split(b":", 1)) for line in lines]
    return status, [(name.lower(), value) for name, value in fields]


async def test_each_response_carries_exactly_one_date(nursery, tunnel_server, open_agent):
    listeners = await nursery.start(partial(trio.serve_tcp, _raw_origin, 0, host="127.0.0.1"))
    origin_port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        async with open_agent(tunnel_server.port, origin_port):
            # The origin's own Date passes through, alone.
            status, fields = await _raw_head(tunnel_server.port, "app.localhost", "/dated")
            assert status.startswith(b"HTTP/1.1 200"), status
            assert [v for n, v in fields if n == b"date"] == [ORIGIN_DATE], fields
            # An origin without a clock gets one Date, the server's.
            status, fields = await _raw_head(tunnel_server.port, "app.localhost", "/undated")
            assert status.startswith(b"HTTP/1.1 200"), status
            dates = [v for n, v in fields if n == b"date"]
            assert len(dates) == 1, fields
            assert dates[0].endswith(b" GMT")
            assert dates[0] != ORIGIN_DATE
        # A page the server answers itself keeps its Date.
        status, fields = await _raw_head(tunnel_server.port, "nobody.localhost", "/")
        assert status.startswith(b"HTTP/1.1 404")
        assert len([v for n, v in fields if n == b"date"]) == 1, fields


async def _h2_request(
    port: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, bytes]:
    """One HTTP/2 request as a visitor's frames in one write; its status and body.

    h2's own checks are off, so it sends what a broken or hostile client would.
    A stream reset or a GOAWAY is returned as the negated error code.
    """
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False
        )
    )
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=not body)
    if body:
        conn.send_data(1, body, end_stream=True)
    status, answer = 0, bytearray()
    async with await trio.open_tcp_stream("127.0.0.1", port) as sock:
        await sock.send_all(conn.data_to_send())
        while True:
            data = await sock.receive_some(65536)
            assert data, "the server closed the connection before answering"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    return -event.error_code, bytes(answer)
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    answer += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, bytes(answer)
                elif isinstance(event, h2.events.StreamReset):
                    return -event.error_code, bytes(answer)
            await sock.send_all(conn.data_to_send())


@pytest.mark.parametrize(
    ("method", "length", "body"),
    [
        pytest.param(b"HEAD", b"5", b"", id="HEAD announcing 5 bytes, none sent"),
        pytest.param(b"GET", b"5", b"", id="GET announcing 5 bytes, none sent"),
        pytest.param(b"POST", b"10", b"12345", id="POST announcing 10 bytes, 5 sent"),
        pytest.param(b"POST", b"3", b"12345", id="POST announcing 3 bytes, 5 sent"),
        pytest.param(b"POST", b"abc", b"12345", id="POST with a length that is not a number"),
    ],
)
async def test_an_http2_body_that_disagrees_with_its_length_is_the_visitors_400(
    tunnel_server, local_service, open_agent, visitor, method, length, body
):
    # RFC 9113 section 8.1.1: such a request is malformed. It is the visitor's
    # error, told to the visitor (a 400, or Hypercorn's h2 ends the visitor's
    # connection with PROTOCOL_ERROR when DATA came); it must not reach the
    # local service as a request cut short, nor cost the tunnel its
    # connection to the agent.
    headers = [
        (b":method", method),
        (b":scheme", b"http"),
        (b":authority", b"app.localhost"),
        (b":path", b"/lengths"),
        (b"content-length", length),
    ]
    with trio.fail_after(20):
        async with open_agent(tunnel_server.port, local_service.port) as client:
            links = list(client._links.values())
            status, page = await _h2_request(tunnel_server.port, headers, body)
            assert status in (400, -h2.errors.ErrorCodes.PROTOCOL_ERROR), (status, page)
            if method == b"HEAD":
                assert page == b""
            # The tunnel still serves, on the same connection to its agent.
            async with visitor(tunnel_server.port) as http:
                assert (await http.get("/fixed")).status_code == 200
            assert [id(link) for link in client._links.values()] == [id(link) for link in links]
    assert ("GET", "/fixed") in local_service.requests
    assert all(path != "/lengths" for _, path in local_service.requests)


async def test_an_error_page_for_head_has_no_body_and_keeps_the_agents_connection(
    tunnel_server, open_agent, visitor
):
    # The agent answers HEAD itself when the local service is down: with a
    # body, the server's HTTP/2 took that as a protocol error and ended the
    # agent's whole connection, every request on it with it.
    headers = [
        (b":method", b"HEAD"),
        (b":scheme", b"http"),
        (b":authority", b"app.localhost"),
        (b":path", b"/"),
    ]
    with trio.fail_after(20):
        async with open_agent(tunnel_server.port, free_port()) as client:
            links = list(client._links.values())
            for _ in range(3):
                assert await _h2_request(tunnel_server.port, headers, b"") == (502, b"")
            async with visitor(tunnel_server.port) as http:
                head = await http.head("/")
            assert head.status_code == 502
            assert head.content == b""
            assert [id(link) for link in client._links.values()] == [id(link) for link in links]
