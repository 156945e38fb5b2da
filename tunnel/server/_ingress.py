"""Public requests: one visitor's HTTP request becomes one HTTP/2 stream to its agent.

The visitor's body flows to the stream as Hypercorn delivers it, and the
agent's response flows back as it arrives; neither is ever held whole. A chunk
is acknowledged to the agent (flow control) only once Hypercorn has taken it,
so a slow visitor slows the local service instead of filling memory.

A request the agent refused (REFUSED_STREAM, or above the last stream ID of its
GOAWAY) was never processed, RFC 9113 says, so when the whole request is still
in hand it goes to another connection for the host instead of becoming a 502:
another pool member, another worker's agent, or the agent's new connection.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import h2.errors
import trio

from .._config import ServerConfig
from .._protocol.grpc import is_grpc, split_trailers_only, status_for_reset, status_trailers
from .._protocol.headers import Headers, declares_trailers, header_value, tunnel_request_headers
from ..link import Stream, StreamError
from ._hooks import RequestInfo
from ._hypercorn_h2 import RESET_CODE
from ._hypercorn_patches import NotifyingReceive
from ._limits import Pacer
from ._pages import send_error_page
from ._registry import AgentSession

__all__ = ["forward_http"]

logger = logging.getLogger("tunnel.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: Finds another session for the request's host, waiting for one a little; None if none.
Reroute = Callable[[], Awaitable[AgentSession | None]]

#: Connections one request may be refused by before it is answered 502. Each
#: refusal comes from a connection that is going away and takes no new
#: request, so this is only reached when agents restart faster than requests.
MAX_ATTEMPTS: Final = 4
#: Request body bytes kept to send again after a refusal; a request whose body
#: outgrew it before the refusal came is answered 502 instead.
REPLAY_LIMIT: Final = 64 << 10


class _VisitorGone(Exception):
    """The visitor disconnected."""


class _TooLarge(Exception):
    """The visitor's body passed ``max_request_body``."""


class _TooSlow(Exception):
    """The visitor's body fell behind ``min_request_body_rate``."""


async def forward_http(
    config: ServerConfig,
    session: AgentSession,
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
            await send_error_page(send, 413, _too_large(session, limit), _closing(scope))
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
            await send_error_page(send, 408, _idle(config))
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
    session: AgentSession,
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
        stream = session.mux.open_stream_nowait(headers, end_stream=end_stream)
        if stream is None:
            with trio.move_on_after(config.grace_period):
                stream = await session.mux.open_stream(headers, end_stream=end_stream)
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

    exchange = _Exchange(config, session, scope, stream, receive, send, pacer)
    # The first piece is in hand whatever its size; later ones count to
    # REPLAY_LIMIT. The last attempt keeps nothing: it answers a refusal itself.
    exchange.kept = None if last else [body]
    exchange._kept_size = len(body)
    exchange.more_body = more_body
    if end_stream and isinstance(receive, NotifyingReceive):
        # The whole request is sent, so the only thing left to watch on the
        # visitor's side is its leaving, which Hypercorn (patched) tells
        # without a task of ours waiting in receive().
        receive.on_disconnect = exchange.visitor_left
        if receive.gone:
            exchange.visitor_left()
        try:
            await exchange.relay_response()
        finally:
            receive.on_disconnect = None
            if not stream.done:
                stream.cancel(h2.errors.ErrorCodes.CANCEL)
        return exchange.replay()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exchange.relay_request, body, more_body, nursery.cancel_scope)
        try:
            await exchange.relay_response()
        finally:
            if not stream.done:
                # The response ended first (or failed): stop the agent too.
                stream.cancel(h2.errors.ErrorCodes.CANCEL)
            nursery.cancel_scope.cancel()
    return exchange.replay()


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


def _closing(scope: Scope) -> Headers:
    """Headers for an answer sent before the request body was read.

    The unread rest of the body makes the HTTP/1.1 connection unusable, so the
    visitor is told not to send another request on it.
    """
    return [(b"connection", b"close")] if scope.get("http_version", "1.1") < "2" else []


def _idle(config: ServerConfig) -> str:
    return (
        f"The request body stopped arriving for {config.request_idle_timeout:g} seconds; "
        "the request was dropped."
    )


def _too_slow(config: ServerConfig) -> str:
    return (
        f"The request body arrived slower than {config.min_request_body_rate} bytes per "
        "second; the request was dropped."
    )


def _too_large(session: AgentSession, limit: int) -> str:
    return f"The request body is larger than the {limit} bytes that {session.host} accepts."


class _Exchange:
    """One visitor request and its stream, relayed both ways."""

    def __init__(
        self,
        config: ServerConfig,
        session: AgentSession,
        scope: Scope,
        stream: Stream,
        receive: Receive,
        send: Send,
        pacer: Pacer | None,
    ) -> None:
        self.config = config
        self.session = session
        self.scope = scope
        self.stream = stream
        self.receive = receive
        self.send = send
        self.pacer = pacer
        #: Set when the request itself was refused part-way (status, message).
        self.refusal: tuple[int, str] | None = None
        #: Bounds the wait for the response headers; see _body_sent.
        self.waiting = trio.CancelScope()
        self.body_done = False
        #: The body taken from the visitor so far, while it fits REPLAY_LIMIT,
        #: so that a refused request can be sent again; else None.
        self.kept: list[bytes] | None = None
        self._kept_size = 0
        #: Whether more of the body is still to come from the visitor.
        self.more_body = False
        #: Set instead of answering when the agent refused the request unread.
        self.refused: StreamError | None = None

    def replay(self) -> tuple[StreamError, bytes, bool] | None:
        """What forward_http sends again, if the agent refused the request unread."""
        if self.refused is None or self.kept is None:
            return None
        return self.refused, b"".join(self.kept), self.more_body

    def _keep(self, body: bytes, more_body: bool) -> None:
        self.more_body = more_body
        if self.kept is not None and body:
            self._kept_size += len(body)
            if self._kept_size > REPLAY_LIMIT:
                self.kept = None
            else:
                self.kept.append(body)

    async def relay_request(
        self, body: bytes, more_body: bool, cancel_scope: trio.CancelScope
    ) -> None:
        """Send the visitor's body to the agent, then watch for the visitor leaving."""
        stream, limit, pacer = self.stream, self.config.max_request_body, self.pacer
        idle, rate = self.config.request_idle_timeout, self.config.min_request_body_rate
        sent = 0
        # Only the time spent waiting for the visitor counts against its rate:
        # waits for the agent or the local service (backpressure) and for our
        # own bandwidth limits are not the visitor's doing.
        waited = 0.0
        try:
            while True:
                if body or not more_body:
                    sent += len(body)
                    if limit is not None and sent > limit:
                        raise _TooLarge
                    if pacer is not None:
                        await pacer.pace(len(body))
                    if body or not stream.local_ended:
                        await stream.send_data(body, end_stream=not more_body)
                    if not more_body:
                        self._body_sent()
                if not more_body:
                    break
                timeout = idle
                if rate is not None:
                    # As mod_reqtimeout's MinRate: the body may take
                    # request_idle_timeout, plus a second per ``rate`` bytes
                    # it brought, so a pause is fine once it was earned.
                    timeout = max(0.0, min(idle, idle + sent / rate - waited))
                started = trio.current_time()
                with trio.move_on_after(timeout) as stalled:
                    message = await self.receive()
                waited += trio.current_time() - started
                if stalled.cancelled_caught:
                    raise _TooSlow if timeout < idle else trio.TooSlowError
                if message["type"] == "http.disconnect":
                    raise _VisitorGone
                body = message.get("body", b"")
                more_body = message.get("more_body", False)
                self._keep(body, more_body)
            # Hypercorn tells a disconnect only through receive(); without this,
            # a long response (server-sent events) would stream to nobody forever.
            while (await self.receive())["type"] != "http.disconnect":
                pass
            raise _VisitorGone
        except (_TooLarge, _TooSlow, trio.TooSlowError) as exc:
            # The response side answers 413 or 408 if it has not started yet.
            if isinstance(exc, _TooLarge):
                self.refusal = (413, _too_large(self.session, limit or 0))
            elif isinstance(exc, _TooSlow):
                self.refusal = (408, _too_slow(self.config))
            else:
                self.refusal = (408, _idle(self.config))
            if not stream.done:
                stream.cancel(h2.errors.ErrorCodes.CANCEL)
        except StreamError:
            if stream.reset is None:
                # The agent answered before taking the whole body and asked us to
                # stop sending (RFC 9113 section 8.1): the response goes on.
                return
            if stream.reset.code == h2.errors.ErrorCodes.REFUSED_STREAM:
                # The response side sees the refusal too, and sends the request
                # elsewhere: cancelling it here would leave the visitor unanswered.
                return
            cancel_scope.cancel()
        except _VisitorGone:
            # Resetting the stream ends the response side through its own
            # reads. Not cancel_scope: Hypercorn tells of the disconnect from
            # inside the send that completes the response, and cancelling that
            # send leaves the connection without its idle timer, so it stays
            # open (and a graceful shutdown waits for it) until the visitor
            # closes it.
            if not stream.done:
                stream.cancel(h2.errors.ErrorCodes.CANCEL)

    def visitor_left(self) -> None:
        """Stop the agent: the visitor is gone (what ``_VisitorGone`` does below)."""
        if not self.stream.done:
            self.stream.cancel(h2.errors.ErrorCodes.CANCEL)

    def _body_sent(self) -> None:
        # The clock for the response starts once the whole request is sent: a
        # long upload is no sign of a slow service.
        self.body_done = True
        if self._grpc_call():
            # A gRPC call carries its own deadline (grpc-timeout), which the
            # client enforces by cancelling; a long call is no sign of a stuck
            # service, and a 504 would reach the client as UNAVAILABLE.
            return
        self.waiting.deadline = trio.current_time() + self.config.response_timeout

    def _trailers_allowed(self) -> bool:
        return (
            "http.response.trailers" in self.scope.get("extensions", {})
            and header_value(self.scope["headers"], b"te") == b"trailers"
        )

    def _grpc_call(self) -> bool:
        return self._trailers_allowed() and is_grpc(self.scope["headers"])

    async def _end_call(self, exc: StreamError, *, start: bool = False) -> None:
        """End a gRPC call that the agent or the local service could not finish."""
        lost = self.session.mux.closed_reason is not None
        code = status_for_reset(exc.code, connection_lost=lost)
        host = self.session.host
        message = (
            f"tunnel: the agent for {host} is unavailable: {exc.reason}"
            if lost
            else f"tunnel: the service behind {host} ended the call: {exc.reason}"
        )
        if start:
            await self.send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/grpc")],
                    "trailers": True,
                }
            )
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        await self.send(
            {"type": "http.response.trailers", "headers": status_trailers(code, message)}
        )

    def _unread(self) -> Headers:
        """``Connection: close`` when we answer before reading the whole body."""
        return [] if self.body_done else _closing(self.scope)

    async def relay_response(self) -> None:
        """Relay the agent's response (or an error page) to the visitor."""
        config, session, stream, send = self.config, self.session, self.stream, self.send
        if stream.local_ended:
            self._body_sent()
        try:
            with self.waiting:
                headers = await stream.receive_headers()
            if self.waiting.cancelled_caught:
                raise trio.TooSlowError
        except trio.TooSlowError:
            await send_error_page(
                send,
                504,
                f"The service behind {session.host} did not answer within "
                f"{config.response_timeout:g} seconds.",
                self._unread(),
            )
            return
        except StreamError as exc:
            if self.refusal is not None:
                await send_error_page(send, *self.refusal, _closing(self.scope))
            elif exc.code == h2.errors.ErrorCodes.REFUSED_STREAM and self.kept is not None:
                # Never processed (RFC 9113 section 8.7): forward_http sends it again.
                self.refused = exc
            elif self._grpc_call():
                await self._end_call(exc, start=True)
            else:
                await send_error_page(
                    send,
                    502,
                    f"The agent for {session.host} could not answer: {exc.reason}.",
                    self._unread(),
                )
            return

        status = 0
        response_headers: Headers = []
        for key, value in headers:
            if key == b":status":
                status = int(value) if len(value) == 3 and value.isdigit() else 0
            elif not key.startswith(b":"):
                response_headers.append((key, value))
        if stream.headers_ended and self.scope["method"] != "HEAD":
            # The agent ended the response with its headers: whatever length
            # they declare, the body is empty, and must be sent as such.
            response_headers = [(k, v) for k, v in response_headers if k != b"content-length"]
        if not 200 <= status <= 599:
            stream.cancel(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            await send_error_page(
                send, 502, f"The agent for {session.host} sent an invalid response status."
            )
            return
        # gRPC responses carry their status in trailers without announcing them
        # with a Trailer header; Hypercorn sends trailers only over HTTP/2 (where
        # the extension is offered) to a visitor that sent TE: trailers.
        grpc = self._trailers_allowed() and is_grpc(response_headers)
        trailers = grpc or (self._trailers_allowed() and declares_trailers(response_headers))
        if grpc and stream.headers_ended:
            # Trailers-only (a gRPC error): the status and metadata are trailers.
            response_headers, trailing = split_trailers_only(response_headers)
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": response_headers,
                    "trailers": True,
                }
            )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            await send({"type": "http.response.trailers", "headers": trailing})
            return
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": response_headers,
                "trailers": trailers,
            }
        )
        pacer = self.pacer
        finished = False
        try:
            while not finished:
                data = await stream.receive_data()
                # Everything that already arrived goes out in one send, and the
                # last piece carries the end of the body.
                finished = not data or (stream.remote_ended and not stream.data_buffered())
                if pacer is not None and data:
                    await pacer.pace(len(data))
                await send({"type": "http.response.body", "body": data, "more_body": not finished})
                stream.acknowledge()
        except StreamError as exc:
            logger.info("response from %s cut short: %s", session.host, exc.reason)
            if grpc:
                # A gRPC client reads the end of its call from the trailers:
                # the status it would have derived from the reset or lost link.
                await self._end_call(exc)
                return
            # The status is sent already; the only honest signal left is to end
            # the response without its final chunk: Hypercorn closes an HTTP/1
            # connection, and (fixed) resets an HTTP/2 stream with the agent's code.
            self.scope[RESET_CODE] = exc.code
            return
        if trailers:
            await send(
                {
                    "type": "http.response.trailers",
                    "headers": stream.trailers or [],
                    "more_trailers": False,
                }
            )
