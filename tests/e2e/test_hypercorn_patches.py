"""The Hypercorn patches that the tunnel's hot path relies on, against real Hypercorn."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio
from hypercorn.trio import tcp_server

from tunnel._asgi import NotifyingReceive
from tunnel.server.hypercorn._patches import apply_hypercorn_patches
from tunnel.server.hypercorn._patches.disconnect_notice import VERIFIED as _VERIFIED_SPAWN_APP
from tunnel.server.hypercorn._patches.read_size import READ_SIZE


async def test_an_app_hears_of_a_visitor_leaving_with_no_task_in_receive(
    nursery: trio.Nursery,
) -> None:
    # The notice silently does nothing on an unverified Hypercorn (forward_visitor_http
    # then watches receive() with a task of its own): this test is the reminder
    # to check a new Hypercorn's spawn_app and add its version.
    assert importlib.metadata.version("hypercorn").startswith(_VERIFIED_SPAWN_APP)
    apply_hypercorn_patches()
    left = trio.Event()
    started = trio.Event()
    receives: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        receives.append(receive)
        assert isinstance(receive, NotifyingReceive)
        receive.on_disconnect = left.set
        started.set()
        # Never reads receive() and never answers: only the notice can end this.
        with trio.move_on_after(10):
            await left.wait()

    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    urls: list[str] = await nursery.start(hypercorn.trio.serve, app, config)  # type: ignore[arg-type]
    port = int(urls[0].rsplit(":", 1)[1])
    with trio.fail_after(5):
        visitor = await trio.open_tcp_stream("127.0.0.1", port)
        await visitor.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await started.wait()
        assert not receives[0].gone
        await visitor.aclose()
        await left.wait()
    assert receives[0].gone


def test_hypercorn_reads_connections_in_large_pieces() -> None:
    # 64 KiB reads sent every 64 KiB of an upload through Hypercorn's whole
    # stack and gave the agent's WebSocket 16 reads per MiB. If a Hypercorn
    # update renames MAX_RECV or changes its default, the patch stops applying.
    apply_hypercorn_patches()
    assert tcp_server.MAX_RECV == READ_SIZE
