"""Replay: send a recorded request to the local service again, and record the answer.

The replay goes straight to the local service on a connection of its own (the
visitor and the tunnel server take no part), with the headers and body the
first request had, and is recorded as a new exchange whose ``replay_of`` names
the original. It is bounded like everything the inspector does: one request, a
deadline of :data:`REPLAY_TIMEOUT`, and the response body kept only up to the
recorder's cap (the rest is read and dropped).
"""

from __future__ import annotations

import h11
import trio

from ._observe import Exchange, Recorder
from ._upstream import LocalConnection, LocalFailure, LocalPool

__all__ = ["REPLAY_TIMEOUT", "ReplayRefused", "replay"]

#: Seconds a replay may take, from connecting to the end of the response.
REPLAY_TIMEOUT = 30.0
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


class ReplayRefused(Exception):
    """The exchange cannot be replayed; the message says why."""


async def replay(exchange: Exchange, recorder: Recorder, pool: LocalPool) -> Exchange:
    """Send ``exchange``'s request to the local service again.

    Returns:
        The new exchange, recorded in ``recorder``; a failure (local service
        down, invalid answer, too slow) is recorded in its ``error``.

    Raises:
        ReplayRefused: The request body was larger than the recorder kept, or
            has not all arrived.
    """
    if exchange.request_body.truncated:
        raise ReplayRefused(
            f"the request body ({exchange.request_body.size} bytes) was larger than the "
            f"{exchange.request_body.cap} bytes recorded, so it cannot be sent again"
        )
    if not exchange.request_whole:
        raise ReplayRefused(
            f"the request body has not all arrived ({exchange.request_body.size} bytes so far), "
            "so it cannot be sent again yet"
        )
    body = bytes(exchange.request_body.data)
    headers = [(k, v) for k, v in exchange.request_headers if k not in _FRAMING]
    if body or len(headers) != len(exchange.request_headers):
        headers.append((b"content-length", str(len(body)).encode()))
    method, target = exchange.method.encode(), exchange.target.encode()
    record = recorder.request_started(method, target, headers, replay_of=exchange.id)
    try:
        with trio.fail_after(REPLAY_TIMEOUT):
            await _exchange(
                pool, h11.Request(method=method, target=target, headers=headers), body, record
            )
    except trio.TooSlowError:
        record.ended(f"no complete answer within {REPLAY_TIMEOUT:g}s")
    except LocalFailure as failure:
        record.ended(failure.detail, status=failure.status)
    except (h11.ProtocolError, OSError, trio.BrokenResourceError) as exc:
        record.ended(f"the local service at {pool.label} failed: {exc}")
    except BaseException:
        record.ended("cancelled")
        raise
    record.ended()
    return record


async def _exchange(pool: LocalPool, request: h11.Request, body: bytes, record: Exchange) -> None:
    conn = LocalConnection(await pool.open())
    try:
        await conn.send(request)
        if body:
            await conn.send(h11.Data(data=body))
            record.request_data(body)
        await conn.send(h11.EndOfMessage())
        while True:
            event = await conn.next_event()
            if isinstance(event, h11.Response):
                record.response_started(event.status_code, event.headers)
                break
            if not isinstance(event, h11.InformationalResponse):
                raise h11.RemoteProtocolError(
                    "the local service sent something other than a response"
                )
        while True:
            event = await conn.next_event()
            if isinstance(event, h11.Data):
                record.response_data(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")
    finally:
        with trio.CancelScope(shield=True):
            await conn.socket.aclose()
