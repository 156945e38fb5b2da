"""Refusals sent to ASGI clients: error pages for HTTP, statuses for WebSocket handshakes."""

from __future__ import annotations

from collections.abc import Sequence

from .._asgi import BODY_FOLLOWS, Scope, Send
from .._protocol.pages import PAGE_HEADERS, error_page

__all__ = ["refuse_websocket", "send_error_page"]


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
            BODY_FOLLOWS: True,
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def refuse_websocket(
    scope: Scope,
    send: Send,
    status: int,
    reason: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Refuse a WebSocket handshake with an HTTP status, a reason and any ``headers``."""
    body = reason.encode("utf-8")
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        # Without the extension ASGI can only refuse with a bare 403.
        await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
