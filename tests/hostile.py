"""Attackers and instruments for the hostile-input tests (``tests/e2e/test_hostile.py``).

* :func:`start_server`: a tunnel server under real Hypercorn whose
  :class:`tunnel.TunnelApp` the test holds, to read its statistics.
* :class:`EvilAgent`: a malicious agent. It makes the real control handshake
  with trio-websocket, then sends whatever bytes it likes as WebSocket binary
  messages; a sans-IO h2 connection of its own reads what the server sends.
* :func:`frame`: one HTTP/2 frame, by hand (any type, flags, stream ID, length).
* :class:`RawVisitor`: a visitor on a bare TCP socket, for bytes no HTTP client
  would send.
* :func:`watch_memory`: the server's memory growth during an attack, with
  tracemalloc (peak of what was allocated since the start and not yet freed)
  and VmRSS.
* :class:`Witness`: a legitimate tunnel's visitor, requesting all through an
  attack and checking every answer and how long it took.

The server runs in the test's process, so the attackers' own allocations are
counted too; they are kept small (payloads built once, sent many times) and
the bounds leave room for them.
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import tracemalloc
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import hypercorn.trio
import trio
import trio_websocket

import tunnel
from helpers import LocalService, serve_local
from tunnel._protocol.handshake import HOST_HEADER, SUBPROTOCOL

__all__ = [
    "TOKEN",
    "EvilAgent",
    "H2Visitor",
    "Memory",
    "RawVisitor",
    "RecordingService",
    "Server",
    "Witness",
    "frame",
    "h2_request",
    "open_evil_agent",
    "start_server",
    "start_service",
    "watch_memory",
    "witness_traffic",
]

logger = logging.getLogger("tests.hostile")

TOKEN = "s3cret"
MiB = 1 << 20

# HTTP/2 frame types (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20


def frame(
    kind: int, flags: int, stream_id: int, payload: bytes = b"", *, length: int = -1
) -> bytes:
    """One HTTP/2 frame; ``length`` overrides the length field (to lie about it)."""
    size = len(payload) if length < 0 else length
    return (
        size.to_bytes(3, "big")
        + bytes([kind & 0xFF, flags & 0xFF])
        + (stream_id & 0xFFFFFFFF).to_bytes(4, "big")
        + payload
    )


# -- the server -----------------------------------------------------------------


@dataclass
class Server:
    """A tunnel server in the test's nursery."""

    port: int
    app: tunnel.TunnelApp

    def streams_in_flight(self) -> int:
        return sum(s.streams_in_flight for s in self.app.statistics())

    def hosts(self) -> list[str]:
        return [s.host for s in self.app.statistics()]


async def start_server(nursery: trio.Nursery, **overrides: object) -> Server:
    """Serve :class:`tunnel.TunnelApp` on 127.0.0.1, port 0, as :func:`tunnel.serve` would."""
    settings: dict[str, object] = {"address": "127.0.0.1:0", "tokens": frozenset({TOKEN})}
    settings.update(overrides)
    config = tunnel.ServerConfig(**settings)  # type: ignore[arg-type]
    app = tunnel.TunnelApp(config)
    urls: list[str] = await nursery.start(
        partial(hypercorn.trio.serve, app, tunnel.hypercorn_config(config))  # type: ignore[arg-type]
    )
    return Server(int(urls[0].rsplit(":", 1)[1]), app)


class RecordingService(LocalService):
    """The tests' local service, also keeping every HTTP request as it arrived.

    ``seen`` holds (method, raw path, headers) as the service's own HTTP/1.1
    parser read them off the wire from the agent.
    """

    def __init__(self, name: str = "local") -> None:
        super().__init__(name)
        self.seen: list[tuple[str, bytes, list[tuple[bytes, bytes]]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/witness/"):
            self.seen.append((scope["method"], scope["raw_path"], list(scope["headers"])))
        await super().__call__(scope, receive, send)


async def start_service(nursery: trio.Nursery, name: str) -> RecordingService:
    """A :class:`RecordingService` on 127.0.0.1, port 0."""
    service = RecordingService(name)
    await nursery.start(partial(serve_local, service, 0))
    return service


# -- the malicious agent --------------------------------------------------------


class EvilAgent:
    """An agent that passed the handshake and then sends whatever it likes.

    Its own h2 connection (the HTTP/2 server side, as a real agent) only reads:
    it tells when the server opened a stream, and answers nothing by itself.
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, validate_inbound_headers=False)
        )
        self.h2.initiate_connection()
        self._preface = self.h2.data_to_send()  # our SETTINGS, sent by start()
        self.requests: list[int] = []

    async def start(self) -> None:
        """Send the agent's SETTINGS, as a live agent does (the server then routes to it)."""
        await self.send(self._preface)

    async def send(self, data: bytes) -> None:
        """Send ``data`` as one binary message."""
        await self.ws.send_message(data)

    async def receive(self) -> list[h2.events.Event]:
        """One message from the server, as h2 events (ours, which never fail)."""
        data = await self.ws.get_message()
        assert isinstance(data, bytes), "the server sent a text message"
        try:
            events = self.h2.receive_data(data)
        except Exception:  # our bookkeeping only; the server's bytes may be anything now
            return []
        self.h2.data_to_send()  # our automatic answers are not sent
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                assert event.stream_id is not None
                self.requests.append(event.stream_id)
        return events

    async def wait_request(self) -> int:
        """Wait until the server opens a stream (a visitor's request); its ID."""
        while not self.requests:
            await self.receive()
        return self.requests.pop(0)

    async def wait_closed(self) -> trio_websocket.CloseReason:
        """Read (and drop) everything until the server closes; its close reason."""
        reason: trio_websocket.CloseReason | None = None
        try:
            while True:
                await self.ws.get_message()
        except trio_websocket.ConnectionClosed as closed:
            reason = closed.reason
        assert reason is not None
        return reason

    async def alive(self) -> bool:
        """Whether the server still answers a PING (False: it closed the connection).

        Waits for one or the other; cap it with ``trio.fail_after``: no answer
        and no close means the server stalled on this connection. The answer is
        looked for in the raw bytes, not parsed: after a flood, parsing what
        the server sent back would cost the (shared) CPU more than the attack.
        """
        answer = frame(PING, ACK, 0, b"evil-png")
        tail = b""
        try:
            await self.send(frame(PING, 0, 0, b"evil-png"))
            while answer not in tail:
                data = await self.ws.get_message()
                assert isinstance(data, bytes), "the server sent a text message"
                tail = tail[-len(answer) :] + data
        except trio_websocket.ConnectionClosed:
            return False
        return True


@asynccontextmanager
async def open_evil_agent(
    port: int,
    host: str = "evil.localhost",
    *,
    token: str = TOKEN,
    start: bool = True,
    message_queue_size: int = 64,
    receive_buffer: int | None = None,
) -> AsyncIterator[EvilAgent]:
    """Connect a malicious agent that claims ``host``; ``start`` sends its SETTINGS.

    ``receive_buffer`` shrinks the socket's receive buffer (SO_RCVBUF), for a
    peer that stops reading.
    """
    sock = trio.socket.socket()
    if receive_buffer is not None:
        # Set before connecting, so the window the server sees stays small: a
        # peer that does not read then stops the server's writes at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                f"127.0.0.1:{port}",
                "/_tunnel",
                subprotocols=[SUBPROTOCOL],
                extra_headers=[
                    (b"authorization", f"Bearer {token}".encode()),
                    (HOST_HEADER.encode(), host.encode()),
                ],
                message_queue_size=message_queue_size,
                max_message_size=64 * MiB,
                receive_buffer_size=64 * 1024,
            )
            agent = EvilAgent(ws)
            if start:
                await agent.start()
            yield agent
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


# -- raw visitors ---------------------------------------------------------------


class RawVisitor:
    """A visitor on a bare TCP connection to the server."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.received = bytearray()

    @classmethod
    @asynccontextmanager
    async def connect(cls, port: int) -> AsyncIterator[RawVisitor]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            yield cls(stream)
        finally:
            await trio.aclose_forcefully(stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_until_closed(self, limit: int = 4 * MiB) -> bytes:
        """Everything the server sends until it closes (or ``limit`` bytes)."""
        while len(self.received) < limit:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            self.received += data
        return bytes(self.received)

    async def read_response(self) -> tuple[int, dict[str, str], bytes]:
        """One HTTP/1.1 response with a Content-Length (status, headers, body)."""
        while b"\r\n\r\n" not in self.received:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(f"closed after {bytes(self.received)!r}")
            self.received += data
        head, _, rest = bytes(self.received).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            data = await self.stream.receive_some(65536)
            if not data:
                break
            rest += data
        self.received = bytearray(rest[length:])
        return status, headers, rest[:length]


class H2Visitor:
    """A visitor speaking HTTP/2 over cleartext with prior knowledge, with h2's checks off.

    It sends what it is told (any header bytes), so it can try what a
    browser never would.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.responses: dict[int, list[h2.events.Event]] = {}
        self._sending = trio.Lock()
        self.closed = False
        self.terminated: h2.events.ConnectionTerminated | None = None

    @classmethod
    @asynccontextmanager
    async def connect(cls, port: int) -> AsyncIterator[H2Visitor]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            visitor = cls(stream)
            visitor.conn.initiate_connection()
            await visitor.flush()
            yield visitor
        finally:
            await trio.aclose_forcefully(stream)

    async def flush(self) -> None:
        async with self._sending:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)

    def request_nowait(self, headers: list[tuple[bytes, bytes]], body: bytes | None = None) -> int:
        """Queue a request (sent by the next :meth:`flush`); its stream ID."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, headers, end_stream=body is None)
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=True)
        self.responses[stream_id] = []
        return stream_id

    async def receive(self) -> bool:
        """Read once and record the events; False once the server has closed."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            stream_id = getattr(event, "stream_id", None)
            if stream_id in self.responses:
                self.responses[stream_id].append(event)
            if isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event
        await self.flush()
        return True

    async def response(self, stream_id: int) -> tuple[int | None, bytes]:
        """Wait for the whole response on ``stream_id``: (status, body); None if reset."""
        while True:
            events = self.responses[stream_id]
            if any(isinstance(e, h2.events.StreamReset) for e in events):
                return None, b""
            if any(isinstance(e, h2.events.StreamEnded) for e in events):
                status = None
                body = b""
                for event in events:
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data or b""
                        self.conn.acknowledge_received_data(
                            event.flow_controlled_length or 0, stream_id
                        )
                return status, body
            if self.closed or self.terminated is not None or not await self.receive():
                return None, b""


def h2_request(host: str, path: str = "/", method: str = "GET") -> list[tuple[bytes, bytes]]:
    """The header list of a plain HTTP/2 request."""
    return [
        (b":method", method.encode()),
        (b":scheme", b"http"),
        (b":authority", host.encode()),
        (b":path", path.encode()),
    ]


# -- memory ---------------------------------------------------------------------


def _status(field_name: bytes) -> int:
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(field_name + b":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


@dataclass
class Memory:
    """What an attack cost the process (server and attacker together)."""

    label: str
    before: int = 0  # VmRSS at the start
    peak_rss: int = 0  # VmHWM at the end minus VmRSS at the start
    rss_growth: int = 0  # VmRSS at the end minus at the start
    traced_peak: int | None = None  # tracemalloc: most allocated since the start at once
    samples: list[tuple[float, int]] = field(default_factory=list)

    def sample(self) -> int:
        """Record (time, RSS growth so far); return the growth."""
        growth = _status(b"VmRSS") - self.before
        self.samples.append((trio.current_time(), growth))
        return growth

    def growth_since(self, seconds_into: float) -> int:
        """RSS growth from the first sample at least ``seconds_into`` after the start."""
        assert self.samples, "no samples taken"
        start = self.samples[0][0]
        later = [growth for at, growth in self.samples if at - start >= seconds_into]
        assert later, f"no samples after {seconds_into}s"
        return self.samples[-1][1] - later[0]

    def __str__(self) -> str:
        text = (
            f"peak RSS +{self.peak_rss / MiB:.1f} MiB, "
            f"RSS at the end +{self.rss_growth / MiB:.1f} MiB"
        )
        if self.traced_peak is not None:
            text += f", tracemalloc peak {self.traced_peak / MiB:.1f} MiB"
        return text


MEASURED: list[Memory] = []


@contextmanager
def watch_memory(label: str, *, trace: bool = False) -> Iterator[Memory]:
    """Measure the process's memory over the ``with`` block.

    The peak is VmHWM, reset at the start (``/proc/self/clear_refs``), so a
    short-lived spike counts. ``trace`` also runs tracemalloc (precise, but it
    makes allocation-heavy code several times slower, so floods go slower).
    """
    gc.collect()
    memory = Memory(label)
    exact_peak = _reset_peak_rss()
    memory.before = _status(b"VmRSS")
    if trace:
        tracemalloc.start()
    try:
        yield memory
    finally:
        if trace:
            memory.traced_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        gc.collect()
        end = _status(b"VmRSS")
        memory.rss_growth = end - memory.before
        samples = [growth for _, growth in memory.samples]
        peak = _status(b"VmHWM") if exact_peak else max([end, *samples])
        memory.peak_rss = max(peak - memory.before, 0)
        MEASURED.append(memory)
        logger.warning("memory, %s: %s", label, memory)


# -- the legitimate tunnel's witness --------------------------------------------


@dataclass
class Witness:
    """Requests through a legitimate tunnel during an attack, each one checked.

    A request still waiting when the attack ends counts with the time it has
    waited, so a stall shows even if no request finished during it.
    """

    http: httpx.AsyncClient
    service: LocalService
    pause: float = 0.02
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _started: float | None = None

    async def check_once(self, due: float | None = None) -> None:
        """One request; its latency counts from ``due`` (when it should have started)."""
        path = f"/witness/{len(self.latencies)}"
        self._started = started = trio.current_time() if due is None else due
        try:
            response = await self.http.get(path, headers={"x-witness": "1"})
        except httpx.HTTPError as exc:
            self.failures.append(f"{path}: {exc!r}")
            return
        finally:
            self._started = None
        self.latencies.append(trio.current_time() - started)
        if response.status_code != 200:
            self.failures.append(f"{path}: {response.status_code} {response.text[:300]}")
            return
        echo = json.loads(response.content)
        if echo["path"] != path or echo["service"] != self.service.name:
            self.failures.append(f"{path}: answered by {echo['service']} for {echo['path']}")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.check_once()
        task_status.started()
        while True:
            # Counted from when it was due, so a stall between two requests
            # (the whole event loop blocked) shows as well.
            due = trio.current_time() + self.pause
            await trio.sleep_until(due)
            await self.check_once(due)

    def stop(self) -> None:
        if self._started is not None:
            self.latencies.append(trio.current_time() - self._started)
            self._started = None

    def assert_served(self, *, max_latency: float) -> None:
        assert not self.failures, self.failures[:5]
        assert self.latencies, "the legitimate tunnel was never asked"
        slowest = max(self.latencies)
        logger.warning("witness: %d requests, slowest %.3fs", len(self.latencies), slowest)
        assert slowest < max_latency, (
            f"the legitimate tunnel stalled: a request took {slowest:.2f}s "
            f"(bound {max_latency:g}s; {len(self.latencies)} requests)"
        )


@asynccontextmanager
async def witness_traffic(
    http: httpx.AsyncClient, service: LocalService, *, max_latency: float = 3.0
) -> AsyncIterator[Witness]:
    """Keep a legitimate tunnel busy for the block; on leaving, check its every answer."""
    witness = Witness(http, service)
    async with trio.open_nursery() as nursery:
        await nursery.start(witness.run)
        yield witness
        witness.stop()
        nursery.cancel_scope.cancel()
    await witness.check_once()  # and once more after the attack
    witness.assert_served(max_latency=max_latency)


def headers_of(echo: bytes) -> Sequence[tuple[str, str]]:
    """The header list the local service saw, from its JSON echo."""
    return [(key, value) for key, value in json.loads(echo)["headers"]]
