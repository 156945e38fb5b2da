"""The link's trio shell: runs a :class:`~._core.LinkCore` over a message transport.

It moves bytes and wakes tasks; what to do with them is the core's to decide.
The rules that keep it fast:

* Only the reader task feeds received bytes to the core; only the writer task
  takes its frames. Every other task calls the core's synchronous methods,
  which wake the writer; it sends everything queued as one message, so frames
  of many streams share one write.
* A producer waits for the flow-control window on its stream, and while more
  than OUTBOUND_HIGH_WATER waits for the writer: what waits in memory is
  bounded by windows, not by a queue length.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

import h2.exceptions
import trio

from .._protocol.headers import Headers
from .._transport import ABNORMAL_CLOSURE, MessageTransport, TransportClosed
from ._abuse import Abuse
from ._core import LinkCore
from ._state import (
    CONNECTION_WINDOW,
    MAX_MESSAGE,
    OUTBOUND_HIGH_WATER,
    POLICY_VIOLATION_CLOSE,
    PROTOCOL_ERROR_CLOSE,
    RECEIVE_SLICE,
    STREAM_WINDOW,
    Role,
)
from ._stream import StreamState

__all__ = ["Link", "Stream"]

logger = logging.getLogger("tunnel")


class Stream(StreamState):
    """One HTTP/2 stream, as the task that handles it sees it."""

    __slots__ = ("_link", "_wake", "cancel_scope")

    def __init__(self, link: Link, stream_id: int) -> None:
        super().__init__(link._core, stream_id)
        self._link = link
        self._wake: trio.Event | None = None
        #: Cancelled when the stream is reset or the connection ends, so a
        #: handler blocked elsewhere (on the local service) stops at once. It
        #: exists from the start: a reset that arrives before the handler runs
        #: still stops it the moment it enters the scope.
        self.cancel_scope = trio.CancelScope()

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def _stop(self) -> None:
        self.cancel_scope.cancel()

    async def _wait(self) -> None:
        self._wake = trio.Event()
        await self._wake.wait()

    async def receive_headers(self) -> Headers:
        """Wait for the peer's header block (request or response).

        Raises:
            StreamError: The stream was reset or its connection ended.
        """
        while self.headers is None:
            if self.reset is not None:
                raise self.reset
            await self._wait()
        return self.headers

    async def receive_data(self) -> bytes:
        """Wait for body bytes; all that is buffered comes as one piece.

        Returns ``b""`` once the peer has ended its side. Call
        :meth:`acknowledge` after passing the bytes on.

        Raises:
            StreamError: The stream was reset or its connection ended.
        """
        while not self._chunks:
            if self.reset is not None:
                raise self.reset
            if self.remote_ended:
                return b""
            await self._wait()
        if self.reset is not None:
            raise self.reset
        return self.take_data()

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        """Send body bytes, waiting for flow-control window as needed.

        Raises:
            StreamError: The stream or its connection can send no more.
        """
        await self._link._send_data(self, data, end_stream)


class Link:
    """One HTTP/2 connection over a :class:`MessageTransport`, shared by its streams.

    Make one with :meth:`opener` or :meth:`answerer`, then :meth:`run` it.

    Args:
        role: Whether this end opens streams or answers them.
        transport: The message transport to the peer.
        keepalive_interval: Seconds between PINGs.
        keepalive_timeout: Seconds to wait for a PING's answer before the
            connection is taken for dead.
        max_concurrent_streams: Streams the peer may open at once.
        on_stream: For the answerer: called, as a task in the link's own
            nursery, for each stream the peer opens.
        trusted_peer: Skip h2's validation of received headers.
        trusted_peer_frames: Do not count the peer's PINGs, SETTINGS and free
            frames as abuse.
        stream_window: What the peer may send on one stream before it is
            acknowledged; default ``STREAM_WINDOW``.
        connection_window: What the peer may send on all streams together;
            default ``CONNECTION_WINDOW``.
    """

    # Slots: the server keeps a link per agent, idle or not.
    __slots__ = (
        "_close_code",
        "_core",
        "_drain_done",
        "_drained",
        "_ended",
        "_keepalive_interval",
        "_keepalive_timeout",
        "_nursery",
        "_on_stream",
        "_send_wanted",
        "_settings_received",
        "_transport",
        "_writing",
        "peer_close_code",
    )

    def __init__(
        self,
        role: Role,
        *,
        transport: MessageTransport,
        keepalive_interval: float,
        keepalive_timeout: float,
        max_concurrent_streams: int = 100,
        on_stream: Callable[[Stream], Awaitable[None]] | None = None,
        trusted_peer: bool = False,
        trusted_peer_frames: bool = False,
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
    ) -> None:
        self._core: LinkCore[Stream] = LinkCore(
            role,
            # A partial, not a method: no Python frame per stream opened.
            new_stream=functools.partial(Stream, self),
            frames_queued=self._kick,
            clock=trio.current_time,
            max_concurrent_streams=max_concurrent_streams,
            trusted_peer=trusted_peer,
            trusted_peer_frames=trusted_peer_frames,
            stream_window=stream_window,
            connection_window=connection_window,
        )
        self._transport = transport
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._on_stream = on_stream
        self._send_wanted = trio.Event()
        self._drained: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        #: Set once the first drain() is over; a second one waits for it.
        self._drain_done: trio.Event | None = None
        self._writing = False
        self._settings_received = trio.Event()
        self._core.settings_waiter = self._settings_received
        self._ended = trio.Event()
        #: The WebSocket close code the peer ended the connection with, if any.
        self.peer_close_code: int | None = None
        self._close_code = 1000

    @classmethod
    def opener(
        cls,
        transport: MessageTransport,
        *,
        keepalive_interval: float,
        keepalive_timeout: float,
        max_concurrent_streams: int = 100,
        trusted_peer_frames: bool = False,
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
    ) -> Link:
        """The end that opens streams (the HTTP/2 client).

        The server's end of an agent's link, the agent's link to a local
        HTTP/2 service (which passes ``trusted_peer_frames``), and a node's
        link to another node of its cluster.
        """
        return cls(
            Role.OPENER,
            transport=transport,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            max_concurrent_streams=max_concurrent_streams,
            trusted_peer_frames=trusted_peer_frames,
            stream_window=stream_window,
            connection_window=connection_window,
        )

    @classmethod
    def answerer(
        cls,
        transport: MessageTransport,
        *,
        on_stream: Callable[[Stream], Awaitable[None]],
        keepalive_interval: float,
        keepalive_timeout: float,
        max_concurrent_streams: int = 100,
        trusted_peer: bool = False,
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
    ) -> Link:
        """The end that answers the streams its peer opens (the HTTP/2 server).

        The agent's, and that of a node serving another node of its cluster.
        """
        return cls(
            Role.ANSWERER,
            transport=transport,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            max_concurrent_streams=max_concurrent_streams,
            on_stream=on_stream,
            trusted_peer=trusted_peer,
            stream_window=stream_window,
            connection_window=connection_window,
        )

    # -- what the core knows -----------------------------------------------------

    @property
    def role(self) -> Role:
        """Whether this end opens streams or answers them."""
        return self._core.role

    @property
    def closed_reason(self) -> str | None:
        """Why the connection ended; None while it is open."""
        return self._core.closed_reason

    @property
    def bytes_received(self) -> int:
        """Bytes received from the peer."""
        return self._core.bytes_received

    @property
    def bytes_sent(self) -> int:
        """Bytes sent to the peer."""
        return self._core.bytes_sent

    @property
    def streams_opened(self) -> int:
        """Streams opened on this connection, by either side."""
        return self._core.streams_opened

    @property
    def rtt(self) -> float | None:
        """Seconds the last keepalive PING took to be answered."""
        return self._core.rtt

    @property
    def open_streams(self) -> int:
        """Streams in flight on this connection."""
        return len(self._core.streams)

    @property
    def ready(self) -> bool:
        """Whether the peer's SETTINGS have arrived on a connection still open."""
        return self._core.closed_reason is None and self._core.settings_received

    @property
    def accepting(self) -> bool:
        """Whether new streams may be opened (not draining, no GOAWAY either way)."""
        return self._core.accepting

    # -- lifecycle -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> str:
        """Run the connection until it ends; return why it ended.

        Stream handlers (``on_stream``) run inside; they are cancelled when the
        connection is lost. Every stream still open is failed with
        :class:`StreamError`, so their consumers wake up and answer.
        """
        core = self._core
        core.start()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                core.accepts_streams = self._on_stream is not None
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive)
                task_status.started()
        except* TransportClosed as group:
            closed = group.exceptions[0]
            assert isinstance(closed, TransportClosed)
            self.peer_close_code = closed.code
            if isinstance(closed, Abuse):
                self._close_code = POLICY_VIOLATION_CLOSE
            self._end(closed.reason)
        except* h2.exceptions.ProtocolError as group:
            error = group.exceptions[0]
            self._close_code = PROTOCOL_ERROR_CLOSE
            self._end(f"HTTP/2 protocol error from the peer: {error}")
        finally:
            self._end("the connection was closed")
            self._nursery = None
            core.accepts_streams = False
            with trio.CancelScope(shield=True):
                await self._transport.aclose(self._close_code, core.closed_reason or "")
        assert core.closed_reason is not None
        return core.closed_reason

    def _end(self, reason: str) -> None:
        self._core.end(reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        self._ended.set()
        if self._drained is not None:
            self._drained.set()

    async def wait_closed(self) -> None:
        """Wait until the connection has ended."""
        await self._ended.wait()

    async def wait_peer_settings(self) -> bool:
        """Wait for the peer's SETTINGS, proof that it is alive and speaks HTTP/2.

        Returns False if the connection ended first.
        """
        await self._settings_received.wait()
        return self._core.closed_reason is None

    def close(self, reason: str, code: int = 1000) -> None:
        """End the connection now; streams still open fail with ``reason``.

        ``code`` is the WebSocket close code the peer is told.
        """
        self._close_code = code
        self._end(reason)

    async def drain(self, grace: float) -> None:
        """Stop new streams, let open streams finish (up to ``grace`` seconds), then close.

        Safe to call at any point of the connection's life, and more than once:
        a second call waits for the first one to be over.
        """
        if self._drain_done is not None:
            await self._drain_done.wait()
            return
        self._drain_done = trio.Event()
        try:
            await self._drain(grace)
        finally:
            self._drain_done.set()

    async def _drain(self, grace: float) -> None:
        core = self._core
        if core.closed_reason is not None:
            return
        core.start_drain()
        with trio.move_on_after(grace):
            while core.streams and core.closed_reason is None:
                await self._wait_capacity()
        if self._ended.is_set():
            return
        abandoned = bool(core.streams)
        core.send_goaway()
        with trio.move_on_after(min(grace, 1.0)):
            while (self._send_wanted.is_set() or self._writing) and core.closed_reason is None:
                if self._drained is None:
                    self._drained = trio.Event()
                await self._drained.wait()
            if not abandoned:
                # The peer closes the transport once it has read the GOAWAY;
                # that is the clean end, and closing first ourselves would race
                # it. Not after abandoning streams: then the peer still waits
                # for them, and only our close tells it they are lost.
                await self._ended.wait()
        self._end("the connection was drained and closed")

    async def _wait_capacity(self) -> None:
        """Wait until a stream ends or the peer's SETTINGS change."""
        waiter = self._core.capacity_waiter
        if waiter is None:
            waiter = self._core.capacity_waiter = trio.Event()
        await waiter.wait()

    # -- tasks -----------------------------------------------------------------

    def _kick(self) -> None:
        self._send_wanted.set()

    async def _writer(self) -> None:
        core = self._core
        while True:
            await self._send_wanted.wait()
            self._send_wanted = trio.Event()
            messages = core.messages_to_send(MAX_MESSAGE)
            self._writing = True
            for message in messages:
                await self._transport.send(message)
            self._writing = False
            if self._drained is not None:
                self._drained.set()
                self._drained = None
            if core.final_reason is not None and not self._send_wanted.is_set():
                raise TransportClosed(core.final_reason)

    async def _reader(self) -> None:
        core = self._core
        nursery = self._nursery
        on_stream = self._on_stream
        while True:
            message = await self._transport.receive()
            for start in range(0, len(message), RECEIVE_SLICE):
                if start:
                    # A huge message (a flood of tiny frames) is parsed in
                    # slices, so one peer cannot hold up every other task.
                    await trio.lowlevel.checkpoint()
                data = (
                    memoryview(message)[start : start + RECEIVE_SLICE]
                    if len(message) > RECEIVE_SLICE
                    else message
                )
                for stream in core.receive_data(data):
                    # The core takes streams only while both are set.
                    assert nursery is not None
                    assert on_stream is not None
                    nursery.start_soon(on_stream, stream)

    async def _keepalive(self) -> None:
        core = self._core
        while True:
            await trio.sleep(self._keepalive_interval)
            ping = core.send_ping(trio.current_time())
            if ping is None:
                # After our GOAWAY, h2 can send no PING, and the drain bounds
                # how long the connection still lives.
                return
            answered = ping.waiter = trio.Event()
            with trio.move_on_after(self._keepalive_timeout):
                await answered.wait()
            while core.ping_late(ping):
                with trio.move_on_after(self._keepalive_timeout):
                    await answered.wait()
            if not core.ping_finished(ping, trio.current_time()):
                if not core.can_send:
                    return  # our GOAWAY went out meanwhile, and the answer was dropped
                # A peer that stopped answering PINGs will not answer a close
                # handshake either; waiting for it would only delay the reconnect.
                self._close_code = ABNORMAL_CLOSURE
                # Ended here, not by raising: the writer may be stuck sending to
                # the dead peer (Hypercorn shields its socket writes), and the
                # streams must fail now, not when that write gives up.
                self._end(
                    f"the peer did not answer a keepalive PING within {self._keepalive_timeout:g}s"
                )
                return

    # -- operations on streams -------------------------------------------------

    async def open_stream(self, headers: Headers, *, end_stream: bool) -> Stream:
        """Open a stream with ``headers`` (the opener's side).

        Waits while the peer's limit on concurrent streams is reached.

        Raises:
            StreamError: The connection is closing or closed.
        """
        core = self._core
        if not core.settings_received and core.closed_reason is None:
            await self._settings_received.wait()
        while True:
            stream = core.open_stream_nowait(headers, end_stream)
            if stream is not None:
                return stream
            await self._wait_capacity()

    def open_stream_nowait(self, headers: Headers, *, end_stream: bool) -> Stream | None:
        """Like :meth:`open_stream`, but None where that would have to wait.

        Raises:
            StreamError: The connection is closing or closed.
        """
        return self._core.open_stream_nowait(headers, end_stream)

    async def _send_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        core = self._core
        offset, size = 0, len(data)
        while offset < size:
            reached = core.send_data(stream, data, offset, end_stream)
            if reached != offset and core.queued > OUTBOUND_HIGH_WATER:
                offset = reached
                await self._wait_drained()
            elif reached < size:
                # The stream's or the connection's window is used up.
                offset = reached
                window = stream._window = trio.Event()
                await window.wait()
                stream._window = None
            else:
                offset = reached
        if end_stream:
            core.data_ended(stream, size)

    async def _wait_drained(self) -> None:
        core = self._core
        while core.queued > OUTBOUND_HIGH_WATER and core.closed_reason is None:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()
