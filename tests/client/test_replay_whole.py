"""Replay sends a request again only once its body has all arrived (issue 11's audit).

The inspector's replay took the recorded body as the request's body whenever
it was clicked. While the body is still on its way (a slow upload, or a
request whose answer comes before its body ends), that is a shorter request,
and it went out with a Content-Length to match: the local service got a
different request, and the inspector said it was replayed. Whether the body is
whole is decided by what the request announced.
"""

from __future__ import annotations

import pytest
import trio

from helpers import RecordingService
from tunnel.client._inspector_render import exchange_detail
from tunnel.client._observe import Recorder
from tunnel.client._replay import ReplayRefused, replay
from tunnel.client._upstream import LocalPool


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_request_is_replayed_only_once_its_body_has_all_arrived(framing: str) -> None:
    service = RecordingService()
    recorder = Recorder()
    pool = LocalPool("127.0.0.1", service.port, max_idle=2, connect_timeout=5)
    framing_header = (
        (b"content-length", b"10")
        if framing == "content-length"
        else (b"transfer-encoding", b"chunked")
    )
    try:
        with trio.fail_after(20):
            exchange = recorder.request_started(
                b"POST", b"/length/replayed", [(b"host", b"app.localhost"), framing_header]
            )
            exchange.request_data(b"abc")
            assert exchange_detail(exchange)["replayable"] is False
            with pytest.raises(ReplayRefused, match="not all arrived"):
                await replay(exchange, recorder, pool)
            exchange.request_data(b"defghij")
            exchange.response_started(200, [])
            exchange.ended()
            assert exchange_detail(exchange)["replayable"] is True
            again = await replay(exchange, recorder, pool)
            assert again.error is None, again.error
            assert again.status == 200
        received = service.records("/length/replayed")
        assert [r.body for r in received] == [b"abcdefghij"]
    finally:
        await pool.aclose()
        service.close()


async def test_a_request_cut_short_is_not_replayed() -> None:
    recorder = Recorder()
    exchange = recorder.request_started(
        b"PUT", b"/upload", [(b"host", b"app.localhost"), (b"transfer-encoding", b"chunked")]
    )
    exchange.request_data(b"part of it")
    exchange.ended("the stream was reset: the visitor went away")
    pool = LocalPool("127.0.0.1", 9, max_idle=1, connect_timeout=1)
    try:
        with trio.fail_after(5), pytest.raises(ReplayRefused, match="not all arrived"):
            await replay(exchange, recorder, pool)
    finally:
        await pool.aclose()
