"""The local service of the end-to-end tests: a real ASGI app under real Hypercorn.

The tests reach it only through a tunnel, so every route answers with what the
service saw (method, path, query, headers, body) and every wait in it is on an
event the test controls or observes; nothing here sleeps.

Routes (any other path echoes the request as JSON):

``/fixed``
    1234 bytes with a ``Content-Length``, for every method (HEAD included).
``/status/<code>``
    That status and no body (``/status/304`` adds an ``ETag``).
``/sha``
    Reads the body as it streams in and answers its SHA-256 and length.
``/stream``
    Sends :data:`STREAM_CHUNK_1`, waits for ``release_stream``, then sends
    :data:`STREAM_CHUNK_2` and sets ``stream_finished``.
``/upload-stream``
    Sets ``body_started`` on the first body chunk, then reads the rest and
    answers the whole body.
``/hop``
    Echoes the request and answers with hop-by-hop headers of its own.
``/hang``
    Never answers; returns once the request is abandoned.
``/watch``
    Sends :data:`STREAM_CHUNK_1`, then waits for the visitor to go and sets
    ``disconnected`` when its ``receive()`` says so (or its ``send`` fails).
``/gather/<n>``
    Waits until ``gather_target`` requests are inside at once, then echoes.
``/hold``
    Counts itself in ``holding`` and waits for ``release_hold``, then echoes.

Also here, for tests that compare requests byte for byte (tests/e2e/test_conformance.py):
:class:`RecordingService`, an HTTP/1.1 server on raw sockets that records each
request as it read it and frames its answer however the path asks; and
:class:`Processes`, tunnel servers and agents as processes of their own, started
without an event loop so that module-scoped fixtures can share them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import hypercorn.config
import hypercorn.trio
import trio

__all__ = [
    "FRAMINGS",
    "STREAM_CHUNK_1",
    "STREAM_CHUNK_2",
    "LocalService",
    "Outcome",
    "Processes",
    "Recorded",
    "RecordingService",
    "eventually",
    "fetch",
    "free_port",
    "response_body",
    "serve_local",
    "stop_politely",
    "visitor",
    "wait_until_inside",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FIXED_BODY = b"F" * 1234
STREAM_CHUNK_1 = b"first chunk of the stream\n" * 8
STREAM_CHUNK_2 = b"last chunk of the stream\n"
HOP_RESPONSE_HEADERS = [
    (b"connection", b"x-local-hop"),
    (b"x-local-hop", b"1"),
    (b"keep-alive", b"timeout=5, max=100"),
    (b"proxy-connection", b"keep-alive"),
    (b"x-end-to-end", b"kept"),
]


class LocalService:
    """The test ASGI app, with the events its routes wait on or set.

    Args:
        name: Included in every echo, so a test can tell two services apart.
    """

    def __init__(self, name: str = "local") -> None:
        self.name = name
        self.port = 0
        self.lifespan_started = trio.Event()
        self.release_stream = trio.Event()
        self.stream_finished = trio.Event()
        self.body_started = trio.Event()
        self.disconnected = trio.Event()
        self.hang_abandoned = trio.Event()
        self.gather_target = 200
        self._gathered = 0
        self._all_gathered = trio.Event()
        self.holding = 0
        self.release_hold = trio.Event()
        self.requests: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        assert scope["type"] == "http", scope["type"]
        path: str = scope["path"]
        self.requests.append((scope["method"], path))
        if path == "/fixed":
            await _read_body(receive)
            await _respond(send, 200, FIXED_BODY, [(b"content-type", b"text/plain")])
        elif path.startswith("/status/"):
            await self._status(int(path.rsplit("/", 1)[1]), receive, send)
        elif path == "/sha":
            await self._sha(receive, send)
        elif path == "/stream":
            await self._stream(receive, send)
        elif path == "/upload-stream":
            await self._upload_stream(scope, receive, send)
        elif path == "/hop":
            body = await _read_body(receive)
            await _respond(send, 200, self._echo(scope, body), HOP_RESPONSE_HEADERS)
        elif path == "/hang":
            await _wait_for_disconnect(receive)
            self.hang_abandoned.set()
        elif path == "/watch":
            await self._watch(receive, send)
        elif path.startswith("/gather/"):
            await self._gather(scope, receive, send)
        elif path == "/hold":
            body = await _read_body(receive)
            self.holding += 1
            await self.release_hold.wait()
            await _respond(send, 200, self._echo(scope, body), [])
        else:
            body = await _read_body(receive)
            await _respond(
                send,
                200,
                self._echo(scope, body),
                [
                    (b"content-type", b"application/json"),
                    (b"set-cookie", b"a=1"),
                    (b"set-cookie", b"b=2"),
                ],
            )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
                self.lifespan_started.set()
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _echo(self, scope: Scope, body: bytes) -> bytes:
        return json.dumps(
            {
                "service": self.name,
                "method": scope["method"],
                "path": scope["path"],
                "query": scope["query_string"].decode("latin-1"),
                "headers": [
                    [key.decode("latin-1"), value.decode("latin-1")]
                    for key, value in scope["headers"]
                ],
                "body": body.decode("latin-1"),
            }
        ).encode()

    async def _status(self, status: int, receive: Receive, send: Send) -> None:
        await _read_body(receive)
        headers = [(b"etag", b'"v1"')] if status == 304 else []
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _sha(self, receive: Receive, send: Send) -> None:
        digest = hashlib.sha256()
        length = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            digest.update(chunk)
            length += len(chunk)
            more = message.get("more_body", False)
        answer = json.dumps({"sha256": digest.hexdigest(), "length": length}).encode()
        await _respond(send, 200, answer, [(b"content-type", b"application/json")])

    async def _stream(self, receive: Receive, send: Send) -> None:
        await _read_body(receive)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")],
            }
        )
        await send({"type": "http.response.body", "body": STREAM_CHUNK_1, "more_body": True})
        await self.release_stream.wait()
        await send({"type": "http.response.body", "body": STREAM_CHUNK_2, "more_body": False})
        self.stream_finished.set()

    async def _upload_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
                self.body_started.set()
            more = message.get("more_body", False)
        await _respond(send, 200, self._echo(scope, b"".join(chunks)), [])

    async def _watch(self, receive: Receive, send: Send) -> None:
        await _read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": STREAM_CHUNK_1, "more_body": True})
        try:
            await _wait_for_disconnect(receive)
        finally:
            # A cancelled handler, or a receive() that says the visitor left:
            # either way the local service noticed.
            self.disconnected.set()

    async def _gather(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        self._gathered += 1
        if self._gathered >= self.gather_target:
            self._all_gathered.set()
        await self._all_gathered.wait()
        await _respond(send, 200, self._echo(scope, body), [])


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def serve_local(
    service: LocalService,
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``service`` with Hypercorn on ``127.0.0.1:port`` until cancelled.

    Start it with ``await nursery.start(serve_local, service)``; that returns the
    bound port once Hypercorn listens and the app has answered lifespan startup.
    """
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.graceful_timeout = 0.5

    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(hypercorn.trio.serve, service, config)  # type: ignore[arg-type]
        await service.lifespan_started.wait()
        service.port = int(urls[0].rsplit(":", 1)[1])
        task_status.started(service.port)


async def eventually(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait (polling, bounded) until ``condition()`` holds; fail after ``limit`` seconds."""
    for _ in range(int(limit / 0.02)):
        if condition():
            return
        await trio.sleep(0.02)
    assert condition()


async def wait_until_inside(service: LocalService, path: str) -> None:
    """Wait (up to 5 s) until ``service`` has received a GET for ``path``."""
    await eventually(lambda: ("GET", path) in service.requests)


class Outcome:
    """What a visitor's request got, and when: filled in by :func:`fetch`."""

    def __init__(self) -> None:
        self.response: httpx.Response | None = None
        #: The client's error, if ``fetch`` was told to keep it (else it propagates).
        self.error: httpx.HTTPError | None = None
        self.at = 0.0
        self.done = trio.Event()


async def fetch(
    http: httpx.AsyncClient, path: str, outcome: Outcome, *, keep_error: bool = False
) -> None:
    """GET ``path`` (run it in the background) and record the answer in ``outcome``.

    With ``keep_error``, a client error (a connection cut, a timeout) is an
    outcome like an answer; without it, it fails the test.
    """
    try:
        outcome.response = await http.get(path)
    except httpx.HTTPError as exc:
        if not keep_error:
            raise
        outcome.error = exc
    finally:
        outcome.at = trio.current_time()
        outcome.done.set()


async def stop_politely(process: trio.Process) -> None:
    """``deliver_cancel`` for a script that starts processes of its own: SIGTERM lets
    it stop them; SIGKILL after 10 s.
    """
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(10):
        await process.wait()
    process.kill()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def visitor(
    port: int,
    host: str = "app.localhost",
    *,
    scheme: str = "http",
    **kwargs: Any,
) -> httpx.AsyncClient:
    """An HTTP client that reaches the tunnel server at ``127.0.0.1:port`` as ``host``."""
    kwargs.setdefault("timeout", httpx.Timeout(20.0))
    return httpx.AsyncClient(
        base_url=f"{scheme}://127.0.0.1:{port}",
        headers={"host": host},
        trust_env=False,
        **kwargs,
    )


# -- a recording local service, written on raw sockets --------------------------

#: The ways the recording service frames its answer, chosen by the first segment
#: of the request's path (``/<framing>/...``).
FRAMINGS = ("length", "chunked", "trailers", "close", "204", "304", "1xx")


@dataclass(frozen=True)
class Recorded:
    """One request as the recording service read it off its socket."""

    method: str
    target: str
    #: Names lower-cased (HTTP/2 carries them so), values as sent, in order.
    headers: tuple[tuple[str, str], ...]
    body: bytes
    trailers: tuple[tuple[str, str], ...]
    #: Which accepted connection carried it, and how many requests came before
    #: it on that connection (0: a fresh connection).
    connection: int
    index: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


def response_body(method: str, target: str, body: bytes, size: int) -> bytes:
    """What the recording service answers: a line naming the request, padded to ``size``."""
    line = f"{method} {target} {len(body)} {hashlib.sha256(body).hexdigest()}\n".encode()
    return line + b"r" * max(0, size - len(line))


class RecordingService:
    """An HTTP/1.1 server on raw sockets, in threads, that records every request.

    Nothing in it parses with a library: the request is read byte by byte as a
    proxy must have written it, and the answer is framed exactly as its path
    asks (see :data:`FRAMINGS`), so a test controls response framing to the
    byte. The query parameter ``r`` sets the answer's body size. Threads, not
    trio, so that one service can outlive many tests (module-scoped fixtures)
    and keep answering while a test's own trio loop blocks in a browser.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Condition()
        self._records: list[Recorded] = []
        self._connections = 0
        self._sockets: set[socket.socket] = set()
        self._closed = False
        #: ``/page/<name>`` answers ``pages[name]`` as HTML (for a browser to run).
        self.pages: dict[str, bytes] = {}
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        # Closing alone does not wake a thread blocked in accept(); shutting down does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in list(self._sockets):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def records(self, target_prefix: str = "/") -> list[Recorded]:
        with self._lock:
            return [r for r in self._records if r.target.startswith(target_prefix)]

    def take(self, target: str, timeout: float = 5.0) -> Recorded:
        """Wait for the request for ``target``, and forget it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for i, record in enumerate(self._records):
                    if record.target == target:
                        del self._records[i]
                        return record
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [r.target for r in self._records]
                    raise AssertionError(f"no request for {target} reached the service: {seen}")
                self._lock.wait(left)

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                number = self._connections
                self._connections += 1
                self._sockets.add(sock)
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        reader = _Reader(sock)
        try:
            for index in itertools.count():
                head = reader.until(b"\r\n\r\n")
                if head is None:
                    return
                if not self._answer(sock, reader, head, number, index):
                    return
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._sockets.discard(sock)
            sock.close()

    def _answer(
        self, sock: socket.socket, reader: _Reader, head: bytes, number: int, index: int
    ) -> bool:
        request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ")
        headers = tuple(
            (name.strip().lower(), value.strip())
            for name, value in (line.split(":", 1) for line in lines)
        )
        fields = dict(headers)
        if fields.get("expect", "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        trailers: tuple[tuple[str, str], ...] = ()
        if "chunked" in fields.get("transfer-encoding", "").lower():
            body, trailers = _read_chunked(reader)
        else:
            body = reader.exactly(int(fields.get("content-length", "0")))
        with self._lock:
            self._records.append(Recorded(method, target, headers, body, trailers, number, index))
            self._lock.notify_all()
        framing = target.split("/")[1] if target.count("/") > 1 else "length"
        query = dict(
            part.split("=", 1) for part in target.partition("?")[2].split("&") if "=" in part
        )
        if framing == "page":
            page = self.pages.get(target.split("/")[2], b"")
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nCache-Control: no-store\r\n"
                + f"Content-Length: {len(page)}\r\n\r\n".encode()
                + page
            )
            return True
        payload = response_body(method, target, body, int(query.get("r", "0")))
        sock.sendall(_frame(framing, method, payload))
        return framing != "close" and fields.get("connection", "").lower() != "close"


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def until(self, marker: bytes) -> bytes | None:
        while marker not in self.buffer:
            if not self._fill():
                if self.buffer:
                    raise ValueError("connection closed mid-request")
                return None
        part, _, self.buffer = self.buffer.partition(marker)
        return part + marker

    def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._fill():
                raise ValueError("connection closed mid-body")
        part, self.buffer = self.buffer[:n], self.buffer[n:]
        return part


def _read_chunked(reader: _Reader) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    body = bytearray()
    while True:
        size_line = reader.until(b"\r\n")
        if size_line is None:
            raise ValueError("connection closed mid-body")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            break
        body += reader.exactly(size)
        reader.exactly(2)
    trailers = []
    while (line := reader.until(b"\r\n")) not in (b"\r\n", None):
        name, _, value = line.decode("latin-1").partition(":")
        trailers.append((name.strip().lower(), value.strip()))
    return bytes(body), tuple(trailers)


def _frame(framing: str, method: str, payload: bytes) -> bytes:
    """The whole answer, framed as ``framing`` says (a HEAD answer has no body)."""
    body = b"" if method == "HEAD" else payload
    common = b"Content-Type: text/plain\r\nX-Recorded: yes\r\n"
    if framing == "204":
        return b"HTTP/1.1 204 No Content\r\nX-Recorded: yes\r\n\r\n"
    if framing == "304":
        return b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nX-Recorded: yes\r\n\r\n'
    if framing == "close":
        # HTTP/1.0 style: no length, the end of the body is the end of the connection.
        return b"HTTP/1.0 200 OK\r\n" + common + b"\r\n" + body
    if framing in ("chunked", "trailers"):
        head = b"HTTP/1.1 200 OK\r\n" + common + b"Transfer-Encoding: chunked\r\n"
        if framing == "trailers":
            head += b"Trailer: X-Checksum\r\n"
        out = head + b"\r\n"
        if method != "HEAD":
            for start in range(0, len(body), 4000):
                piece = body[start : start + 4000]
                out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            out += b"0\r\n"
            if framing == "trailers":
                out += f"X-Checksum: {hashlib.sha256(body).hexdigest()}\r\n".encode()
            out += b"\r\n"
        return out
    early = b""
    if framing == "1xx":
        early = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    length = f"Content-Length: {len(payload)}\r\n".encode()
    return early + b"HTTP/1.1 200 OK\r\n" + common + length + b"\r\n" + body


# -- tunnel servers and agents as processes, for module-scoped fixtures ---------


class Processes:
    """Tunnel server and agent processes (``tests/processes.py``), started synchronously.

    For fixtures that outlive one test: pytest-trio runs each test in its own
    event loop, so what is shared between tests cannot live in one. The agent
    runs in a process of its own, as in a real deployment: only then do the
    server's writes and the agent's reads interleave as they do in production
    (one process hides races between them).
    """

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def _start(self, args: list[str], ready: str) -> subprocess.Popen[bytes]:
        script = str(Path(__file__).resolve().parent / "processes.py")
        root = str(Path(__file__).resolve().parents[1])
        child = subprocess.Popen(
            [sys.executable, script, *args],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": root},
        )
        self.children.append(child)
        assert child.stdout is not None
        deadline = time.monotonic() + 30
        lines: list[bytes] = []
        while True:
            left = deadline - time.monotonic()
            ready_to_read, _, _ = select.select([child.stdout], [], [], max(left, 0))
            if not ready_to_read:
                raise AssertionError(f"{args[0]} never printed {ready!r}: {lines}")
            line = child.stdout.readline()
            if not line:
                raise AssertionError(f"{args[0]} ended before printing {ready!r}: {lines}")
            lines.append(line.strip())
            if line.strip() == ready.encode():
                return child

    def server(self, *options: str) -> int:
        """A server on a free port, once it listens; returns the port."""
        port = free_port()
        self._start(["server", str(port), *options], "listening")
        return port

    def agent(self, server_port: int, local_port: int, host: str, *options: str) -> None:
        """An agent for ``host``, once connected."""
        self._start(["agent", str(server_port), str(local_port), host, *options], "connected")

    def close(self) -> None:
        # Killed, not stopped: nothing is left to check, and a graceful stop
        # waits for visitors' idle keep-alive connections.
        for child in self.children:
            child.kill()
        for child in self.children:
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        self.children.clear()


async def echo_websocket(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that echoes each WebSocket message (text as ``echo: <text>``)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "websocket":
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": "echo: " + message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})
