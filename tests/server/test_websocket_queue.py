"""The byte-bounded queue of a WebSocket's messages for its app (a Hypercorn patch)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from tunnel.server.hypercorn._patches.websocket_queue import _MessageQueue


def _message(size: int) -> dict[str, Any]:
    return {"type": "websocket.receive", "bytes": bytes(size), "text": None}


async def test_the_queue_holds_bytes_not_messages_counting_the_apps_own() -> None:
    queue = _MessageQueue(1000)
    put: list[int] = []

    async def sender() -> None:
        for size in (900, 500, 0):
            await queue.put(_message(size))
            put.append(size)
        await queue.put({"type": "websocket.disconnect", "code": 1000})
        put.append(-1)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            # One message always fits; the next waits for room.
            assert put == [900]
            assert len((await queue.get())["bytes"]) == 900
            await trio.testing.wait_all_tasks_blocked()
            # The app still holds the first: it counts until the app asks again.
            assert put == [900]
            assert len((await queue.get())["bytes"]) == 500
            await trio.testing.wait_all_tasks_blocked()
            # An empty message costs something too, and the disconnect gets
            # through whatever is queued.
            assert put == [900, 500, 0, -1]
            assert (await queue.get())["bytes"] == b""
            assert (await queue.get())["type"] == "websocket.disconnect"


async def test_nothing_waits_for_an_app_that_has_returned() -> None:
    queue = _MessageQueue(1000)
    with trio.fail_after(5):
        await queue.put(_message(900))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.put, _message(900))
            await trio.testing.wait_all_tasks_blocked()
            queue.close()
        await queue.put(_message(900))
