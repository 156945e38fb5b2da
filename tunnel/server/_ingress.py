"""Public requests: one visitor's HTTP request becomes one HTTP/2 stream to its agent.

Here the request is checked, its head built, and where it goes decided; each try on
a stream is relayed both ways by ``_ingress_relay.py``.

A request the agent refused (REFUSED_STREAM, or above the last stream ID of its
GOAWAY) was never processed, RFC 9113 says, so when the whole request is still
in hand it goes to another connection for the host instead of becoming a 502:
another pool member, another worker's agent, or the agent's new connection.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import h2.errors
import trio

from .._asgi import NotifyingReceive, Receive, Scope, Send
from .._config import ServerConfig
from .._config.hooks import RequestInfo
from .._protocol.headers import Headers, header_value, tunnel_request_headers
from ..link import StreamError
from ._ingress_relay import (
    StreamRelay,
    closing_headers,
    idle_message,
    too_large_message,
)
from ._limits import Pacer
from ._pages import send_error_page
from ._registry import Session

__all__ = ["forward_visitor_http"]

logger = logging.getLogger("tunnel.server")

#: Finds another session for the request's host, waiting for one a little; None if none.
Reroute = Callable[[], Awaitable[Session | None]]

#: Connections one request may be refused by before it is answered 502. Each
#: refusal comes from a connection that is going away and takes no new
#: request, so this is only reached when agents restart faster than requests.
MAX_ATTEMPTS: Final = 4


async def forward_visitor_http(
    config: ServerConfig,
    session: Session,
    scope: Scope,
    receive: Receive,
    send: Send,
    pacer: Pacer | None = None,
    reroute: Reroute | None = None,
) -> None:
    """Forward one ASGI HTTP request through ``session`` and relay the response.

    ``pacer`` slows the body transfers to the bandwidth limits that apply.
    ``reroute`` finds another session for a request the agent refused unread.
    """
    client = scope.get("client")
    visitor = client[0] if client else None
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    request_headers = scope["headers"]
    if session.policy.user is not None:
        # The tunnel's own password is for the tunnel, not for the service.
        request_headers = [(k, v) for k, v in request_headers if k != b"authorization"]
    headers = tunnel_request_headers(
        method=scope["method"],
        scheme=scope["scheme"],
        path=raw_path,
        query_string=scope.get("query_string", b""),
        headers=request_headers,
        client=visitor,
        trust_forwarded=config.trust_forwarded_headers,
    )
    limit = config.max_request_body
    if limit is not None:
        length = header_value(scope["headers"], b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await send_error_page(
                send, 413, too_large_message(session, limit), closing_headers(scope)
            )
            return
    on_request = config.callbacks.on_request
    if on_request is not None:
        try:
            await on_request(
                RequestInfo(session.host, scope["method"], headers[3][1].decode("latin-1"), visitor)
            )
        except Exception:
            logger.exception("on_request callback failed for %s; forwarding anyway", session.host)

    body = b""
    more_body = False
    if not _bodyless(scope):
        # Hypercorn has usually queued the first body message already, so
        # waiting for it costs little, and a request whose body turns out empty
        # still goes out as one HEADERS frame with END_STREAM. (A plain cancel
        # scope rather than fail_after, whose generator-based context manager
        # costs more than the scope, on every request.)
        with trio.move_on_after(config.request_idle_timeout) as waited:
            first = await receive()
        if waited.cancelled_caught:
            await send_error_page(send, 408, idle_message(config))
            return
        if first["type"] == "http.disconnect":
            return
        body = first.get("body", b"")
        more_body = first.get("more_body", False)
        if not more_body and (wrong := _wrong_length(scope, len(body))):
            await send_error_page(send, 400, wrong)
            return
    for attempt in range(1, MAX_ATTEMPTS + 1):
        last = reroute is None or attempt == MAX_ATTEMPTS
        outcome = await _forward_once(
            config, session, scope, receive, send, pacer, headers, body, more_body, last
        )
        if outcome is None:
            return
        refused, body, more_body = outcome
        found = None if reroute is None or last else await reroute()
        if found is None:
            await send_error_page(
                send, 502, f"The agent for {session.host} could not answer: {refused.reason}."
            )
            return
        logger.debug("request for %s refused by its agent, retried: %s", session.host, refused)
        session = found


async def _forward_once(
    config: ServerConfig,
    session: Session,
    scope: Scope,
    receive: Receive,
    send: Send,
    pacer: Pacer | None,
    headers: Headers,
    body: bytes,
    more_body: bool,
    last: bool,
) -> tuple[StreamError, bytes, bool] | None:
    """Forward the request on ``session``; None once it is answered.

    Else the agent refused it unread and it may go elsewhere: the refusal, the
    body received so far (to send again) and whether more of it follows. The
    ``last`` attempt answers a refusal itself, as any failure (a gRPC call
    with its status).
    """
    end_stream = not body and not more_body
    try:
        # Usually the agent has room for another stream and nothing waits.
        stream = session.link.open_stream_nowait(headers, end_stream=end_stream)
        if stream is None:
            with trio.move_on_after(config.grace_period):
                stream = await session.link.open_stream(headers, end_stream=end_stream)
    except StreamError as exc:
        # Nothing was sent: whatever the request, another connection may take it.
        return exc, body, more_body
    if stream is None:
        await send_error_page(
            send,
            503,
            f"The agent for {session.host} is at its limit of requests in flight; "
            "try again shortly.",
        )
        return None
    session.requests_served += 1

    relay = StreamRelay(config, session, scope, stream, receive, send, pacer)
    # The first piece is in hand whatever its size; later ones count to
    # REPLAY_LIMIT. The last attempt keeps nothing: it answers a refusal itself.
    relay.keep_first(body, more_body, keep=not last)
    if end_stream and isinstance(receive, NotifyingReceive):
        # The whole request is sent, so the only thing left to watch on the
        # visitor's side is its leaving, which Hypercorn (patched) tells
        # without a task of ours waiting in receive().
        receive.on_disconnect = relay.visitor_left
        if receive.gone:
            relay.visitor_left()
        try:
            await relay.relay_response()
        finally:
            receive.on_disconnect = None
            if not stream.done:
                stream.cancel(h2.errors.ErrorCodes.CANCEL)
        return relay.replay()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.relay_request, body, more_body, nursery.cancel_scope)
        try:
            await relay.relay_response()
        finally:
            if not stream.done:
                # The response ended first (or failed): stop the agent too.
                stream.cancel(h2.errors.ErrorCodes.CANCEL)
            nursery.cancel_scope.cancel()
    return relay.replay()


def _bodyless(scope: Scope) -> bool:
    """Whether an HTTP/1 request has no body (RFC 9112 section 6.3), so none is awaited.

    Reading the empty body from Hypercorn costs a task switch per request.
    """
    if scope.get("http_version") not in ("1.0", "1.1"):
        return False  # in HTTP/2 only the end of the stream tells
    for key, _ in scope["headers"]:
        if key == b"content-length" or key == b"transfer-encoding":
            return False
    return True


def _wrong_length(scope: Scope, size: int) -> str | None:
    """What is wrong with an HTTP/2 request whose whole body is ``size`` bytes, if anything.

    A content-length that disagrees with the body makes the request malformed
    (RFC 9113 section 8.1.1). h2 catches that in Hypercorn when DATA frames
    came, but not when HEADERS ended the stream: such a request, sent on,
    would reach the local service announcing a body it never gets.
    (HTTP/1.1 frames its body by that length, so there it cannot disagree.)
    """
    if scope.get("http_version") in ("1.0", "1.1"):
        return None
    declared = header_value(scope["headers"], b"content-length")
    if declared is None or (declared.isdigit() and int(declared) == size):
        return None
    if not declared.isdigit():
        return "The request's content-length is not a number of bytes."
    return f"The request's content-length says {int(declared)} bytes, but its body had {size}."
