"""The metrics on an address of their own (``ServerConfig.metrics_address``)."""

from __future__ import annotations

import logging

import trio
from prometheus_client import CollectorRegistry

from .._metrics import MetricsEndpoint
from ._plain import serve_plain

__all__ = ["serve_metrics"]


async def serve_metrics(
    collectors: CollectorRegistry,
    address: str,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` of ``collectors`` over plain HTTP on ``address`` until cancelled.

    ``task_status`` receives the metrics URL, such as
    ``"http://127.0.0.1:9100/metrics"``, once it listens.
    """

    async def started(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve_plain(
            MetricsEndpoint(collectors),
            address,
            errorlog=logging.getLogger("tunnel.server"),
            server_header=False,
            graceful_timeout=1.0,
            task_status=task_status,
        )

    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(started)
        task_status.started(f"{urls[0]}/metrics")
