"""WebSockets through the tunnel: a real visitor, a real local WebSocket service."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trio_websocket
from hostile import MiB, watch_memory

import tunnel
from helpers import free_port

TOKEN = "s3cret"
HOST = "ws.localhost"
BIG = 16 << 20


class WebSocketService:
    """A local ASGI service with WebSocket routes; records what it saw."""

    def __init__(self) -> None:
        self.disconnects: list[int] = []
        self.disconnected = trio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "websocket":
            return
        await receive()  # websocket.connect
        if scope["path"] == "/refuse":
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 401,
                    "headers": [(b"content-type", b"text/plain")],
                }
            )
            await send({"type": "websocket.http.response.body", "body": b"no entry without a key"})
            return
        offered = scope.get("subprotocols") or []
        await send({"type": "websocket.accept", "subprotocol": offered[-1] if offered else None})
        if scope["path"] == "/stall":
            # Reads nothing: what visitors send piles up on the way.
            await trio.sleep_forever()
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.disconnects.append(message.get("code", 0))
                self.disconnected.set()
                return
            text = message.get("text")
            if text is not None and text.startswith("send:"):
                await send({"type": "websocket.send", "bytes": bytes(int(text[5:]))})
                continue
            if text is not None and text.startswith("close:"):
                _, code, reason = text.split(":", 2)
                await send({"type": "websocket.close", "code": int(code), "reason": reason})
                return
            if text is not None:
                await send({"type": "websocket.send", "text": text})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})


@pytest.fixture
async def ws_service(nursery: trio.Nursery) -> tuple[WebSocketService, int]:
    service = WebSocketService()
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    config.websocket_max_message_size = 32 << 20
    (url,) = await nursery.start(hypercorn.trio.serve, service, config)
    return service, int(url.rsplit(":", 1)[1])


@pytest.fixture
async def server_port(nursery: trio.Nursery) -> int:
    config = tunnel.ServerConfig(address="127.0.0.1:0", tokens=frozenset({TOKEN}))
    (url,) = await nursery.start(tunnel.serve, config)
    return int(url.rsplit(":", 1)[1])


def agent(server_port: int, local_port: int) -> tunnel.ClientConfig:
    return tunnel.ClientConfig(
        address=f"127.0.0.1:{server_port}", token=TOKEN, port=local_port, host=HOST
    )


@asynccontextmanager
async def visit(
    port: int, path: str = "/echo", subprotocols: list[str] | None = None
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A visitor's WebSocket to ``ws://ws.localhost:<port><path>``, via 127.0.0.1."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                f"{HOST}:{port}",
                path,
                subprotocols=subprotocols,
                max_message_size=32 << 20,
                receive_buffer_size=256 << 10,
            )
            yield ws
            await ws.aclose()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A refused handshake surfaces from trio-websocket's reader task.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        await stream.aclose()


async def test_text_binary_and_16_mib_messages_both_ways(nursery, ws_service) -> None:
    """Messages as large as the operator allows (``max_websocket_message``) pass."""
    _, local_port = ws_service
    big = os.urandom(BIG)
    config = tunnel.ServerConfig(
        address="127.0.0.1:0",
        tokens=frozenset({TOKEN}),
        max_websocket_message=BIG,
        max_websocket_buffer=2 * BIG,
    )
    (url,) = await nursery.start(tunnel.serve, config)
    server_port = int(url.rsplit(":", 1)[1])
    with trio.fail_after(30):
        async with tunnel.open_tunnel(agent(server_port, local_port)), visit(server_port) as ws:
            await ws.send_message("héllo")
            assert await ws.get_message() == "héllo"
            await ws.send_message(b"\x00\x01binary")
            assert await ws.get_message() == b"\x00\x01binary"
            await ws.send_message(big)
            assert await ws.get_message() == big
            # Many small messages in a burst keep their order.
            for i in range(200):
                await ws.send_message(f"m{i}")
            assert [await ws.get_message() for _ in range(200)] == [f"m{i}" for i in range(200)]


async def test_subprotocol_is_negotiated_end_to_end(ws_service, server_port) -> None:
    _, local_port = ws_service
    with trio.fail_after(10):
        async with (
            tunnel.open_tunnel(agent(server_port, local_port)),
            visit(server_port, subprotocols=["chat.v1", "chat.v2"]) as ws,
        ):
            assert ws.subprotocol == "chat.v2"
            await ws.send_message("ok?")
            assert await ws.get_message() == "ok?"


async def test_close_code_and_reason_from_the_local_service(ws_service, server_port) -> None:
    _, local_port = ws_service
    with trio.fail_after(10):
        async with tunnel.open_tunnel(agent(server_port, local_port)), visit(server_port) as ws:
            await ws.send_message("close:4001:see you")
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 4001
    assert closed.value.reason.reason == "see you"


async def test_close_code_from_the_visitor_reaches_the_local_service(
    server_port, nursery: trio.Nursery
) -> None:
    # Hypercorn tells its apps 1006 for any close the client starts, so the
    # local service here is trio-websocket's server, which reports the code.
    seen: list[trio_websocket.CloseReason | None] = []
    closed = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed as exc:
            seen.append(exc.reason)
            closed.set()

    server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
    local_port = server.port
    with trio.fail_after(10):
        async with tunnel.open_tunnel(agent(server_port, local_port)):
            async with visit(server_port) as ws:
                await ws.send_message("ping?")
                assert await ws.get_message() == "ping?"
                await ws.aclose(4002, "done here")
            await closed.wait()
    assert seen[0] is not None
    assert seen[0].code == 4002
    assert seen[0].reason == "done here"


async def test_a_refused_upgrade_reaches_the_visitor_with_its_status(
    ws_service, server_port
) -> None:
    _, local_port = ws_service
    with trio.fail_after(10):
        async with tunnel.open_tunnel(agent(server_port, local_port)):
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with visit(server_port, "/refuse"):
                    pass
    assert rejected.value.status_code == 401
    assert rejected.value.body == b"no entry without a key"


async def test_unknown_host_refuses_the_websocket_with_404(server_port) -> None:
    with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with visit(server_port):
            pass
    assert rejected.value.status_code == 404
    assert HOST.encode() in (rejected.value.body or b"")


async def test_local_service_down_refuses_with_502_naming_it(server_port) -> None:
    port = free_port()
    with trio.fail_after(10):
        async with tunnel.open_tunnel(agent(server_port, port)):
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with visit(server_port):
                    pass
    assert rejected.value.status_code == 502
    assert f"127.0.0.1:{port}".encode() in (rejected.value.body or b"")


async def test_visitor_vanishing_closes_the_local_websocket(ws_service, server_port) -> None:
    service, local_port = ws_service
    with trio.fail_after(10):
        async with tunnel.open_tunnel(agent(server_port, local_port)):
            stream = await trio.open_tcp_stream("127.0.0.1", server_port)
            async with trio.open_nursery() as nursery:
                ws = await trio_websocket.wrap_client_stream(
                    nursery, stream, f"{HOST}:{server_port}", "/echo"
                )
                await ws.send_message("hello")
                assert await ws.get_message() == "hello"
                # No close frame: the visitor's TCP connection just goes.
                await trio.aclose_forcefully(stream)
                nursery.cancel_scope.cancel()
            with trio.fail_after(2):
                await service.disconnected.wait()
    assert len(service.disconnects) == 1


async def test_agent_dying_closes_visitor_websockets_with_1011(
    ws_service, server_port, nursery: trio.Nursery
) -> None:
    _, local_port = ws_service
    client = tunnel.Client(agent(server_port, local_port))
    agent_scope = trio.CancelScope()
    with trio.fail_after(10):
        await nursery.start(_run_until, client, agent_scope)
        async with visit(server_port) as ws:
            await ws.send_message("x")
            assert await ws.get_message() == "x"
            agent_scope.cancel()
            with trio.fail_after(1), pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason is not None
    assert closed.value.reason.code in (1011, 1001)


async def test_a_message_over_the_limit_closes_that_websocket_with_1009(
    ws_service, server_port
) -> None:
    """Over ``max_websocket_message`` (1 MiB by default), either way: that WebSocket
    closes with 1009, and nothing else does."""
    _, local_port = ws_service
    limit = tunnel.ServerConfig().max_websocket_message
    with trio.fail_after(20):
        async with (
            tunnel.open_tunnel(agent(server_port, local_port)),
            visit(server_port) as bystander,
        ):
            async with visit(server_port) as ws:
                await ws.send_message(bytes(limit))
                assert await ws.get_message() == bytes(limit)
                await ws.send_message(bytes(limit + 1))
                with pytest.raises(trio_websocket.ConnectionClosed) as visitor_side:
                    await ws.get_message()
            async with visit(server_port) as ws:
                await ws.send_message(f"send:{limit + 1}")
                with pytest.raises(trio_websocket.ConnectionClosed) as service_side:
                    await ws.get_message()
            await bystander.send_message("still here")
            assert await bystander.get_message() == "still here"
    assert visitor_side.value.reason.code == 1009
    assert service_side.value.reason.code == 1009


async def _stalled_websocket_service(stream: trio.SocketStream) -> None:
    """Accepts a WebSocket upgrade, then reads nothing more (nothing piles up here)."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(4096)
    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    await trio.sleep_forever()


async def test_a_stalled_service_holds_little_of_what_visitors_send(
    nursery: trio.Nursery, server_port: int
) -> None:
    """Visitors send 1 MiB messages as fast as they can to a service that reads nothing.

    What piles up in the server is bounded per WebSocket: ``max_websocket_buffer``
    (4 MiB), the message Hypercorn is reading and the one being framed for the
    agent, not the 10 whole messages (of up to 32 MiB each) Hypercorn queues by
    default. The agent holds at most its HTTP/2 connection window (16 MiB) of
    them, and each visitor a message or two of its own. Bound: 128 MiB of peak
    RSS for 8 visitors, tunnel, agent and visitors together, which Hypercorn's
    own queue of 10 messages per WebSocket goes well past.
    """
    listeners = await nursery.start(
        partial(trio.serve_tcp, _stalled_websocket_service, 0, host="127.0.0.1")
    )
    local_port = listeners[0].socket.getsockname()[1]
    message = os.urandom(1 << 20)
    sent: list[int] = []

    async def flood() -> None:
        count = 0
        with trio.CancelScope() as scope:
            async with visit(server_port, "/stall") as ws:
                # Until the server stops taking them (none for a second).
                while True:
                    with trio.move_on_after(1) as stalled:
                        await ws.send_message(message)
                        count += 1
                    if stalled.cancelled_caught:
                        break
                # No closing handshake gets through a stalled WebSocket.
                scope.deadline = trio.current_time() + 0.5
        sent.append(count)

    with trio.fail_after(60):
        async with tunnel.open_tunnel(agent(server_port, local_port)):
            with watch_memory("8 WebSockets towards a stalled service") as memory:
                async with trio.open_nursery() as visitors:
                    for _ in range(8):
                        visitors.start_soon(flood)
    logging.getLogger("tests.hostile").warning("1 MiB messages taken per WebSocket: %s", sent)
    assert memory.peak_rss < 128 * MiB, memory


async def _run_until(
    client: tunnel.Client, scope: trio.CancelScope, *, task_status: trio.TaskStatus[str]
) -> None:
    with scope:
        await client.connect(task_status=task_status)
