"""The agent's side of a request: one HTTP/2 stream, one HTTP/1.1 exchange.

The exchange with the local service runs over a small pool of keep-alive
connections.

A plain h11 connection per request, reused when both sides finished cleanly,
costs several times less than a general-purpose HTTP client. Bodies stream both
ways: a request chunk is acknowledged to the server (flow control) only once the
local socket took it, and a response chunk is read only as fast as the server's
window allows.
"""

from __future__ import annotations

import logging
import select
import ssl
from collections import deque
from typing import TYPE_CHECKING

import h2.errors
import h11
import trio

from .._protocol.headers import (
    header_value,
    local_request_headers,
    response_headers_from_local,
)
from .._settings import client_setting
from ..link import Stream, StreamError, answer_error

if TYPE_CHECKING:
    from ._observe import ExchangeObserver, Observer

__all__ = [
    "LocalConnection",
    "LocalFailure",
    "LocalPool",
    "has_bytes_waiting",
    "relay_body",
    "relay_local_http",
]

logger = logging.getLogger("tunnel.client")

RECEIVE_SIZE = 256 * 1024


def has_bytes_waiting(stream: trio.abc.Stream) -> bool:
    """Whether ``stream``'s socket has bytes, or its end, to read now (never waits).

    Raises:
        OSError, ValueError: The socket is closed, or ``stream`` has none.
    """
    raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(raw, trio.SocketStream):
        raise ValueError(f"not over a socket: {raw!r}")
    # poll, not select: select cannot watch descriptors above 1023, which a
    # busy agent reaches.
    poller = select.poll()
    poller.register(raw.socket.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class LocalConnection:
    """One HTTP/1.1 connection to the local service."""

    __slots__ = ("h11", "reused", "socket")

    def __init__(self, socket: trio.abc.Stream) -> None:
        self.socket = socket
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self.reused = False

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            await self.socket.send_all(data)

    async def send_all(self, data: bytes) -> None:
        await self.socket.send_all(data)

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await self.socket.receive_some(RECEIVE_SIZE)
            self.h11.receive_data(bytes(data))

    def buffered_event(self) -> h11.Event | type[h11.PAUSED] | None:
        """The next event if what was read already holds it (never reads); else None."""
        event = self.h11.next_event()
        return None if event is h11.NEED_DATA else event  # type: ignore[return-value]

    def stale(self) -> bool:
        """Whether an idle connection was closed (or spoke) while it sat in the pool."""
        try:
            return has_bytes_waiting(self.socket)
        except (OSError, ValueError):
            return True


class LocalPool:
    """Keep-alive connections to ``host:port``, at most ``max_idle`` kept idle.

    With ``ssl_context`` the HTTP/1.1 connections speak TLS (``local_tls``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_idle: int,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self._idle: deque[LocalConnection] = deque()

    @property
    def label(self) -> str:
        """``host:port``, for messages."""
        return f"{self.host}:{self.port}"

    async def acquire(self) -> LocalConnection:
        """An idle connection that is still open, or a new one."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.stale():
                conn.reused = True
                return conn
            await conn.socket.aclose()
        return LocalConnection(await self.open())

    async def open(self) -> trio.abc.Stream:
        """A new connection for HTTP/1.1: TLS-wrapped when ``ssl_context`` is set.

        Raises:
            LocalFailure: As for :meth:`connect`, or the TLS handshake failed.
        """
        tcp = await self.connect()
        if self.ssl_context is None:
            return tcp
        tls = trio.SSLStream(tcp, self.ssl_context, server_hostname=self.host)
        try:
            with trio.fail_after(self.connect_timeout):
                await tls.do_handshake()
        except (trio.TooSlowError, OSError, trio.BrokenResourceError) as exc:
            await trio.aclose_forcefully(tcp)
            raise tls_failure(self.label, exc) from None
        return tls

    async def connect(self) -> trio.SocketStream:
        """A new connection to the local service.

        Raises:
            LocalFailure: Refused, unreachable or too slow, with the page to show.
        """
        try:
            with trio.fail_after(self.connect_timeout):
                return await trio.open_tcp_stream(self.host, self.port)
        except trio.TooSlowError:
            raise LocalFailure(
                502, f"The local service at {self.label} did not accept a connection in time."
            ) from None
        except OSError as exc:
            raise LocalFailure(
                502,
                f"The tunnel's agent could not reach the local service at {self.label}: "
                f"{exc.strerror or exc}.",
            ) from None

    async def release(self, conn: LocalConnection) -> None:
        """Keep ``conn`` for the next request if both sides finished cleanly."""
        ours, theirs = conn.h11.our_state, conn.h11.their_state
        if ours is h11.DONE and theirs is h11.DONE and len(self._idle) < self.max_idle:
            conn.h11.start_next_cycle()
            self._idle.append(conn)
        else:
            await conn.socket.aclose()

    async def aclose(self) -> None:
        """Close every idle connection."""
        while self._idle:
            await self._idle.pop().socket.aclose()


class LocalFailure(Exception):
    """The local service could not be used; ``detail`` is for the visitor."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def tls_failure(label: str, exc: BaseException) -> LocalFailure:
    """The 502 for a TLS handshake with the local service at ``label`` that failed.

    trio wraps the ``ssl`` error in a ``BrokenResourceError`` with an empty
    message; the page names what ``ssl`` said and, for a certificate the agent
    does not trust, the settings that fix it.
    """
    if isinstance(exc, trio.BrokenResourceError) and isinstance(exc.__cause__, ssl.SSLError):
        exc = exc.__cause__
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        return LocalFailure(
            502,
            f"The TLS certificate of the local service at {label} is not trusted ({detail}); "
            f"give the agent the CA that issued it with {client_setting('local_ca_file')}, "
            f"or skip the check with {client_setting('local_insecure_skip_verify')}.",
        )
    if isinstance(exc, trio.TooSlowError):
        return LocalFailure(502, f"The local service at {label} did not finish TLS in time.")
    if isinstance(exc, ssl.SSLError):
        detail = exc.reason or str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        detail = exc.strerror
    else:
        detail = str(exc) or type(exc).__name__
    return LocalFailure(
        502,
        f"TLS with the local service at {label} failed: {detail}; "
        f"is it serving HTTPS? (Without TLS, leave {client_setting('local_tls')} off.)",
    )


async def relay_local_http(
    stream: Stream, pool: LocalPool, observer: Observer | None = None
) -> None:
    """Serve one stream: forward the request to the local service, relay its answer.

    Never raises for anything the visitor, the local service or the server did;
    each gets its answer (an error page, or a reset stream). ``observer``, if
    given, is told about each event of the exchange.
    """
    assert stream.headers is not None
    record = None
    if observer is not None:
        head = local_request_headers(stream.headers, has_body=not stream.headers_ended)
        record = observer.request_started(*head)
    with stream.cancel_scope as scope:
        try:
            await _exchange(stream, pool, record)
        except LocalFailure as failure:
            if record is not None:
                record.ended(failure.detail, status=failure.status)
            await answer_error(stream, failure.status, failure.detail)
        except StreamError as exc:
            # Reset by the server (visitor gone) or connection lost.
            if record is not None:
                record.ended(f"the stream was reset: {exc}")
        except BaseException:
            if record is not None:
                record.ended("cancelled")
            raise
    if record is not None:
        record.ended()  # no-op if it ended above
    if scope.cancelled_caught and not stream.done:
        stream.cancel()


async def _exchange(
    stream: Stream, pool: LocalPool, record: ExchangeObserver | None = None
) -> None:
    assert stream.headers is not None
    has_body = not stream.headers_ended
    method, target, headers = local_request_headers(stream.headers, has_body=has_body)
    try:
        request = h11.Request(method=method, target=target, headers=headers)
    except h11.LocalProtocolError as exc:
        # HTTP/2 lets through what HTTP/1.1 cannot carry (a space in the path).
        raise LocalFailure(400, f"The request cannot be sent to the local service: {exc}") from None
    conn, response = await _start(pool, request, retry=not has_body)
    try:
        if has_body:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_body, stream, conn, pool.label, record)
                # Errors are caught inside _respond, so they come out as
                # themselves rather than wrapped in an exception group.
                failure, response_started = await _respond(stream, conn, response, pool, record)
                if failure is not None or conn.h11.our_state is not h11.DONE:
                    # Failed, or answered before the request body was all sent:
                    # the rest of the body has no use (RFC 9113 section 8.1).
                    nursery.cancel_scope.cancel()
        else:
            # No nursery without a body to send: even an empty one costs a
            # task switch on its way out, per request.
            failure, response_started = await _respond(stream, conn, response, pool, record)
    except BaseException:
        await _close_quietly(conn)
        raise
    if failure is None and conn.h11.our_state is h11.DONE:
        await pool.release(conn)
        return
    await conn.socket.aclose()
    if failure is None:
        if not stream.done:
            stream.cancel(h2.errors.ErrorCodes.NO_ERROR)
        return
    if isinstance(failure, StreamError | LocalFailure):
        raise failure
    if response_started:
        logger.info("local service %s failed mid-response: %s", pool.label, failure)
        if record is not None:
            record.ended(f"the local service failed mid-response: {failure}")
        if not stream.done:
            stream.cancel(h2.errors.ErrorCodes.INTERNAL_ERROR)
        return
    raise LocalFailure(
        502, f"The local service at {pool.label} sent an invalid response: {failure}"
    )


async def _respond(
    stream: Stream,
    conn: LocalConnection,
    response: h11.Response | None,
    pool: LocalPool,
    record: ExchangeObserver | None,
) -> tuple[Exception | None, bool]:
    """Relay the local response to the stream: (what failed, if anything; whether it started)."""
    response_started = False
    try:
        if response is None:
            response = await _receive_response(conn, pool.label)
        if record is not None:
            record.response_started(response.status_code, response.headers)
        stream.send_headers(response_headers_from_local(response.status_code, response.headers))
        response_started = True
        await relay_body(stream, conn, record)
    except (h11.ProtocolError, OSError, trio.BrokenResourceError, LocalFailure) as exc:
        return exc, response_started
    except StreamError as exc:
        return exc, response_started
    return None, response_started


async def relay_body(
    stream: Stream, conn: LocalConnection, record: ExchangeObserver | None = None
) -> None:
    """Relay the local response's body and trailers to the stream (and ``record``)."""
    event = await conn.next_event()
    while True:
        if isinstance(event, h11.Data):
            if record is not None:
                record.response_data(event.data)
            # A small response's end usually came in the same read as its
            # last chunk: END_STREAM then rides on that chunk's DATA frame
            # instead of a frame of its own, which the server parses apart.
            following = conn.buffered_event()
            if isinstance(following, h11.EndOfMessage) and not following.headers:
                await stream.send_data(bytes(event.data), end_stream=True)
                return
            await stream.send_data(bytes(event.data))
            event = following if following is not None else await conn.next_event()
            continue
        if isinstance(event, h11.EndOfMessage):
            if event.headers:
                stream.send_headers(list(event.headers), end_stream=True)
            else:
                stream.end()
            return
        raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")


async def _start(
    pool: LocalPool, request: h11.Request, *, retry: bool
) -> tuple[LocalConnection, h11.Response | None]:
    """Send the request's head (and, without a body, wait for the response's).

    A reused connection that the local service closed meanwhile is retried on a
    new one when no body has been sent, which is safe because the local service
    never saw the request.
    """
    conn = await pool.acquire()
    try:
        if retry:
            # No body: the request is complete with its head, and saying so
            # lets the connection go back to the pool afterwards.
            head, end = conn.h11.send(request), conn.h11.send(h11.EndOfMessage())
            await conn.send_all((head or b"") + (end or b""))
        else:
            await conn.send(request)
            return conn, None
        return conn, await _receive_response(conn, pool.label, reused=conn.reused)
    except _Retry:
        await conn.socket.aclose()
        return await _start(pool, request, retry=False)
    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
        await conn.socket.aclose()
        if conn.reused:
            return await _start(pool, request, retry=retry)
        raise LocalFailure(
            502, f"The local service at {pool.label} failed to take the request: {exc}"
        ) from None
    except BaseException:
        await _close_quietly(conn)
        raise


class _Retry(Exception):
    """A reused connection turned out closed before any answer."""


async def _receive_response(
    conn: LocalConnection, label: str, *, reused: bool = False
) -> h11.Response:
    try:
        while True:
            event = await conn.next_event()
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue: the body is already on its way
            if isinstance(event, h11.ConnectionClosed):
                if reused:
                    raise _Retry
                raise LocalFailure(
                    502, f"The local service at {label} closed the connection without answering."
                )
            raise LocalFailure(
                502, f"The local service at {label} sent something other than a response."
            )
    except h11.RemoteProtocolError as exc:
        if reused and conn.h11.their_state is h11.SEND_RESPONSE:
            raise _Retry from None
        raise LocalFailure(
            502, f"The local service at {label} sent an invalid response: {exc}"
        ) from None


async def _send_body(
    stream: Stream, conn: LocalConnection, label: str, record: ExchangeObserver | None
) -> None:
    assert stream.headers is not None
    # A body announced with a length is whole once that many bytes went out,
    # whenever END_STREAM follows: the server sends it apart when the visitor's
    # end of message came in a receive of its own, and a local service that
    # answered in between must keep its connection. (h2 refuses a body that
    # runs past its content-length, so nothing can follow.)
    length = header_value(stream.headers, b"content-length")
    left = int(length) if length is not None and length.isdigit() else None
    try:
        while left != 0:
            data = await stream.receive_data()
            if not data:
                break
            if record is not None:
                record.request_data(data)
            await conn.send(h11.Data(data=data))
            stream.acknowledge()
            if left is not None:
                left -= len(data)
        await conn.send(h11.EndOfMessage())
    except (OSError, trio.BrokenResourceError, h11.LocalProtocolError) as exc:
        # The local service stopped reading; what it answered (if anything)
        # is still relayed by the response side.
        logger.debug("request body to %s stopped: %s", label, exc)
    except StreamError:
        pass  # reset: the stream's cancel scope ends the whole exchange


async def _close_quietly(conn: LocalConnection) -> None:
    with trio.CancelScope(shield=True):
        await conn.socket.aclose()
