"""Public requests: one visitor's HTTP request becomes one HTTP/2 stream to its agent.

The visitor's body flows to the stream as Hypercorn delivers it, and the
agent's response flows back as it arrives; neither is ever held whole. A chunk
is acknowledged to the agent (flow control) only once Hypercorn has taken it,
so a slow visitor slows the local service instead of filling memory.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h2.errors
import trio

from .._config import ServerConfig
from .._mux import Stream, StreamError
from .._protocol.headers import Headers, declares_trailers, header_value, tunnel_request_headers
from ._hooks import RequestInfo
from ._pages import send_error_page
from ._registry import AgentSession

__all__ = ["forward_http"]

logger = logging.getLogger("tunnel.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _VisitorGone(Exception):
    """The visitor disconnected."""


async def forward_http(
    config: ServerConfig, session: AgentSession, scope: Scope, receive: Receive, send: Send
) -> None:
    """Forward one ASGI HTTP request through ``session`` and relay the response."""
    client = scope.get("client")
    visitor = client[0] if client else None
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    headers = tunnel_request_headers(
        method=scope["method"],
        scheme=scope["scheme"],
        path=raw_path,
        query_string=scope.get("query_string", b""),
        headers=scope["headers"],
        client=visitor,
        trust_forwarded=config.trust_forwarded_headers,
    )
    on_request = config.callbacks.on_request
    if on_request is not None:
        try:
            await on_request(
                RequestInfo(session.host, scope["method"], headers[3][1].decode("latin-1"), visitor)
            )
        except Exception:
            logger.exception("on_request callback failed for %s; forwarding anyway", session.host)

    # Hypercorn has usually queued the first body message already, so waiting
    # for it costs nothing, and a request without a body then goes out as one
    # HEADERS frame with END_STREAM.
    first = await receive()
    if first["type"] == "http.disconnect":
        return
    body: bytes = first.get("body", b"")
    more_body: bool = first.get("more_body", False)
    try:
        with trio.fail_after(config.grace_period):
            stream = await session.mux.open_stream(headers, end_stream=not body and not more_body)
    except trio.TooSlowError:
        await send_error_page(
            send,
            503,
            f"The agent for {session.host} is at its limit of requests in flight; "
            "try again shortly.",
        )
        return
    except StreamError as exc:
        await send_error_page(
            send, 502, f"The agent for {session.host} is unavailable: {exc.reason}."
        )
        return
    session.requests_served += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_relay_request, stream, body, more_body, receive, nursery.cancel_scope)
        try:
            await _relay_response(config, session, scope, stream, send)
        finally:
            if not stream.done:
                # The response ended first (or failed): stop the agent too.
                stream.cancel(h2.errors.ErrorCodes.CANCEL)
            nursery.cancel_scope.cancel()


async def _relay_request(
    stream: Stream,
    body: bytes,
    more_body: bool,
    receive: Receive,
    cancel_scope: trio.CancelScope,
) -> None:
    """Send the visitor's body to the agent, then watch for the visitor leaving."""
    try:
        if body or more_body:
            await stream.send_data(body, end_stream=not more_body)
        while more_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _VisitorGone
            more_body = message.get("more_body", False)
            await stream.send_data(message.get("body", b""), end_stream=not more_body)
        # Hypercorn tells a disconnect only through receive(); without this, a
        # long response (server-sent events) would stream to nobody forever.
        while (await receive())["type"] != "http.disconnect":
            pass
        raise _VisitorGone
    except (_VisitorGone, StreamError):
        if not stream.done:
            stream.cancel(h2.errors.ErrorCodes.CANCEL)
        cancel_scope.cancel()


async def _relay_response(
    config: ServerConfig, session: AgentSession, scope: Scope, stream: Stream, send: Send
) -> None:
    try:
        with trio.fail_after(config.response_timeout):
            headers = await stream.receive_headers()
    except trio.TooSlowError:
        await send_error_page(
            send,
            504,
            f"The service behind {session.host} did not answer within "
            f"{config.response_timeout:g} seconds.",
        )
        return
    except StreamError as exc:
        await send_error_page(
            send,
            502,
            f"The agent for {session.host} could not answer: {exc.reason}.",
        )
        return

    status = 502
    response_headers: Headers = []
    for key, value in headers:
        if key == b":status":
            status = int(value)
        elif not key.startswith(b":"):
            response_headers.append((key, value))
    trailers = (
        "http.response.trailers" in scope.get("extensions", {})
        and header_value(scope["headers"], b"te") == b"trailers"
        and declares_trailers(response_headers)
    )
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": response_headers,
            "trailers": trailers,
        }
    )
    finished = False
    try:
        while not finished:
            data = await stream.receive_data()
            # Everything that already arrived goes out in one send, and the last
            # piece carries the end of the body.
            finished = not data or (stream.remote_ended and not stream.data_buffered())
            await send({"type": "http.response.body", "body": data, "more_body": not finished})
            stream.acknowledge()
    except StreamError as exc:
        # The status is sent already; the only honest signal left is to end the
        # response without its final chunk, which Hypercorn does when we return.
        logger.info("response from %s cut short: %s", session.host, exc.reason)
        return
    if trailers:
        await send(
            {
                "type": "http.response.trailers",
                "headers": stream.trailers or [],
                "more_trailers": False,
            }
        )
