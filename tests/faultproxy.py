"""A fault-injecting TCP proxy for the tests: put it between an agent and its server.

Faults are injected for real, on loopback, at the TCP level, the way a network
or a NAT box would cause them:

``pass_through()``
    Bytes flow both ways as they arrive (the initial mode).
``delay(seconds)``
    Every chunk is held back for ``seconds`` in both directions (latency).
``black_hole()``
    Nothing flows, in either direction, and nothing is closed: the way a
    dropped Wi-Fi, a sleeping laptop or a stale NAT mapping looks to both
    ends. New connections are accepted but never reach the server, the way a
    lost SYN leaves a connect hanging. Bytes already sent stay queued, as TCP
    would retransmit them once the network is back (``pass_through()``).
``cut()``
    Every connection through the proxy is reset (RST) at once, both sides.
``refuse()``
    New connections are reset as they arrive (``pass_through()`` ends it).

Start it with ``proxy = await nursery.start(FaultProxy(target_port).run)``;
agents dial ``proxy.port``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass

import trio

__all__ = ["FaultProxy"]

#: Chunks queued per direction; with ``delay`` a small bound would throttle.
QUEUE = 256
READ_SIZE = 65536


@dataclass
class ProxyStatistics:
    """Counters of a :class:`FaultProxy`."""

    accepted: int = 0
    refused: int = 0
    cut: int = 0
    open: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


def _reset(stream: trio.SocketStream) -> None:
    """Make closing ``stream`` send RST instead of FIN, as a broken network would."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultProxy:
    """A TCP proxy from a port on 127.0.0.1 to ``127.0.0.1:target_port``.

    Args:
        target_port: Where to forward to (the tunnel server).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.statistics = ProxyStatistics()
        self._latency = 0.0
        self._refusing = False
        # Open while bytes may flow; replaced by a fresh (unset) event to stop them.
        self._flowing = trio.Event()
        self._flowing.set()
        self._connections: set[trio.CancelScope] = set()
        self._streams: set[trio.SocketStream] = set()

    # -- faults ----------------------------------------------------------------

    def pass_through(self) -> None:
        """Forward everything again, without delay; release what a black hole held."""
        self._latency = 0.0
        self._refusing = False
        self._flowing.set()

    def delay(self, seconds: float) -> None:
        """Hold every chunk back ``seconds`` before forwarding it."""
        self._latency = seconds
        self._flowing.set()

    def black_hole(self) -> None:
        """Stop all traffic without closing anything."""
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def cut(self) -> None:
        """Reset every connection through the proxy now."""
        for stream in self._streams:
            _reset(stream)
        for scope in self._connections:
            scope.cancel()
        self.statistics.cut += len(self._connections)

    def refuse(self) -> None:
        """Reset new connections as they arrive (existing ones are untouched)."""
        self._refusing = True

    @property
    def connections(self) -> int:
        """Connections through the proxy now."""
        return len(self._connections)

    # -- running ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[FaultProxy] = trio.TASK_STATUS_IGNORED):
        """Accept and forward connections until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)

    async def _wait_flowing(self) -> None:
        while not self._flowing.is_set():
            await self._flowing.wait()

    async def _handle(self, client: trio.SocketStream) -> None:
        if self._refusing:
            self.statistics.refused += 1
            _reset(client)
            await client.aclose()
            return
        self.statistics.accepted += 1
        self.statistics.open += 1
        server: trio.SocketStream | None = None
        try:
            with trio.CancelScope() as scope:
                self._connections.add(scope)
                self._streams.add(client)
                # A black hole swallows the SYN too: the connection hangs here.
                await self._wait_flowing()
                try:
                    server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                except OSError:
                    _reset(client)
                    return
                self._streams.add(server)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._direction, client, server, True, scope)
                    nursery.start_soon(self._direction, server, client, False, scope)
        finally:
            self._connections.discard(scope)
            self.statistics.open -= 1
            for stream in (client, server):
                if stream is not None:
                    self._streams.discard(stream)
                    # Synchronous: under cancellation an await would raise
                    # Cancelled after the first close and leak the second.
                    stream.socket.close()

    async def _direction(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        up: bool,
        connection: trio.CancelScope,
    ) -> None:
        # (due time, bytes); b"" is a clean end of the source, None a reset.
        send, receive = trio.open_memory_channel[tuple[float, bytes | None]](QUEUE)

        async def reader() -> None:
            async with send:
                while True:
                    data: bytes | None
                    try:
                        data = await source.receive_some(READ_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = None
                    await send.send((trio.current_time() + self._latency, data))
                    if not data:
                        return

        async def writer() -> None:
            async with receive:
                async for due, data in receive:
                    # Chunks keep their order; each waits out its own latency.
                    await trio.sleep_until(due)
                    await self._wait_flowing()
                    if data is None:
                        for stream in (source, sink):
                            _reset(stream)
                        connection.cancel()
                        return
                    if not data:
                        # The source closed its side: pass the half-close on.
                        try:
                            await sink.send_eof()
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            connection.cancel()
                        return
                    try:
                        await sink.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        # One side reset: so does the other, as it would end to end.
                        for stream in (source, sink):
                            _reset(stream)
                        connection.cancel()
                        return
                    if up:
                        self.statistics.bytes_up += len(data)
                    else:
                        self.statistics.bytes_down += len(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)
