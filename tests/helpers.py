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
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import hypercorn.config
import hypercorn.trio
import trio

__all__ = [
    "STREAM_CHUNK_1",
    "STREAM_CHUNK_2",
    "LocalService",
    "eventually",
    "free_port",
    "serve_local",
    "visitor",
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
