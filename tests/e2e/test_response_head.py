"""An HTTP/1.1 response's head, first chunk and end leave the server in one write.

Real Hypercorn, real sockets: through a tunnel (server, agent, a local service written
with h11), and Hypercorn serving a plain ASGI app with the patches applied. What goes
out is recorded at the guarded ``TCPServer``'s ``protocol_send``, the one place where
Hypercorn hands a connection's bytes to its socket.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import hypercorn.config
import hypercorn.trio
import pytest
import trio
from hypercorn.events import RawData

from tunnel._asgi import BODY_FOLLOWS
from tunnel.server.hypercorn._guard import _GuardedTCPServer, install_hypercorn_guard
from tunnel.server.hypercorn._patches import apply_hypercorn_patches
from tunnel.server.hypercorn._patches.response_head import HELD_LIMIT

BIG = b"x" * (HELD_LIMIT + 1)


class Writes:
    """The bytes each connection's ``protocol_send`` was given, one entry per write."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_connection: dict[int, list[bytes]] = defaultdict(list)
        original = _GuardedTCPServer.protocol_send

        async def protocol_send(server: _GuardedTCPServer, event: Any) -> None:
            if isinstance(event, RawData) and event.data:
                self.by_connection[id(server)].append(bytes(event.data))
            await original(server, event)

        monkeypatch.setattr(_GuardedTCPServer, "protocol_send", protocol_send)

    def of_responses(self) -> list[bytes]:
        """The writes of the connections that answered HTTP/1.1 requests (not agents)."""
        return [
            data
            for writes in self.by_connection.values()
            if not writes[0].startswith(b"HTTP/1.1 101 ")
            for data in writes
        ]


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Writes:
    install_hypercorn_guard()
    apply_hypercorn_patches()
    return Writes(monkeypatch)


class Origin:
    """A keep-alive HTTP/1.1 local service, answering as its paths say."""

    def __init__(self) -> None:
        #: Set by the test to let ``/late`` send its body.
        self.release = trio.Event()

    async def serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    await self._answer(stream, conn, event)
                elif isinstance(event, h11.EndOfMessage):
                    conn.start_next_cycle()
                else:
                    return

    async def _answer(self, stream: trio.SocketStream, conn: h11.Connection, request: Any) -> None:
        path = request.target
        length = [(b"content-length", b"5")]
        if path.startswith(b"/status/"):
            head = h11.Response(status_code=int(path[8:]), headers=[])
            await stream.send_all(conn.send(head) + conn.send(h11.EndOfMessage()))
        elif path == b"/late":
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[])))
            await self.release.wait()
            data = conn.send(h11.Data(data=b"late!")) + conn.send(h11.EndOfMessage())
            await stream.send_all(data)
        else:
            body = {b"/big": BIG, b"/chunked": b"hello"}.get(path, b"hello")
            headers = [] if path == b"/chunked" else length
            if path == b"/big":
                headers = [(b"content-length", str(len(BIG)).encode())]
            head = conn.send(h11.Response(status_code=200, headers=headers))
            if request.method == b"HEAD":
                await stream.send_all(head + conn.send(h11.EndOfMessage()))
                return
            rest = conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            # One write, as a service answering a small request usually does.
            await stream.send_all(head + rest)


class Visitor:
    """One keep-alive HTTP/1.1 connection, read with h11."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, method: str, path: str) -> bytes:
        request = h11.Request(method=method, target=path, headers=[("host", "app.localhost")])
        return self.conn.send(request) + self.conn.send(h11.EndOfMessage())

    async def next_event(self) -> Any:
        while (event := self.conn.next_event()) is h11.NEED_DATA:
            data = await self.stream.receive_some(65536)
            self.conn.receive_data(data)
        return event

    async def response(self) -> tuple[h11.Response, bytes]:
        head = await self.next_event()
        assert isinstance(head, h11.Response), head
        body = b""
        while isinstance(event := await self.next_event(), h11.Data):
            body += event.data
        assert isinstance(event, h11.EndOfMessage), event
        self.conn.start_next_cycle()
        return head, body

    async def get(self, path: str, method: str = "GET") -> tuple[h11.Response, bytes]:
        await self.stream.send_all(self.request(method, path))
        return await self.response()


async def _tunnel(nursery: trio.Nursery, start_tunnel_server: Any, open_agent: Any) -> Any:
    origin = Origin()
    listeners = await nursery.start(partial(trio.serve_tcp, origin.serve, 0, host="127.0.0.1"))
    server = await start_tunnel_server()
    return origin, server, open_agent(server.port, listeners[0].socket.getsockname()[1])


@asynccontextmanager
async def _visiting(
    nursery: trio.Nursery, start_tunnel_server: Any, open_agent: Any
) -> AsyncIterator[tuple[Origin, Visitor]]:
    """A tunnel to a fresh origin, and one HTTP/1.1 visitor connection to it."""
    origin, server, agent = await _tunnel(nursery, start_tunnel_server, open_agent)
    async with agent:
        visitor = Visitor(await trio.open_tcp_stream("127.0.0.1", server.port))
        async with visitor.stream:
            yield origin, visitor


async def test_small_responses_leave_in_one_write_and_the_connection_is_reused(
    nursery: trio.Nursery, start_tunnel_server: Any, open_agent: Any, writes: Writes
) -> None:
    with trio.fail_after(10):
        async with _visiting(nursery, start_tunnel_server, open_agent) as (_origin, visitor):
            # Content-Length, chunked, HEAD, 204 and 304 on one kept-alive connection.
            head, body = await visitor.get("/cl")
            assert (head.status_code, body) == (200, b"hello")
            assert (await visitor.get("/chunked"))[1] == b"hello"
            head, body = await visitor.get("/cl", "HEAD")
            assert (head.status_code, body) == (200, b"")
            assert dict(head.headers)[b"content-length"] == b"5"
            assert (await visitor.get("/status/204"))[0].status_code == 204
            assert (await visitor.get("/status/304"))[0].status_code == 304
            assert (await visitor.get("/cl"))[1] == b"hello"
    sent = writes.of_responses()
    # One write per response: the head and body together, and a chunked
    # body's end with them.
    assert len(sent) == 6, sent
    assert sent[0].startswith(b"HTTP/1.1 200 ")
    assert sent[0].endswith(b"\r\n\r\nhello")
    assert sent[1].endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert sent[2].endswith(b"\r\n\r\n")
    assert sent[3].startswith(b"HTTP/1.1 204 ")


async def test_a_head_whose_body_is_late_is_not_held_for_it(
    nursery: trio.Nursery, start_tunnel_server: Any, open_agent: Any, writes: Writes
) -> None:
    with trio.fail_after(15):
        async with _visiting(nursery, start_tunnel_server, open_agent) as (origin, visitor):
            await visitor.stream.send_all(visitor.request("GET", "/late"))
            # The service sends its body only once the visitor has the head:
            # a head held for its body would never arrive.
            with trio.fail_after(5):
                head = await visitor.next_event()
            assert isinstance(head, h11.Response)
            assert head.status_code == 200
            origin.release.set()
            data = await visitor.next_event()
            assert isinstance(data, h11.Data)
            assert data.data == b"late!"
            assert isinstance(await visitor.next_event(), h11.EndOfMessage)
            visitor.conn.start_next_cycle()
            assert (await visitor.get("/cl"))[1] == b"hello"
    sent = writes.of_responses()
    assert sent[0].endswith(b"\r\n\r\n")  # the head, alone


async def test_a_large_first_chunk_is_not_copied_onto_its_head(
    nursery: trio.Nursery, start_tunnel_server: Any, open_agent: Any, writes: Writes
) -> None:
    with trio.fail_after(10):
        async with _visiting(nursery, start_tunnel_server, open_agent) as (_origin, visitor):
            assert (await visitor.get("/big"))[1] == BIG
            assert (await visitor.get("/cl"))[1] == b"hello"
    sent = writes.of_responses()
    assert sent[0].endswith(b"\r\n\r\n")
    assert max(len(data) for data in sent) <= len(BIG)


async def test_pipelined_requests_are_answered_in_order(
    nursery: trio.Nursery, start_tunnel_server: Any, open_agent: Any, writes: Writes
) -> None:
    with trio.fail_after(10):
        async with _visiting(nursery, start_tunnel_server, open_agent) as (_origin, visitor):
            first = visitor.request("GET", "/chunked")
            await visitor.stream.send_all(first + first.replace(b"/chunked", b"/status/204"))
            assert (await visitor.response())[1] == b"hello"
            visitor.request("GET", "/status/204")  # h11's turn: sent already
            head, _ = await visitor.response()
            assert head.status_code == 204


async def _hypercorn(nursery: trio.Nursery, http_app: Any) -> int:
    """Serve ``http_app`` (HTTP scopes only) with Hypercorn; its port."""
    install_hypercorn_guard()
    apply_hypercorn_patches()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await http_app(scope, receive, send)

    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    urls: list[str] = await nursery.start(hypercorn.trio.serve, app, config)  # type: ignore[arg-type]
    return int(urls[0].rsplit(":", 1)[1])


async def test_an_app_that_leaves_after_a_held_head_still_sends_it(
    nursery: trio.Nursery, writes: Writes
) -> None:
    # An app that breaks its promise (marks the start, then ends without a
    # body) gets what Hypercorn gives any unfinished response: the head, then
    # the connection closed.
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": [], BODY_FOLLOWS: True}
        await send(start)

    port = await _hypercorn(nursery, app)
    with trio.fail_after(5):
        visitor = Visitor(await trio.open_tcp_stream("127.0.0.1", port))
        async with visitor.stream:
            await visitor.stream.send_all(visitor.request("GET", "/"))
            head = await visitor.next_event()
            assert isinstance(head, h11.Response)
            assert head.status_code == 200
            with pytest.raises(h11.RemoteProtocolError):
                await visitor.next_event()  # closed before the body's end


async def test_a_visitor_gone_before_the_body_costs_the_server_nothing(
    nursery: trio.Nursery, writes: Writes
) -> None:
    gone = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": [], BODY_FOLLOWS: True}
        if scope["path"] == "/leave":
            await send(start)
            assert (await receive())["type"] == "http.request"
            assert (await receive())["type"] == "http.disconnect"
            await send({"type": "http.response.body", "body": b"late", "more_body": False})
            gone.set()
            return
        await send(start)
        await send({"type": "http.response.body", "body": b"fine", "more_body": False})

    port = await _hypercorn(nursery, app)
    with trio.fail_after(5):
        leaving = await trio.open_tcp_stream("127.0.0.1", port)
        await leaving.send_all(Visitor(leaving).request("GET", "/leave"))
        await leaving.aclose()
        await gone.wait()
        visitor = Visitor(await trio.open_tcp_stream("127.0.0.1", port))
        async with visitor.stream:
            assert (await visitor.get("/"))[1] == b"fine"


async def _h2_get(port: int, method: bytes, path: bytes) -> tuple[int, bytes]:
    """One HTTP/2 request with prior knowledge: its status and body."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [
        (b":method", method),
        (b":scheme", b"http"),
        (b":authority", b"app.localhost"),
        (b":path", path),
    ]
    conn.send_headers(1, headers, end_stream=True)
    status, answer = 0, b""
    async with await trio.open_tcp_stream("127.0.0.1", port) as sock:
        await sock.send_all(conn.data_to_send())
        while True:
            data = await sock.receive_some(65536)
            assert data, "closed before the answer ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    answer += event.data
                elif isinstance(event, h2.events.StreamEnded):
                    return status, answer
            await sock.send_all(conn.data_to_send())


async def test_http2_visitors_get_the_same_answers(
    nursery: trio.Nursery, start_tunnel_server: Any, open_agent: Any
) -> None:
    # The mark on the start is for HTTP/1.1; HTTP/2 streams are written as before.
    with trio.fail_after(10):
        origin, server, agent = await _tunnel(nursery, start_tunnel_server, open_agent)
        async with agent:
            assert await _h2_get(server.port, b"GET", b"/cl") == (200, b"hello")
            assert await _h2_get(server.port, b"GET", b"/chunked") == (200, b"hello")
            assert await _h2_get(server.port, b"HEAD", b"/cl") == (200, b"")
            assert await _h2_get(server.port, b"GET", b"/status/204") == (204, b"")
            origin.release.set()
            assert await _h2_get(server.port, b"GET", b"/late") == (200, b"late!")
