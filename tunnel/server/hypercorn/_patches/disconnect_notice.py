"""An HTTP app hears of a visitor leaving without a task waiting in ``receive()``.

Replaces ``TaskGroup.spawn_app`` (``hypercorn/trio/task_group.py``, Hypercorn 0.17 and
0.18; the same in both but for typing) for HTTP scopes. ASGI reports a disconnect solely
as ``http.disconnect`` from ``receive()``, so relaying a response needed a second task per
request, whose start, cancellation and join cost a good share of the server's task
switches (benchmarks/README.rst, "No task per request to watch for the visitor leaving").
With this, an HTTP app's ``receive`` is a :class:`tunnel._asgi.NotifyingReceive`, whose
``on_disconnect`` callback is called as Hypercorn queues ``http.disconnect``; apps that
don't look see a plain ``receive``. Other scopes go to the original (or to
:mod:`.websocket_queue`'s replacement).
"""

from __future__ import annotations

from typing import Any, Final

import trio
from hypercorn.trio import task_group

from ...._asgi import NotifyingReceive
from ...._compat import HYPERCORN_DISCONNECT_NOTICE

__all__ = ["VERIFIED", "notify_disconnect"]

#: The versions whose ``TaskGroup.spawn_app`` this replaces.
VERIFIED: Final = HYPERCORN_DISCONNECT_NOTICE.verified


def notify_disconnect() -> None:
    """Install the replacement (the caller checks the version, once)."""
    original = task_group.TaskGroup.spawn_app

    async def spawn_app(self: Any, app: Any, config: Any, scope: Any, send: Any) -> Any:
        if scope["type"] != "http":
            return await original(self, app, config, scope, send)
        # Hypercorn 0.18's spawn_app, but for the receive and put it hands out.
        put, get = trio.open_memory_channel[Any](config.max_app_queue_size)
        receive = NotifyingReceive(get.receive)
        self._nursery.start_soon(
            task_group._handle,
            *(app, config, scope, receive, send),
            *(trio.to_thread.run_sync, trio.from_thread.run),
        )

        async def app_put(message: Any) -> None:
            if message["type"] == "http.disconnect":
                receive.gone = True
                if receive.on_disconnect is not None:
                    receive.on_disconnect()
            try:
                # Without a yield when the queue has room (it nearly always
                # has): a yield is a trip through the scheduler.
                put.send_nowait(message)
            except trio.WouldBlock:
                await put.send(message)

        return app_put

    task_group.TaskGroup.spawn_app = spawn_app  # type: ignore[method-assign]
