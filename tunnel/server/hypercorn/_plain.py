"""A small ASGI app of our own over plain HTTP, with Hypercorn's public entry point.

The server's metrics (``ServerConfig.metrics_address``) and the demo's sample local
service run this way: no TLS, no access log, none of the tunnel server's settings.
"""

from __future__ import annotations

import logging

import hypercorn.config
import hypercorn.trio
import trio

from ..._asgi import ASGIApp
from ..._config import parse_listen_address

__all__ = ["serve_plain"]


async def serve_plain(
    app: ASGIApp,
    address: str,
    *,
    errorlog: logging.Logger | None,
    server_header: bool = True,
    graceful_timeout: float | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``address`` (``host:port``) until cancelled.

    ``task_status`` receives the base URLs, such as ``["http://127.0.0.1:9100"]``, once
    it listens. ``graceful_timeout`` is Hypercorn's own when None.
    """
    host, port = parse_listen_address(address)
    hc = hypercorn.config.Config()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.include_server_header = server_header
    hc.accesslog = None
    hc.errorlog = errorlog
    if graceful_timeout is not None:
        hc.graceful_timeout = graceful_timeout
    await hypercorn.trio.serve(
        app,  # type: ignore[arg-type]  # Hypercorn's scope TypedDicts vs. plain ASGI mappings
        hc,
        task_status=task_status,
    )
