"""A real grpcio server for the tests: ``grpc.aio`` on its own asyncio loop, in a thread.

No generated code: the methods are generic handlers on raw bytes, so what the
tests send is exactly what crosses the tunnel.

Methods of ``/test.Echo/``:

``Unary``
    Echoes the request. Sends back as initial metadata every ``x-*`` key the
    client sent, and as trailing metadata ``x-trailing: <request length>``.
``Fail``
    Aborts before any message (a trailers-only answer) with the status code
    named by the request (``b"NOT_FOUND"``), details ``"no such thing"`` and
    trailing metadata ``x-why: testing``.
``ServerStream``
    The request is a count N: sends N messages ``b"%d"``; after the first it
    waits (up to 10 s) for :attr:`GrpcService.first_seen`, so a test can prove
    the first message arrived before the last was produced.
``ClientStream``
    Answers the number of messages and of bytes it received, ``b"n,bytes"``.
``Bidi``
    Answers each message with ``b"pong " + message``.
``Sleep``
    Sleeps for the number of seconds in the request; sets :attr:`cancelled`
    (and :attr:`cancelled_at`) if the call is cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

__all__ = ["MAX_MESSAGE", "GrpcService", "call_options"]

#: Message size limit on both ends, above the 16 MiB the tests send.
MAX_MESSAGE = 32 << 20


def _ident(data: bytes) -> bytes:
    return data


def call_options(authority: str | None = "app.localhost") -> list[tuple[str, Any]]:
    """Channel options: the tunnel host as ``:authority`` and room for 16 MiB messages."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        # Fresh channels each test; no retries that would hide a failure.
        ("grpc.enable_retries", 0),
    ]
    if authority is not None:
        options.append(("grpc.default_authority", authority))
    return options


class GrpcService:
    """The server; :meth:`start` and :meth:`stop` from any thread (tests: a worker thread)."""

    def __init__(
        self,
        tls: tuple[bytes, bytes] | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        #: (private key PEM, certificate chain PEM) to serve TLS with, or None.
        self.tls = tls
        #: More grpcio server options.
        self.options = options or []
        self.port = 0
        self.first_seen = threading.Event()
        self.cancelled = threading.Event()
        self.cancelled_at: float | None = None
        self.calls = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="grpc-service", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the gRPC test service did not start")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
                *self.options,
            ]
        )
        server.add_generic_rpc_handlers((self._handlers(),))
        if self.tls is None:
            self.port = server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials([self.tls])
            self.port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop(0)

    def _handlers(self) -> grpc.GenericRpcHandler:
        def unary(fn: Callable[..., Any]) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=_ident, response_serializer=_ident
            )

        return grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Unary": unary(self._unary),
                "Fail": unary(self._fail),
                "Sleep": unary(self._sleep),
                "ServerStream": grpc.unary_stream_rpc_method_handler(
                    self._server_stream, request_deserializer=_ident, response_serializer=_ident
                ),
                "ClientStream": grpc.stream_unary_rpc_method_handler(
                    self._client_stream, request_deserializer=_ident, response_serializer=_ident
                ),
                "Bidi": grpc.stream_stream_rpc_method_handler(
                    self._bidi, request_deserializer=_ident, response_serializer=_ident
                ),
            },
        )

    async def _unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        echoed = tuple((k, v) for k, v in context.invocation_metadata() or () if k.startswith("x-"))
        if echoed:
            await context.send_initial_metadata(echoed)
        context.set_trailing_metadata((("x-trailing", str(len(request))),))
        return request

    async def _fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        code = grpc.StatusCode[request.decode()]
        context.set_trailing_metadata((("x-why", "testing"),))
        await context.abort(code, "no such thing")
        raise AssertionError("abort returns never")

    async def _sleep(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            await asyncio.sleep(float(request))
        except asyncio.CancelledError:
            self.cancelled_at = time.monotonic()
            self.cancelled.set()
            raise
        return b"slept"

    async def _server_stream(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        count = int(request)
        for i in range(count):
            if i == count - 1:
                await asyncio.to_thread(self.first_seen.wait, 10)
            yield b"%d" % i

    async def _client_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        count = size = 0
        async for message in requests:
            count += 1
            size += len(message)
        return b"%d,%d" % (count, size)

    async def _bidi(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for message in requests:
            yield b"pong " + message
