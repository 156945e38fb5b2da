"""The agent's side of a request over HTTP/2 to the local service (gRPC, h2c, h2).

One long-lived connection (``_upstream_h2_conn.py``) carries every such request as a
stream of its own, driven by the same :class:`~tunnel.link.Link` as the link to the
server, so the rules of the hot path hold on this hop too:

* Flow control is end to end: a DATA chunk from the local service is
  acknowledged to it only once the tunnel stream took it, and a request chunk
  from the tunnel only once the local service's window let it through. A slow
  reader anywhere slows the sender; nothing is ever held whole.
* Trailers pass both ways as trailers, a trailers-only answer (HEADERS with
  END_STREAM) stays one, and a stream that ends abnormally on one side is reset
  on the other with the same error code.
* A stream the local service refuses (``REFUSED_STREAM``, or above the last
  stream id of its GOAWAY) was never processed, as HTTP/2 promises, so it is
  sent again while its request body read so far is small enough to keep.
  grpcio servers refuse a stream that comes right after one ended while they
  still count that one against their ``MAX_CONCURRENT_STREAMS``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import h2.errors
import trio

from .._protocol.grpc import is_grpc
from .._protocol.headers import Headers, header_value, strip_hop_by_hop
from ..link import Stream, StreamError, answer_error
from ._upstream import LocalFailure
from ._upstream_h2_conn import LocalH2

if TYPE_CHECKING:
    from ._observe import ExchangeObserver, Observer

__all__ = ["local_h2_request_headers", "needs_h2", "relay_local_h2"]

logger = logging.getLogger("tunnel.client")

#: Times a request refused by the local service is sent in all.
ATTEMPTS: Final = 4
#: Request body kept for sending again after a refusal; past it, a refusal is final.
REPLAY_LIMIT: Final = 64 << 10


def needs_h2(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a request needs HTTP/2 to the local service (``local_protocol="auto"``).

    gRPC needs it (its status travels in trailers), and so does any visitor that
    asked for trailers with ``TE: trailers``: over HTTP/1.1 few services send them.
    """
    if is_grpc(headers):
        return True
    te = header_value(headers, b"te")
    return te is not None and te.strip().lower() == b"trailers"


def local_h2_request_headers(headers: Sequence[tuple[bytes, bytes]], scheme: bytes) -> Headers:
    """The request header list for the local service, from the tunnel stream's.

    Pseudo-headers stay first and as the visitor sent them (``:authority`` is
    the public host name, as over HTTP/1.1), except ``:scheme``, which is that
    of the hop to the local service; ``X-Forwarded-Proto`` tells the visitor's.
    """
    pseudo: Headers = []
    regular: Headers = []
    for key, value in headers:
        if key.startswith(b":"):
            pseudo.append((key, scheme) if key == b":scheme" else (key, value))
        else:
            regular.append((key, value))
    return pseudo + strip_hop_by_hop(regular)


def _response_headers(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    pseudo = [(k, v) for k, v in headers if k.startswith(b":")]
    return pseudo + strip_hop_by_hop((k, v) for k, v in headers if not k.startswith(b":"))


def _status(headers: Sequence[tuple[bytes, bytes]]) -> int:
    value = header_value(headers, b":status") or b"0"
    return int(value) if value.isdigit() else 0


async def relay_local_h2(stream: Stream, local: LocalH2, observer: Observer | None = None) -> None:
    """Serve one tunnel stream over HTTP/2 to the local service.

    Never raises for anything the visitor, the local service or the server did:
    each gets its answer (an error page, or a reset stream with the matching code).
    """
    assert stream.headers is not None
    headers = local_h2_request_headers(stream.headers, local.scheme)
    record: ExchangeObserver | None = None
    if observer is not None:
        record = observer.request_started(
            header_value(headers, b":method") or b"",
            header_value(headers, b":path") or b"/",
            [(k, v) for k, v in headers if not k.startswith(b":")],
        )
    body = _RequestBody(ended=stream.headers_ended)
    upstream: Stream | None = None
    with stream.cancel_scope as scope:
        try:
            for attempt in range(1, ATTEMPTS + 1):
                upstream = await local.open_stream(headers, end_stream=body.empty)
                try:
                    await _exchange(stream, upstream, body, record)
                    break
                except _Refused:
                    if attempt == ATTEMPTS:
                        raise
                    logger.debug(
                        "the local service %s refused a stream; sending it again", local.label
                    )
                    # A refusal says "not now": give the stream it still counts
                    # a moment to end, then try again (a fresh connection if
                    # the old one is going away).
                    await trio.sleep(0.01 * attempt)
        except LocalFailure as failure:
            if record is not None:
                record.ended(failure.detail, status=failure.status)
            await answer_error(stream, failure.status, failure.detail)
        except _Refused as refused:
            if not stream.done:
                stream.cancel(refused.error.code)
            if record is not None:
                record.ended(f"the local service reset the stream: {refused.error.reason}")
        except StreamError as exc:
            if record is not None:
                record.ended(f"the stream was reset: {exc.reason}")
        finally:
            if upstream is not None and not upstream.done:
                # Whatever ended this exchange early (the visitor's reset, the
                # link lost, a bug), the local RPC stops now, with the same code.
                code = (
                    stream.reset.code if stream.reset is not None else h2.errors.ErrorCodes.CANCEL
                )
                upstream.cancel(code)
    if record is not None:
        record.ended("cancelled" if scope.cancelled_caught else None)
    if scope.cancelled_caught and not stream.done:
        stream.cancel()


class _Refused(Exception):
    """The local service refused the stream before any work began; it may be sent again."""

    def __init__(self, error: StreamError) -> None:
        super().__init__(error.reason)
        self.error = error


class _RequestBody:
    """The request body read from the tunnel so far, kept while small for a second try."""

    __slots__ = ("chunks", "ended", "replayable", "size", "trailers")

    def __init__(self, *, ended: bool) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        #: Whether ``chunks`` still hold everything read (nothing dropped).
        self.replayable = True
        #: Whether the tunnel stream's body has been read to its end.
        self.ended = ended
        self.trailers: Headers | None = None

    @property
    def empty(self) -> bool:
        """Whether the request has nothing after its headers."""
        return self.ended and not self.size and self.trailers is None

    def keep(self, data: bytes) -> None:
        if not self.replayable:
            return
        if self.size + len(data) > REPLAY_LIMIT:
            self.replayable = False
            self.chunks.clear()
            return
        self.chunks.append(data)
        self.size += len(data)


async def _exchange(
    stream: Stream, upstream: Stream, body: _RequestBody, record: ExchangeObserver | None
) -> None:
    # The tunnel stream's own end (a reset by the server) comes out as itself,
    # after the nursery, rather than wrapped in an exception group.
    tunnel_reset: StreamError | None = None
    refused: _Refused | None = None
    async with trio.open_nursery() as nursery:
        if not body.empty:
            nursery.start_soon(_send_request_body, stream, upstream, body, record)
        try:
            await _relay_response(stream, upstream, record)
        except StreamError as exc:
            nursery.cancel_scope.cancel()
            if upstream.reset is not exc:
                tunnel_reset = exc
            elif (
                exc.code == h2.errors.ErrorCodes.REFUSED_STREAM
                and upstream.headers is None
                and body.replayable
            ):
                # Never processed (RFC 9113 section 8.7), and everything sent
                # is still here: the caller sends it again.
                refused = _Refused(exc)
            else:
                # The local service reset its stream: reset ours with its code,
                # so the visitor learns how it ended (CANCEL, REFUSED_STREAM, ...).
                if not stream.done:
                    stream.cancel(exc.code)
                if record is not None:
                    record.ended(f"the local service reset the stream: {exc.reason}")
        else:
            if not upstream.local_ended:
                # Answered before the whole request was sent: the rest has no use
                # (RFC 9113 section 8.1); tell both sides to stop sending it.
                nursery.cancel_scope.cancel()
                upstream.cancel(h2.errors.ErrorCodes.NO_ERROR)
                if not stream.done:
                    stream.cancel(h2.errors.ErrorCodes.NO_ERROR)
    if tunnel_reset is not None:
        raise tunnel_reset
    if refused is not None:
        raise refused


async def _relay_response(
    stream: Stream, upstream: Stream, record: ExchangeObserver | None
) -> None:
    headers = _response_headers(await upstream.receive_headers())
    if record is not None:
        record.response_started(_status(headers), [(k, v) for k, v in headers if k[:1] != b":"])
    # A trailers-only answer (a gRPC error) stays one HEADERS frame with END_STREAM.
    stream.send_headers(headers, end_stream=upstream.headers_ended)
    if upstream.headers_ended:
        return
    while True:
        data = await upstream.receive_data()
        if not data:
            break
        if record is not None:
            record.response_data(data)
        await stream.send_data(data)
        upstream.acknowledge()
    if upstream.trailers is not None:
        stream.send_headers(strip_hop_by_hop(upstream.trailers), end_stream=True)
    else:
        stream.end()


async def _send_request_body(
    stream: Stream, upstream: Stream, body: _RequestBody, record: ExchangeObserver | None
) -> None:
    try:
        # A second try first sends again what the first one had read.
        for chunk in body.chunks:
            await upstream.send_data(chunk)
        while not body.ended:
            data = await stream.receive_data()
            if not data:
                body.ended = True
                body.trailers = stream.trailers
                break
            if record is not None:
                record.request_data(data)
            body.keep(data)
            await upstream.send_data(data)
            stream.acknowledge()
        if body.trailers is not None:
            upstream.send_headers(strip_hop_by_hop(body.trailers), end_stream=True)
        else:
            upstream.end()
    except StreamError:
        # Either side reset: the tunnel's reset cancels the whole exchange
        # through its scope, the local service's is answered by the response side.
        pass
