"""One HTTP/2 connection over a message transport, shared by every stream on it.

Used by both ends: the server drives it as the HTTP/2 client, the agent as the
HTTP/2 server. The rules that keep it correct and fast:

* Only the reader task feeds received bytes to ``receive_data()``; only the
  writer task takes ``data_to_send()``. Every other task calls h2's synchronous
  methods and then wakes the writer, which sends everything queued as one
  message, so frames of many streams share one write.
* A stream ID is taken and its headers queued with no ``await`` between them,
  so IDs are used in the order they were taken, as HTTP/2 requires.
* Received DATA is acknowledged (flow control) only when the stream's consumer
  calls :meth:`Stream.acknowledge`, after it passed the bytes on. A slow
  consumer therefore slows its sender, end to end, and what waits in memory is
  bounded by the flow-control windows, not by a queue length.
* The connection's life is one :class:`_Phase`, which only moves forward, and
  whether h2 may still send is one predicate, ``Mux._can_send()``: h2 refuses
  every frame but GOAWAY once it has sent a GOAWAY, and asking it anyway raised
  its ``ProtocolError`` from whichever task happened to send next.
"""

from __future__ import annotations

import binascii
import contextlib
import enum
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import hyperframe.frame
import trio
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, RstStreamFrame

from ._compat import H2_FRAME_READER, HYPERFRAME_REPR
from ._h2settings import compact_header_tables, compact_settings
from ._protocol.headers import Headers
from ._transport import ABNORMAL_CLOSURE, MessageTransport, TransportClosed

__all__ = ["Mux", "Stream", "StreamError"]

logger = logging.getLogger("tunnel")

#: Largest WebSocket message sent; Hypercorn accepts 16 MiB by default.
MAX_MESSAGE: Final = 1 << 20
#: Producers wait while more than this is queued for the writer.
OUTBOUND_HIGH_WATER: Final = 4 << 20
#: What the peer may send on all streams together before we acknowledge.
CONNECTION_WINDOW: Final = 16 << 20
#: What the peer may send on one stream. The connection window above bounds
#: what all streams hold together, so this only decides how much of it one
#: transfer may use: 1 MiB held single downloads to ~155 MiB/s, 8 MiB ~230.
STREAM_WINDOW: Final = 8 << 20
MAX_FRAME: Final = 1 << 20
#: Received messages are fed to h2 this much at a time.
RECEIVE_SLICE: Final = 256 << 10
#: The most header-block bytes (HEADERS plus CONTINUATION) taken for one
#: request or response; h2 alone would buffer 64 frames, up to 64 MiB here.
MAX_HEADER_BLOCK: Final = 256 << 10
#: PINGs and SETTINGS a peer may send per second; a legitimate one sends a
#: few a minute, and each costs us an answer to queue.
MAX_CONTROL_FRAMES_PER_SECOND: Final = 100
#: Frames that cost the peer nothing and ask for nothing, but cost us work:
#: WINDOW_UPDATE on the connection that unblocks nothing, PRIORITY and frames
#: of unknown types. An h2 peer sends such a WINDOW_UPDATE per half window it
#: acknowledged (a few a second at full speed) and never the others.
MAX_FREE_FRAMES_PER_SECOND: Final = 1000
#: h2 never opens a window by less (it waits for 1 KiB acknowledged); an
#: update of a few bytes only makes us wake every waiting stream to send them.
MIN_USEFUL_WINDOW_UPDATE: Final = 1024
#: The HPACK table our encoder keeps for the peer, whatever larger size it
#: announces (SETTINGS_HEADER_TABLE_SIZE): HTTP/2's default. A larger table
#: saves a few bytes per request and costs memory per connection; a peer
#: announcing a gigabyte would make us keep every header we ever sent.
MAX_HEADER_TABLE: Final = 4096
#: DATA frames for finished streams a peer may send per second (some follow
#: every reset; thousands a second only follow a peer gone bad).
MAX_STRAY_DATA_PER_SECOND: Final = 5000
#: Answers (not DATA) queued for a peer that does not read, before we give up.
MAX_UNREAD_ANSWERS: Final = 16 << 20
#: Extra keepalive timeouts a PING's answer may take while the peer keeps
#: sending: 4 more of 15 s by default, so a minute and a quarter in all.
KEEPALIVE_BUSY_PERIODS: Final = 4


#: WebSocket close codes (RFC 6455) for a peer that broke the rules.
PROTOCOL_ERROR_CLOSE: Final = 1002
POLICY_VIOLATION_CLOSE: Final = 1008


class _Abuse(TransportClosed):
    """The peer misbehaved; the connection is closed on our initiative."""


class _Phase(enum.IntEnum):
    """Where a connection is in its life; it only ever moves forward."""

    #: Streams open and flow both ways.
    OPEN = 0
    #: We take no new streams (the agent told the peer so with
    #: SETTINGS_MAX_CONCURRENT_STREAMS = 0); open ones finish.
    DRAINING = 1
    #: The peer's GOAWAY arrived: no new streams. Ours up to its last stream
    #: ID finish, and h2 still sends for them (see ``_Connection``).
    GOAWAY_RECEIVED = 2
    #: We sent GOAWAY: h2 sends nothing more but another GOAWAY, and what the
    #: peer still sends is dropped unread.
    GOAWAY_SENT = 3
    #: The connection has ended; ``closed_reason`` says why.
    CLOSED = 4


class StreamError(Exception):
    """The stream was reset by the peer, or the whole connection ended."""

    def __init__(self, reason: str, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Stream:
    """One HTTP/2 stream, as the task that handles it sees it."""

    __slots__ = (
        "_chunks",
        "_flow",
        "_mux",
        "_settled",
        "_taken",
        "_wake",
        "_window",
        "cancel_scope",
        "headers",
        "headers_ended",
        "id",
        "local_ended",
        "remote_ended",
        "reset",
        "trailers",
    )

    def __init__(self, mux: Mux, stream_id: int) -> None:
        self._mux = mux
        self.id = stream_id
        self.headers: Headers | None = None
        #: Whether the peer's header block carried END_STREAM, so no body
        #: follows. This, not ``remote_ended``, says whether a message has a
        #: body: a small body often arrives in the same read as its head, and
        #: then the stream has ended before its handler first looks at it.
        self.headers_ended = False
        self.trailers: Headers | None = None
        self.remote_ended = False
        self.local_ended = False
        self.reset: StreamError | None = None
        self._chunks: deque[bytes] = deque()
        self._flow = 0  # flow-controlled bytes buffered in _chunks
        self._taken = 0  # flow-controlled bytes handed out, not yet acknowledged
        self._wake: trio.Event | None = None
        self._window: trio.Event | None = None
        #: Cancelled when the stream is reset or the connection ends, so a
        #: handler blocked elsewhere (on the local service) stops at once. It
        #: exists from the start: a reset that arrives before the handler runs
        #: still stops it the moment it enters the scope.
        self.cancel_scope = trio.CancelScope()
        self._settled = False  # the mux gave back all flow control already

    # -- receiving -------------------------------------------------------------

    async def _wait(self) -> None:
        self._wake = trio.Event()
        await self._wake.wait()

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    async def receive_headers(self) -> Headers:
        """Wait for the peer's header block (request or response)."""
        while self.headers is None:
            if self.reset is not None:
                raise self.reset
            await self._wait()
        return self.headers

    async def receive_data(self) -> bytes:
        """Wait for body bytes; all that is buffered comes as one piece.

        Returns ``b""`` once the peer has ended its side. Call
        :meth:`acknowledge` after passing the bytes on.
        """
        while not self._chunks:
            if self.reset is not None:
                raise self.reset
            if self.remote_ended:
                return b""
            await self._wait()
        if self.reset is not None:
            raise self.reset
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._taken += self._flow
        self._flow = 0
        return data

    def data_buffered(self) -> bool:
        """Whether body bytes are waiting, so :meth:`receive_data` won't block."""
        return bool(self._chunks)

    def acknowledge(self) -> None:
        """Open the flow-control window for what :meth:`receive_data` returned."""
        if self._taken and not self._settled:
            self._mux._acknowledge(self.id, self._taken)
        self._taken = 0

    # -- sending ---------------------------------------------------------------

    def send_headers(self, headers: Headers, *, end_stream: bool = False) -> None:
        """Queue a header block (response headers or trailers)."""
        self._mux._send_headers(self, headers, end_stream)

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        """Send body bytes, waiting for flow-control window as needed."""
        await self._mux._send_data(self, data, end_stream)

    def end(self) -> None:
        """End our side of the stream (an empty DATA frame with END_STREAM)."""
        self._mux._end_stream(self)

    def cancel(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Reset the stream: tell the peer to stop, and forget it."""
        self._mux._reset_stream(self, code)

    @property
    def done(self) -> bool:
        """Whether both sides have ended, or the stream was reset."""
        return self.reset is not None or (self.local_ended and self.remote_ended)


def _raw_data_repr(data: bytes | None) -> str:
    # hyperframe's own (hyperframe/frame.py, _raw_data_repr), but hexing only
    # the 10 bytes it shows: h2 formats every received frame for a trace log
    # whether or not anyone logs, and hexing a whole 1 MiB DATA payload for
    # that cost ~2.6 s of CPU per GiB received.
    if not data:
        return "None"
    shown = binascii.hexlify(data[:10]).decode("ascii")
    return "<hex:" + shown + ("..." if len(data) > 10 else "") + ">"


if hasattr(hyperframe.frame, "_raw_data_repr") and HYPERFRAME_REPR.on:
    hyperframe.frame._raw_data_repr = _raw_data_repr


def _reset_reason(code: int) -> str:
    if code == h2.errors.ErrorCodes.REFUSED_STREAM:
        return "the request was refused before any work began (the other side is restarting)"
    try:
        name = h2.errors.ErrorCodes(code).name
    except ValueError:
        name = str(code)
    return f"the other side ended the request ({name})"


class _Rate:
    """Counts one kind of frame per second; too many in one second is abuse."""

    __slots__ = ("_count", "_limit", "_start", "_what")

    def __init__(self, limit: int, what: str) -> None:
        self._limit = limit
        self._what = what
        self._count = 0
        self._start = 0.0

    def count(self) -> None:
        now = trio.current_time()
        if now - self._start >= 1.0:
            self._start, self._count = now, 0
        self._count += 1
        if self._count > self._limit:
            raise _Abuse(f"the peer flooded the connection with {self._what}")


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, with a cap on the bytes of one header block."""

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        result = super()._update_header_buffer(f)
        if self._headers_buffer:
            size = sum(len(getattr(part, "data", b"")) for part in self._headers_buffer)
            if size > MAX_HEADER_BLOCK:
                raise h2.exceptions.ProtocolError(
                    f"a header block of more than {MAX_HEADER_BLOCK} bytes"
                )
        return result


#: The h2 versions whose ``_receive_frame`` the copy in ``_Connection`` follows.
_H2_RECEIVE_FRAME_VERIFIED: Final = H2_FRAME_READER.on


class _Connection(h2.connection.H2Connection):
    """h2's connection, but counting open streams in constant time.

    h2 counts them by walking every stream on each new one, which made opening
    a stream cost ~125 µs with 1,000 in flight. The mux knows the number.
    """

    #: h2 remembers how each closed stream ended, so that a frame still in
    #: flight for it gets the right answer; by default the last 65,536, about
    #: 5.5 MiB on every busy long-lived connection. Frames arrive at most a
    #: round trip late, when only a handful of streams have closed since.
    MAX_CLOSED_STREAMS = 4096

    #: Frame class -> h2's handler, shared by every connection (see __init__).
    _dispatch: ClassVar[dict[type[Frame], Callable[..., Any]] | None] = None

    def __init__(self, config: h2.config.H2Configuration, mux: Mux) -> None:
        super().__init__(config)
        self._mux_streams = mux._streams
        self._mux = mux
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)
        compact_header_tables(self.encoder.header_table, self.decoder.header_table)
        if _H2_RECEIVE_FRAME_VERIFIED:
            # h2 builds a table of a dozen bound methods per connection (1.3 KiB,
            # kept for every idle agent); one table of functions serves all.
            if _Connection._dispatch is None:
                _Connection._dispatch = {
                    frame: getattr(_Connection, handler.__name__)
                    for frame, handler in self._frame_dispatch_table.items()
                }
            del self._frame_dispatch_table

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        mux = self._mux
        if mux._phase >= _Phase.GOAWAY_SENT and not isinstance(frame, GoAwayFrame):
            # h2 refuses every frame but GOAWAY once it sent one (python-hyper/h2
            # issue 1181), and its ProtocolError would drop the events of the
            # frames before this one in the same read. What the peer sends now
            # (WINDOW_UPDATEs, PINGs crossing our GOAWAY) is for streams we gave
            # up on: drop it, and keep reading until the peer closes.
            return []
        # DATA for a stream the mux does not know makes h2 queue an answer
        # (RST_STREAM) without telling us. Some arrive after any reset; a
        # flood of them is a peer making us queue answers it never reads.
        if isinstance(frame, DataFrame) and frame.stream_id not in self._mux_streams:
            self._mux._stray_frames.count()
        events: list[h2.events.Event]
        if not _H2_RECEIVE_FRAME_VERIFIED:
            events = super()._receive_frame(frame)
            if isinstance(frame, GoAwayFrame) and mux._phase < _Phase.GOAWAY_SENT:
                mux._peer_goaway_closed_h2()
            return events
        # h2 4's own (h2/connection.py, H2Connection._receive_frame), less its
        # first line: a trace log of repr(frame), which formats every received
        # frame whether or not anyone logs, 2-3 % of the server's CPU per request.
        try:
            assert _Connection._dispatch is not None
            frames, events = _Connection._dispatch[frame.__class__](self, frame)
        except h2.exceptions.StreamClosedError as exc:
            if not self._stream_is_closed_by_reset(exc.stream_id):
                raise
            reset = RstStreamFrame(exc.stream_id)
            reset.error_code = exc.error_code
            self._prepare_for_sending([reset])
            events = exc._events
        except h2.exceptions.StreamIDTooLowError as exc:
            if self._stream_is_closed_by_reset(exc.stream_id):
                reset = RstStreamFrame(exc.stream_id)
                reset.error_code = h2.errors.ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([reset])
                events = []
            elif self._stream_is_closed_by_end(exc.stream_id):
                raise h2.exceptions.StreamClosedError(exc.stream_id) from exc
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events

    def _receive_goaway_frame(
        self, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        # h2 4's own, less two things. It closes its state machine, so the
        # streams the peer promised to finish (up to last_stream_id, RFC 9113
        # section 6.8) could neither receive nor acknowledge another frame; and
        # it drops what we queued and not yet wrote, the end of a response
        # among it. The mux refuses new streams from here on by its phase.
        if not _H2_RECEIVE_FRAME_VERIFIED:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        if self._mux._phase < _Phase.GOAWAY_RECEIVED:
            self._mux._phase = _Phase.GOAWAY_RECEIVED
        return [], [event]

    def _open_streams(self, remainder: int) -> int:
        # All of one side's streams are opened by the same peer (the server
        # opens them all), so the mux's count is the count for that side.
        return len(self._mux_streams)


class Mux:
    """Drives one h2 connection over a :class:`MessageTransport`.

    Args:
        client_side: True for the HTTP/2 client (the server's end).
        transport: The message transport to the peer.
        keepalive_interval: Seconds between PINGs.
        keepalive_timeout: Seconds to wait for a PING's answer before the
            connection is taken for dead.
        max_concurrent_streams: Streams the peer may open at once.
        on_stream: For the HTTP/2 server: called, as a task in the mux's own
            nursery, for each stream the peer opens.
        trusted_peer: Skip h2's validation of received headers (the agent trusts
            the server it chose to dial; the server never trusts agents).
    """

    # Slots: the server keeps a Mux per agent, idle or not; an instance dict of
    # these thirty attributes cost 1.5 KiB of it.
    __slots__ = (
        "_capacity",
        "_client_side",
        "_close_code",
        "_conn",
        "_control_frames",
        "_drain_done",
        "_drained",
        "_ended",
        "_final_reason",
        "_free_frames",
        "_keepalive_interval",
        "_keepalive_timeout",
        "_nursery",
        "_on_stream",
        "_phase",
        "_pings",
        "_queued",
        "_send_wanted",
        "_settings_received",
        "_stray_frames",
        "_streams",
        "_transport",
        "_writing",
        "bytes_received",
        "bytes_sent",
        "closed_reason",
        "peer_close_code",
        "rtt",
        "streams_opened",
    )

    def __init__(
        self,
        *,
        client_side: bool,
        transport: MessageTransport,
        keepalive_interval: float,
        keepalive_timeout: float,
        max_concurrent_streams: int = 100,
        on_stream: Callable[[Stream], Awaitable[None]] | None = None,
        trusted_peer: bool = False,
    ) -> None:
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=not trusted_peer,
            # Outbound headers are built by this package from already validated
            # input, so h2 checking them again is wasted work per request.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._streams: dict[int, Stream] = {}
        self._conn = _Connection(config, self)
        # The server accepts header lists up to its max_header_bytes (32 KiB by
        # default, counted as HTTP/2 does); hpack's own default of 64 KiB would
        # let a visitor with a larger setting knock the agent's whole connection
        # off. Header blocks are capped by MAX_HEADER_BLOCK all the same.
        self._conn.decoder.max_header_list_size = 1 << 20
        settings = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        }
        if not client_side:
            # WebSockets arrive as extended CONNECT streams (RFC 8441).
            settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
        self._conn.local_settings = compact_settings(
            h2.settings.Settings(client=client_side, initial_values=settings)
        )
        compact_settings(self._conn.remote_settings)
        self._client_side = client_side
        self._transport = transport
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._on_stream = on_stream
        self._send_wanted = trio.Event()
        self._drained: trio.Event | None = None
        self._capacity: trio.Event | None = None
        self._pings: dict[bytes, trio.Event] = {}
        self._queued = 0
        self._nursery: trio.Nursery | None = None
        self._phase = _Phase.OPEN
        #: Set once the first drain() is over; a second one waits for it.
        self._drain_done: trio.Event | None = None
        #: Why the connection ends once the writer has sent what is queued.
        self._final_reason: str | None = None
        self._writing = False
        self._settings_received = trio.Event()
        self._ended = trio.Event()
        # Each PING or SETTINGS makes h2 queue an answer; a peer sending them
        # endlessly (and not reading) would fill our memory.
        self._control_frames = _Rate(MAX_CONTROL_FRAMES_PER_SECOND, "PING or SETTINGS frames")
        self._free_frames = _Rate(
            MAX_FREE_FRAMES_PER_SECOND, "WINDOW_UPDATE, PRIORITY or unknown frames"
        )
        self._stray_frames = _Rate(MAX_STRAY_DATA_PER_SECOND, "DATA for finished streams")
        self.closed_reason: str | None = None
        #: The WebSocket close code the peer ended the connection with, if any.
        self.peer_close_code: int | None = None
        self._close_code = 1000
        self.bytes_received = 0
        self.bytes_sent = 0
        self.streams_opened = 0
        self.rtt: float | None = None

    # -- lifecycle -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> str:
        """Run the connection until it ends; return why it ended.

        Stream handlers (``on_stream``) run inside; they are cancelled when the
        connection is lost. Every stream still open is failed with
        :class:`StreamError`, so their consumers wake up and answer.
        """
        conn = self._conn
        conn.initiate_connection()
        # Raising the frame size in the initial SETTINGS would announce it before
        # the peer has agreed to anything; raising it after the preface is safe.
        conn.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME})
        conn.max_inbound_frame_size = MAX_FRAME
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._kick()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive)
                task_status.started()
        except* TransportClosed as group:
            closed = group.exceptions[0]
            assert isinstance(closed, TransportClosed)
            self.peer_close_code = closed.code
            if isinstance(closed, _Abuse):
                self._close_code = POLICY_VIOLATION_CLOSE
            self._end(closed.reason)
        except* h2.exceptions.ProtocolError as group:
            error = group.exceptions[0]
            self._close_code = PROTOCOL_ERROR_CLOSE
            self._end(f"HTTP/2 protocol error from the peer: {error}")
        finally:
            self._end("the connection was closed")
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._transport.aclose(self._close_code, self.closed_reason or "")
        assert self.closed_reason is not None
        return self.closed_reason

    def _end(self, reason: str) -> None:
        if self.closed_reason is None:
            # After our GOAWAY, the peer closing the transport is the plan.
            self.closed_reason = (
                "the connection was drained and closed"
                if self._phase == _Phase.GOAWAY_SENT
                else reason
            )
        self._phase = _Phase.CLOSED
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        lost = StreamError(self.closed_reason, h2.errors.ErrorCodes.INTERNAL_ERROR)
        for stream in list(self._streams.values()):
            if stream.reset is None:
                stream.reset = lost
            stream._notify()
            if stream._window is not None:
                stream._window.set()
            stream.cancel_scope.cancel()
        self._streams.clear()
        self._settings_received.set()
        self._ended.set()
        for event in (self._drained, self._capacity, *self._pings.values()):
            if event is not None:
                event.set()

    async def wait_closed(self) -> None:
        """Wait until the connection has ended."""
        await self._ended.wait()

    async def wait_peer_settings(self) -> bool:
        """Wait for the peer's SETTINGS, proof that it is alive and speaks HTTP/2.

        Returns False if the connection ended first.
        """
        await self._settings_received.wait()
        return self.closed_reason is None

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
        if self.closed_reason is not None:
            return
        if self._phase < _Phase.DRAINING:
            self._phase = _Phase.DRAINING
        if not self._client_side and self._can_send():
            # h2 lets nothing but GOAWAY through once a GOAWAY is sent, so the
            # agent stops new streams with SETTINGS_MAX_CONCURRENT_STREAMS = 0
            # and keeps GOAWAY for last. The server never receives streams: its
            # drain is GOAWAY alone.
            self._conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
            self._kick()
        self._wake_capacity_waiters()  # they fail now: no new streams
        with trio.move_on_after(grace):
            while self._streams and self.closed_reason is None:
                if self._capacity is None:
                    self._capacity = trio.Event()
                await self._capacity.wait()
        if self._ended.is_set():
            return
        abandoned = bool(self._streams)
        if self._phase < _Phase.GOAWAY_SENT:
            self._phase = _Phase.GOAWAY_SENT
            self._conn.close_connection()
            self._kick()
            # h2 will send nothing more for them: they fail now, not at close.
            self._fail_streams("the connection closed before the request finished")
        with trio.move_on_after(min(grace, 1.0)):
            while (self._send_wanted.is_set() or self._writing) and self.closed_reason is None:
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

    def _can_send(self) -> bool:
        """Whether h2 may still send frames other than GOAWAY."""
        return self._phase < _Phase.GOAWAY_SENT

    def _fail_streams(self, reason: str, code: int = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        for stream in list(self._streams.values()):
            if stream.reset is None:
                stream.reset = StreamError(reason, code)
            self._forget(stream)

    def _wake_capacity_waiters(self) -> None:
        if self._capacity is not None:
            self._capacity.set()
            self._capacity = None

    def _peer_goaway_closed_h2(self) -> None:
        # An h2 this module was not verified with closed its state machine on
        # the peer's GOAWAY, as h2 4 does unpatched. Nothing but GOAWAY can be
        # sent now, so say it too: that is the truth the phase must tell.
        self._phase = _Phase.GOAWAY_SENT
        self._conn.close_connection()
        self._kick()

    def _finish_when_flushed(self, reason: str) -> None:
        """End the connection once the writer has sent everything queued."""
        self._final_reason = reason
        self._kick()

    @property
    def open_streams(self) -> int:
        """Streams in flight on this connection."""
        return len(self._streams)

    @property
    def ready(self) -> bool:
        """Whether the peer's SETTINGS have arrived on a connection still open."""
        return self.closed_reason is None and self._settings_received.is_set()

    @property
    def accepting(self) -> bool:
        """Whether new streams may be opened (not draining, no GOAWAY either way)."""
        return self._phase == _Phase.OPEN and self._conn.remote_settings.max_concurrent_streams > 0

    # -- tasks -----------------------------------------------------------------

    def _kick(self) -> None:
        self._send_wanted.set()

    def _kick_if_queued(self) -> None:
        # Most received frames and acknowledgements make h2 queue nothing (it
        # sends WINDOW_UPDATE only once half a window is used up); waking the
        # writer for nothing cost a task switch per request on each side.
        if getattr(self._conn, "_data_to_send", True):
            self._kick()

    async def _writer(self) -> None:
        while True:
            await self._send_wanted.wait()
            self._send_wanted = trio.Event()
            data = self._conn.data_to_send()
            self._queued = 0
            self._writing = True
            if data:
                self.bytes_sent += len(data)
                if len(data) <= MAX_MESSAGE:
                    await self._transport.send(data)
                else:
                    view = memoryview(data)
                    for start in range(0, len(data), MAX_MESSAGE):
                        await self._transport.send(bytes(view[start : start + MAX_MESSAGE]))
            self._writing = False
            if self._drained is not None:
                self._drained.set()
                self._drained = None
            if self._final_reason is not None and not self._send_wanted.is_set():
                raise TransportClosed(self._final_reason)

    async def _reader(self) -> None:
        conn = self._conn
        while True:
            message = await self._transport.receive()
            self.bytes_received += len(message)
            for start in range(0, len(message), RECEIVE_SLICE):
                if start:
                    # A huge message (a flood of tiny frames) is parsed in
                    # slices, so one peer cannot hold up every other task.
                    await trio.lowlevel.checkpoint()
                data = (
                    message[start : start + RECEIVE_SLICE]
                    if len(message) > RECEIVE_SLICE
                    else message
                )
                events = conn.receive_data(data)
                for event in events:
                    self._dispatch(event)
                self._check_answers_read()
                self._kick_if_queued()

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(self._keepalive_interval)
            if not self._can_send():
                # After our GOAWAY, h2 can send no PING, and the drain bounds
                # how long the connection still lives.
                return
            opaque = os.urandom(8)
            answered = self._pings[opaque] = trio.Event()
            sent_at = trio.current_time()
            received = self.bytes_received
            self._conn.ping(opaque)
            self._kick()
            with trio.move_on_after(self._keepalive_timeout):
                await answered.wait()
            # A peer that is still sending is alive, even when its answer is
            # late: with 10,000 streams answering at once, one side's loop took
            # longer than the timeout to get to the PING, and the connection
            # was dropped with every stream on it. A few more periods while
            # bytes keep arriving; flow control stops a peer that is not read.
            for _ in range(KEEPALIVE_BUSY_PERIODS):
                if answered.is_set() or self.bytes_received == received:
                    break
                received = self.bytes_received
                with trio.move_on_after(self._keepalive_timeout):
                    await answered.wait()
            del self._pings[opaque]
            if not answered.is_set():
                if not self._can_send():
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
            self.rtt = trio.current_time() - sent_at

    # -- events ----------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None
            assert event.data is not None
            stream = self._streams.get(event.stream_id)
            flow = event.flow_controlled_length or 0
            if stream is None or stream.reset is not None:
                # Nobody will consume it; give the window back at once. A few
                # such frames are in flight after a reset; a stream of them is
                # a peer gone bad.
                self._stray_frames.count()
                if flow:
                    self._conn.acknowledge_received_data(flow, event.stream_id)
                return
            if not event.data:
                # An empty (or padding-only) frame carries no body: queued, it
                # would read as the end of the body (receive_data's b"") when it
                # happened to arrive alone. What padding took is given back now.
                if flow:
                    self._conn.acknowledge_received_data(flow, event.stream_id)
                if event.stream_ended is not None:
                    stream.remote_ended = True
                    stream._notify()
                    self._forget_if_done(stream)
                return
            stream._chunks.append(event.data)
            stream._flow += flow
            if event.stream_ended is not None:
                stream.remote_ended = True
            stream._notify()
            self._forget_if_done(stream)
        elif isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None
            stream = Stream(self, event.stream_id)
            stream.headers = event.headers
            stream.remote_ended = stream.headers_ended = event.stream_ended is not None
            self._streams[event.stream_id] = stream
            self.streams_opened += 1
            if self._on_stream is None or self._nursery is None or self._phase != _Phase.OPEN:
                # Refused, so the peer knows no work began and may retry it.
                self._reset_stream(stream, h2.errors.ErrorCodes.REFUSED_STREAM)
            else:
                self._nursery.start_soon(self._on_stream, stream)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream.headers = event.headers
                stream.remote_ended = stream.headers_ended = event.stream_ended is not None
                stream._notify()
                self._forget_if_done(stream)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream.trailers = event.headers
                stream.remote_ended = True
                stream._notify()
                self._forget_if_done(stream)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream.remote_ended = True
                stream._notify()
                self._forget_if_done(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                code = event.error_code or 0
                if code == h2.errors.ErrorCodes.NO_ERROR and stream.remote_ended:
                    # The peer finished its side and asks us to stop sending
                    # (RFC 9113 section 8.1): what it sent is still good to read.
                    stream.local_ended = True
                    if stream._window is not None:
                        stream._window.set()
                    self._forget(stream)
                    return
                stream.reset = StreamError(_reset_reason(code), code)
                self._forget(stream)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self._streams.get(event.stream_id)
                if stream is not None and stream._window is not None:
                    stream._window.set()
            else:
                # Only an update that opens the connection's window from
                # nothing can unblock a sender, and an h2 peer sends those only
                # once we sent all it allowed, so they cost it data. The rest
                # (and slivers) only cost us: they count as free frames.
                delta = event.delta or 0
                opened = self._conn.outbound_flow_control_window - delta <= 0
                if not opened or delta < MIN_USEFUL_WINDOW_UPDATE:
                    self._count_free_frame()
                if opened:
                    self._wake_all_senders()
        elif isinstance(
            event,
            h2.events.PriorityUpdated
            | h2.events.UnknownFrameReceived
            | h2.events.AlternativeServiceAvailable,
        ):
            self._count_free_frame()
        elif isinstance(event, h2.events.PingReceived):
            self._count_control_frame()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._count_control_frame()
            self._clamp_header_table()
            self._settings_received.set()
            self._wake_all_senders()
            if self._capacity is not None:
                self._capacity.set()
                self._capacity = None
        elif isinstance(event, h2.events.PingAckReceived):
            answered = self._pings.get(event.ping_data or b"")
            if answered is not None:
                answered.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            if event.error_code:
                raise TransportClosed(f"the peer closed the connection ({event.error_code!s})")
            self._goaway_received(event.last_stream_id or 0)

    def _goaway_received(self, last_stream_id: int) -> None:
        # RFC 9113 section 6.8: streams we opened above the peer's last stream
        # ID were never processed, so they are refused (and may be retried);
        # ours up to it finish, while h2 can still send for them. The peer's
        # own streams end here: our peers' h2 sends nothing after its GOAWAY.
        for stream in list(self._streams.values()):
            ours = (stream.id % 2 == 1) == self._client_side
            if ours and stream.id > last_stream_id:
                stream.reset = StreamError(
                    "the request was refused before any work began (the other side is going away)",
                    h2.errors.ErrorCodes.REFUSED_STREAM,
                )
            elif ours and self._can_send():
                continue
            elif stream.reset is None:
                stream.reset = StreamError(
                    "the other side went away before the request finished",
                    h2.errors.ErrorCodes.INTERNAL_ERROR,
                )
            self._forget(stream)
        if not self._streams:
            raise TransportClosed("the peer went away (GOAWAY)")

    def _check_answers_read(self) -> None:
        # What h2 queued beyond our own DATA is answers to the peer's frames
        # (PING ACKs, RST_STREAMs for frames on closed streams, ...). A peer
        # that makes us answer while it reads nothing would fill our memory.
        unsent = len(getattr(self._conn, "_data_to_send", b"")) - self._queued
        if unsent > MAX_UNREAD_ANSWERS:
            raise _Abuse("the peer stopped reading while its frames kept asking for answers")

    def _count_control_frame(self) -> None:
        self._control_frames.count()

    def _count_free_frame(self) -> None:
        self._free_frames.count()

    def _clamp_header_table(self) -> None:
        # h2 has just sized our encoder's table to what the peer allows. Any
        # size up to that is ours to choose (RFC 7541 section 4.2); the peer
        # learns of it from the size update the next header block starts with,
        # so the one it would have heard of first is dropped.
        encoder = self._conn.encoder
        if encoder.header_table_size > MAX_HEADER_TABLE:
            encoder.header_table_size = MAX_HEADER_TABLE
            encoder.table_size_changes = [
                size for size in encoder.table_size_changes if size <= MAX_HEADER_TABLE
            ]

    def _wake_all_senders(self) -> None:
        for stream in self._streams.values():
            if stream._window is not None:
                stream._window.set()

    def _forget_if_done(self, stream: Stream) -> None:
        if stream.local_ended and stream.remote_ended:
            self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        stream._notify()
        if stream._window is not None:
            stream._window.set()
        # Whatever its consumer has not acknowledged yet goes back now: a stream
        # that ended (or was reset) can receive nothing more, and a consumer
        # cancelled between a chunk and its acknowledgement must not leak window.
        pending = stream._flow + stream._taken
        stream._flow = stream._taken = 0
        stream._settled = True
        if stream.reset is not None:
            stream.cancel_scope.cancel()
            stream._chunks.clear()
        if pending and self._can_send():
            self._conn.acknowledge_received_data(pending, stream.id)
            self._kick_if_queued()
        # h2 itself finds closed streams by walking all of them on every new
        # stream; dropping them here keeps that walk short (see _Connection).
        h2_stream = self._conn.streams.pop(stream.id, None)
        if h2_stream is not None:
            if h2_stream.closed:
                self._conn._closed_streams[stream.id] = h2_stream.closed_by
            else:
                self._conn.streams[stream.id] = h2_stream
        self._wake_capacity_waiters()
        if self._phase == _Phase.GOAWAY_RECEIVED and not self._streams:
            # Not at once: the frames that finished the last stream (its END_STREAM,
            # a WINDOW_UPDATE) are still to be written.
            self._finish_when_flushed("the peer went away (GOAWAY) and every stream has finished")

    # -- operations on streams (called from stream handlers) --------------------

    async def open_stream(self, headers: Headers, *, end_stream: bool) -> Stream:
        """Open a stream with ``headers`` (client side).

        Waits while the peer's limit on concurrent streams is reached.

        Raises:
            StreamError: The connection is closing or closed.
        """
        conn = self._conn
        if not self._settings_received.is_set() and self.closed_reason is None:
            await self._settings_received.wait()
        while True:
            if not self.accepting:
                raise self._refusal()
            if len(self._streams) < conn.remote_settings.max_concurrent_streams:
                break
            if self._capacity is None:
                self._capacity = trio.Event()
            await self._capacity.wait()
        return self._open(headers, end_stream)

    def open_stream_nowait(self, headers: Headers, *, end_stream: bool) -> Stream | None:
        """Like :meth:`open_stream`, but None where that would have to wait.

        Raises:
            StreamError: The connection is closing or closed.
        """
        if not self._settings_received.is_set() and self.closed_reason is None:
            return None
        if not self.accepting:
            raise self._refusal()
        if len(self._streams) >= self._conn.remote_settings.max_concurrent_streams:
            return None
        return self._open(headers, end_stream)

    def _refusal(self) -> StreamError:
        """Why no stream can be opened now; REFUSED_STREAM: nothing was sent."""
        reason = self.closed_reason
        if reason is None:
            reason = (
                "the other side has stopped taking new requests"
                if self._conn.remote_settings.max_concurrent_streams == 0
                else "the connection is going away"
            )
        return StreamError(reason, h2.errors.ErrorCodes.REFUSED_STREAM)

    def _cannot_send(self, stream: Stream) -> StreamError:
        """Why a frame for ``stream`` cannot be sent, in words a visitor may read."""
        if stream.reset is not None:
            return stream.reset
        if self.closed_reason is not None:
            return StreamError(self.closed_reason, h2.errors.ErrorCodes.INTERNAL_ERROR)
        if not self._can_send():
            return StreamError(
                "the connection closed before the request finished",
                h2.errors.ErrorCodes.INTERNAL_ERROR,
            )
        return StreamError("the other side already ended this request")

    def _open(self, headers: Headers, end_stream: bool) -> Stream:
        # Synchronous, so nothing runs between taking a stream ID and queueing
        # its headers: stream IDs must be used in increasing order.
        conn = self._conn
        stream_id = conn.get_next_available_stream_id()
        stream = Stream(self, stream_id)
        try:
            conn.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError:
            # h2's text names its internals; the visitor's page gets ours.
            raise self._refusal() from None
        # Counted only now: h2 asks for the open streams while sending headers.
        self._streams[stream_id] = stream
        stream.local_ended = end_stream
        self.streams_opened += 1
        self._kick()
        return stream

    def _send_headers(self, stream: Stream, headers: Headers, end_stream: bool) -> None:
        if stream.reset is not None or not self._can_send():
            raise self._cannot_send(stream)
        try:
            self._conn.send_headers(stream.id, headers, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            raise self._cannot_send(stream) from None
        self._kick()
        if end_stream:
            stream.local_ended = True
            self._forget_if_done(stream)

    async def _send_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        conn = self._conn
        offset, size = 0, len(data)
        while offset < size:
            if stream.reset is not None or not self._can_send():
                raise self._cannot_send(stream)
            if stream.id not in self._streams:
                raise StreamError("the peer no longer reads this stream")
            window = conn.local_flow_control_window(stream.id)
            if window <= 0:
                stream._window = trio.Event()
                await stream._window.wait()
                stream._window = None
                continue
            n = min(window, size - offset, conn.max_outbound_frame_size)
            chunk = data if n == size else data[offset : offset + n]
            offset += n
            last = end_stream and offset == size
            try:
                conn.send_data(stream.id, chunk, end_stream=last)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                raise self._cannot_send(stream) from None
            self._queued += n
            self._kick()
            if self._queued > OUTBOUND_HIGH_WATER:
                await self._wait_drained()
        if end_stream:
            if size == 0:
                self._end_stream(stream)
            else:
                stream.local_ended = True
                self._forget_if_done(stream)

    async def _wait_drained(self) -> None:
        while self._queued > OUTBOUND_HIGH_WATER and self.closed_reason is None:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    def _end_stream(self, stream: Stream) -> None:
        if stream.reset is not None or not self._can_send():
            raise self._cannot_send(stream)
        try:
            self._conn.end_stream(stream.id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            raise self._cannot_send(stream) from None
        stream.local_ended = True
        self._kick()
        self._forget_if_done(stream)

    def _reset_stream(self, stream: Stream, code: int) -> None:
        if stream.reset is None:
            stream.reset = StreamError("the stream was cancelled", code)
            if stream.id in self._streams and self._can_send():
                # Already closed at the h2 level means nothing to tell the peer.
                with contextlib.suppress(
                    h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError
                ):
                    self._conn.reset_stream(stream.id, code)
                self._kick()
        self._forget(stream)

    def _acknowledge(self, stream_id: int, size: int) -> None:
        if not self._can_send():
            return
        self._conn.acknowledge_received_data(size, stream_id)
        self._kick_if_queued()
