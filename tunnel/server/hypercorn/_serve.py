"""Running the app: :func:`serve` puts :class:`~tunnel.TunnelApp` under Hypercorn's trio worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from ..._asgi import ASGIApp
from ..._config import ServerConfig
from .._redis_store import check_store
from ._run import serve_sockets
from ._workers import serve_workers

__all__ = ["serve"]


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
        StoreUnavailableError: ``config.store`` is set and Redis cannot be
            reached (the message names the URL, without its password).
        ConfigError: With several workers, the settings cannot be copied to
            the worker processes.

    Example::

        async with trio.open_nursery() as nursery:
            urls = await nursery.start(tunnel.serve, tunnel.ServerConfig(address="127.0.0.1:0"))
    """
    if config.store is not None:
        # Before binding anything: a node that cannot reach its cluster's store
        # says so at once, rather than through every agent it would refuse.
        await check_store(config)
    if config.workers > 1:
        await serve_workers(config, fallback, shutdown_trigger, task_status)
        return
    await serve_sockets(config, fallback, None, shutdown_trigger, task_status=task_status)
