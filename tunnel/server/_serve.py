"""Running the app: :func:`serve` puts :class:`TunnelApp` under Hypercorn's trio worker."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from wsgiref.handlers import format_date_time

import hypercorn.config
import hypercorn.trio
import trio
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from .._config import ServerConfig, parse_listen_address
from ..link import MAX_MESSAGE
from ._app import ASGIApp, Message, Receive, Scope, Send, TunnelApp
from ._hypercorn_guard import install_hypercorn_guard
from ._hypercorn_patches import set_websocket_buffer
from ._ledger import HostLedger
from ._metrics import serve_metrics
from ._workers import serve_workers

__all__ = ["hypercorn_config", "serve"]


def hypercorn_config(config: ServerConfig) -> hypercorn.config.Config:
    """The Hypercorn settings :func:`serve` uses for ``config``.

    Start from these when embedding :class:`TunnelApp` in your own Hypercorn
    deployment: they lift the limits that hurt a busy tunnel. (:func:`serve`
    also turns Hypercorn's ``Date`` header off and dates the responses that
    have none itself, so a tunnelled response carries only its origin's.)
    """
    host, port = parse_listen_address(config.address)
    hc = hypercorn.config.Config()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if config.certificate is not None and config.key is not None:
        hc.certfile = os.fspath(config.certificate)
        hc.keyfile = os.fspath(config.key)
    # A visitor's keep-alive connection may carry any number of requests; the
    # default of 1000 makes busy clients reconnect for nothing.
    hc.keep_alive_max_requests = 2**31
    # Hypercorn listens with a backlog of 100: a burst of new visitors beyond it
    # (thousands of requests in flight through one tunnel, each on its own
    # connection) overflows the accept queue, and the kernel drops their SYNs
    # (a 1 s retransmit each) or the connections they thought were open. The
    # kernel caps this at net.core.somaxconn (4096 by default since Linux 5.4).
    hc.backlog = 4096
    hc.graceful_timeout = config.graceful_timeout
    hc.include_server_header = False
    hc.accesslog = None
    hc.errorlog = logging.getLogger("tunnel.server")
    # Agents' messages (at most MAX_MESSAGE) pass the same check as visitors',
    # which the tunnel enforces itself (see _ingress_ws.py). The margin lets an
    # agent's frame over HTTP/2's limit be refused by the mux, with that reason,
    # rather than by Hypercorn with a bare 1009.
    hc.websocket_max_message_size = max(config.max_websocket_message, 2 * MAX_MESSAGE)
    set_websocket_buffer(hc, config.max_websocket_buffer)
    # Hypercorn's idle timer runs from a connection's start, or the end of a
    # response, until the next request's headers are complete.
    hc.keep_alive_timeout = config.header_timeout
    # Above our own header limit, so visitors get its clear 431 rather than
    # Hypercorn's bare 400.
    hc.h11_max_incomplete_size = max(64 << 10, 2 * config.max_header_bytes)
    return hc


async def serve(
    config: ServerConfig,
    *,
    fallback: ASGIApp | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a tunnel server until cancelled (or until ``shutdown_trigger`` returns).

    With ``config.workers`` above 1 the server runs that many worker processes
    on the same port, and restarts any that dies. Each is a fresh interpreter
    that gets a copy of the settings, so the auth hook, the callbacks and
    ``fallback`` must be importable: module-level functions of a module, not
    lambdas or functions of the main script.

    Args:
        config: The server's settings.
        fallback: An ASGI app for hosts no agent has claimed.
        shutdown_trigger: An async function; when it returns the server stops
            accepting, lets requests in flight finish (up to
            ``config.graceful_timeout``), sends every agent away to reconnect
            (HTTP/2 GOAWAY) and returns. Cancelling ``serve`` instead stops at
            once.
        task_status: Receives, once the server listens, the base URLs it is
            bound to, such as ``["http://127.0.0.1:54321"]``; bind port 0 and
            read the port from here. With ``config.metrics_address`` the
            metrics URL (``http://…/metrics``) comes last, one per worker.

    Raises:
        ConfigError: With several workers, the settings cannot be copied to
            the worker processes.

    Example::

        async with trio.open_nursery() as nursery:
            urls = await nursery.start(tunnel.serve, tunnel.ServerConfig(address="127.0.0.1:0"))
    """
    if config.workers > 1:
        await serve_workers(config, fallback, shutdown_trigger, task_status)
        return
    await serve_sockets(config, fallback, None, shutdown_trigger, task_status=task_status)


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
    app.registry.ledger = ledger
    trigger = None
    if shutdown_trigger is not None:
        user_trigger = shutdown_trigger

        async def trigger() -> None:
            await user_trigger()
            # Hypercorn's own graceful wait ends only when every connection
            # has; the agents' connections end once their sessions drained.
            app.begin_shutdown()

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
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
