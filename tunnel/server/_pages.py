"""Sending the error pages of :mod:`tunnel._protocol.pages` to an ASGI visitor."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .._protocol.pages import PAGE_HEADERS, error_page

__all__ = ["send_error_page"]

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def send_error_page(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer an ASGI HTTP request with an error page (and any extra ``headers``)."""
    body = error_page(status, detail)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *PAGE_HEADERS,
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
