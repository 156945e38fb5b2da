"""The traffic inspector: a web page of the agent's recent requests, with Replay.

An ASGI app under Hypercorn's trio worker, in the agent's own nursery, on
loopback by default. Routes:

``GET /``
    The page (static HTML, JavaScript and CSS from ``_inspector_static/``).
``GET /api/events``
    Server-sent events, so the page needs no polling: ``snapshot`` (the status
    and every exchange kept) first and whenever the page fell too far behind,
    ``exchange`` (one exchange's summary) as each starts, gets its response and
    ends, ``status`` every few seconds.
``GET /api/exchanges`` and ``GET /api/exchanges/<id>``
    The same snapshot as JSON; one exchange in full (404 once it left the buffer).
``POST /api/exchanges/<id>/replay``
    Sends the request to the local service again; 201 with the new exchange's
    id, 409 when the body was too large to keep.
``DELETE /api/exchanges``
    Forgets every exchange kept.

Everything is bounded: the recorder's buffer, each page's queue of changes
(past the buffer's size it becomes one "resync"), the number of pages open at
once and of replays in flight. Two guards keep other web sites out: the Host
header must be an IP address or ``localhost`` (no DNS rebinding), and requests
that change something need an ``X-Tunnel-Inspector`` header, which a cross-site
form cannot send.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from functools import partial
from importlib import resources
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from .._asgi import Receive, Scope, Send
from ._inspector_render import exchange_detail, exchange_summary
from ._observe import Exchange, Recorder
from ._replay import ReplayRefused, replay
from ._upstream import LocalPool

__all__ = ["InspectorApp", "allowed_host", "bind_inspector", "open_inspector", "serve_inspector"]

logger = logging.getLogger("tunnel.inspector")

Status = Callable[[], dict[str, Any]]

#: Pages that may hold the event stream open at once.
MAX_PAGES = 16
#: Replays in flight at once.
MAX_REPLAYS = 4
#: Seconds between ``status`` events (which also tell a dead page from a live one).
STATUS_INTERVAL = 5.0
#: Seconds a page's changes are gathered before they are sent, under load.
BATCH_DELAY = 0.05
#: How many ports after the configured one are tried when it is in use.
PORT_ATTEMPTS = 10
#: The header a request that changes something must carry.
CSRF_HEADER = b"x-tunnel-inspector"

_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/inspector.js": ("inspector.js", "text/javascript; charset=utf-8"),
    "/static/inspector.css": ("inspector.css", "text/css; charset=utf-8"),
}
_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


def _static_files() -> dict[str, tuple[bytes, bytes]]:
    folder = resources.files(__package__).joinpath("_inspector_static")
    return {
        path: (folder.joinpath(name).read_bytes(), content_type.encode())
        for path, (name, content_type) in _STATIC.items()
    }


def allowed_host(host: bytes | None) -> bool:
    """Whether a request's Host names loopback by a name no web site can take.

    IP literals and ``localhost`` (with its subdomains, which resolve to loopback
    by RFC 6761) pass; any other name could be a rebinding attacker's.
    """
    if not host:
        return False
    name = host.decode("ascii", "replace").lower()
    if name.startswith("["):
        name = name[1 : name.find("]")]
    elif name.count(":") == 1:
        name = name.split(":")[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _Feed:
    """What one open page has yet to be told; at most ``limit`` ids, then a resync."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending: dict[int, None] = {}
        self.resync = False
        self._wake = trio.Event()

    def notify(self, exchange: Exchange | None) -> None:
        if exchange is None or self.resync or len(self.pending) >= self.limit:
            self.resync = True
            self.pending.clear()
        else:
            self.pending[exchange.id] = None
        self._wake.set()

    async def wait(self) -> None:
        await self._wake.wait()
        self._wake = trio.Event()


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class InspectorApp:
    """The inspector's ASGI app.

    Args:
        recorder: Whose exchanges to show.
        pool: The local service, for replays.
        status: Returns the tunnel's state for the page's header
            (``state``, ``url``, ``target``).
    """

    def __init__(self, recorder: Recorder, pool: LocalPool, status: Status) -> None:
        self.recorder = recorder
        self.pool = pool
        self.status = status
        self._static = _static_files()
        self._pages = 0
        self._replays = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # WebSockets: Hypercorn closes the connection
        headers = dict(scope["headers"])
        if not allowed_host(headers.get(b"host")):
            await _plain(
                send,
                403,
                "The tunnel inspector answers only to an IP address or localhost "
                "(a guard against DNS rebinding). Open it as http://127.0.0.1:<port>/.",
            )
            return
        method, path = scope["method"], scope["path"]
        if method in ("GET", "HEAD") and path in self._static:
            body, content_type = self._static[path]
            await _respond(send, 200, body, content_type)
        elif method == "GET" and path == "/api/events":
            await self._events(receive, send)
        elif method == "GET" and path == "/api/exchanges":
            await _json(send, 200, self._snapshot())
        elif path.startswith("/api/exchanges/"):
            await self._exchange(method, path.split("/")[3:], headers, send)
        elif method == "DELETE" and path == "/api/exchanges":
            if CSRF_HEADER not in headers:
                await _json(send, 403, {"error": f"missing the {CSRF_HEADER.decode()} header"})
                return
            self.recorder.clear()
            await _respond(send, 204, b"", b"text/plain")
        else:
            await _json(send, 404, {"error": f"no such page: {method} {path}"})

    def _snapshot(self) -> dict[str, Any]:
        return {
            "status": self.status(),
            "capacity": self.recorder.capacity,
            "body_cap": self.recorder.body_cap,
            "exchanges": [exchange_summary(e) for e in self.recorder.exchanges()],
        }

    async def _exchange(
        self, method: str, parts: list[str], headers: dict[bytes, bytes], send: Send
    ) -> None:
        if not parts or not parts[0].isdigit() or len(parts) > 2:
            await _json(send, 404, {"error": "no such exchange"})
            return
        exchange = self.recorder.get(int(parts[0]))
        if exchange is None:
            await _json(send, 404, {"error": f"exchange {parts[0]} is no longer kept"})
        elif len(parts) == 1 and method == "GET":
            await _json(send, 200, exchange_detail(exchange))
        elif parts[1:] == ["replay"] and method == "POST":
            await self._replay(exchange, headers, send)
        else:
            await _json(send, 405, {"error": f"{method} is not allowed here"})

    async def _replay(self, exchange: Exchange, headers: dict[bytes, bytes], send: Send) -> None:
        if CSRF_HEADER not in headers:
            await _json(send, 403, {"error": f"missing the {CSRF_HEADER.decode()} header"})
            return
        if self._replays >= MAX_REPLAYS:
            await _json(send, 503, {"error": "too many replays in flight; try again"})
            return
        self._replays += 1
        try:
            new = await replay(exchange, self.recorder, self.pool)
        except ReplayRefused as exc:
            await _json(send, 409, {"error": str(exc)})
            return
        finally:
            self._replays -= 1
        await _json(send, 201, {"id": new.id})

    async def _events(self, receive: Receive, send: Send) -> None:
        if self._pages >= MAX_PAGES:
            await _plain(send, 503, f"At most {MAX_PAGES} inspector pages may be open at once.")
            return
        feed = _Feed(self.recorder.capacity)
        self._pages += 1
        self.recorder.add_listener(feed.notify)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_wait_disconnect, receive, nursery.cancel_scope)
                await self._stream(feed, send)
        finally:
            self.recorder.remove_listener(feed.notify)
            self._pages -= 1

    async def _stream(self, feed: _Feed, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), *_SECURITY_HEADERS],
            }
        )
        chunk = b"retry: 1000\n" + _event("snapshot", self._snapshot())
        while True:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await trio.sleep(BATCH_DELAY)
            if not feed.pending and not feed.resync:
                with trio.move_on_after(STATUS_INTERVAL):
                    await feed.wait()
            if feed.resync:
                feed.resync = False
                feed.pending.clear()
                chunk = _event("snapshot", self._snapshot())
                continue
            ids, feed.pending = list(feed.pending), {}
            chunk = b"".join(
                _event("exchange", exchange_summary(exchange))
                for exchange in map(self.recorder.get, ids)
                if exchange is not None
            )
            if not ids:
                chunk = _event("status", self.status())


async def _wait_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        *_SECURITY_HEADERS,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, data: Any) -> None:
    await _respond(send, status, json.dumps(data).encode(), b"application/json")


async def _plain(send: Send, status: int, text: str) -> None:
    await _respond(send, status, text.encode() + b"\n", b"text/plain; charset=utf-8")


def bind_inspector(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, or to the first free one of the next ports.

    Port 0 takes any free port; another port in use is skipped for the next,
    up to :data:`PORT_ATTEMPTS` in all, as a second agent on one machine needs.

    Raises:
        OSError: No port could be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports = [port] if port == 0 else range(port, min(port + PORT_ATTEMPTS, 65536))
    error: OSError | None = None
    for candidate in ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, candidate))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            error = exc
            continue
        return sock
    assert error is not None
    raise error


async def serve_inspector(
    listener: socket.socket,
    app: InspectorApp,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listener`` (from :func:`bind_inspector`) until cancelled.

    Args:
        listener: A bound, listening socket; this function owns it from now on.
        app: The inspector.
        task_status: Receives the page's URL, such as ``http://127.0.0.1:4040``.
    """
    config = hypercorn.config.Config()
    config.bind = [f"fd://{listener.detach()}"]
    config.accesslog = None
    config.errorlog = logger
    config.include_server_header = False
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            partial(hypercorn.trio.serve, app, config)  # type: ignore[arg-type]  # ASGI TypedDicts
        )
        task_status.started(urls[0])


@contextlib.asynccontextmanager
async def open_inspector(
    address: tuple[str, int] | None, recorder: Recorder | None, pool: LocalPool, status: Status
) -> AsyncIterator[str | None]:
    """Serve the inspector for the duration of the block; yields its URL.

    Yields None, and serves nothing, without an address or recorder, or when
    no port could be bound (that is logged as a warning: the tunnel matters
    more than its inspector).
    """
    if address is None or recorder is None:
        yield None
        return
    try:
        listener = bind_inspector(*address)
    except OSError as exc:
        logger.warning(
            "traffic inspector not started: cannot listen on %s:%d: %s",
            *address,
            exc.strerror or exc,
        )
        yield None
        return
    app = InspectorApp(recorder, pool, status)
    try:
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(serve_inspector, listener, app)
            logger.info("traffic inspector on %s", url)
            yield url
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A context manager holding one error raises that error, not a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
