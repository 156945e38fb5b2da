"""The benchmark's app, served two ways: a bare trio HTTP/1.1 server, and Hypercorn.

Run as ``python benchmarks/_service.py raw PORT`` or ``... hypercorn PORT``.

Both serve the same three routes:

- ``GET /``: a 14-byte text body (the "small GET");
- ``GET /download?bytes=N``: ``N`` zero bytes, sent in 256 KiB pieces as they are
  written, never held whole;
- ``POST /upload``: reads and discards the body as it arrives (Content-Length or
  chunked) and answers with the number of bytes it read;
- ``GET /hold?n=N&ms=S``: waits until N such requests are held at once (at most
  ``HOLD_MAX`` seconds), then S milliseconds more, then answers like ``GET /``:
  the in-flight phase, which must show N requests in flight together;
- ``GET /release`` (raw server only): answers every held ``/hold`` now;
- ``GET /holders`` (raw server only): ``CURRENT PEAK``, the ``/hold`` handlers
  running now and the most that ran at once; ``?reset=1`` sets the peak to the
  current count.

The raw server is the "local service" behind the tunnel and the "direct"
baseline: a few dozen lines of trio over plain sockets, parsing only what these
routes need, so that it costs far less per request than anything it is compared
with. It is honest HTTP/1.1 for the clients used here (keep-alive, Content-Length
and chunked request bodies), not a general-purpose server.

The Hypercorn variant runs the same app as ASGI under Hypercorn's trio worker,
in one process, with the Hypercorn settings the tunnel server itself uses
(``tunnel.server.hypercorn_config``), so that "tunnel ÷ Hypercorn-direct" compares
like with like.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import trio

HELLO = b"Hello, world!\n"
CHUNK = bytes(256 * 1024)
RECEIVE_SIZE = 256 * 1024
MAX_HEAD = 64 * 1024

_HELLO_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (
    len(HELLO),
    HELLO,
)


def _download_size(query: bytes) -> int:
    values = parse_qs(query.decode("latin-1")).get("bytes", ["0"])
    return max(0, int(values[0]))


#: The longest a ``/hold`` waits for the others, in seconds: a phase whose
#: requests never all arrive still ends, and its peak count shows the shortfall.
HOLD_MAX = 240.0


class _Holders:
    """The ``/hold`` handlers running now, the most at once, and their release."""

    current = 0
    peak = 0
    reached: trio.Event | None = None


async def _hold(query: bytes) -> None:
    values = parse_qs(query.decode("latin-1"))
    wanted = int(values.get("n", ["1"])[0])
    after = min(60.0, max(0.0, int(values.get("ms", ["0"])[0]) / 1000))
    if _Holders.reached is None:
        _Holders.reached = trio.Event()
    reached = _Holders.reached
    _Holders.current += 1
    _Holders.peak = max(_Holders.peak, _Holders.current)
    try:
        if _Holders.current >= wanted:
            reached.set()
        with trio.move_on_after(HOLD_MAX):
            await reached.wait()
        await trio.sleep(after)
    finally:
        _Holders.current -= 1
        if _Holders.current == 0:
            _Holders.reached = None  # the next phase waits afresh


def _holders_body(query: bytes) -> bytes:
    body = b"%d %d" % (_Holders.current, _Holders.peak)
    if b"reset=1" in query:
        _Holders.peak = _Holders.current
    return body


# --- the raw trio server ----------------------------------------------------------------


class _Closed(Exception):
    """The client went away, or spoke something this server does not parse."""


class _Reader:
    """Bytes from one connection, with what was read ahead kept for the next request."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _more(self) -> bytes:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise _Closed
        return data

    async def line(self, limit: int = MAX_HEAD) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > limit:
                raise _Closed
            self.buffer += await self._more()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def head(self) -> bytes | None:
        """The next request's head, or None at a clean end of the connection."""
        start = 0
        while (end := self.buffer.find(b"\r\n\r\n", start)) < 0:
            if len(self.buffer) > MAX_HEAD:
                raise _Closed
            start = max(0, len(self.buffer) - 3)
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                if self.buffer:
                    raise _Closed
                return None
            self.buffer += data
        head = bytes(self.buffer[:end])
        del self.buffer[: end + 4]
        return head

    async def discard(self, count: int) -> None:
        """Read and drop exactly ``count`` bytes without gathering them."""
        taken = min(count, len(self.buffer))
        del self.buffer[:taken]
        count -= taken
        while count:
            data = await self._more()
            if len(data) > count:
                self.buffer += data[count:]
                return
            count -= len(data)

    async def discard_chunked(self) -> int:
        total = 0
        while True:
            size = int((await self.line()).split(b";", 1)[0], 16)
            if size == 0:
                while await self.line():  # trailers, up to the empty line
                    pass
                return total
            await self.discard(size + 2)  # the chunk and its CRLF
            total += size


async def _serve_connection(stream: trio.SocketStream) -> None:
    reader = _Reader(stream)
    try:
        while (head := await reader.head()) is not None:
            lines = head.split(b"\r\n")
            method, target, version = lines[0].split(b" ", 2)
            length = 0
            chunked = False
            close = version != b"HTTP/1.1"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    close = b"close" in value.lower()
            if chunked:
                length = await reader.discard_chunked()
            elif length:
                await reader.discard(length)
            path, _, query = target.partition(b"?")
            if method == b"POST" and path == b"/upload":
                body = b"%d" % length
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
            elif path == b"/download":
                size = _download_size(query)
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                    b"content-length: %d\r\n\r\n" % size
                )
                view = memoryview(CHUNK)
                while size:
                    piece = view[: min(size, len(CHUNK))]
                    await stream.send_all(piece)
                    size -= len(piece)
            elif path == b"/release":
                if _Holders.reached is not None:
                    _Holders.reached.set()
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            elif path == b"/holders":
                body = _holders_body(query)
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
            else:
                if path == b"/hold":
                    await _hold(query)
                await stream.send_all(_HELLO_RESPONSE)
            if close:
                return
    except (_Closed, ValueError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def serve_raw(port: int) -> None:
    # The agent opens one connection per request in flight: 10,000 in the
    # in-flight phase, faster than a backlog of a few hundred drains.
    await trio.serve_tcp(_serve_connection, port, host="127.0.0.1", backlog=4096)


# --- the same app as ASGI, under Hypercorn -----------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


async def app(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """The benchmark app as ASGI: the same routes and bodies as the raw server."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope["path"]
    if scope["method"] == "POST" and path == "/upload":
        count = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            count += len(message.get("body", b""))
            more = message.get("more_body", False)
        await _send_small(send, b"%d" % count)
    elif path == "/download":
        size = _download_size(scope["query_string"])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", b"%d" % size),
                ],
            }
        )
        while size:
            piece = CHUNK if size >= len(CHUNK) else CHUNK[:size]
            size -= len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": size > 0})
    else:
        if path == "/hold":
            await _hold(scope["query_string"])
        await _send_small(send, HELLO)


async def _send_small(send: Callable[[Message], Awaitable[None]], body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def serve_hypercorn(port: int) -> None:
    import hypercorn.trio

    from tunnel import ServerConfig
    from tunnel.server import hypercorn_config

    await hypercorn.trio.serve(
        app,  # type: ignore[arg-type]
        hypercorn_config(ServerConfig(address=f"127.0.0.1:{port}")),
    )


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    runner = {"raw": serve_raw, "hypercorn": serve_hypercorn}[mode]
    instruments = []
    if mode == "hypercorn":
        # Trio task switches, as the tunnel's processes count them (see _steps.py);
        # the bench sets the variable only for a tunnel that has the module.
        with contextlib.suppress(ImportError):
            from tunnel._scheduling import instruments_from_environment

            instruments = instruments_from_environment()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(runner, port, instruments=instruments)


if __name__ == "__main__":
    main()
