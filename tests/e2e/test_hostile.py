"""Hostile input: malicious agents, malicious visitors, and attempts to use the server as a proxy.

Every attack runs against a real server (Hypercorn, port 0) that also carries a
legitimate tunnel, ``good.localhost``. Each test checks three things:

* the attacker gets a clear, bounded answer: its own connection closed with a
  reason, or an HTTP error status;
* the legitimate tunnel keeps answering correctly and promptly throughout
  (:class:`hostile.Witness` requests through it all along) and its agent is
  never knocked off;
* the server's memory stays bounded (:func:`hostile.watch_memory`: the peak
  RSS of this process, where server, agents and attackers all run).

The bounds are stated next to each test; the measured numbers are logged as
warnings (``pytest -rA`` or ``-o log_cli=true`` shows them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import h2.errors
import hpack
import httpx
import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio_websocket
from hostile import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    TOKEN,
    WINDOW_UPDATE,
    H2Visitor,
    Memory,
    MiB,
    RawVisitor,
    RecordingService,
    Server,
    frame,
    h2_request,
    open_evil_agent,
    start_server,
    start_service,
    watch_memory,
    witness_traffic,
)
from hpack.hpack import encode_integer

import tunnel
from helpers import (
    STREAM_CHUNK_1,
    STREAM_CHUNK_2,
    LocalService,
    Outcome,
    eventually,
    fetch,
    free_port,
)
from tunnel._protocol.handshake import HOST_HEADER, SUBPROTOCOL
from tunnel._transport import TransportClosed

#: Examples per fuzz test; the ``fuzz`` nox session raises it.
FUZZ_EXAMPLES = int(os.environ.get("TUNNEL_FUZZ_EXAMPLES", "25"))
#: Visitors' runs are cheaper (no agent to reconnect), so they get more examples.
VISITOR_FUZZ_EXAMPLES = int(os.environ.get("TUNNEL_FUZZ_EXAMPLES", "100"))
PHASES = tuple(hypothesis.Phase)
if not os.environ.get("TUNNEL_FUZZ_SHRINK"):
    PHASES = tuple(p for p in PHASES if p is not hypothesis.Phase.shrink)
EVIL = "evil.localhost"
GOOD = "good.localhost"


# -- fixtures -------------------------------------------------------------------


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    return await start_server(nursery)


@pytest.fixture
async def good(nursery: trio.Nursery) -> RecordingService:
    """The legitimate tunnel's local service; it records what reached it."""
    return await start_service(nursery, "good")


@pytest.fixture
async def good_http(
    server: Server, good: LocalService, open_agent: Any, visitor: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A visitor of the legitimate tunnel, ``good.localhost``, whose agent is connected."""
    async with open_agent(server.port, good.port, host=GOOD), visitor(server.port, GOOD) as http:
        yield http


def connected_since(server: Server, host: str = GOOD) -> float:
    """When the agent for ``host`` connected: it changes if the agent was knocked off."""
    (stats,) = [s for s in server.app.statistics() if s.host == host]
    return stats.connected_since


def no_server_errors(caplog: pytest.LogCaptureFixture, logger: str = "") -> None:
    """No error was logged (by ``logger`` and below): every attack was answered, none
    crashed a handler.
    """
    errors = [
        f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}" if r.exc_info else r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(logger)
    ]
    assert not errors, errors[:3]


@contextlib.asynccontextmanager
async def under_attack(
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    label: str,
    *,
    seconds: float,
    peak_rss: int | None = None,
    max_latency: float = 3.0,
    caplog: pytest.LogCaptureFixture | None = None,
    errors_of: str = "",
) -> AsyncIterator[Memory]:
    """The frame of an attack: capped at ``seconds``, the legitimate tunnel witnessed
    throughout (no request slower than ``max_latency``), memory watched.

    On leaving, the legitimate agent must still be on its first connection,
    the peak RSS under ``peak_rss`` (if given), and, with ``caplog``, no error
    logged by ``errors_of`` and below.
    """
    since = connected_since(server)
    with trio.fail_after(seconds), watch_memory(label) as memory:
        async with witness_traffic(good_http, good, max_latency=max_latency):
            yield memory
    assert connected_since(server) == since, "the legitimate tunnel's agent was knocked off"
    if peak_rss is not None:
        assert memory.peak_rss < peak_rss, f"{label}: {memory}"
    if caplog is not None:
        no_server_errors(caplog, errors_of)


# -- a malicious agent ----------------------------------------------------------
#
# The agent is the HTTP/2 *server* inside its WebSocket; the tunnel server is the
# client and opens every stream. Anything else the agent sends is a protocol
# error that must end its own connection (RFC 9113 section 5.4.1), with a reason.


async def provoke(
    server: Server,
    payload: bytes | list[bytes],
    visitor: Any,
    *,
    with_stream: bool = True,
    answer_if_kept: bool = True,
    await_visit: bool = False,
) -> tuple[trio_websocket.CloseReason | None, Outcome]:
    """Connect as ``evil.localhost``, let a visitor open stream 1, send ``payload``.

    Returns how the server closed the agent's connection (None: it kept it
    open) and what the visitor got. A connection that still answers a PING is
    then made to answer stream 1 properly (``answer_if_kept``), or the
    visitor's answer is awaited as it is (``await_visit``). One that
    neither answers nor closes within 0.5 s is waiting for the rest of a frame
    the payload began (a length that lies): not a stall of the server, whose
    other tunnels the callers keep checking, and the keepalive ends it.
    """
    visit = Outcome()
    messages = [payload] if isinstance(payload, bytes) else payload
    # A request the agent refused unread (a GOAWAY below its stream) waits up
    # to grace_period for the agent to come back before its 502.
    patience = server.app.config.grace_period + 5.0
    async with (
        open_evil_agent(server.port, EVIL) as evil,
        visitor(server.port, EVIL, timeout=httpx.Timeout(patience)) as http,
        trio.open_nursery() as nursery,
    ):
        if with_stream:
            nursery.start_soon(partial(fetch, http, "/evil", visit, keep_error=True))
            assert await evil.wait_request() == 1
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            # The server may close before it has read everything.
            for message in messages:
                await evil.send(message)
        alive: bool | None = None
        with trio.move_on_after(0.5):
            alive = await evil.alive()
        if alive is None or alive:
            if alive and with_stream and answer_if_kept:
                # Ignored, then: the connection must still work.
                await evil.send(VALID_ANSWER)
            if alive and with_stream and (answer_if_kept or await_visit):
                with trio.fail_after(5):
                    await visit.done.wait()
            nursery.cancel_scope.cancel()
            return None, visit
        reason = await evil.wait_closed()
        if with_stream:
            with trio.fail_after(patience):
                await visit.done.wait()
        return reason, visit


def hpack_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    return hpack.Encoder().encode(headers)


RESPONSE_200 = hpack_block([(b":status", b"200"), (b"content-length", b"5")])
#: A correct answer to stream 1 (the fuzz mutates it).
VALID_ANSWER = frame(HEADERS, END_HEADERS, 1, RESPONSE_200) + frame(DATA, END_STREAM, 1, b"hello")

# Each a header block the server's HPACK decoder must refuse.
BAD_HPACK = {
    "index 0": b"\x80",
    "index past the tables": b"\xff\xff\xff\x0f",
    "integer overflow": b"\xff" + b"\xff" * 12 + b"\x0f",
    "truncated literal": b"\x40\x0a" + b"abc",
    "bad huffman": b"\x00\x81\xff\x81\xff",
    "table size over the limit": b"\x3f\xe1\xff\x03",
    # 4000 bytes into the dynamic table (index 62), then named 20 000 times:
    # 80 MB decoded from 24 KB sent, unless the header list limit stops it.
    "hpack bomb": b"\x40\x01x" + bytes(encode_integer(4000, 7)) + b"a" * 4000 + b"\xbe" * 20_000,
}


# Frames on streams the server never opened, or that an HTTP/2 server may never send.
STREAM_ABUSE = {
    "HEADERS on an odd stream the server did not open": frame(
        HEADERS, END_HEADERS | END_STREAM, 99, RESPONSE_200
    ),
    "HEADERS on an even stream (an unannounced push)": frame(
        HEADERS, END_HEADERS | END_STREAM, 2, RESPONSE_200
    ),
    "HEADERS on stream 0": frame(HEADERS, END_HEADERS, 0, RESPONSE_200),
    "PUSH_PROMISE (push is disabled)": frame(
        PUSH_PROMISE, END_HEADERS, 1, (2).to_bytes(4, "big") + RESPONSE_200
    ),
    "DATA on stream 0": frame(DATA, 0, 0, b"hello"),
    "DATA on an idle stream": frame(DATA, END_STREAM, 7, b"hello"),
    "RST_STREAM on an idle stream": frame(RST_STREAM, 0, 9, (8).to_bytes(4, "big")),
    "WINDOW_UPDATE overflowing the window": frame(
        WINDOW_UPDATE, 0, 0, (0x7FFFFFFF).to_bytes(4, "big")
    ),
    "WINDOW_UPDATE of 0": frame(WINDOW_UPDATE, 0, 0, (0).to_bytes(4, "big")),
    "SETTINGS on a stream": frame(SETTINGS, 0, 1, b""),
    "SETTINGS of a bad length": frame(SETTINGS, 0, 0, b"\x00\x04\x00"),
    "SETTINGS with a window over 2^31-1": frame(
        SETTINGS, 0, 0, (4).to_bytes(2, "big") + (0x80000000).to_bytes(4, "big")
    ),
    "PING on a stream": frame(PING, 0, 1, b"12345678"),
    "PING of a bad length": frame(PING, 0, 0, b"123"),
    "PRIORITY depending on itself": frame(PRIORITY, 0, 1, (1).to_bytes(4, "big") + b"\x10"),
    "CONTINUATION without HEADERS": frame(CONTINUATION, END_HEADERS, 1, RESPONSE_200),
    "HEADERS then DATA before its CONTINUATION": frame(HEADERS, 0, 1, RESPONSE_200)
    + frame(DATA, 0, 1, b"x"),
    "a second response on stream 1 (trailers without END_STREAM)": frame(
        HEADERS, END_HEADERS, 1, RESPONSE_200
    )
    + frame(HEADERS, END_HEADERS, 1, hpack_block([(b":status", b"200")])),
    "more DATA than its content-length": frame(HEADERS, END_HEADERS, 1, RESPONSE_200)
    + frame(DATA, END_STREAM, 1, b"hello, world"),
}


#: Every way above for an agent to break HTTP/2: bad HPACK, then stream abuse.
PROTOCOL_ERRORS = {
    **{
        f"bad HPACK: {name}": frame(HEADERS, END_HEADERS | END_STREAM, 1, block)
        for name, block in BAD_HPACK.items()
    },
    **STREAM_ABUSE,
}


def check_protocol_error(reason: trio_websocket.CloseReason | None, visit: Outcome) -> None:
    """The server closed the agent's connection saying "protocol error" and its visitor
    got a 502; or it ignored the frame and the stream then answered normally.
    """
    assert visit.response is not None, f"the visitor got no answer: {visit.error!r}"
    if reason is None:
        answer = (visit.response.status_code, visit.response.text)
        assert answer == (200, "hello"), f"kept open, but the stream answered {answer}"
    else:
        assert "protocol error" in (reason.reason or "").lower(), (
            f"closed with an unclear reason: {reason}"
        )
        assert visit.response.status_code == 502, f"the visitor got {visit.response.status_code}"


@pytest.mark.parametrize("name", list(PROTOCOL_ERRORS))
async def test_agent_protocol_error_closes_its_connection(
    name: str,
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    visitor: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bad HPACK, frames on streams the server never opened, frames no HTTP/2 server sends.

    Each must end the agent's own connection with a reason that says "protocol
    error" (its visitor gets 502), or, for the few that h2 may ignore, leave
    the connection working (the stream then answers normally). Bound: 32 MiB
    of peak RSS (the HPACK bomb alone would decode to 80 MB).
    """
    async with under_attack(
        server, good, good_http, name, seconds=40, peak_rss=32 * MiB, caplog=caplog
    ):
        reason, visit = await provoke(server, PROTOCOL_ERRORS[name], visitor)
    check_protocol_error(reason, visit)


async def test_agent_protocol_errors_one_after_another(
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    visitor: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every case of :func:`test_agent_protocol_error_closes_its_connection` in a row,
    on one server: what one leaves behind meets the next, and the bound (32 MiB of
    peak RSS) holds over all of them.
    """
    failures: list[str] = []
    async with under_attack(
        server, good, good_http, "bad HPACK and stream abuse", seconds=40, peak_rss=32 * MiB,
        caplog=caplog,
    ):  # fmt: skip
        for name, payload in PROTOCOL_ERRORS.items():
            try:
                check_protocol_error(*await provoke(server, payload, visitor))
            except AssertionError as exc:
                failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


#: name: (what the agent sends, what the reason for closing its connection must match)
OVERSIZED = {
    # Over the 1 MiB frame size the server allows.
    "a frame just over 1 MiB": ([frame(DATA, 0, 1, b"x" * (MiB + 1))], "overlong frame"),
    # The largest length HTTP/2 can state, sent in 1 MiB messages: refused only
    # once all of it has arrived (h2 checks the length after buffering the body).
    "a frame that claims 16 MiB": (
        [frame(DATA, 0, 1, length=(1 << 24) - 1), *([b"y" * MiB] * 15), b"y" * (MiB - 1)],
        "overlong frame",
    ),
    # HEADERS without END_HEADERS, then CONTINUATION frames of 1 MiB each. Header
    # blocks are not flow-controlled: h2 alone would buffer 64 such frames (and
    # a copy to join them) before giving up; the reason is h2's CONTINUATION
    # limit or a header block cap of the server's own. 68 frames, past h2's
    # limit of 64, in messages of 2 MiB: the largest the server takes from an
    # agent (Hypercorn closes its WebSocket beyond).
    "a CONTINUATION flood": (
        [
            frame(HEADERS, 0, 1, hpack_block([(b":status", b"200")])),
            *[frame(CONTINUATION, 0, 1, b"\x00" * (MiB - 64)) * 2] * 34,
        ],
        "(?i:continuation)|header block",
    ),
}


@pytest.mark.parametrize("name", list(OVERSIZED))
async def test_agent_oversized_input_closes_its_connection(
    name: str,
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    visitor: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Frames and header blocks larger than the server takes: the agent's connection
    closes with a reason that says which, its visitor gets 502.

    Bound: 40 MiB of peak RSS, 2.5 times the 16 MiB connection window the
    server gives an agent for flow-controlled data.
    """
    messages, says = OVERSIZED[name]
    async with under_attack(
        server, good, good_http, name, seconds=30, peak_rss=40 * MiB, caplog=caplog
    ):
        reason, visit = await provoke(server, messages, visitor)
    assert reason is not None
    assert re.search(says, reason.reason or ""), reason
    assert visit.response is not None
    assert visit.response.status_code == 502


def evil_stats(server: Server) -> tunnel.TunnelStatistics | None:
    found = [s for s in server.app.statistics() if s.host == EVIL]
    return found[0] if found else None


#: name: (one frame, how many bytes the server answers per byte of it, needs a finished stream)
FLOODS = {
    "PING and SETTINGS": (frame(PING, 0, 0, b"12345678") + frame(SETTINGS, 0, 0), 1.0, False),
    # Each is a stream error: the server answers RST_STREAM (13 bytes for 9).
    "DATA on a finished stream": (frame(DATA, 0, 1), 13 / 9, True),
}


@pytest.mark.parametrize("name", list(FLOODS))
async def test_agent_flood_while_not_reading(
    name: str,
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    visitor: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Thousands of frames a second, for up to 5 s, from an agent that reads nothing back.

    Every one of them makes the server answer. A server with backpressure
    stops reading from a peer that does not read its answers (or closes it);
    one without queues answers for as long as the flood lasts. What the
    server read times the answer ratio, minus what it managed to send, is what
    it holds queued. Bound: less than 1 MiB queued (the RSS growth after the
    first 1.5 s, when socket buffers are full, is logged too).
    """
    unit, ratio, needs_stream = FLOODS[name]
    burst = unit * (18_000 // len(unit))
    sent = 0
    closed: trio_websocket.CloseReason | None = None
    async with (
        under_attack(
            server, good, good_http, f"{name} flood, not reading", seconds=30, caplog=caplog
        ) as memory,
        open_evil_agent(server.port, EVIL, message_queue_size=1, receive_buffer=4096) as evil,
        visitor(server.port, EVIL) as http,
    ):
        if needs_stream:
            visit = Outcome()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(fetch, http, "/evil", visit, keep_error=True))
                await evil.wait_request()
                await evil.send(VALID_ANSWER)
            assert visit.response is not None
            assert visit.response.text == "hello"
        # The agent's handshake is answered before its session is registered.
        await eventually(lambda: evil_stats(server) is not None)
        before = evil_stats(server)
        assert before is not None
        stats = before
        started = trio.current_time()
        with trio.move_on_after(5):
            try:
                while True:
                    await evil.send(burst)
                    sent += len(burst)
                    stats = evil_stats(server) or stats
                    if not memory.samples or trio.current_time() - memory.samples[-1][0] > 0.25:
                        memory.sample()
            except trio_websocket.ConnectionClosed as exc:
                closed = exc.reason
        elapsed = trio.current_time() - started
        stats = evil_stats(server) or stats
    read = stats.bytes_received - before.bytes_received
    queued = read * ratio - (stats.bytes_sent - before.bytes_sent)
    logging.getLogger("tests.hostile").warning(
        "%s flood: %.1f MB sent in %.1fs, the server read %.1f MB, answered %.1f MB, "
        "closed: %s; RSS grew %.1f MiB after the first 1.5 s",
        name,
        sent / 1e6,
        elapsed,
        read / 1e6,
        (stats.bytes_sent - before.bytes_sent) / 1e6,
        closed,
        # A flood the server ends early (by closing the agent) has no samples
        # that late.
        memory.growth_since(1.5) / MiB
        if memory.samples and memory.samples[-1][0] - memory.samples[0][0] >= 1.5
        else 0.0,
    )
    assert queued < 1 * MiB, (
        f"the server queued {queued / MiB:.1f} MiB of answers for a peer that reads nothing "
        f"({sent / 1e6:.1f} MB of {name} frames sent in {elapsed:.1f}s)"
    )


async def test_agent_one_huge_message_of_pings_does_not_stall_the_server(
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One 2 MiB WebSocket message of PINGs (an eighth of a million frames), the
    largest message the server takes from an agent.

    The server may spend CPU on it, but not all at once: other tunnels must
    keep answering. Bound: no request through the legitimate tunnel waits more
    than 1 s; 16 MiB of peak RSS.
    """
    message = frame(PING, 0, 0, b"12345678") * ((2 * MiB) // 17)
    async with (
        under_attack(
            server, good, good_http, "2 MiB of PINGs in one message", seconds=40,
            peak_rss=16 * MiB, max_latency=1.0, caplog=caplog,
        ),
        open_evil_agent(server.port, EVIL) as evil,
    ):  # fmt: skip
        await evil.send(message)
        with trio.fail_after(30):
            await evil.alive()


#: name: one frame that asks for no answer but costs the server work on each.
FREE_FLOODS = {
    # Each wakes every stream waiting to send.
    "WINDOW_UPDATE on the connection": frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")),
    "PRIORITY": frame(PRIORITY, 0, 1001, (0).to_bytes(4, "big") + b"\x0f"),
    "unknown type": frame(0xFA, 0, 0, b"12345678"),
}


@pytest.mark.parametrize("name", list(FREE_FLOODS))
async def test_agent_flood_of_free_frames_is_cut_off(
    name: str,
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Frames a second by the ten thousand that need no answer, as PINGs would.

    The server must count them as it counts PINGs and close the agent (1008,
    policy violation) within the 5 s the flood lasts; the other tunnel answers
    throughout.
    """
    burst = FREE_FLOODS[name] * (18_000 // len(FREE_FLOODS[name]))
    closed: trio_websocket.CloseReason | None = None
    sent = 0
    async with (
        under_attack(server, good, good_http, f"{name} flood", seconds=30, caplog=caplog),
        open_evil_agent(server.port, EVIL) as evil,
    ):
        with trio.move_on_after(5):
            try:
                while True:
                    await evil.send(burst)
                    sent += len(burst)
                    await trio.sleep(0.01)
            except trio_websocket.ConnectionClosed as exc:
                closed = exc.reason
    logging.getLogger("tests.hostile").warning(
        "%s flood: %.1f MB sent, closed: %s", name, sent / 1e6, closed
    )
    assert closed is not None, f"{sent / 1e6:.1f} MB of {name} frames and the agent is still on"
    assert closed.code == 1008, closed


def answer_with_status(status: bytes) -> bytes:
    block = hpack_block([(b":status", status), (b"content-length", b"5")])
    return frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, END_STREAM, 1, b"hello")


#: name: (the agent's answer to stream 1, the statuses its visitor may get)
BAD_ANSWERS = {
    # A ``:status`` that is not three digits (valid HPACK, valid HTTP/2 framing):
    # a clear 502 from the tunnel, not a crashed handler.
    **{
        f":status {status.decode('latin-1')!r}": (answer_with_status(status), {502})
        for status in [b"abc", b"99999", b"2000", b"-1", b"", b"101", b"200 OK", b"\xff"]
    },
    # ``content-length: 5`` and END_STREAM: a body announced, never sent. h2
    # checks a body against its Content-Length only when DATA comes, so this
    # reaches the server's relay: a 502, or an empty body with a
    # Content-Length that says so.
    "a body announced, never sent": (
        frame(HEADERS, END_HEADERS | END_STREAM, 1, RESPONSE_200),
        {200, 502},
    ),
}


@pytest.mark.parametrize("name", list(BAD_ANSWERS))
async def test_agent_bad_answer_gets_its_visitor_a_clear_status(
    name: str,
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    visitor: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An answer well-framed but wrong: the visitor gets a well-formed answer, not a
    crashed handler and a cut connection.
    """
    answer, statuses = BAD_ANSWERS[name]
    async with under_attack(server, good, good_http, name, seconds=10, caplog=caplog):
        reason, visit = await provoke(
            server, answer, visitor, answer_if_kept=False, await_visit=True
        )
    assert visit.response is not None, f"the visitor's connection was cut: {visit.error!r}"
    assert visit.response.status_code in statuses, (name, visit.response.status_code, reason)


async def test_agent_sending_text_messages_is_closed(
    server: Server, good: RecordingService, good_http: httpx.AsyncClient, visitor: Any
) -> None:
    """The tunnel protocol is binary messages only; a text message ends the connection."""
    visit = Outcome()
    async with (
        under_attack(server, good, good_http, "a text message", seconds=10),
        open_evil_agent(server.port, EVIL) as evil,
        visitor(server.port, EVIL) as http,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(partial(fetch, http, "/evil", visit, keep_error=True))
        await evil.wait_request()
        await evil.ws.send_message("PRI * HTTP/2.0 as text")
        reason = await evil.wait_closed()
        await visit.done.wait()
    assert "text message" in (reason.reason or ""), reason
    assert visit.response is not None
    assert visit.response.status_code == 502


async def test_agent_goaway_below_the_visitors_stream_then_silence(
    nursery: trio.Nursery, visitor: Any
) -> None:
    """GOAWAY(last stream 0) while the visitor's stream 1 is open, and no return.

    Stream 1 was refused unread, so the visitor's request waits grace_period
    (0.5 s here) for the agent's new connection, then gets a 502 that says so:
    never a hang, nothing logged as an error.
    """
    server = await start_server(nursery, grace_period=0.5)
    goaway = frame(GOAWAY, 0, 0, bytes(8))
    with trio.fail_after(15):
        started = trio.current_time()
        reason, visit = await provoke(server, goaway, visitor)
        took = trio.current_time() - started
    assert visit.response is not None, visit.error
    assert visit.response.status_code == 502
    assert "could not answer" in visit.response.text
    assert took < 3.0, took
    # The server, having nothing left on the connection, closes it.
    assert reason is not None
    assert reason.reason == "the peer went away (GOAWAY)"


async def test_agent_that_never_speaks_http2_is_dropped(
    nursery: trio.Nursery, start_local_service: Any, open_agent: Any, visitor: Any
) -> None:
    """Accepted, then silent: no SETTINGS, no PING answers.

    Its host gets no requests (they wait the grace period, then 502), and the
    keepalive ends it: within keepalive_interval + keepalive_timeout (0.5 s
    each here) plus a second.
    """
    server = await start_server(
        nursery, keepalive_interval=0.5, keepalive_timeout=0.5, grace_period=0.5
    )
    good = await start_local_service("good")
    with trio.fail_after(15):
        async with (
            open_agent(server.port, good.port, host=GOOD),
            visitor(server.port, GOOD) as good_http,
            witness_traffic(good_http, good),
            open_evil_agent(server.port, EVIL, start=False) as evil,
            visitor(server.port, EVIL) as http,
        ):
            started = trio.current_time()
            response = await http.get("/anyone-there")
            reason = await evil.wait_closed()
            took = trio.current_time() - started
    assert response.status_code == 502
    assert took < 2.0, took
    # Hypercorn closes with 1011 (and no reason) when the app ends the
    # connection without a close of its own, as the server does for a peer it
    # believes dead.
    assert "keepalive" in (reason.reason or "") or reason.code in (1006, 1011), reason


# -- a malicious agent: handshakes ----------------------------------------------


async def handshake(
    port: int,
    headers: list[tuple[bytes, bytes]],
    subprotocols: list[str],
    host: str = "127.0.0.1",
) -> tuple[int, str]:
    """Open the control WebSocket as ``host``; (101, "") if accepted, else the refusal's
    status and body.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    result = (101, "")
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, host, "/_tunnel",
                subprotocols=subprotocols, extra_headers=headers,
            )  # fmt: skip
            await ws.aclose()
    except* trio_websocket.ConnectionRejected as group:
        rejected = group.exceptions[0]
        assert isinstance(rejected, trio_websocket.ConnectionRejected)
        result = rejected.status_code, (rejected.body or b"").decode("utf-8", "replace")
    finally:
        await stream.aclose()
    return result


def auth(token: str = TOKEN) -> tuple[bytes, bytes]:
    return (b"authorization", f"Bearer {token}".encode())


def claim(host: bytes) -> tuple[bytes, bytes]:
    return (HOST_HEADER.encode(), host)


def refused_host(host: bytes) -> tuple[list[tuple[bytes, bytes]], list[str], int, str]:
    return [auth(), claim(host)], [SUBPROTOCOL], 400, "not a valid host"


A_HOST = claim(b"a.localhost")
HANDSHAKES: dict[str, tuple[list[tuple[bytes, bytes]], list[str], int, str]] = {
    # name: (headers, subprotocols, status, words the refusal must say)
    "no subprotocol": ([auth(), A_HOST], [], 426, SUBPROTOCOL),
    "a future protocol": ([auth(), A_HOST], ["tunnel.v99"], 426, "tunnel.v99"),
    "junk subprotocols": ([auth(), A_HOST], ["x" * 200, "y"], 426, SUBPROTOCOL),
    "no token": ([A_HOST], [SUBPROTOCOL], 401, "Bearer"),
    "basic auth": ([(b"authorization", b"Basic czNjcmV0"), A_HOST], [SUBPROTOCOL], 401, "Bearer"),
    "wrong token": ([auth("guess"), A_HOST], [SUBPROTOCOL], 401, "token"),
    "huge token": ([auth("t" * 20_000), A_HOST], [SUBPROTOCOL], 401, "token"),
    "over-long label": refused_host(b"a" * 64 + b".localhost"),
    "over-long name": refused_host(b"a." * 127 + b"localhost"),
    "unicode": refused_host("tünnel.localhost".encode()),
    "empty label": refused_host(b"a..localhost"),
    "leading hyphen": refused_host(b"-a.localhost"),
    "underscore": refused_host(b"a_b.localhost"),
    "space": refused_host(b"a b.localhost"),
    "a path": refused_host(b"a.localhost/x"),
    "a port": refused_host(b"a.localhost:80"),
    "userinfo": refused_host(b"u@a.localhost"),
    "IPv6 zone": refused_host(b"fe80::1%eth0"),
    "a TCP registry key": refused_host(b"tcp:20000"),
    "junk TCP port": (
        [auth(), A_HOST, (b"tunnel-tcp-port", b"99999999")],
        [SUBPROTOCOL],
        400,
        "port",
    ),
}


@pytest.mark.parametrize("name", list(HANDSHAKES))
async def test_agent_handshake_with_junk_is_refused_clearly(
    name: str, server: Server, good: RecordingService, good_http: httpx.AsyncClient
) -> None:
    """Bad subprotocols, credentials and host names: each a status and a reason, no session."""
    headers, subprotocols, status, words = HANDSHAKES[name]
    async with under_attack(server, good, good_http, name, seconds=20):
        got, body = await handshake(server.port, headers, subprotocols)
    assert got == status, f"{got} {body[:200]!r}"
    assert words in body, f"{got} {body[:200]!r}"
    assert server.hosts() == [GOOD]


RAW_HANDSHAKE = (
    b"GET /_tunnel HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: tunnel.v1\r\nAuthorization: Bearer s3cret\r\n"
)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"tunnel-host: a.localhost\r\nX-Injected: 1\r\n", id="a second header (fine)"),
        pytest.param(b"tunnel-host: a.localhost\rX-Injected: 1\r\n", id="a bare CR in a value"),
        pytest.param(b"tunnel-host: a.localhost\x00\r\n", id="NUL"),
        pytest.param(b"tunnel-host: a.localhost\r\n continued.localhost\r\n", id="obs-fold"),
        pytest.param(b"tunnel-host : a.localhost\r\n", id="space before the colon"),
        pytest.param(b"tunnel-host: \xe2\x80\xae.localhost\r\n", id="right-to-left override"),
    ],
)
async def test_agent_raw_handshake_with_control_characters(extra: bytes, server: Server) -> None:
    """Bytes no WebSocket library would send: Hypercorn's 400, our 400, or a clean claim.

    Whatever happens, no host with a control character or a fold is registered.
    """
    async with RawVisitor.connect(server.port) as raw:
        await raw.send(RAW_HANDSHAKE + extra + b"\r\n")
        with trio.fail_after(5):
            answer = await _first_line(raw)
    status = int(answer.split(b" ")[1])
    assert status in (101, 400), answer
    assert set(server.hosts()) <= {"a.localhost"}


async def _first_line(raw: RawVisitor) -> bytes:
    while b"\r\n" not in raw.received:
        data = await raw.stream.receive_some(4096)
        if not data:
            break
        raw.received += data
    return bytes(raw.received).split(b"\r\n", 1)[0]


# -- a malicious agent: fuzzing ---------------------------------------------------
#
# Hypothesis runs in a worker thread and hands each example to the test's Trio
# loop (trio.from_thread.run), so one server (and one legitimate tunnel) takes
# every example, as a real server would, and state left over by one example
# meets the next.

STREAM_IDS = st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF, 0x80000001]) | st.integers(0, 2**32 - 1)
FLAGS = st.sampled_from([0, END_STREAM, END_HEADERS, END_STREAM | END_HEADERS, 0x8, 0x20]) | (
    st.integers(0, 255)
)
HEADER_NAMES = st.sampled_from(
    [b":status", b":path", b":method", b"content-length", b"te", b"connection", b"x-a", b"Upper"]
) | st.binary(min_size=1, max_size=8)
HEADER_LISTS = st.lists(st.tuples(HEADER_NAMES, st.binary(max_size=12)), max_size=5)

RAW_FRAMES = st.builds(
    frame, st.integers(0, 12) | st.integers(0, 255), FLAGS, STREAM_IDS, st.binary(max_size=48)
)
LYING_FRAMES = st.builds(
    lambda kind, flags, stream_id, payload, length: frame(
        kind, flags, stream_id, payload, length=length
    ),
    st.integers(0, 10), FLAGS, STREAM_IDS, st.binary(max_size=32), st.integers(0, 70),
)  # fmt: skip
HEADER_FRAMES = st.builds(
    lambda kind, flags, stream_id, headers: frame(kind, flags, stream_id, hpack_block(headers)),
    st.sampled_from([HEADERS, CONTINUATION, PUSH_PROMISE]), FLAGS, STREAM_IDS, HEADER_LISTS,
)  # fmt: skip
SETTINGS_FRAMES = st.builds(
    lambda flags, pairs: frame(
        SETTINGS, flags, 0, b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in pairs)
    ),
    st.sampled_from([0, ACK]), st.lists(st.tuples(st.integers(0, 9), st.integers(0, 2**32 - 1))),
)  # fmt: skip
NUMBER_FRAMES = st.builds(
    lambda kind, stream_id, number: frame(kind, 0, stream_id, number.to_bytes(4, "big")),
    st.sampled_from([WINDOW_UPDATE, RST_STREAM]), STREAM_IDS, st.integers(0, 2**32 - 1),
)  # fmt: skip
GOAWAY_FRAMES = st.builds(
    lambda last, code, debug: frame(
        GOAWAY, 0, 0, last.to_bytes(4, "big") + code.to_bytes(4, "big") + debug
    ),
    st.integers(0, 2**32 - 1), st.integers(0, 20), st.binary(max_size=16),
)  # fmt: skip
ANY_FRAME = st.one_of(
    RAW_FRAMES, LYING_FRAMES, HEADER_FRAMES, SETTINGS_FRAMES, NUMBER_FRAMES, GOAWAY_FRAMES
)
#: Up to three WebSocket messages of up to six frames each.
RANDOM_MESSAGES = st.lists(
    st.lists(ANY_FRAME, min_size=1, max_size=6).map(b"".join), min_size=1, max_size=3
)

MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate", "repeat"]),
        st.integers(0, len(VALID_ANSWER) + 8),
        st.binary(min_size=1, max_size=4),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, mutations: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for op, position, value in mutations:
        at = position % (len(out) + 1)
        if op == "flip" and at < len(out):
            out[at] ^= value[0] or 1
        elif op == "set" and at < len(out):
            out[at] = value[0]
        elif op == "insert":
            out[at:at] = value
        elif op == "delete":
            del out[at : at + len(value)]
        elif op == "truncate":
            del out[at:]
        elif op == "repeat":
            out += out[at : at + 9 + value[0] % 16]
    return bytes(out)


async def fuzz(
    server: Server,
    good_http: httpx.AsyncClient,
    visitor: Any,
    caplog: pytest.LogCaptureFixture,
    strategy: st.SearchStrategy[tuple[list[bytes], bool]],
) -> None:
    """Run ``FUZZ_EXAMPLES`` examples of ``strategy``: (messages, whether stream 1 is open)."""
    since = connected_since(server)

    async def one(messages: list[bytes], with_stream: bool) -> None:
        with trio.fail_after(20):
            reason, visit = await provoke(
                server, messages, visitor, with_stream=with_stream, answer_if_kept=False
            )
            if reason is not None:
                assert reason.reason, f"closed without a reason: {reason}"
                if with_stream and not isinstance(visit.error, httpx.RemoteProtocolError):
                    # The visitor got an HTTP answer, whatever the agent sent (or,
                    # once its response had begun, a response cut short: the
                    # only signal left, and a clear one).
                    assert visit.response is not None, visit.error
                    assert visit.response.status_code != 500, visit.response.text
            no_server_errors(caplog)
            answer = await good_http.get("/still-there")
            assert answer.status_code == 200
            assert connected_since(server) == since

    @hypothesis.settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        print_blob=True,
        # Each example costs real round trips (and a stall up to its 15 s cap),
        # so CI reports the first failure as found; the fuzz session shrinks it.
        phases=PHASES,
    )
    @hypothesis.given(strategy)
    def check(example: tuple[list[bytes], bool]) -> None:
        trio.from_thread.run(one, *example)

    await trio.to_thread.run_sync(check)


#: name: examples of (messages, whether stream 1 is open)
AGENT_FUZZ = {
    # Random frames: any type, flags, stream ID, length, lying lengths, HPACK of junk.
    "random frames": st.tuples(RANDOM_MESSAGES, st.booleans()),
    # A correct answer to a visitor's request (HEADERS + DATA), with bytes
    # flipped, inserted, deleted, truncated or repeated.
    "mutated answers": MUTATIONS.map(lambda mutations: ([mutate(VALID_ANSWER, mutations)], True)),
}


@pytest.mark.parametrize("name", list(AGENT_FUZZ))
async def test_fuzz_agent(
    name: str,
    server: Server,
    good_http: httpx.AsyncClient,
    visitor: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``FUZZ_EXAMPLES`` examples (``nox -s fuzz``: more) of an agent's junk.

    For each: the server closes the agent's connection with a reason or keeps
    it working (no stall: it answers a PING within 5 s), its visitor gets an
    HTTP answer that is not a crash, nothing is logged as an error, and the
    legitimate tunnel answers. Bound: 48 MiB of peak RSS over the whole run
    (Hypothesis itself runs in this process too).
    """
    with watch_memory(f"{FUZZ_EXAMPLES} {name} examples") as memory:
        await fuzz(server, good_http, visitor, caplog, AGENT_FUZZ[name])
    assert memory.peak_rss < 48 * MiB


# -- a malicious visitor ----------------------------------------------------------
#
# Visitors need no credentials at all, so anything here is open to anyone.


def service_saw(service: LocalService) -> list[tuple[str, str]]:
    return [request for request in service.requests if not request[1].startswith("/witness/")]


def http1(
    line: bytes, *headers: bytes, body: bytes = b"", host: bytes = b"good.localhost"
) -> bytes:
    """An HTTP/1.1 request as raw bytes: ``line``, a Host, ``headers``, ``body``."""
    return b"\r\n".join([line, b"Host: " + host, *headers, b"", body])


CHUNKED = b"Transfer-Encoding: chunked"
MALFORMED = {
    # name: (bytes, may it reach the local service?)
    "garbage": (b"GARBAGE\r\n\r\n", False),
    "no Host": (b"GET /m HTTP/1.1\r\n\r\n", False),
    # h11 takes any HTTP/1.x-style version (9.9 too) as HTTP/1.1; harmless.
    "HTTP/9.9": (http1(b"GET /m HTTP/9.9"), True),
    "header without a colon": (http1(b"GET /m HTTP/1.1", b"NoColon"), False),
    "NUL in a value": (http1(b"GET /m HTTP/1.1", b"X: a\x00b"), False),
    "space in a name": (http1(b"GET /m HTTP/1.1", b"X Y: 1"), False),
    "space before the colon": (http1(b"GET /m HTTP/1.1", b"X : 1"), False),
    "DEL in the target": (http1(b"GET /m\x7f HTTP/1.1"), False),
    "spaces in the target": (http1(b"GET /m x HTTP/1.1"), False),
    "bad Content-Length": (http1(b"POST /m HTTP/1.1", b"Content-Length: abc"), False),
    "negative Content-Length": (http1(b"POST /m HTTP/1.1", b"Content-Length: -1"), False),
    "two Content-Lengths": (
        http1(b"POST /m HTTP/1.1", b"Content-Length: 1", b"Content-Length: 2", body=b"ab"),
        False,
    ),
    "Transfer-Encoding: gzip": (http1(b"POST /m HTTP/1.1", b"Transfer-Encoding: gzip"), False),
    "two Transfer-Encodings": (
        http1(b"POST /m HTTP/1.1", CHUNKED, CHUNKED, body=b"0\r\n\r\n"),
        False,
    ),
    "two Hosts": (http1(b"GET /m HTTP/1.1", b"Host: other.localhost"), True),
    "bad chunk size": (
        http1(b"POST /m HTTP/1.1", CHUNKED, body=b"ZZ\r\nhello\r\n0\r\n\r\n"),
        True,
    ),
    "chunk longer than it says": (
        http1(b"POST /m HTTP/1.1", CHUNKED, body=b"2\r\nhello\r\n0\r\n\r\n"),
        True,
    ),
    "junk after a GET, as a second request": (
        http1(b"GET /m HTTP/1.1", body=b"GARBAGE\r\n\r\n"),
        True,
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_visitor_malformed_http11_gets_an_error_status(
    name: str,
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each gets a 4xx or 5xx within 3 s (those marked as reaching the service: an answer or
    a closed connection).

    Those the HTTP/1.1 parser refuses never reach the local service; none
    knocks the tunnel's agent off. Bound: 16 MiB of peak RSS.
    """
    request, may_reach = MALFORMED[name]
    async with under_attack(
        server, good, good_http, name, seconds=30, peak_rss=16 * MiB, caplog=caplog
    ):
        before = len(service_saw(good))
        status: int | None = None
        async with RawVisitor.connect(server.port) as raw:
            await raw.send(request)
            with trio.move_on_after(3) as waited, contextlib.suppress(EOFError):
                status, _, _ = await raw.read_response()
        reached = service_saw(good)[before:]
    assert not waited.cancelled_caught, "no answer and not closed within 3 s"
    if not may_reach:
        answered = f"answered {status} {bytes(raw.received)[:120]!r}"
        assert status is not None, answered
        assert status >= 400, answered
        assert not reached, f"reached the local service: {reached}"


def h2_get(
    path: bytes, *extra: tuple[bytes, bytes], host: bytes = GOOD.encode()
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", host),
        (b":path", path),
        *extra,
    ]


#: name: an HTTP/1.1 request as raw bytes, or an h2c request's header list. (A bare
#: LF ends a header line for h11, as RFC 9112 allows; a visitor who sends one
#: sends two headers, which it could anyway, so that is no attempt.)
CRLF_INJECTIONS: dict[str, bytes | list[tuple[bytes, bytes]]] = {
    "HTTP/1.1, encoded CRLF in the path": (
        b"GET /a%0d%0aX-Injected:%201 HTTP/1.1\r\nHost: good.localhost\r\n\r\n"
    ),
    "HTTP/1.1, bare CR in a value": (
        b"GET /b HTTP/1.1\r\nHost: good.localhost\r\nX-A: a\rX-Injected: 1\r\n\r\n"
    ),
    "HTTP/1.1, obs-fold": (
        b"GET /d HTTP/1.1\r\nHost: good.localhost\r\nX-A: a\r\n X-Injected: 1\r\n\r\n"
    ),
    "HTTP/1.1, CRLF in the target": (
        b"GET /e\r\nX-Injected: 1 HTTP/1.1\r\nHost: good.localhost\r\n\r\n"
    ),
    "HTTP/1.1, bare CR in the Host": (
        b"GET /f HTTP/1.1\r\nHost: good.localhost\rX-Injected: 1\r\n\r\n"
    ),
    "h2c, CRLF in a value": h2_get(b"/g", (b"x-a", b"a\r\nx-injected: 1")),
    "h2c, a smuggled request in :path": h2_get(
        b"/h\r\nx-injected: 1\r\n\r\nGET /smuggled HTTP/1.1"
    ),
    "h2c, a request line in :path": h2_get(b"/i HTTP/1.1\r\nx-injected: 1\r\n\r\nGET /smuggled"),
    "h2c, space in :path": h2_get(b"/j x"),
    "h2c, SOH in a value": h2_get(b"/k", (b"x-a", b"a\x01b")),
    "h2c, NUL in a value": h2_get(b"/l", (b"x-a", b"a\x00b")),
    "h2c, CRLF in :authority": h2_get(b"/m", host=b"good.localhost\r\nx-injected: 1"),
    "h2c, CRLF in :method": [
        (b":method", b"GET /n HTTP/1.1\r\nx-injected: 1\r\n"),
        *h2_get(b"/n")[1:],
    ],
    "h2c, CRLF in a name": h2_get(b"/o", (b"x-injected\r\nx-b", b"1")),
}


@pytest.mark.parametrize("name", list(CRLF_INJECTIONS))
async def test_visitor_crlf_injection_never_reaches_the_local_service(
    name: str,
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CR, LF and NUL in paths, header values, methods and authorities, over HTTP/1.1 and h2c.

    Whatever each gets (an error status, a reset stream, a closed
    connection), the local service never sees an injected header, a second
    request, or a request line or header with a control character in it.
    """
    request = CRLF_INJECTIONS[name]
    answer: int | None = None
    # The agent logs a traceback for a request line its HTTP/1.1 library
    # refuses (reported; not an injection), so only the server's log is checked.
    async with under_attack(
        server, good, good_http, name, seconds=30, caplog=caplog, errors_of="tunnel.server"
    ):
        if isinstance(request, bytes):
            async with RawVisitor.connect(server.port) as raw:
                await raw.send(request)
                with trio.move_on_after(3), contextlib.suppress(EOFError):
                    answer = (await raw.read_response())[0]
        else:
            # A connection of its own: some of these end the whole connection.
            async with H2Visitor.connect(server.port) as h2c:
                stream_id = h2c.request_nowait(request)
                await h2c.flush()
                with trio.move_on_after(3):
                    answer = (await h2c.response(stream_id))[0]
    logging.getLogger("tests.hostile").warning(
        "%s: answered %s; the service saw %s", name, answer, good.seen
    )
    for method, raw_path, headers in good.seen:
        assert method.isalpha(), method
        assert all(32 < byte < 127 for byte in raw_path), raw_path
        assert b"smuggled" not in raw_path
        for header, value in headers:
            assert b"injected" not in header.lower(), (header, value)
            assert not set(value) & {0, 10, 13}, (header, value)


#: name: (HTTP/1.1 or h2c, the size of one header's value, the statuses it may get)
HUGE_HEADERS: dict[str, tuple[str, int, set[int | None]]] = {
    # Over the tunnel's 32 KiB limit: its 431.
    "HTTP/1.1, 40 kB": ("HTTP/1.1", 40_000, {431}),
    # Over Hypercorn's buffer: its 431 or 400.
    "HTTP/1.1, 200 kB": ("HTTP/1.1", 200_000, {400, 431}),
    "HTTP/1.1, 2 MB": ("HTTP/1.1", 2_000_000, {400, 431}),
    "h2c, 40 kB": ("h2c", 40_000, {431}),
    # Past the 64 KiB header list size Hypercorn announces: the connection ends.
    "h2c, 100 kB": ("h2c", 100_000, {None, 431}),
}


@pytest.mark.parametrize("name", list(HUGE_HEADERS))
async def test_visitor_huge_headers_get_431_or_400(
    name: str,
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A header over the tunnel's limit, or over Hypercorn's: an error status (or, over
    h2c, the connection ended); nothing reaches the local service. Bound: 16 MiB of
    peak RSS.
    """
    protocol, size, statuses = HUGE_HEADERS[name]
    status: int | None = None
    async with under_attack(
        server, good, good_http, name, seconds=20, peak_rss=16 * MiB, caplog=caplog
    ):
        if protocol == "HTTP/1.1":
            async with RawVisitor.connect(server.port) as raw:
                request = b"GET /huge HTTP/1.1\r\nHost: good.localhost\r\nX-Big: "
                with contextlib.suppress(trio.BrokenResourceError):
                    await raw.send(request + b"a" * size + b"\r\n\r\n")
                with trio.fail_after(5), contextlib.suppress(EOFError):
                    status = (await raw.read_response())[0]
        else:
            async with H2Visitor.connect(server.port) as h2c:
                stream_id = h2c.request_nowait(h2_get(b"/huge", (b"x-big", b"a" * size)))
                with contextlib.suppress(trio.BrokenResourceError):
                    await h2c.flush()
                with trio.fail_after(5):
                    status = (await h2c.response(stream_id))[0]
    assert status in statuses, status
    assert good.seen == []


async def many_small_headers(server: Server, http: httpx.AsyncClient) -> list[int]:
    headers = [(f"x-h{i}", "v") for i in range(3000)]
    return [(await http.get("/many-headers", headers=headers)).status_code]


async def content_length_and_chunked(server: Server, http: httpx.AsyncClient) -> list[int]:
    statuses = []
    async with RawVisitor.connect(server.port) as raw:
        await raw.send(
            b"POST /te-cl HTTP/1.1\r\nHost: good.localhost\r\nContent-Length: 44\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            b"GET /second HTTP/1.1\r\nHost: good.localhost\r\n\r\n"
        )
        with trio.move_on_after(5), contextlib.suppress(EOFError):
            for _ in range(2):
                statuses.append((await raw.read_response())[0])
    return statuses


#: name: (a visitor's request, what the agent's side could take for its whole
#: connection's error; the statuses its first answer may have)
KNOCK_OFF_ATTEMPTS = {
    # 21 KB by the tunnel's count, under its 32 KiB limit; but HPACK counts 32
    # bytes more per field (RFC 9113 section 6.5.2): 117 KB, over the 64 KiB the
    # agent's h2 accepts by default. The visitor must get a 431 instead, or be
    # served.
    "3000 small headers": (many_small_headers, {200, 431}),
    # ``Content-Length: 44`` and ``Transfer-Encoding: chunked`` with a 5-byte
    # body. h11 (under Hypercorn) lets chunked win, as RFC 9112 section 6.3
    # says, but the header then forwarded must not be the Content-Length:
    # HTTP/2 checks DATA against it. The pipelined request after it is the
    # visitor's own second request, and must arrive as exactly that.
    "Content-Length and chunked": (content_length_and_chunked, {200, 400}),
}


@pytest.mark.parametrize("name", list(KNOCK_OFF_ATTEMPTS))
async def test_visitor_does_not_knock_the_agent_off(
    name: str,
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
) -> None:
    """A request that, sent on as it came, would be a connection error for the agent:
    its whole connection (every request on it) would go. The download running
    meanwhile on the same tunnel must complete, and the agent stay.
    """
    attack, first_statuses = KNOCK_OFF_ATTEMPTS[name]
    since = connected_since(server)
    statuses: list[int] = []
    received = b""
    failures: list[str] = []
    with trio.fail_after(20):
        async with good_http.stream("GET", "/stream") as download:
            chunks = download.aiter_bytes()
            received += await chunks.__anext__()
            try:
                async with witness_traffic(good_http, good):
                    statuses = await attack(server, good_http)
            except AssertionError as exc:
                failures.append(str(exc))
            good.release_stream.set()
            try:
                async for chunk in chunks:
                    received += chunk
            except httpx.HTTPError as exc:
                failures.append(f"the download broke: {exc!r}")
    assert connected_since(server) == since, (
        f"a visitor's request knocked the agent off (it got {statuses}; {failures})"
    )
    assert received == STREAM_CHUNK_1 + STREAM_CHUNK_2, failures
    assert not failures, failures
    assert statuses, "no answer"
    assert statuses[0] in first_statuses, statuses
    for _, raw_path, headers in good.seen:
        if raw_path == b"/te-cl":
            assert dict(headers).get(b"content-length") in (None, b"5"), headers


async def test_visitor_slowloris_and_slow_bodies_are_cut_off(
    nursery: trio.Nursery, open_agent: Any, visitor: Any
) -> None:
    """Slow visitors, 10 of each kind, while the legitimate tunnel keeps answering.

    * Headers a byte every 0.25 s: ``header_timeout`` (5 s here; Hypercorn's
      keep_alive_timeout, which runs from the connection's start until a
      request's head is complete) cuts them off. Bound: 8 s.
    * Half a body, then silence: ``request_idle_timeout`` (1 s here) answers
      408 and the connection ends. Bound: 3 s.
    * A body a byte every 0.25 s: every byte would restart
      ``request_idle_timeout``, and Hypercorn has no read timeout
      (``read_timeout=None``); ``min_request_body_rate`` (500 bytes a second,
      as Apache's mod_reqtimeout ``MinRate``) ends it. Bound: 6 s.
    """
    server = await start_server(
        nursery, response_timeout=2.0, request_idle_timeout=1.0, header_timeout=5.0
    )
    good = await start_service(nursery, "good")
    closed_after: dict[str, list[float]] = {"headers": [], "silent body": [], "body": []}

    async def slow(kind: str, head: bytes, drip: bytes, limit: float) -> None:
        async with RawVisitor.connect(server.port) as raw:
            started = trio.current_time()
            await raw.send(head)
            with trio.move_on_after(limit):
                if not drip:
                    await raw.read_until_closed()
                else:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        while True:
                            await raw.send(drip)
                            await trio.sleep(0.25)
            closed_after[kind].append(trio.current_time() - started)

    headers = b"GET /slow HTTP/1.1\r\nHost: good.localhost\r\nX-Slow: "
    body = b"POST /slow HTTP/1.1\r\nHost: good.localhost\r\nContent-Length: 100000\r\n\r\n"
    with trio.fail_after(30), watch_memory("slow visitors") as memory:
        async with (
            open_agent(server.port, good.port, host=GOOD),
            visitor(server.port, GOOD) as good_http,
            witness_traffic(good_http, good),
            trio.open_nursery() as attackers,
        ):
            for _ in range(10):
                attackers.start_soon(slow, "headers", headers, b"a", 10.0)
                attackers.start_soon(slow, "silent body", body + b"x" * 500, b"", 6.5)
                attackers.start_soon(slow, "body", body, b"b", 6.5)
    slowest = {kind: round(max(times), 2) for kind, times in closed_after.items()}
    logging.getLogger("tests.hostile").warning("slow visitors cut off after %s s", slowest)
    assert slowest["headers"] < 8.0, f"slow headers were not cut off: {slowest}"
    assert slowest["silent body"] < 3.0, f"stalled bodies were not cut off: {slowest}"
    assert slowest["body"] < 6.0, (
        f"bodies trickled at 4 bytes/s were not cut off: {slowest} (request_idle_timeout "
        "is 1 s, response_timeout 2 s)"
    )
    assert memory.peak_rss < 16 * MiB


async def test_visitor_http2_rapid_reset(
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    nursery: trio.Nursery,
    open_agent: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """h2c with prior knowledge: 4000 streams opened and reset at once (CVE-2023-44487).

    Then 40 connections that each open 10 streams of a streamed response and
    vanish (TCP closed) in the middle of it. The server survives, the attacked
    tunnel has no stream left in flight within 2 s, the other tunnel answers
    promptly throughout. Bound: 48 MiB of peak RSS.
    """
    target = await start_service(nursery, "target")
    async with (
        under_attack(
            server, good, good_http, "HTTP/2 rapid reset", seconds=40, peak_rss=48 * MiB,
            caplog=caplog,
        ),
        open_agent(server.port, target.port, host="target.localhost"),
    ):  # fmt: skip
        async with H2Visitor.connect(server.port) as h2c, trio.open_nursery() as reader:

            async def drain() -> None:
                while await h2c.receive():
                    h2c.responses.clear()

            reader.start_soon(drain)
            with contextlib.suppress(trio.BrokenResourceError):
                for _ in range(40):
                    for _ in range(100):
                        stream_id = h2c.conn.get_next_available_stream_id()
                        h2c.conn.send_headers(
                                stream_id, h2_get(b"/hang", host=b"target.localhost"),
                                end_stream=True,
                            )  # fmt: skip
                        h2c.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                    await h2c.flush()
            reader.cancel_scope.cancel()
        for _ in range(40):
            async with H2Visitor.connect(server.port) as h2c:
                for _ in range(10):
                    h2c.request_nowait(h2_get(b"/stream", host=b"target.localhost"))
                await h2c.flush()
                await h2c.receive()  # the first bytes of some responses
        in_flight: dict[str, int] = {}
        with trio.move_on_after(2):
            while in_flight.get("target.localhost") != 0:
                in_flight = {s.host: s.streams_in_flight for s in server.app.statistics()}
                await trio.sleep(0.05)
    logging.getLogger("tests.hostile").warning(
        "rapid reset: %d requests reached the target service", len(target.requests)
    )
    assert in_flight.get("target.localhost") == 0, in_flight


# -- no open proxy ------------------------------------------------------------------


class Listener:
    """A TCP port that records every connection made to it (a service nobody should reach)."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self.received = b""

    async def serve(self, nursery: trio.Nursery) -> Listener:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = int(listeners[0].socket.getsockname()[1])
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
                self.received += await stream.receive_some(4096)


async def raw_exchange(port: int, request: bytes) -> int | None:
    """Send ``request`` on a new connection; the status of the first answer (None: closed)."""
    async with RawVisitor.connect(port) as raw:
        await raw.send(request)
        with trio.fail_after(5), contextlib.suppress(EOFError):
            return (await raw.read_response())[0]
    return None


#: Any status: what matters is that nothing but the local service is dialled.
ANY = None
#: name: (the request, given the internal service's ``host:port``; the statuses it may get)
OPEN_PROXY_ATTEMPTS: dict[
    str, tuple[Callable[[bytes], bytes | list[tuple[bytes, bytes]]], set[int | None] | None]
] = {
    "absolute-form": (lambda target: http1(b"GET http://" + target + b"/secret HTTP/1.1"), ANY),
    "absolute-form, no Host of ours": (
        lambda target: http1(b"GET http://" + target + b"/secret HTTP/1.1", host=target),
        ANY,
    ),
    # CONNECT is never tunnelled by an HTTP tunnel: a refusal, not a pipe.
    "CONNECT": (
        lambda target: http1(b"CONNECT " + target + b" HTTP/1.1"),
        {None, *range(400, 600)},
    ),
    "CONNECT to the tunnel's host": (
        lambda target: http1(b"CONNECT " + target + b" HTTP/1.1", host=target),
        ANY,
    ),
    "Host of the internal service": (
        lambda target: http1(b"GET /secret HTTP/1.1", host=target),
        {404},
    ),
    "Host with userinfo": (
        lambda target: http1(b"GET /secret HTTP/1.1", host=b"good.localhost@" + target),
        ANY,
    ),
    "OPTIONS *": (lambda target: http1(b"OPTIONS * HTTP/1.1"), ANY),
    # (A CONNECT without :path kills the whole server: its own test below.)
    "h2c :authority of the internal service": (
        lambda target: h2_get(b"/secret", host=target),
        ANY,
    ),
    "h2c extended CONNECT": (
        lambda target: [
            (b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"),
            (b":path", b"/"), (b":authority", b"good.localhost"),
            (b"sec-websocket-version", b"13"),
        ],
        ANY,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(OPEN_PROXY_ATTEMPTS))
async def test_no_open_proxy(
    name: str,
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Absolute-form targets, CONNECT (HTTP/1.1 and h2c) and Host headers naming an
    internal service: the agent dials nothing but its own local service, and the
    internal service sees no connection at all.
    """
    internal = await Listener().serve(nursery)
    make, statuses = OPEN_PROXY_ATTEMPTS[name]
    request = make(f"127.0.0.1:{internal.port}".encode())
    status: int | None = None
    async with under_attack(
        server, good, good_http, name, seconds=30, caplog=caplog, errors_of="tunnel.server"
    ):
        if isinstance(request, bytes):
            status = await raw_exchange(server.port, request)
        else:
            async with H2Visitor.connect(server.port) as h2c:
                stream_id = h2c.request_nowait(request)
                await h2c.flush()
                with trio.move_on_after(5):
                    status = (await h2c.response(stream_id))[0]
    logging.getLogger("tests.hostile").warning(
        "no open proxy, %s: status %s; the local service saw %s",
        name,
        status,
        [(m, p) for m, p, _ in good.seen],
    )
    assert internal.connections == 0, (
        f"a visitor made something dial the internal service: {status}"
    )
    for method, raw_path, _ in good.seen:
        assert method != "CONNECT", raw_path
    if statuses is not ANY:
        assert status in statuses, status


#: name: (a request, given the TCP tunnel's port; the status it must get, if any)
TCP_KEYS_AS_HOSTS: dict[str, tuple[str, int | None]] = {
    "Host: [tcp:<port>]": ("GET / HTTP/1.1\r\nHost: [tcp:{port}]\r\n\r\n", 404),
    "Host: tcp:<port>": ("GET / HTTP/1.1\r\nHost: tcp:{port}\r\n\r\n", 404),
    "Host: [tcp:<port>]:80": ("GET / HTTP/1.1\r\nHost: [tcp:{port}]:80\r\n\r\n", 404),
    "CONNECT with Host: [tcp:<port>]": (
        "CONNECT x:1 HTTP/1.1\r\nHost: [tcp:{port}]\r\n\r\n",
        None,
    ),
}


@pytest.mark.parametrize("name", list(TCP_KEYS_AS_HOSTS))
async def test_an_http_visitor_cannot_reach_a_tcp_tunnel(
    name: str, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """The registry knows a TCP tunnel as ``tcp:<port>``; no Host header may route there.

    ``Host: [tcp:<port>]`` parses (as an IPv6 literal would) to exactly that
    key. Through it an HTTP visitor would reach the raw TCP service through the
    HTTP port: the agent sends it an HTTP request, or, for CONNECT, pipes raw
    bytes to it. An operator who keeps TCP tunnels on an internal interface
    (``tcp_host``) would have them exposed on the public HTTP port.
    """
    template, expected = TCP_KEYS_AS_HOSTS[name]
    public = free_port()
    server = await start_server(nursery, tcp_ports=range(public, public + 1))
    secret = await Listener().serve(nursery)
    config = tunnel.ClientConfig(
        address=f"127.0.0.1:{server.port}", token=TOKEN, port=secret.port, tcp=True,
        backoff_initial=0.05, backoff_max=0.2,
    )  # fmt: skip
    with trio.fail_after(20):
        async with tunnel.open_tunnel(config):
            status = await raw_exchange(server.port, template.format(port=public).encode())
    assert secret.connections == 0, (
        f"an HTTP visitor reached the TCP tunnel's service (status {status}): "
        f"it received {secret.received[:200]!r}"
    )
    if expected is not None:
        assert status == expected, status


async def test_visitors_are_routed_per_request_and_each_tunnels_rules_hold(
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    nursery: trio.Nursery,
    open_agent: Any,
) -> None:
    """On one keep-alive connection (HTTP/1.1) and on one h2c connection, a visitor
    switches Host/``:authority`` from a public tunnel to a password-protected one:
    each request is routed by its own Host, and the protected tunnel's password is
    asked for every time, never carried over from the first.
    """
    private = await start_service(nursery, "private")
    async with open_agent(server.port, private.port, host="private.localhost", basic_auth="ann:pw"):
        with trio.fail_after(20):
            async with RawVisitor.connect(server.port) as raw:
                await raw.send(
                    b"GET /first HTTP/1.1\r\nHost: good.localhost\r\n\r\n"
                    b"GET /second HTTP/1.1\r\nHost: private.localhost\r\n\r\n"
                    b"GET /third HTTP/1.1\r\nHost: good.localhost\r\n\r\n"
                )
                h1 = [(await raw.read_response())[0] for _ in range(3)]
            async with H2Visitor.connect(server.port) as h2c:
                first = h2c.request_nowait(h2_get(b"/h2-first"))
                await h2c.flush()
                first_status = (await h2c.response(first))[0]
                second = h2c.request_nowait(h2_get(b"/h2-second", host=b"private.localhost"))
                await h2c.flush()
                second_status = (await h2c.response(second))[0]
    assert h1 == [200, 401, 200]
    assert (first_status, second_status) == (200, 401)
    assert [p for _, p, _ in good.seen] == [b"/first", b"/third", b"/h2-first"]
    assert private.seen == []


async def test_control_path_on_a_tunnel_host_is_the_tunnels(
    server: Server, good: RecordingService, good_http: httpx.AsyncClient
) -> None:
    """A visitor's plain GET of the control path under a tunnel's host goes to the tunnel
    (as ``ServerConfig.control_path`` documents), and a visitor's WebSocket there,
    without credentials, is refused without touching that tunnel.
    """
    with trio.fail_after(10):
        control = await good_http.get("/_tunnel")
        status, _ = await handshake(server.port, [], ["chat"], host=GOOD)
        status_v1, _ = await handshake(server.port, [claim(GOOD.encode())], [SUBPROTOCOL], GOOD)
    assert control.status_code == 200
    assert control.json()["path"] == "/_tunnel"
    assert (status, status_v1) == (426, 401)
    assert server.hosts() == [GOOD]


async def test_challenge_path_on_a_tunnel_host_is_the_tunnels(
    server: Server, good: RecordingService, good_http: httpx.AsyncClient
) -> None:
    """``<control path>/challenge`` under a tunnel's host is also the tunnel's path.

    The server used to answer it itself (a 404 "does not accept public
    keys", or with keys on, a fresh nonce per request: any visitor could mint
    them, and 10 000 evict a legitimate agent's pending challenge). Only an
    agent's request, which names the protocol in ``tunnel-challenge``, is the
    server's.
    """
    with trio.fail_after(10):
        answer = await good_http.get("/_tunnel/challenge")
    assert [p for _, p, _ in good.seen] == [b"/_tunnel/challenge"], (
        f"the server answered {answer.status_code} {answer.text[:120]!r} itself"
    )


async def test_visitor_http2_connect_without_path_does_not_kill_the_server(
    server: Server, good: RecordingService, good_http: httpx.AsyncClient
) -> None:
    """An HTTP/2 CONNECT (``:method`` and ``:authority`` only, as RFC 9113 section 8.5
    has it), over cleartext with prior knowledge, from a visitor with no credentials.

    It may be refused; the server must go on serving every tunnel.
    """
    with trio.fail_after(10):
        async with H2Visitor.connect(server.port) as h2c:
            stream_id = h2c.request_nowait([(b":method", b"CONNECT"), (b":authority", b"x:1")])
            await h2c.flush()
            with trio.move_on_after(2):
                await h2c.response(stream_id)
        await trio.sleep(0.2)
        answer = await good_http.get("/after-connect")
    assert answer.status_code == 200


async def test_the_agent_takes_no_huge_message_from_its_server(
    server: Server,
    good: RecordingService,
    good_http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server (or whatever sits in its place) sending an 8 MiB message.

    A server sends messages of at most 1 MiB; the agent takes up to 4 MiB and
    queues at most 4 of them, so it holds no more than 16 MiB unread, not the
    32 MiB each of trio-websocket's default that it used to take. Beyond it,
    the agent closes the connection with 1009 (and reconnects).
    """
    caplog.set_level(logging.INFO, logger="tunnel.client")
    (session,) = [s for s in server.app.registry.sessions() if s.host == GOOD]
    with trio.fail_after(10):
        # The agent may refuse it from its header and close before the rest is
        # written: the server's own framing of a taken-over connection says
        # so (Hypercorn's WebSocket did not).
        with contextlib.suppress(TransportClosed):
            await session.link._transport.send(bytes(8 * MiB))
        await session.link.wait_closed()
    # Whether the server read the agent's close frame or its reset first, the
    # agent says why it closed.
    assert "1009" in (session.link.closed_reason or "") or (
        "1009 MESSAGE_TOO_BIG (Exceeded maximum message size: 4194304 bytes)" in caplog.text
    ), session.link.closed_reason


# -- a malicious visitor: fuzzing HTTP/2 -------------------------------------------
#
# A visitor speaking cleartext HTTP/2 (prior knowledge) sends a sequence of
# frames, valid and not, on streams in every state: open (a request whose body
# has not ended), half-closed (its body ended, the answer not yet read),
# closed (answered, or reset), never opened, and stream 0. "wait" steps read
# what the server sends for a moment, so that frames that follow meet streams
# the server has meanwhile answered (the late-DATA crash of Hypercorn's
# H2Protocol). After each run the server must still serve, log no error, and
# keep the legitimate tunnel's agent.

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0)
#: Odd IDs are the visitor's; 2 is one it may never open; the last ones are out of range.
VISITOR_STREAMS = st.sampled_from([1, 1, 1, 3, 3, 5, 7, 2, 0, 0x7FFFFFFF, 0x80000001])
REQUEST_HEADERS = st.builds(
    lambda method, host, path, extra: [
        (b":method", method), (b":scheme", b"http"), (b":authority", host), (b":path", path),
        *extra,
    ],
    st.sampled_from([b"GET", b"POST", b"CONNECT", b"HEAD"]),
    # The legitimate tunnel (it answers after the body), a host nobody serves
    # (404 at once, before any body) and the control path's host.
    st.sampled_from([GOOD.encode(), b"nobody.localhost", b"localhost"]),
    st.sampled_from([b"/", b"/", b"/status/413", b"/_tunnel", b"/_tunnel/challenge", b"*", b""]),
    # Mostly none: most of these make h2 refuse the whole connection.
    st.just([]) | st.just([]) | st.lists(
        st.tuples(
            st.sampled_from([b"content-length", b"te", b"x-a", b"connection", b":path"]),
            st.sampled_from([b"0", b"5", b"trailers", b"close", b"x"]),
        ),
        max_size=2,
    ),
)  # fmt: skip
VISITOR_STEPS = st.one_of(
    st.builds(
        lambda stream_id, headers, end_stream, end_headers: frame(
            HEADERS,
            (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0),
            stream_id,
            hpack_block(headers),
        ),
        VISITOR_STREAMS, REQUEST_HEADERS, st.booleans(), st.booleans() | st.just(True),
    ),
    # Trailers, or a CONTINUATION with no HEADERS before it.
    st.builds(
        lambda kind, stream_id, flags: frame(kind, flags, stream_id, hpack_block([(b"x-t", b"1")])),
        st.sampled_from([HEADERS, CONTINUATION]), VISITOR_STREAMS,
        st.sampled_from([END_HEADERS, END_STREAM | END_HEADERS, 0]),
    ),
    st.builds(
        lambda stream_id, body, end_stream: frame(
            DATA, END_STREAM if end_stream else 0, stream_id, body
        ),
        VISITOR_STREAMS, st.binary(max_size=64), st.booleans(),
    ),
    st.builds(
        lambda stream_id, body, end_stream: frame(
            DATA, END_STREAM if end_stream else 0, stream_id, body
        ),
        VISITOR_STREAMS, st.binary(max_size=64), st.booleans(),
    ),
    st.builds(
        lambda kind, stream_id, number: frame(kind, 0, stream_id, number.to_bytes(4, "big")),
        st.sampled_from([RST_STREAM, WINDOW_UPDATE]), VISITOR_STREAMS,
        st.sampled_from([0, 1, 8, 65535, 2**31 - 1, 2**31]) | st.integers(0, 2**32 - 1),
    ),
    st.builds(
        lambda stream_id, depends_on, exclusive, weight: frame(
            PRIORITY, 0, stream_id,
            (depends_on | (0x80000000 if exclusive else 0)).to_bytes(4, "big") + bytes([weight]),
        ),
        VISITOR_STREAMS, VISITOR_STREAMS.map(lambda i: i & 0x7FFFFFFF), st.booleans(),
        st.integers(0, 255),
    ),
    st.builds(lambda payload: frame(PING, 0, 0, payload), st.binary(min_size=8, max_size=8)),
    SETTINGS_FRAMES,
    RAW_FRAMES,
    st.just("wait"),
    st.just("wait"),
)  # fmt: skip
#: A request answered (404) before its body ended, then more of the body: the
#: KeyError that stopped Hypercorn's serve, tried in every run.
LATE_DATA = (
    [
        frame(HEADERS, END_HEADERS, 1, hpack_block(h2_request("nobody.localhost", "/", "POST"))),
        "wait",
        frame(DATA, 0, 1, b"more"),
        frame(DATA, END_STREAM, 1, b"and the end"),
    ],
    "read",
)
#: A HEAD to a tunnel announcing a body, with END_STREAM on its HEADERS: the
#: agent's 502 page for it had a body, and the server's h2 ended the agent's
#: connection over it (found by this fuzz).
HEAD_WITH_LENGTH = (
    [
        frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            hpack_block([*h2_request(GOOD, "/", "HEAD"), (b"content-length", b"5")]),
        ),
    ],
    "read",
)
#: Requests that open streams 1 and 3 (a body to follow, or none), a moment
#: for the server to answer them, and often more of stream 1's body: the
#: states the steps after them then meet.
OPENINGS = st.builds(
    lambda requests, more_body: [
        *requests, "wait", *([frame(DATA, 0, 1, b"more of the body")] if more_body else [])
    ],
    st.lists(
        st.builds(
            lambda stream_id, headers, end_stream: frame(
                HEADERS, END_HEADERS | (END_STREAM * end_stream), stream_id, hpack_block(headers)
            ),
            st.sampled_from([1, 3]), REQUEST_HEADERS, st.booleans(),
        ),
        min_size=1, max_size=2,
    ),
    st.booleans(),
)  # fmt: skip
VISITOR_RUNS = st.tuples(
    st.tuples(OPENINGS, st.lists(VISITOR_STEPS, min_size=1, max_size=10)).map(
        lambda parts: [*parts[0], *parts[1]]
    ),
    # How the visitor leaves: GOAWAY and close, just close, or wait for the server.
    st.sampled_from(["goaway", "close", "read"]),
)


async def visit_with_frames(port: int, steps: list[bytes | str], leave: str) -> None:
    """One visitor's run of ``steps`` on a fresh connection; whatever the server does
    to it (answers, resets, closes) is fine.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(H2_PREFACE)
        for step in steps:
            if step == "wait":
                with trio.move_on_after(0.1):
                    while await stream.receive_some():
                        pass
            else:
                assert isinstance(step, bytes)
                await stream.send_all(step)
        if leave == "goaway":
            await stream.send_all(frame(GOAWAY, 0, 0, bytes(8)))
        elif leave == "read":
            with trio.move_on_after(0.3):
                while await stream.receive_some():
                    pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # The server closed the connection on us: an answer like any other.
    finally:
        await trio.aclose_forcefully(stream)


async def test_fuzz_visitor_http2_frames(
    server: Server,
    good_http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sequences of HTTP/2 frames from a visitor, valid and invalid, on streams in
    every state (see above); ``VISITOR_FUZZ_EXAMPLES`` of them (``nox -s fuzz``: more).

    After each: no error logged (Hypercorn's guard logs a connection that
    failed), the legitimate tunnel answers, its agent was not knocked off.
    Bound: 48 MiB of peak RSS over the whole run.
    """
    since = connected_since(server)

    async def one(steps: list[bytes | str], leave: str) -> None:
        with trio.fail_after(10):
            await visit_with_frames(server.port, steps, leave)
            no_server_errors(caplog)
            answer = await good_http.get("/still-there")
            assert answer.status_code == 200
            assert connected_since(server) == since

    @hypothesis.settings(
        max_examples=VISITOR_FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        print_blob=True,
        phases=PHASES,
    )
    @hypothesis.given(VISITOR_RUNS)
    @hypothesis.example(LATE_DATA)
    @hypothesis.example(HEAD_WITH_LENGTH)
    def check(run: tuple[list[bytes | str], str]) -> None:
        trio.from_thread.run(one, *run)

    with watch_memory(f"{VISITOR_FUZZ_EXAMPLES} visitor HTTP/2 runs") as memory:
        await trio.to_thread.run_sync(check)
    assert memory.peak_rss < 48 * MiB
    # The last word: a visitor over HTTP/2 still gets its answer.
    async with H2Visitor.connect(server.port) as h2c:
        stream_id = h2c.request_nowait(h2_request(GOOD, "/after-the-fuzz"))
        await h2c.flush()
        with trio.fail_after(5):
            status, _ = await h2c.response(stream_id)
    assert status == 200
