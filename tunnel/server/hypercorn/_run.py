"""One process's server: :class:`~tunnel.TunnelApp` under Hypercorn's trio worker.

:func:`tunnel.serve` runs this in its own process, or, with several workers, each
worker process does (``_worker.py``), on the sockets the parent bound.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import cast
from urllib.parse import urlsplit
from wsgiref.handlers import format_date_time

import hypercorn.trio
import trio
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from ..._asgi import ASGIApp, Message, Receive, Scope, Send
from ..._config import ServerConfig
from .._app import TunnelApp
from .._ledger import HostLedger
from .._store import LocalStore
from ._config import hypercorn_config
from ._guard import install_hypercorn_guard
from ._metrics import serve_metrics

__all__ = ["serve_sockets"]


async def serve_sockets(
    config: ServerConfig,
    fallback: ASGIApp | None,
    sockets: Sockets | None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    *,
    ledger: HostLedger | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One process's server, on ``sockets`` (bound and listening) or its own.

    A worker of several passes the ``ledger`` it shares with the others.
    """
    install_hypercorn_guard()
    app = TunnelApp(config, fallback=fallback)
    served = _dated(app)
    hc = hypercorn_config(config)
    # Hypercorn appends a Date of its own after the app's headers: a tunnelled
    # response, which carries its origin's, would carry two. The app's
    # wrapper dates what has no Date instead.
    hc.include_date_header = False
    if ledger is not None:
        app.registry.store = LocalStore(ledger)
    trigger = None
    if shutdown_trigger is not None:
        user_trigger = shutdown_trigger

        async def trigger() -> None:
            await user_trigger()
            # Hypercorn's own graceful wait ends only when every connection
            # has; the agents' connections end once their sessions drained.
            app.begin_shutdown()

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        task_status = cast("trio.TaskStatus[list[str]]", _Listening(app, task_status))
        if sockets is None:
            await hypercorn.trio.serve(
                served,  # type: ignore[arg-type]  # Hypercorn's scope TypedDicts vs. plain ASGI mappings
                hc,
                shutdown_trigger=trigger,
                task_status=task_status,
            )
            return
        # The public serve() binds sockets of its own; a worker serves the
        # parent's, through the function that serve() wraps.
        await worker_serve(
            wrap_app(served, 0, "asgi"),  # type: ignore[arg-type]  # as above
            hc,
            sockets=sockets,
            shutdown_trigger=trigger,
            task_status=task_status,
        )

    if config.metrics_address is None:
        await run(task_status=task_status)
        return
    try:
        async with trio.open_nursery() as nursery:
            metrics_url: str = await nursery.start(
                serve_metrics, app.metrics_registry, config.metrics_address
            )

            async def run_then_stop(*, task_status: trio.TaskStatus[list[str]]) -> None:
                await run(task_status=task_status)
                nursery.cancel_scope.cancel()

            urls: list[str] = await nursery.start(run_then_stop)
            task_status.started([*urls, metrics_url])
    except BaseExceptionGroup as group:
        # One failure (such as an address in use) is raised as itself.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


class _Listening:
    """A task status that also tells the app where it listens, once Hypercorn has bound."""

    def __init__(self, app: TunnelApp, task_status: trio.TaskStatus[list[str]]) -> None:
        self._app = app
        self._task_status = task_status

    def started(self, urls: list[str]) -> None:
        if urls:
            self._app.listening_on(urlsplit(urls[0]).netloc)
        self._task_status.started(urls)


#: The ASGI messages that begin an HTTP response.
_RESPONSE_STARTS = frozenset({"http.response.start", "websocket.http.response.start"})


def _dated(app: ASGIApp) -> ASGIApp:
    """``app``, with a ``Date`` header on each response that has none.

    A tunnelled response keeps its origin's ``Date`` (the only one it then
    carries); the pages the server answers itself, and a response whose origin
    sent none, are dated here, as RFC 9110 §6.6.1 asks of a proxy.
    """

    async def dated(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" and scope["type"] != "websocket":
            await app(scope, receive, send)
            return

        async def send_dated(message: Message) -> None:
            if message["type"] in _RESPONSE_STARTS:
                headers = message.get("headers") or []
                if not any(name.lower() == b"date" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"date", _http_date())]}
            await send(message)

        await app(scope, receive, send_dated)

    return dated


_last_date: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """Now, as an HTTP date (formatted once a second)."""
    global _last_date
    now = int(time.time())
    if _last_date[0] != now:
        _last_date = (now, format_date_time(now).encode("ascii"))
    return _last_date[1]
