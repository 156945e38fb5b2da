"""The messages a WebSocket's app has not read yet are bounded in bytes, not in count.

Replaces ``TaskGroup.spawn_app`` (``hypercorn/trio/task_group.py``, Hypercorn 0.17 and
0.18) for WebSocket scopes. Hypercorn queues up to ``max_app_queue_size`` (10) whole
messages for a WebSocket's app, each up to ``websocket_max_message_size``: hundreds of MiB
per visitor when the app (the tunnel, towards a slow local service) reads slower than the
visitor sends. The replacement bounds the bytes queued instead
(:func:`set_websocket_buffer`), and counts the message the app took until it asks for the
next, so that what the app still holds is counted too. Hypercorn's reading of the
connection waits meanwhile, so a visitor that sends faster is read slower.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

import trio
from hypercorn.trio import task_group

__all__ = ["DEFAULT_WEBSOCKET_BUFFER", "bound_websocket_queues", "set_websocket_buffer"]

#: What one WebSocket may hold when :func:`set_websocket_buffer` was not called.
DEFAULT_WEBSOCKET_BUFFER: Final = 4 << 20
#: What a queued message costs beyond its data, so empty messages count too.
_MESSAGE_OVERHEAD: Final = 64
_BUFFER_ATTRIBUTE: Final = "tunnel_websocket_buffer"


def set_websocket_buffer(config: Any, size: int) -> None:
    """Let each WebSocket served with Hypercorn ``config`` hold ``size`` bytes of messages."""
    setattr(config, _BUFFER_ATTRIBUTE, size)


class _MessageQueue:
    """Messages for one WebSocket's app, at most ``limit`` bytes of them (one always fits)."""

    __slots__ = ("_bytes", "_changed", "_closed", "_held", "_limit", "_messages")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._messages: deque[tuple[Any, int]] = deque()
        self._bytes = 0  # queued, and held by the app (its last message)
        self._held = 0
        self._changed = trio.Event()
        self._closed = False

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def put(self, message: Any) -> None:
        size = 0
        if message.get("type") == "websocket.receive":
            data = message.get("bytes") or message.get("text") or b""
            size = len(data) + _MESSAGE_OVERHEAD
        # Connect and disconnect always go through; data waits for room.
        while not self._closed and size and self._bytes and self._bytes + size > self._limit:
            await self._changed.wait()
        if self._closed:
            # The app has returned: nobody will read this. (Hypercorn's own
            # queue would hold the connection up for good once full.)
            return
        self._messages.append((message, size))
        self._bytes += size
        self._wake()

    async def get(self) -> Any:
        # Asking for the next message means the app is done with the last.
        self._bytes -= self._held
        self._held = 0
        self._wake()
        while not self._messages:
            await self._changed.wait()
        message, self._held = self._messages.popleft()
        return message

    def close(self) -> None:
        self._closed = True
        self._messages.clear()
        self._wake()


def bound_websocket_queues() -> None:
    """Install the replacement (the caller checks the version, once)."""
    original = task_group.TaskGroup.spawn_app

    async def spawn_app(self: Any, app: Any, config: Any, scope: Any, send: Any) -> Any:
        if scope["type"] != "websocket":
            return await original(self, app, config, scope, send)
        # Hypercorn 0.18's spawn_app, with the queue above for its channel.
        queue = _MessageQueue(getattr(config, _BUFFER_ATTRIBUTE, DEFAULT_WEBSOCKET_BUFFER))

        async def run() -> None:
            try:
                await task_group._handle(
                    *(app, config, scope, queue.get, send),
                    *(trio.to_thread.run_sync, trio.from_thread.run),
                )
            finally:
                queue.close()

        self._nursery.start_soon(run)
        return queue.put

    task_group.TaskGroup.spawn_app = spawn_app  # type: ignore[method-assign]
