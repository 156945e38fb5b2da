"""One attempt at a visitor's HTTP request on one stream to its agent, relayed both ways.

The visitor's body flows to the stream as Hypercorn delivers it, and the agent's
response flows back as it arrives; neither is ever held whole. A chunk is acknowledged
to the agent (flow control) only once Hypercorn has taken it, so a slow visitor slows
the local service instead of filling memory. ``_ingress.py`` decides where the request
goes and how often it is tried; this module relays one try.
"""

from __future__ import annotations

import logging
from typing import Final

import h2.errors
import trio

from .._asgi import BODY_FOLLOWS, RESET_CODE, Receive, Scope, Send
from .._config import ServerConfig
from .._protocol.grpc import is_grpc, split_trailers_only, status_for_reset, status_trailers
from .._protocol.headers import Headers, declares_trailers, header_value
from ..link import Stream, StreamError
from ._limits import Pacer
from ._pages import send_error_page
from ._registry import Session

__all__ = [
    "REPLAY_LIMIT",
    "StreamRelay",
    "closing_headers",
    "idle_message",
    "too_large_message",
    "too_slow_message",
]

logger = logging.getLogger("tunnel.server")

#: Requests sent again through another node when theirs was lost before any answer.
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

#: Request body bytes kept to send again after a refusal; a request whose body
#: outgrew it before the refusal came is answered 502 instead.
REPLAY_LIMIT: Final = 64 << 10


class _VisitorGone(Exception):
    """The visitor disconnected."""


class _TooLarge(Exception):
    """The visitor's body passed ``max_request_body``."""


class _TooSlow(Exception):
    """The visitor's body fell behind ``min_request_body_rate``."""


def closing_headers(scope: Scope) -> Headers:
    """Headers for an answer sent before the request body was read.

    The unread rest of the body makes the HTTP/1.1 connection unusable, so the
    visitor is told not to send another request on it.
    """
    return [(b"connection", b"close")] if scope.get("http_version", "1.1") < "2" else []


def idle_message(config: ServerConfig) -> str:
    return (
        f"The request body stopped arriving for {config.request_idle_timeout:g} seconds; "
        "the request was dropped."
    )


def too_slow_message(config: ServerConfig) -> str:
    return (
        f"The request body arrived slower than {config.min_request_body_rate} bytes per "
        "second; the request was dropped."
    )


def too_large_message(session: Session, limit: int) -> str:
    return f"The request body is larger than the {limit} bytes that {session.host} accepts."


class StreamRelay:
    """One attempt at a visitor's request: its stream to the agent, relayed both ways.

    The request's head and body go to the agent on ``stream``; the response comes back
    to the visitor through ``send``. If the agent refuses the request unread,
    :meth:`replay` gives what ``forward_visitor_http`` sends again elsewhere.
    """

    def __init__(
        self,
        config: ServerConfig,
        session: Session,
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

    def keep_first(self, body: bytes, more_body: bool, *, keep: bool) -> None:
        """Hold the first piece of the body (whatever its size), if ``keep``, to send again."""
        self.kept = [body] if keep else None
        self._kept_size = len(body)
        self.more_body = more_body

    def replay(self) -> tuple[StreamError, bytes, bool] | None:
        """What forward_visitor_http sends again, if the agent refused the request unread."""
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
                self.refusal = (413, too_large_message(self.session, limit or 0))
            elif isinstance(exc, _TooSlow):
                self.refusal = (408, too_slow_message(self.config))
            else:
                self.refusal = (408, idle_message(self.config))
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
        lost = self.session.link.closed_reason is not None
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
        return [] if self.body_done else closing_headers(self.scope)

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
                await send_error_page(send, *self.refusal, closing_headers(self.scope))
            elif exc.code == h2.errors.ErrorCodes.REFUSED_STREAM and self.kept is not None:
                # Never processed (RFC 9113 section 8.7): forward_visitor_http sends it again.
                self.refused = exc
            elif (
                session.retried_when_lost
                and self.kept is not None
                and self.scope["method"] in SAFE_METHODS
                and session.link.closed_reason is not None
            ):
                # The link to the node of the cluster that has the agent was
                # lost before any answer: a safe request may go again, through
                # another node (RFC 9110 section 9.2.2). A node that died then
                # costs its visitors nothing but the time to notice.
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
        pacer = self.pacer
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": response_headers,
                "trailers": trailers,
                # The first body message follows without a wait when its bytes
                # (or the end) came with the headers and no bandwidth limit may
                # delay them: the head may then leave with it, in one write.
                # Else it must not wait for them.
                BODY_FOLLOWS: pacer is None and (stream.remote_ended or stream.data_buffered()),
            }
        )
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
