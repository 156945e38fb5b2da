"""gRPC through the tunnel: real grpcio clients and a real grpcio server.

The visitor is a synchronous grpcio channel in a worker thread (every call has
its own gRPC deadline, and the thread is abandoned if the test's cap passes
first); the local service is ``grpc.aio`` on its own loop in another thread
(``tests/grpc_service.py``). The channel dials the tunnel server with HTTP/2
prior knowledge (or TLS) and names ``app.localhost`` as ``:authority``.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar, TypeVar

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trustme
from faultproxy import FaultProxy
from grpc_service import GrpcService, call_options
from processes import start_agent

T = TypeVar("T")


def _ident(data: bytes) -> bytes:
    return data


async def in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking grpcio call in a worker thread; a test's cap still ends the wait."""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


@pytest.fixture
async def grpc_service() -> AsyncIterator[GrpcService]:
    service = GrpcService()
    await trio.to_thread.run_sync(service.start)
    try:
        yield service
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(service.stop)


class Calls:
    """A grpcio channel to one address and its methods on ``/test.Echo/``."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.unary = channel.unary_unary(
            "/test.Echo/Unary", request_serializer=_ident, response_deserializer=_ident
        )
        self.fail = channel.unary_unary(
            "/test.Echo/Fail", request_serializer=_ident, response_deserializer=_ident
        )
        self.sleep = channel.unary_unary(
            "/test.Echo/Sleep", request_serializer=_ident, response_deserializer=_ident
        )
        self.server_stream = channel.unary_stream(
            "/test.Echo/ServerStream", request_serializer=_ident, response_deserializer=_ident
        )
        self.client_stream = channel.stream_unary(
            "/test.Echo/ClientStream", request_serializer=_ident, response_deserializer=_ident
        )
        self.bidi = channel.stream_stream(
            "/test.Echo/Bidi", request_serializer=_ident, response_deserializer=_ident
        )


@pytest.fixture
def channel() -> Iterator[Callable[..., Calls]]:
    """``channel(port)``: an insecure (h2c prior knowledge) channel; closed after the test."""
    opened: list[grpc.Channel] = []

    def open_(port: int, *, credentials: grpc.ChannelCredentials | None = None, **kw: Any) -> Calls:
        target = f"127.0.0.1:{port}"
        options = call_options(**kw)
        if credentials is None:
            chan = grpc.insecure_channel(target, options=options)
        else:
            chan = grpc.secure_channel(target, credentials, options=options)
        opened.append(chan)
        return Calls(chan)

    yield open_
    for chan in opened:
        chan.close()


@pytest.fixture
async def through(tunnel_server, grpc_service, open_agent, channel) -> AsyncIterator[Calls]:
    """A channel through the tunnel to ``grpc_service``, the agent speaking h2c."""
    async with open_agent(tunnel_server.port, grpc_service.port, local_protocol="h2c"):
        yield channel(tunnel_server.port)


async def test_unary_with_metadata_both_ways(through, grpc_service):
    with trio.fail_after(10):

        def call() -> tuple[bytes, Any, Any]:
            response, rpc = through.unary.with_call(
                b"hello", timeout=5, metadata=(("x-initial", "from-client"),)
            )
            return response, rpc.initial_metadata(), rpc.trailing_metadata()

        response, initial, trailing = await in_thread(call)
    assert response == b"hello"
    assert ("x-initial", "from-client") in initial
    assert ("x-trailing", "5") in trailing


async def test_error_status_details_and_metadata_trailers_only(through):
    with trio.fail_after(10):

        def call() -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as info:
                through.fail(b"NOT_FOUND", timeout=5)
            return info.value

        error = await in_thread(call)
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert error.details() == "no such thing"
    assert ("x-why", "testing") in error.trailing_metadata()


async def test_server_streaming_arrives_as_produced(through, grpc_service):
    with trio.fail_after(15):

        def call() -> list[bytes]:
            received = []
            for message in through.server_stream(b"1000", timeout=10):
                received.append(message)
                # The service holds back its last message until this is set:
                # the first one crossed the tunnel on its own.
                grpc_service.first_seen.set()
            return received

        received = await in_thread(call)
    assert received == [b"%d" % i for i in range(1000)]


async def test_client_streaming(through):
    with trio.fail_after(10):
        messages = [b"x" * i for i in range(200)]
        answer = await in_thread(lambda: through.client_stream(iter(messages), timeout=5))
    assert answer == b"200,%d" % sum(range(200))


async def test_bidi_ping_pong_on_one_call(through):
    with trio.fail_after(15):

        def call() -> list[bytes]:
            import queue

            outbox: queue.Queue[bytes | None] = queue.Queue(maxsize=1)

            def requests() -> Iterator[bytes]:
                while (message := outbox.get(timeout=5)) is not None:
                    yield message

            outbox.put(b"0")
            answers = []
            responses = through.bidi(requests(), timeout=10)
            for answer in responses:
                answers.append(answer)
                # The next ping goes only once its pong came back: 100 round trips.
                outbox.put(b"%d" % len(answers) if len(answers) < 100 else None)
            return answers

        answers = await in_thread(call)
    assert answers == [b"pong %d" % i for i in range(100)]


async def test_deadline_expires_and_the_handler_is_cancelled(through, grpc_service):
    with trio.fail_after(10):

        def call() -> tuple[grpc.RpcError, float]:
            with pytest.raises(grpc.RpcError) as info:
                through.sleep(b"30", timeout=0.5)
            return info.value, time.monotonic()

        error, failed_at = await in_thread(call)
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await in_thread(lambda: grpc_service.cancelled.wait(5))
    assert grpc_service.cancelled_at is not None
    assert grpc_service.cancelled_at < failed_at + 0.1


async def test_client_cancellation_reaches_the_handler_within_100ms(through, grpc_service):
    with trio.fail_after(10):

        def call() -> float:
            future = through.sleep.future(b"30", timeout=20)
            time.sleep(0.3)  # the call is in the handler by now
            cancelled_at = time.monotonic()
            future.cancel()
            return cancelled_at

        cancelled_at = await in_thread(call)
        await in_thread(lambda: grpc_service.cancelled.wait(5))
    assert grpc_service.cancelled_at is not None
    assert grpc_service.cancelled_at - cancelled_at < 0.1


async def test_sixteen_mib_messages_both_ways(through):
    message = bytes(range(256)) * (1 << 16)  # 16 MiB
    with trio.fail_after(30):
        answer = await in_thread(lambda: through.unary(message, timeout=25))
    assert answer == message


async def test_hundred_concurrent_calls_on_one_channel(through, grpc_service):
    with trio.fail_after(20):

        def call() -> list[bytes]:
            futures = [through.unary.future(b"call %d" % i, timeout=15) for i in range(100)]
            return [future.result() for future in futures]

        answers = await in_thread(call)
    assert answers == [b"call %d" % i for i in range(100)]
    assert grpc_service.calls == 100


async def test_agent_killed_mid_stream_ends_the_call_unavailable(
    tunnel_server, grpc_service, channel
):
    calls = channel(tunnel_server.port)
    agent = await start_agent(
        tunnel_server.port, grpc_service.port, "app.localhost", "--local-protocol", "h2c"
    )
    try:
        with trio.fail_after(20):
            await agent.wait_for_line("connected", 15)
            got_first = trio.Event()
            token = trio.lowlevel.current_trio_token()

            def call() -> tuple[grpc.RpcError, float]:
                responses = calls.server_stream(b"1000", timeout=15)
                # The service holds its last message back (first_seen unset).
                next(responses)
                token.run_sync_soon(got_first.set)
                with pytest.raises(grpc.RpcError) as info:
                    for _ in responses:
                        pass
                return info.value, time.monotonic()

            async with trio.open_nursery() as nursery:
                outcome: list[tuple[grpc.RpcError, float]] = []

                async def run_call() -> None:
                    outcome.append(await in_thread(call))

                nursery.start_soon(run_call)
                await got_first.wait()
                killed_at = time.monotonic()
                await agent.kill()
        error, failed_at = outcome[0]
        assert error.code() is grpc.StatusCode.UNAVAILABLE, error
        # The server said so itself, in the call's own trailers.
        assert error.details().startswith("tunnel: the agent for app.localhost is unavailable")
        assert failed_at - killed_at < 2
    finally:
        grpc_service.first_seen.set()
        await agent.aclose()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_channel_to_the_server_and_tls_to_the_local_service(
    tmp_path, ca, start_tunnel_server, open_agent, channel
):
    # The public side: HTTPS with ALPN h2, a grpcio channel with TLS credentials.
    cert = ca.issue_cert("app.localhost", "127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(cert_file), append=True)
    ca.cert_pem.write_to_path(str(ca_file))
    server = await start_tunnel_server(certificate=str(cert_file), key=str(key_file))
    # The local side: a gRPC server with TLS, reached with HTTP/2 over TLS (ALPN).
    local_cert = ca.issue_cert("127.0.0.1")
    chain = b"".join(blob.bytes() for blob in local_cert.cert_chain_pems)
    service = GrpcService(tls=(local_cert.private_key_pem.bytes(), chain))
    await trio.to_thread.run_sync(service.start)
    try:
        with trio.fail_after(15):
            async with open_agent(
                server.port,
                service.port,
                address=f"wss://127.0.0.1:{server.port}",
                ca_file=str(ca_file),
                local_protocol="h2",
                local_ca_file=str(ca_file),
            ):
                credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
                calls = channel(server.port, credentials=credentials)
                # TLS checks the name in the certificate against the authority.
                answer = await in_thread(lambda: calls.unary(b"over tls", timeout=5))
                assert answer == b"over tls"
                error = await in_thread(lambda: _failure(calls, b"PERMISSION_DENIED"))
                assert error.code() is grpc.StatusCode.PERMISSION_DENIED
                assert error.details() == "no such thing"
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(service.stop)


def _failure(calls: Calls, code: bytes) -> grpc.RpcError:
    try:
        calls.fail(code, timeout=5)
    except grpc.RpcError as error:
        return error
    raise AssertionError("the call succeeded")


# -- plain HTTP/2 to a local ASGI app under Hypercorn (local_protocol="h2c") ----


async def _echo_with_trailers(scope: dict, receive: Any, send: Any) -> None:
    """Echo each request chunk as it arrives; end with a trailer of the body's SHA-256."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"trailer", b"x-sha256"), (b"x-version", scope["http_version"].encode())],
            "trailers": True,
        }
    )
    digest = hashlib.sha256()
    more = True
    while more:
        message = await receive()
        body, more = message.get("body", b""), message.get("more_body", False)
        digest.update(body)
        if body:
            await send({"type": "http.response.body", "body": body, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    await send(
        {"type": "http.response.trailers", "headers": [(b"x-sha256", digest.hexdigest().encode())]}
    )


class H2Visitor:
    """A bare HTTP/2 client (prior knowledge) that sees frames as they come, trailers too."""

    def __init__(self, socket: trio.SocketStream) -> None:
        self.socket = socket
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )

    async def flush(self) -> None:
        await self.socket.send_all(self.conn.data_to_send())

    async def events(self) -> list[h2.events.Event]:
        data = await self.socket.receive_some(1 << 20)
        assert data, "the server closed the connection"
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        await self.flush()
        return events


async def test_plain_http2_streams_both_ways_with_trailers(tunnel_server, open_agent, nursery):
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    urls = await nursery.start(hypercorn.trio.serve, _echo_with_trailers, config)
    local_port = int(urls[0].rsplit(":", 1)[1])
    chunks = [os.urandom(1000 * (i + 1)) for i in range(5)]
    with trio.fail_after(10):
        async with open_agent(tunnel_server.port, local_port, local_protocol="h2c"):
            visitor = H2Visitor(await trio.open_tcp_stream("127.0.0.1", tunnel_server.port))
            async with visitor.socket:
                visitor.conn.initiate_connection()
                sid = visitor.conn.get_next_available_stream_id()
                visitor.conn.send_headers(
                    sid,
                    [
                        (b":method", b"POST"),
                        (b":scheme", b"http"),
                        (b":authority", b"app.localhost"),
                        (b":path", b"/echo"),
                        (b"te", b"trailers"),
                    ],
                )
                await visitor.flush()
                headers: list[tuple[bytes, bytes]] = []
                trailers: list[tuple[bytes, bytes]] = []
                echoed = b""
                pongs: list[bytes] = []
                for chunk in chunks:
                    # Each chunk comes back before the next one is sent: both
                    # directions stream, nothing waits for the whole body.
                    visitor.conn.send_data(sid, chunk)
                    # Keepalive PINGs are the server's to answer, mid-stream.
                    visitor.conn.ping(b"%08d" % len(pongs))
                    await visitor.flush()
                    while not echoed.endswith(chunk):
                        for event in await visitor.events():
                            if isinstance(event, h2.events.ResponseReceived):
                                headers = event.headers
                            elif isinstance(event, h2.events.DataReceived):
                                echoed += event.data
                            elif isinstance(event, h2.events.PingAckReceived):
                                pongs.append(event.ping_data)
                visitor.conn.end_stream(sid)
                await visitor.flush()
                ended = False
                while not ended:
                    for event in await visitor.events():
                        if isinstance(event, h2.events.TrailersReceived):
                            trailers = event.headers
                        elif isinstance(event, h2.events.StreamEnded):
                            ended = True
                        elif isinstance(event, h2.events.PingAckReceived):
                            pongs.append(event.ping_data)
                        elif isinstance(event, h2.events.StreamReset):
                            raise AssertionError(f"reset: {event}")
    assert (b":status", b"200") in headers
    # The local service was spoken to over HTTP/2.
    assert (b"x-version", b"2") in headers
    assert echoed == b"".join(chunks)
    assert sorted(pongs) == [b"%08d" % i for i in range(len(chunks))]
    assert trailers == [(b"x-sha256", hashlib.sha256(echoed).hexdigest().encode())]


# -- local_protocol="auto" (the default) ---------------------------------------


async def test_auto_sends_grpc_over_http2(tunnel_server, grpc_service, open_agent, channel):
    with trio.fail_after(10):
        async with open_agent(tunnel_server.port, grpc_service.port):
            calls = channel(tunnel_server.port)
            assert await in_thread(lambda: calls.unary(b"auto", timeout=5)) == b"auto"
            error = await in_thread(lambda: _failure(calls, b"ALREADY_EXISTS"))
            assert error.code() is grpc.StatusCode.ALREADY_EXISTS


class _Http1Only(http.server.BaseHTTPRequestHandler):
    """Python's own HTTP/1.1 server: no HTTP/2 at all."""

    protocol_version = "HTTP/1.1"
    first_lines: ClassVar[list[bytes]] = []

    def parse_request(self) -> bool:
        self.first_lines.append(self.raw_requestline.strip())
        return super().parse_request()

    def do_GET(self) -> None:
        body = self.headers.get("te", "-").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


async def test_auto_falls_back_to_http1_and_asks_once(tunnel_server, open_agent, visitor):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Http1Only)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with trio.fail_after(10):
            async with (
                open_agent(tunnel_server.port, server.server_address[1]),
                visitor(tunnel_server.port) as http_client,
            ):
                for _ in range(3):
                    # TE: trailers asks for HTTP/2; the service has none to give.
                    response = await http_client.get("/", headers={"te": "trailers"})
                    assert response.status_code == 200
    finally:
        await trio.to_thread.run_sync(server.shutdown)
        server.server_close()
        thread.join(5)
    # One HTTP/2 attempt (the preface), then plain HTTP/1.1 every time.
    assert _Http1Only.first_lines.count(b"PRI * HTTP/2.0") == 1
    assert _Http1Only.first_lines.count(b"GET / HTTP/1.1") == 3


async def test_local_stream_lost_mid_response_resets_the_visitors(
    tunnel_server, open_agent, nursery
):
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    urls = await nursery.start(hypercorn.trio.serve, _echo_with_trailers, config)
    proxy = await nursery.start(FaultProxy(int(urls[0].rsplit(":", 1)[1])).run)
    with trio.fail_after(10):
        async with open_agent(tunnel_server.port, proxy.port, local_protocol="h2c"):
            visitor = H2Visitor(await trio.open_tcp_stream("127.0.0.1", tunnel_server.port))
            async with visitor.socket:
                visitor.conn.initiate_connection()
                sid = visitor.conn.get_next_available_stream_id()
                visitor.conn.send_headers(sid, _post(b"/echo"))
                visitor.conn.send_data(sid, b"first")
                await visitor.flush()
                echoed = b""
                while echoed != b"first":
                    for event in await visitor.events():
                        if isinstance(event, h2.events.DataReceived):
                            echoed += event.data
                # The agent's connection to the local service dies mid-response.
                proxy.cut()
                with trio.fail_after(2):
                    reset = None
                    while reset is None:
                        for event in await visitor.events():
                            assert not isinstance(event, h2.events.StreamEnded)
                            if isinstance(event, h2.events.StreamReset):
                                reset = event
    # Not a clean end (it wasn't one), and not a hang: a reset, as the agent's.
    assert reset.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR


def _post(path: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"app.localhost"),
        (b":path", path),
        (b"te", b"trailers"),
    ]


async def test_a_call_may_outlast_the_servers_response_timeout(
    start_tunnel_server, grpc_service, open_agent, channel
):
    # gRPC calls carry their own deadline; the server's wait for response
    # headers (a 504 for plain HTTP) does not cut them short.
    server = await start_tunnel_server(response_timeout=0.3)
    with trio.fail_after(10):
        async with open_agent(server.port, grpc_service.port, local_protocol="h2c"):
            calls = channel(server.port)
            assert await in_thread(lambda: calls.sleep(b"0.8", timeout=5)) == b"slept"


async def test_one_connection_within_the_services_stream_limit_replaced_when_lost(
    tunnel_server, open_agent, channel, nursery
):
    # The service takes 4 streams at a time; the rest wait at the agent.
    service = GrpcService(options=[("grpc.max_concurrent_streams", 4)])
    await trio.to_thread.run_sync(service.start)
    proxy = await nursery.start(FaultProxy(service.port).run)
    try:
        with trio.fail_after(15):
            async with open_agent(tunnel_server.port, proxy.port, local_protocol="h2c"):
                calls = channel(tunnel_server.port)

                def twenty() -> list[bytes]:
                    futures = [calls.sleep.future(b"0.1", timeout=10) for _ in range(20)]
                    return [future.result() for future in futures]

                assert await in_thread(twenty) == [b"slept"] * 20
                assert proxy.statistics.accepted == 1
                # The connection dies; the next call gets a new one.
                proxy.cut()
                assert await in_thread(lambda: calls.unary(b"again", timeout=5)) == b"again"
                assert proxy.statistics.accepted == 2
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(service.stop)


class _RefusingService:
    """A bare h2c service: refuses its first ``refuse`` streams once each whole
    request arrived (as a busy gRPC server does), then echoes the body."""

    def __init__(self, refuse: int) -> None:
        self.refuse = refuse
        self.bodies: list[bytes] = []

    async def handle(self, socket: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        await socket.send_all(conn.data_to_send())
        bodies: dict[int, bytes] = {}
        while data := await socket.receive_some(1 << 16):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    bodies[event.stream_id] = b""
                elif isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    body = bodies.pop(event.stream_id)
                    self.bodies.append(body)
                    if len(self.bodies) <= self.refuse:
                        conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    else:
                        conn.send_headers(event.stream_id, [(b":status", b"200")])
                        conn.send_data(event.stream_id, body, end_stream=True)
            await socket.send_all(conn.data_to_send())


async def _serve_raw(nursery: trio.Nursery, handle: Callable[[trio.SocketStream], Any]) -> int:
    """Serve ``handle`` on a raw TCP listener on 127.0.0.1; the port."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


@pytest.mark.parametrize("size", [0, 1000, 65536])
async def test_a_refused_stream_is_sent_again_with_its_body(
    tunnel_server, open_agent, visitor, nursery, size
):
    # REFUSED_STREAM means "never processed": the agent sends the request
    # again, body included, and the visitor never learns of the refusal.
    service = _RefusingService(refuse=2)
    port = await _serve_raw(nursery, service.handle)
    body = os.urandom(size)
    with trio.fail_after(10):
        async with (
            open_agent(tunnel_server.port, port, local_protocol="h2c"),
            visitor(tunnel_server.port) as http_client,
        ):
            response = await http_client.post("/echo", content=body)
    assert response.status_code == 200
    assert response.content == body
    assert service.bodies == [body] * 3


async def test_a_refused_stream_with_a_body_too_big_to_keep_is_not_sent_again(
    tunnel_server, open_agent, visitor, nursery
):
    # 1 MiB: more than the agent keeps (64 KiB), and more than the server
    # keeps past the first piece Hypercorn hands it, so neither sends it again.
    service = _RefusingService(refuse=1)
    port = await _serve_raw(nursery, service.handle)
    with trio.fail_after(10):
        async with (
            open_agent(tunnel_server.port, port, local_protocol="h2c"),
            visitor(tunnel_server.port) as http_client,
        ):
            response = await http_client.post("/echo", content=os.urandom(1 << 20))
            assert response.status_code == 502
            # The next request is served as usual.
            assert (await http_client.post("/echo", content=b"next")).content == b"next"
    assert len(service.bodies) == 2


class _BigDownload:
    """An ASGI app that streams ``size`` bytes in 1 MiB chunks and counts what it got out."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"x" * (1 << 20)
        while self.sent < self.size:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.sent += len(chunk)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_a_visitor_that_does_not_read_holds_the_local_service_back(
    tunnel_server, open_agent, nursery
):
    size = 64 << 20
    app = _BigDownload(size)
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    urls = await nursery.start(hypercorn.trio.serve, app, config)
    local_port = int(urls[0].rsplit(":", 1)[1])
    with trio.fail_after(40):
        async with open_agent(tunnel_server.port, local_port, local_protocol="h2c"):
            visitor = H2Visitor(await trio.open_tcp_stream("127.0.0.1", tunnel_server.port))
            async with visitor.socket:
                visitor.conn.initiate_connection()
                sid = visitor.conn.get_next_available_stream_id()
                get = [(k, v) for k, v in _post(b"/big") if k != b":method"]
                visitor.conn.send_headers(sid, [(b":method", b"GET"), *get], end_stream=True)
                await visitor.flush()
                # The visitor reads nothing (its window is 64 KiB): the local
                # service's sends stop once the windows on the way are full.
                sent = -1
                while sent != app.sent:
                    sent = app.sent
                    await trio.sleep(0.5)
                # The agent's windows, the tunnel stream's, Hypercorn's buffers:
                # some tens of MiB at most, never the whole response.
                assert sent <= 40 << 20, sent >> 20
                # Now it reads, with room to read fast: everything arrives.
                visitor.conn.increment_flow_control_window(64 << 20)
                visitor.conn.increment_flow_control_window(64 << 20, stream_id=sid)
                await visitor.flush()
                received = 0
                ended = False
                while not ended:
                    for event in await visitor.events():
                        if isinstance(event, h2.events.DataReceived):
                            received += len(event.data)
                        elif isinstance(event, h2.events.StreamEnded):
                            ended = True
    assert received == size


class _StalledService:
    """A bare h2c service that reads nothing until ``release`` is set.

    It leaves each request's DATA unacknowledged, so its flow-control windows
    fill and the agent must stop sending; once released it reads everything
    and answers with the body's SHA-256. It counts the PINGs it gets.
    """

    def __init__(self) -> None:
        self.release = trio.Event()
        self.received = 0
        self.pings = 0

    async def handle(self, socket: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        await socket.send_all(conn.data_to_send())
        digests: dict[int, Any] = {}
        unread: list[tuple[int, int]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_when_released, socket, conn, unread)
            while data := await socket.receive_some(1 << 16):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.PingReceived):
                        self.pings += 1
                    elif isinstance(event, h2.events.RequestReceived):
                        digests[event.stream_id] = hashlib.sha256()
                    elif isinstance(event, h2.events.DataReceived):
                        self.received += len(event.data)
                        digests[event.stream_id].update(event.data)
                        size = event.flow_controlled_length
                        if self.release.is_set():
                            conn.acknowledge_received_data(size, event.stream_id)
                        else:
                            unread.append((size, event.stream_id))
                    elif isinstance(event, h2.events.StreamEnded):
                        digest = digests.pop(event.stream_id).hexdigest().encode()
                        conn.send_headers(event.stream_id, [(b":status", b"200")])
                        conn.send_data(event.stream_id, digest, end_stream=True)
                await socket.send_all(conn.data_to_send())
            nursery.cancel_scope.cancel()

    async def _read_when_released(
        self, socket: trio.SocketStream, conn: h2.connection.H2Connection, unread: list
    ) -> None:
        await self.release.wait()
        for size, stream_id in unread:
            conn.acknowledge_received_data(size, stream_id)
        await socket.send_all(conn.data_to_send())


async def test_an_upload_to_a_local_service_that_does_not_read_holds_the_visitor_back(
    tunnel_server, open_agent, nursery
):
    # The mirror of the test above: an HTTP/2 local service that takes no
    # data (its window is 64 KiB) stops the visitor's upload once the windows
    # and buffers on the way are full; nothing holds the whole body.
    service = _StalledService()
    local_port = await _serve_raw(nursery, service.handle)
    size, piece = 64 << 20, os.urandom(1 << 16)
    sent = 0
    answer = bytearray()

    async def upload(socket: trio.SocketStream) -> None:
        nonlocal sent
        head = b"POST /upload HTTP/1.1\r\nhost: app.localhost\r\ncontent-length: %d\r\n\r\n"
        await socket.send_all(head % size)
        while sent < size:
            await socket.send_all(piece)
            sent += len(piece)
        while data := await socket.receive_some(1 << 16):
            answer.extend(data)

    with trio.fail_after(60):
        async with open_agent(tunnel_server.port, local_port, local_protocol="h2c"):
            socket = await trio.open_tcp_stream("127.0.0.1", tunnel_server.port)
            async with socket, trio.open_nursery() as visit:
                visit.start_soon(upload, socket)
                last = -1
                while sent != last:
                    last = sent
                    await trio.sleep(0.5)
                # Kernel buffers, Hypercorn's, the tunnel stream's window, the
                # agent's: some tens of MiB at most, never the whole body.
                assert sent <= 40 << 20, sent >> 20
                assert service.received <= 1 << 20, service.received
                service.release.set()
    digest = hashlib.sha256(piece * (size // len(piece))).hexdigest().encode()
    assert answer.startswith(b"HTTP/1.1 200"), bytes(answer[:200])
    assert b"\r\n" + digest + b"\r\n" in answer  # chunked: the answer's length was not given
    assert service.received == size


async def test_a_visitors_pings_are_answered_by_the_server_and_never_reach_the_local_service(
    tunnel_server, open_agent, nursery
):
    service = _StalledService()
    service.release.set()
    local_port = await _serve_raw(nursery, service.handle)
    with trio.fail_after(20):
        async with open_agent(tunnel_server.port, local_port, local_protocol="h2c"):
            visitor = H2Visitor(await trio.open_tcp_stream("127.0.0.1", tunnel_server.port))
            async with visitor.socket:
                visitor.conn.initiate_connection()
                sid = visitor.conn.get_next_available_stream_id()
                visitor.conn.send_headers(sid, _post(b"/pings"))
                pongs = 0
                for n in range(10):
                    visitor.conn.send_data(sid, b"x" * 100)
                    visitor.conn.ping(b"%08d" % n)
                    await visitor.flush()
                    while pongs <= n:
                        for event in await visitor.events():
                            pongs += isinstance(event, h2.events.PingAckReceived)
                visitor.conn.end_stream(sid)
                await visitor.flush()
                ended = False
                while not ended:
                    for event in await visitor.events():
                        ended = ended or isinstance(event, h2.events.StreamEnded)
    assert pongs == 10
    assert service.received == 1000
    assert service.pings == 0


async def test_finished_calls_leave_hypercorns_stream_tables_at_once(
    through, grpc_service, monkeypatch
):
    # Every gRPC response ends with trailers; Hypercorn let go of such a
    # stream only when its sender next visited it, and under a steady load
    # the finished ones piled up until the priority tree refused its 1,001st
    # stream and the connection failed. The most streams Hypercorn holds when
    # a new one arrives stays near the calls in flight.
    import hypercorn.protocol.h2 as hypercorn_h2

    held: list[int] = []
    create = hypercorn_h2.H2Protocol._create_stream

    async def counting(self: Any, request: Any) -> None:
        held.append(max(len(self.stream_buffers), len(self.priority._streams) - 1))
        await create(self, request)

    monkeypatch.setattr(hypercorn_h2.H2Protocol, "_create_stream", counting)
    calls, in_flight = 1500, 50
    with trio.fail_after(60):

        def call() -> int:
            # A steady load: a new call as soon as one ends, as a busy client has.
            slots = threading.Semaphore(in_flight)
            futures = []
            for i in range(calls):
                slots.acquire()
                future = through.unary.future(b"call %d" % i, timeout=30)
                future.add_done_callback(lambda _: slots.release())
                futures.append(future)
            return sum(1 for future in futures if future.result())

        answered = await in_thread(call)
    assert answered == calls
    assert len(held) >= calls
    assert max(held) <= in_flight + 10, f"Hypercorn held up to {max(held)} streams"
