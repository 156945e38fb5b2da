"""Node-to-node forwarding: a visitor of a node without the agent is served by the node with it.

Two nodes in this process, each a real :class:`tunnel.TunnelApp` under real
Hypercorn on 127.0.0.1; real agents (``tunnel.open_tunnel``) on node B, real
local services, visitors on node A. Where a host's agents are is a dict here
(``locate``); in a cluster it is the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trio_websocket
import trustme
from faultproxy import FaultProxy
from grpc_service import GrpcService, call_options

import tunnel
from helpers import STREAM_CHUNK_1, LocalService, echo_websocket, eventually, free_port
from tunnel._protocol.peer import (
    PEER_NODE_HEADER,
    PEER_NONCE_HEADER,
    PEER_SIGNATURE_HEADER,
    PEER_SUBPROTOCOL,
    PEER_TIME_HEADER,
)
from tunnel.server import hypercorn_config

TOKEN = "s3cret"
SECRET = "the cluster secret, 32 characters"
HOST = "app.localhost"
#: The visitor's own address: not the one the nodes talk to each other from.
VISITOR_ADDRESS = "127.0.0.2"
MiB = 1 << 20


@dataclass
class Node:
    """A node: its app, its port, and where it believes each host's agents are."""

    app: tunnel.TunnelApp
    port: int
    where: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    located: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def locate(self, key: str) -> list[tuple[str, str]]:
        self.located.append(key)
        return self.where.get(key, [])


async def _run_node(
    config: tunnel.ServerConfig, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED
) -> None:
    app = tunnel.TunnelApp(config)
    node = Node(app, 0)
    app.locate = node.locate
    hc = hypercorn_config(config)
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(partial(hypercorn.trio.serve, app, hc))  # type: ignore[arg-type]
        node.port = int(urls[0].rsplit(":", 1)[1])
        task_status.started(node)


StartNode = Callable[..., Any]


@pytest.fixture
def start_node(nursery: trio.Nursery) -> StartNode:
    """``await start_node(node_id, **ServerConfig overrides)``: a node of one cluster."""

    async def start(node_id: str, **overrides: Any) -> Node:
        settings: dict[str, Any] = {
            "address": "127.0.0.1:0",
            "tokens": frozenset({TOKEN}),
            "node_id": node_id,
            "cluster_secret": SECRET,
            "grace_period": 2.0,
        }
        settings.update(overrides)
        node: Node = await nursery.start(_run_node, tunnel.ServerConfig(**settings))
        return node

    return start


@pytest.fixture
async def pair(start_node: StartNode) -> tuple[Node, Node]:
    """Nodes A and B; A believes B holds ``HOST``'s agents."""
    a = await start_node("a")
    b = await start_node("b")
    a.where[HOST] = [("b", b.address)]
    return a, b


def agent(node: Node, local_port: int, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "address": node.address,
        "token": TOKEN,
        "port": local_port,
        "host": HOST,
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
    }
    settings.update(overrides)
    return tunnel.open_tunnel(tunnel.ClientConfig(**settings))


def visit(node: Node, **kwargs: Any) -> httpx.AsyncClient:
    """A visitor of ``node``, from VISITOR_ADDRESS."""
    kwargs.setdefault("headers", {"host": HOST})
    transport = httpx.AsyncHTTPTransport(
        local_address=VISITOR_ADDRESS,
        http1=kwargs.pop("http1", True),
        http2=kwargs.pop("http2", False),
    )
    return httpx.AsyncClient(
        base_url=f"http://{node.address}",
        trust_env=False,
        timeout=httpx.Timeout(20.0),
        transport=transport,
        **kwargs,
    )


def header_values(echo: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in echo["headers"] if key == name]


async def test_get_is_served_by_the_agent_on_the_other_node(pair, local_service) -> None:
    a, b = pair
    with trio.fail_after(15):
        async with agent(b, local_service.port), visit(a) as http:
            response = await http.get("/hello?x=1", headers={"x-forwarded-for": "6.6.6.6"})
            assert response.status_code == 200
            echo = response.json()
            assert echo["path"] == "/hello"
            assert echo["query"] == "x=1"
            # Node A built the head, as for an agent of its own; node B passed
            # it on untouched (it would have added the address of node A).
            assert header_values(echo, "x-forwarded-for") == [VISITOR_ADDRESS]
            assert header_values(echo, "x-forwarded-host") == [HOST]
            assert header_values(echo, "x-forwarded-proto") == ["http"]
            assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
            # The second request takes the same link.
            assert (await http.get("/again")).json()["path"] == "/again"
            head = await http.head("/fixed")
            assert head.status_code == 200
            assert head.headers["content-length"] == "1234"
            assert head.content == b""
            assert (await http.get("/status/204")).status_code == 204
            assert a.app.peers.attempts(b.address) == 1
            assert list(a.app.peers.links()) == [b.address]
            # Node B never asked where the host is: it serves it.
            assert b.located == []


async def test_post_with_its_body_in_the_same_write_as_its_head(pair, local_service) -> None:
    a, b = pair
    with trio.fail_after(15):
        async with agent(b, local_service.port):
            stream = await trio.open_tcp_stream("127.0.0.1", a.port)
            async with stream:
                # As curl sends a small POST: head and body in one segment.
                await stream.send_all(
                    b"POST /form HTTP/1.1\r\nHost: app.localhost\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: 11\r\nConnection: close\r\n\r\nhello world"
                )
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    echo = json.loads(body)
    assert echo["method"] == "POST"
    assert echo["body"] == "hello world"


class Producer:
    """An upload body that counts what it produced; it pauses while ``stop`` is set."""

    def __init__(self, total: int, chunk: int = 256 << 10) -> None:
        self.total = total
        self.chunk = chunk
        self.produced = 0
        self.digest = hashlib.sha256()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        block = bytes(range(256)) * (self.chunk // 256)
        while self.produced < self.total:
            piece = block[: min(self.chunk, self.total - self.produced)]
            self.produced += len(piece)
            self.digest.update(piece)
            yield piece


class SlowService:
    """A local service that holds uploads unread, and streams downloads, until released."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.abandoned = trio.Event()
        self.uploaded = 0
        self.sent = 0
        self.port = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["path"] == "/abandoned":
            # Reads the body as it comes, and notes when its sender vanishes.
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.abandoned.set()
                    return
                self.uploaded += len(message.get("body", b""))
        if scope["path"] == "/upload":
            # Read one chunk, then nothing until released: what the visitor
            # sends meanwhile waits on the way, as far as the windows allow.
            digest = hashlib.sha256()
            first = await receive()
            digest.update(first.get("body", b""))
            length = len(first.get("body", b""))
            more = first.get("more_body", False)
            await self.release.wait()
            while more:
                message = await receive()
                chunk = message.get("body", b"")
                digest.update(chunk)
                length += len(chunk)
                more = message.get("more_body", False)
            body = json.dumps({"sha256": digest.hexdigest(), "length": length}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
        else:
            total = int(scope["query_string"] or b"0")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            block = bytes(range(256)) * 1024
            sent = 0
            while sent < total:
                piece = block[: min(len(block), total - sent)]
                sent += len(piece)
                self.sent += len(piece)
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


@pytest.fixture
async def slow_service(nursery: trio.Nursery) -> SlowService:
    service = SlowService()
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    (url,) = await nursery.start(hypercorn.trio.serve, service, config)
    service.port = int(url.rsplit(":", 1)[1])
    return service


async def settled(count: Callable[[], int]) -> int:
    """Wait until ``count()`` stops growing (the same over five looks 0.2 s apart)."""
    last, same = -1, 0
    while same < 5:
        await trio.sleep(0.2)
        now = count()
        same = same + 1 if now == last else 0
        last = now
    return last


#: More than all the buffers on the way hold together (every window of both
#: links, the writers' high water marks, the sockets'); a relay that held a
#: body whole would take all of it.
BIG = 128 * MiB
#: What the buffers on the way may hold, at most, while the far end reads nothing.
IN_FLIGHT = 64 * MiB


async def test_large_upload_streams_with_backpressure(pair, slow_service) -> None:
    a, b = pair
    body = Producer(BIG)
    with trio.fail_after(90):
        result: list[httpx.Response] = []
        async with (
            agent(b, slow_service.port),
            visit(a) as http,
            trio.open_nursery() as nursery,
        ):

            async def upload() -> None:
                result.append(await http.post("/upload", content=body))

            nursery.start_soon(upload)
            held = await settled(lambda: body.produced)
            # The local service reads nothing: the visitor is held back.
            assert held < IN_FLIGHT, held
            slow_service.release.set()
    (response,) = result
    assert response.status_code == 200
    assert response.json() == {"sha256": body.digest.hexdigest(), "length": BIG}


async def test_large_download_streams_with_backpressure(pair, slow_service) -> None:
    a, b = pair
    digest = hashlib.sha256()
    received = 0
    with trio.fail_after(90):
        async with (
            agent(b, slow_service.port),
            visit(a) as http,
            http.stream("GET", f"/download?{BIG}") as response,
        ):
            assert response.status_code == 200
            chunks = response.aiter_raw()
            first = await chunks.__anext__()
            digest.update(first)
            received += len(first)
            # The visitor reads nothing now: the local service is held back.
            held = await settled(lambda: slow_service.sent)
            assert held < IN_FLIGHT, held
            async for chunk in chunks:
                digest.update(chunk)
                received += len(chunk)
    block = bytes(range(256)) * 1024
    expected = hashlib.sha256()
    for start in range(0, BIG, len(block)):
        expected.update(block[: min(len(block), BIG - start)])
    assert received == BIG
    assert digest.hexdigest() == expected.hexdigest()


async def test_websocket_echo_through_the_other_node(pair, nursery) -> None:
    a, b = pair
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    (url,) = await nursery.start(hypercorn.trio.serve, echo_websocket, config)
    local_port = int(url.rsplit(":", 1)[1])
    with trio.fail_after(15):
        async with agent(b, local_port):
            stream = await trio.open_tcp_stream("127.0.0.1", a.port)
            async with stream, trio.open_nursery() as inner:
                ws = await trio_websocket.wrap_client_stream(
                    inner, stream, f"{HOST}:{a.port}", "/ws", max_message_size=8 * MiB
                )
                await ws.send_message("hello")
                assert await ws.get_message() == "echo: hello"
                big = bytes(range(256)) * (900 * 1024 // 256)  # under max_websocket_message
                await ws.send_message(big)
                assert await ws.get_message() == big
                await ws.aclose()
                inner.cancel_scope.cancel()


async def test_visitor_leaving_mid_response_reaches_the_local_service(
    pair, local_service: LocalService
) -> None:
    a, b = pair
    with trio.fail_after(15):
        async with agent(b, local_service.port):
            async with visit(a) as http, http.stream("GET", "/watch") as response:
                assert response.status_code == 200
                received = b""
                with trio.CancelScope() as reading:
                    async for chunk in response.aiter_raw():
                        received += chunk
                        if len(received) >= len(STREAM_CHUNK_1):
                            reading.cancel()
                assert received == STREAM_CHUNK_1
                assert not local_service.disconnected.is_set()
            # The visitor's connection closed: A resets its stream to B, B its
            # stream to the agent, the agent its connection to the service.
            with trio.fail_after(5):
                await local_service.disconnected.wait()


async def test_a_forwarded_request_is_never_forwarded_again(pair) -> None:
    """No agent anywhere, each node believing the other has it: one hop, then 502."""
    a, b = pair
    b.where[HOST] = [("a", a.address)]
    with trio.fail_after(15):
        async with visit(a) as http:
            response = await http.get("/")
    assert response.status_code == 502
    assert "node b" in response.text
    # Node B answered from its own registry: it never looked the host up, nor
    # dialled node A.
    assert b.located == []
    assert b.app.peers.links() == {}
    assert b.app.peers.attempts(a.address) == 0


async def test_a_node_with_another_secret_is_refused(
    start_node: StartNode, local_service: LocalService, caplog: pytest.LogCaptureFixture
) -> None:
    b = await start_node("b")
    stranger = await start_node("x", cluster_secret="not the cluster secret at all")
    stranger.where[HOST] = [("b", b.address)]
    caplog.set_level(logging.INFO, logger="tunnel.server")
    with trio.fail_after(15):
        async with agent(b, local_service.port), visit(stranger) as http:
            response = await http.get("/")
    assert response.status_code == 502
    assert "cannot reach" in response.text
    refusals = [r.getMessage() for r in caplog.records if "peer_refused" in r.getMessage()]
    assert refusals, "node B logged no refusal"
    assert "status=403" in refusals[0], refusals
    assert stranger.app.peers.links() == {}


async def _dial(port: int, headers: list[tuple[bytes, bytes]]) -> None:
    """A peer's handshake with ``headers``; raises its refusal."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                f"127.0.0.1:{port}",
                "/_tunnel/peer",
                subprotocols=[PEER_SUBPROTOCOL],
                extra_headers=headers,
            )
            await ws.aclose()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        await stream.aclose()


async def test_a_handshake_without_the_signature_is_refused(start_node: StartNode) -> None:
    b = await start_node("b")
    with trio.fail_after(10):
        for headers in (
            [],
            [
                (PEER_NODE_HEADER.encode(), b"x"),
                (PEER_TIME_HEADER.encode(), b"1"),
                (PEER_NONCE_HEADER.encode(), b"00"),
                (PEER_SIGNATURE_HEADER.encode(), b"0" * 64),
            ],
        ):
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                await _dial(b.port, headers)
            assert refused.value.status_code in (400, 403)


async def test_a_lost_link_is_dialled_again_for_the_next_request(
    pair, local_service: LocalService, nursery: trio.Nursery
) -> None:
    a, b = pair
    proxy: FaultProxy = await nursery.start(FaultProxy(b.port).run)
    through = f"127.0.0.1:{proxy.port}"
    a.where[HOST] = [("b", through)]
    with trio.fail_after(20):
        async with agent(b, local_service.port), visit(a) as http:
            assert (await http.get("/one")).status_code == 200
            assert a.app.peers.attempts(through) == 1
            proxy.cut()
            await eventually(lambda: not a.app.peers.links())
            response = await http.get("/two")
            assert response.status_code == 200
            assert response.json()["path"] == "/two"
            assert a.app.peers.attempts(through) == 2
            assert list(a.app.peers.links()) == [through]
            (peer,) = a.app.peers.statistics()
            assert (peer.node, peer.address, peer.up) == ("b", through, True)
            assert (peer.dials, peer.failed_dials) == (2, 0)
            assert peer.last_error  # why the first link was lost


async def test_stalled_downloads_of_one_tunnel_do_not_stall_the_others(pair, slow_service) -> None:
    """Visitors who stop reading hold their own streams' windows, not the link's.

    One link carries every tunnel between two nodes; with an agent link's
    windows (8 MiB a stream, 16 MiB in all) two such visitors of one tunnel
    would stop every response of every other tunnel from node B to node A.
    """
    a, b = pair
    other = "other.localhost"
    a.where[other] = [("b", b.address)]
    with trio.fail_after(60):
        async with (
            agent(b, slow_service.port),
            agent(b, slow_service.port, host=other),
            trio.open_nursery() as nursery,
        ):
            stalled = trio.Semaphore(0)

            async def stall() -> None:
                stream = await trio.open_tcp_stream("127.0.0.1", a.port)
                async with stream:
                    await stream.send_all(
                        f"GET /download?{BIG} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
                    )
                    assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
                    stalled.release()
                    await trio.sleep_forever()  # reading nothing more

            for _ in range(4):
                nursery.start_soon(stall)
            for _ in range(4):
                await stalled.acquire()
            await settled(lambda: slow_service.sent)
            async with visit(a, headers={"host": other}) as http:
                with trio.fail_after(10):
                    response = await http.get("/download?300000")
            assert response.status_code == 200
            assert len(response.content) == 300000
            nursery.cancel_scope.cancel()


async def _digest_server(stream: trio.SocketStream) -> None:
    """Reads until EOF, then answers the sha256 and length of what it read."""
    digest, size = hashlib.sha256(), 0
    async with stream:
        while data := await stream.receive_some(65536):
            digest.update(data)
            size += len(data)
        await stream.send_all(f"{digest.hexdigest()} {size}".encode())


async def test_tcp_tunnel_through_the_other_node(start_node: StartNode, nursery) -> None:
    """A TCP tunnel's public port, served on node A too, reaches the agent on node B."""
    (listener,) = await nursery.start(partial(trio.serve_tcp, _digest_server, 0, host="127.0.0.1"))
    local_port = listener.socket.getsockname()[1]
    public = free_port()
    # Both nodes bind the public port, each on its own loopback address.
    a = await start_node("a", tcp_host="127.0.0.3")
    b = await start_node("b", tcp_ports=range(public, public + 1))
    a.where[f"tcp:{public}"] = [("b", b.address)]
    payload = bytes(range(256)) * (8 * MiB // 256)
    with trio.fail_after(30):
        async with agent(b, local_port, tcp=True, host=None) as client:
            assert client.url.endswith(f":{public}")
            await nursery.start(a.app.serve_tcp_port, public)
            stream = await trio.open_tcp_stream("127.0.0.3", public)
            async with stream:
                await stream.send_all(payload)
                # Half-closed: the local service reads to the end, then answers.
                await stream.send_eof()
                answer = b""
                while data := await stream.receive_some(65536):
                    answer += data
            assert list(a.app.peers.links()) == [b.address]
    assert answer.decode() == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}"


async def test_nodes_that_serve_tls_talk_tls(
    start_node: StartNode, local_service: LocalService, tmp_path
) -> None:
    """Both nodes share a certificate (from a private CA) that names 127.0.0.1."""
    ca = trustme.CA()
    cert = ca.issue_cert("app.localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "node.pem", tmp_path / "node.key"
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    tls = {"certificate": str(cert_file), "key": str(key_file)}
    a = await start_node("a", **tls)
    b = await start_node("b", **tls)
    a.where[HOST] = [("b", b.address)]
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    with trio.fail_after(15):
        async with (
            agent(b, local_service.port, address=f"wss://{b.address}", insecure_skip_verify=True),
            httpx.AsyncClient(
                base_url=f"https://{a.address}",
                headers={"host": HOST},
                trust_env=False,
                verify=trusting,
            ) as http,
        ):
            response = await http.get("/secure")
            assert response.status_code == 200
            assert response.json()["path"] == "/secure"
            assert list(a.app.peers.links()) == [b.address]


async def test_the_agents_policy_is_enforced_on_its_node(pair, local_service) -> None:
    """Node B holds the agent's rules and applies them to the visitor of node A."""
    a, b = pair
    with trio.fail_after(15):
        async with (
            agent(b, local_service.port, deny_ips=(f"{VISITOR_ADDRESS}/32",)),
            visit(a) as http,
        ):
            refused = await http.get("/")
        assert refused.status_code == 403
        assert VISITOR_ADDRESS in refused.text
        async with (
            agent(b, local_service.port, basic_auth="ann:secret"),
            visit(a) as http,
        ):
            challenged = await http.get("/")
            assert challenged.status_code == 401
            assert challenged.headers["www-authenticate"].startswith("Basic")
            response = await http.get("/", auth=("ann", "secret"))
            assert response.status_code == 200
            # The tunnel's password is for the tunnel, not for the service.
            assert header_values(response.json(), "authorization") == []


async def test_when_the_cluster_state_is_unavailable_the_visitor_is_told(pair) -> None:
    a, _ = pair

    async def lost(key: str) -> list[tuple[str, str]]:
        raise ConnectionError("Redis is down")

    a.app.locate = lost
    with trio.fail_after(10):
        async with visit(a) as http:
            response = await http.get("/")
    assert response.status_code == 502
    assert "cluster&#x27;s state is unavailable" in response.text


async def test_a_host_no_node_holds_is_still_404(pair) -> None:
    a, _ = pair
    with trio.fail_after(10):
        async with visit(a, headers={"host": "nobody.localhost"}) as http:
            response = await http.get("/")
    assert response.status_code == 404
    assert a.located == ["nobody.localhost"]
    assert a.app.peers.links() == {}


async def test_an_agent_lost_before_answering_is_a_502_page(pair, local_service) -> None:
    a, b = pair
    with trio.fail_after(15):
        answers: list[httpx.Response] = []
        async with (
            agent(b, local_service.port),
            visit(a) as http,
            trio.open_nursery() as nursery,
        ):

            async def request() -> None:
                answers.append(await http.get("/hold"))

            nursery.start_soon(request)
            await eventually(lambda: local_service.holding == 1)
            (session,) = b.app.registry.sessions()
            session.link.close("the agent's connection broke")
    (response,) = answers
    assert response.status_code == 502
    assert "could not answer: the agent&#x27;s connection broke" in response.text


async def test_a_node_shutting_down_drains_its_links_and_refuses_new_ones(
    pair, local_service, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair
    caplog.set_level(logging.INFO, logger="tunnel.server")
    with trio.fail_after(15):
        async with agent(b, local_service.port), visit(a) as http:
            assert (await http.get("/")).status_code == 200
            b.app.begin_shutdown()
            # Node B sends node A away (GOAWAY once its streams are done)...
            await eventually(lambda: not a.app.peers.links())
            # ...and refuses to be dialled again: node A's visitor is told.
            response = await http.get("/")
    assert response.status_code == 502
    assert "cannot reach" in response.text
    assert any(
        "peer_refused" in r.getMessage() and "status=503" in r.getMessage() for r in caplog.records
    )


async def test_a_tcp_visitor_the_agent_denies_is_closed(start_node: StartNode, nursery) -> None:
    (listener,) = await nursery.start(partial(trio.serve_tcp, _digest_server, 0, host="127.0.0.1"))
    local_port = listener.socket.getsockname()[1]
    public = free_port()
    a = await start_node("a", tcp_host="127.0.0.3")
    b = await start_node("b", tcp_ports=range(public, public + 1))
    a.where[f"tcp:{public}"] = [("b", b.address)]
    with trio.fail_after(30):
        async with agent(b, local_port, tcp=True, host=None, deny_ips=(f"{VISITOR_ADDRESS}/32",)):
            await nursery.start(a.app.serve_tcp_port, public)
            answers = []
            for source in (VISITOR_ADDRESS, "127.0.0.1"):
                stream = await trio.open_tcp_stream("127.0.0.3", public, local_address=source)
                async with stream:
                    await stream.send_all(b"hello")
                    await stream.send_eof()
                    answer = b""
                    with contextlib.suppress(trio.BrokenResourceError):
                        while data := await stream.receive_some(65536):
                            answer += data
                    answers.append(answer)
    denied, admitted = answers
    assert denied == b""
    assert admitted.decode() == f"{hashlib.sha256(b'hello').hexdigest()} 5"


async def test_a_forwarded_request_waits_for_its_agent_to_reconnect(pair, local_service) -> None:
    """Node B waits the grace period for its agent, as it would for its own visitor."""
    a, b = pair
    with trio.fail_after(15):
        async with agent(b, local_service.port), visit(a) as http:
            assert (await http.get("/before")).status_code == 200
            (session,) = b.app.registry.sessions()
            session.link.close("the agent's connection broke")
            response = await http.get("/after")
            assert response.status_code == 200
            assert response.json()["path"] == "/after"
            assert b.app.registry.sessions() != [session]


async def test_a_node_without_the_cluster_secret_says_it_cannot_forward(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    a = await start_node("a", cluster_secret=None)
    a.where[HOST] = [("b", "127.0.0.1:9")]
    with trio.fail_after(10):
        async with visit(a) as http:
            response = await http.get("/")
    assert response.status_code == 404
    assert any("cannot carry visitors to other nodes" in r.getMessage() for r in caplog.records)


async def test_a_draining_node_is_passed_over_for_another_that_holds_the_host(
    start_node: StartNode, start_local_service, nursery
) -> None:
    """Node B restarts (drains) with a request in flight; node C serves the next one."""
    a = await start_node("a")
    b = await start_node("b", graceful_timeout=10.0)
    c = await start_node("c")
    on_b = await start_local_service("on-b")
    on_c = await start_local_service("on-c")
    with trio.fail_after(20):
        held: list[httpx.Response] = []
        async with (
            agent(b, on_b.port),
            agent(c, on_c.port),
            visit(a) as http,
            trio.open_nursery() as inner,
        ):
            # The link to node B is up: with two nodes, a link that is up wins.
            a.where[HOST] = [("b", b.address)]
            assert (await http.get("/")).json()["service"] == "on-b"
            a.where[HOST] = [("b", b.address), ("c", c.address)]

            async def hold() -> None:
                held.append(await http.get("/hold"))

            inner.start_soon(hold)
            await eventually(lambda: on_b.holding == 1)
            b.app.begin_shutdown()
            await eventually(lambda: not a.app.peers.links()[b.address].accepting)
            response = await http.get("/next")
            assert response.json()["service"] == "on-c"
            # What was in flight on node B finishes there.
            on_b.release_hold.set()
        (answer,) = held
        assert answer.status_code == 200
        assert answer.json()["service"] == "on-b"


def _ident(data: bytes) -> bytes:
    return data


async def test_grpc_trailers_and_a_trailers_only_error_through_the_other_node(pair) -> None:
    """gRPC's status travels in trailers: they must pass node B as trailers."""
    a, b = pair
    service = GrpcService()
    await trio.to_thread.run_sync(service.start)
    channel = grpc.insecure_channel(f"127.0.0.1:{a.port}", options=call_options())
    try:
        unary = channel.unary_unary(
            "/test.Echo/Unary", request_serializer=_ident, response_deserializer=_ident
        )
        fail = channel.unary_unary(
            "/test.Echo/Fail", request_serializer=_ident, response_deserializer=_ident
        )

        def calls() -> tuple[bytes, Any, grpc.RpcError]:
            response, rpc = unary.with_call(b"hello", timeout=5)
            with pytest.raises(grpc.RpcError) as info:
                fail(b"NOT_FOUND", timeout=5)
            return response, rpc.trailing_metadata(), info.value

        with trio.fail_after(20):
            async with agent(b, service.port, local_protocol="h2c"):
                response, trailing, error = await trio.to_thread.run_sync(
                    calls, abandon_on_cancel=True
                )
    finally:
        channel.close()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(service.stop)
    assert response == b"hello"
    assert ("x-trailing", "5") in trailing
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert error.details() == "no such thing"
    assert ("x-why", "testing") in error.trailing_metadata()


async def test_a_visitor_leaving_mid_upload_reaches_the_local_service(pair, slow_service) -> None:
    a, b = pair

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 65536
        await trio.sleep_forever()  # the visitor stops sending, and then leaves

    with trio.fail_after(15):
        async with agent(b, slow_service.port), visit(a) as http:
            with trio.CancelScope() as uploading:

                async def leave_once_read() -> None:
                    await eventually(lambda: slow_service.uploaded == 65536)
                    uploading.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(leave_once_read)
                    await http.post("/abandoned", content=body())
            # A resets its stream to B, B its stream to the agent, the agent
            # its connection to the service.
            await slow_service.abandoned.wait()


async def test_an_http2_visitor_through_the_other_node(pair, local_service) -> None:
    a, b = pair
    with trio.fail_after(15):
        async with agent(b, local_service.port), visit(a, http1=False, http2=True) as http:
            responses: list[httpx.Response] = []

            async def post(index: int) -> None:
                responses.append(await http.post(f"/h2/{index}", content=b"body %d" % index))

            async with trio.open_nursery() as nursery:
                for index in range(5):
                    nursery.start_soon(post, index)
    assert sorted(r.json()["body"] for r in responses) == [f"body {i}" for i in range(5)]
    assert {r.http_version for r in responses} == {"HTTP/2"}


async def test_a_dead_node_does_not_keep_the_visitor_from_a_live_one(
    start_node: StartNode, start_local_service, nursery
) -> None:
    """Node B's network is gone (a dial hangs until its timeout); node C serves at once."""
    a = await start_node("a", grace_period=30.0)
    b = await start_node("b")
    c = await start_node("c")
    proxy: FaultProxy = await nursery.start(FaultProxy(b.port).run)
    proxy.black_hole()
    a.where[HOST] = [("b", f"127.0.0.1:{proxy.port}"), ("c", c.address)]
    on_c = await start_local_service("on-c")
    async with agent(c, on_c.port), visit(a) as http:
        # Well within the 10 s a dial of node B takes to give up.
        with trio.fail_after(8):
            response = await http.get("/")
    assert response.json()["service"] == "on-c"
