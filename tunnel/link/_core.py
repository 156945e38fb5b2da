"""The link's sans-IO core: every piece of state of one HTTP/2 connection.

Everything that decides lives here: the table of streams, flow-control
accounting, the connection's :class:`~._state.Phase` (the one place that says
whether h2 may still send), what the peer's GOAWAY means for each stream, and
the abuse counters; the operations a stream's task asks for (open, send, end,
reset) are in :mod:`._operations`, which :class:`LinkCore` inherits. It does no
I/O and never waits, so it imports no trio: bytes go in through
:meth:`LinkCore.receive_data`, frames come out of :meth:`LinkCore.data_to_send`.
The shell that runs it (:mod:`._trio`) is told of news three ways, each as
cheap as the direct call it replaced:

* ``frames_queued()``, a callback, whenever h2 has something new to send;
* the hooks of :class:`StreamState` (``_notify``, ``_stop``, the ``_window``
  waker), which the shell's stream overrides to wake its tasks;
* wakers the shell leaves in the core (``settings_waiter``,
  ``capacity_waiter``, each :class:`Ping`'s ``waiter``): anything with
  ``set()``, such as a trio Event.

The rules that keep it correct and fast:

* A stream ID is taken and its headers queued in one call, so IDs are used in
  the order they were taken, as HTTP/2 requires.
* Received DATA is acknowledged only when the stream's consumer calls
  :meth:`StreamState.acknowledge`, after it passed the bytes on: a slow
  consumer slows its sender, end to end.
* h2 refuses every frame but GOAWAY once it has sent a GOAWAY, so nothing is
  asked of it past :attr:`Phase.GOAWAY_SENT`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import h2.config
import h2.errors
import h2.events
import h2.settings

from .._transport import TransportClosed
from ._abuse import MAX_UNREAD_ANSWERS, Abuse, AbuseCounters
from ._h2compat import OUTBOUND_BUFFER, H2Connection, compact_settings
from ._operations import StreamOperations
from ._state import (
    CONNECTION_WINDOW,
    KEEPALIVE_BUSY_PERIODS,
    MAX_FRAME,
    MAX_HEADER_TABLE,
    MIN_USEFUL_WINDOW_UPDATE,
    STREAM_WINDOW,
    Phase,
    Role,
    StreamError,
)
from ._stream import Ping, StreamState, Waker

__all__ = ["LinkCore"]

S = TypeVar("S", bound=StreamState)


def _reset_reason(code: int) -> str:
    if code == h2.errors.ErrorCodes.REFUSED_STREAM:
        return "the request was refused before any work began (the other side is restarting)"
    try:
        name = h2.errors.ErrorCodes(code).name
    except ValueError:
        name = str(code)
    return f"the other side ended the request ({name})"


def _nothing() -> None:
    pass


class LinkCore(StreamOperations[S]):
    """One HTTP/2 connection's state, driven by bytes in and frames out.

    Args:
        role: Whether this end opens streams or answers them.
        new_stream: Makes the state of a stream with the given ID (the
            shell's stream class).
        frames_queued: Called whenever h2 queued frames to send.
        clock: Returns the current time in seconds (for the abuse counters).
        max_concurrent_streams: Streams the peer may open at once.
        trusted_peer: Skip h2's validation of received headers (the agent
            trusts the server it chose to dial; the server never trusts agents).
        trusted_peer_frames: Do not count PINGs, SETTINGS and free frames as
            abuse (see :class:`~._abuse.AbuseCounters`).
        stream_window: What the peer may send on one stream before we
            acknowledge (our SETTINGS_INITIAL_WINDOW_SIZE).
        connection_window: What the peer may send on all streams together.
    """

    # Slots: the server keeps a link per agent, idle or not.
    __slots__ = (
        "_conn",
        "_frames_queued",
        "_new_stream",
        "abuse",
        "accepts_streams",
        "bytes_received",
        "bytes_sent",
        "capacity_waiter",
        "closed_reason",
        "connection_window",
        "final_reason",
        "phase",
        "pings",
        "role",
        "rtt",
        "settings_received",
        "settings_waiter",
        "streams",
    )

    def __init__(
        self,
        role: Role,
        *,
        new_stream: Callable[[int], S],
        frames_queued: Callable[[], None] = _nothing,
        clock: Callable[[], float] = time.monotonic,
        max_concurrent_streams: int = 100,
        trusted_peer: bool = False,
        trusted_peer_frames: bool = False,
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
    ) -> None:
        opener = role is Role.OPENER
        self.connection_window = connection_window
        config = h2.config.H2Configuration(
            client_side=opener,
            header_encoding=None,
            validate_inbound_headers=not trusted_peer,
            # Outbound headers are built by this package from already validated
            # input, so h2 checking them again is wasted work per request.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.role = role
        self.streams: dict[int, S] = {}
        self._new_stream = new_stream
        self._frames_queued = frames_queued
        self._conn = H2Connection(config, self)
        # The server accepts header lists up to its max_header_bytes (counted
        # as HTTP/2 does); hpack's own default of 64 KiB would let a visitor
        # with a larger setting knock the agent's whole connection off. Header
        # blocks are capped by MAX_HEADER_BLOCK all the same.
        self._conn.decoder.max_header_list_size = 1 << 20
        settings = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        }
        if not opener:
            # WebSockets arrive as extended CONNECT streams (RFC 8441).
            settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
        self._conn.local_settings = compact_settings(
            h2.settings.Settings(client=opener, initial_values=settings)
        )
        compact_settings(self._conn.remote_settings)
        self.abuse = AbuseCounters(clock, trusted_peer_frames=trusted_peer_frames)
        self.phase = Phase.OPEN
        #: Whether a handler takes the streams the peer opens; when not, they
        #: are refused. The shell sets it while it runs.
        self.accepts_streams = False
        self.settings_received = False
        self.settings_waiter: Waker | None = None
        self.capacity_waiter: Waker | None = None
        self.pings: dict[bytes, Ping] = {}
        self.queued = 0
        #: Why the connection ends once the writer has sent what is queued.
        self.final_reason: str | None = None
        self.closed_reason: str | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.streams_opened = 0
        self.rtt: float | None = None

    # -- bytes in, frames out --------------------------------------------------

    def start(self) -> None:
        """Queue the connection preface, our SETTINGS and our windows."""
        conn = self._conn
        conn.initiate_connection()
        # Raising the frame size in the initial SETTINGS would announce it before
        # the peer has agreed to anything; raising it after the preface is safe.
        conn.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME})
        conn.max_inbound_frame_size = MAX_FRAME
        conn.increment_flow_control_window(self.connection_window - 65535)
        self._frames_queued()

    def receive_data(self, data: bytes | memoryview) -> list[S]:
        """Take bytes from the peer; return the streams it opened, for a handler.

        Every other event lands in the stream it is for (woken through its
        hooks) or in the connection's state.

        Raises:
            TransportClosed: The connection is over (the peer's GOAWAY with
                an error, or with no stream left to finish).
            Abuse: The peer broke one of the abuse limits.
            h2.exceptions.ProtocolError: The peer broke HTTP/2.
        """
        self.bytes_received += len(data)
        opened: list[S] = []
        for event in self._conn.receive_data(data):
            self._dispatch(event, opened)
        # What h2 queued beyond our own DATA is answers to the peer's frames
        # (PING ACKs, RST_STREAMs for frames on closed streams, ...). A peer
        # that makes us answer while it reads nothing would fill our memory.
        if len(getattr(self._conn, OUTBOUND_BUFFER, b"")) - self.queued > MAX_UNREAD_ANSWERS:
            raise Abuse("the peer stopped reading while its frames kept asking for answers")
        self.kick_if_queued()
        return opened

    def data_to_send(self) -> bytes:
        """Take every frame queued for the peer."""
        data = self._conn.data_to_send()
        self.queued = 0
        self.bytes_sent += len(data)
        return data

    def messages_to_send(self, limit: int) -> list[bytes]:
        """Take every frame queued for the peer, in messages of at most ``limit`` bytes.

        Each byte is copied once on its way, into the message it goes in.
        """
        messages = self._conn.messages_to_send(limit)
        self.queued = 0
        self.bytes_sent += sum(map(len, messages))
        return messages

    # -- the connection's life -------------------------------------------------

    def end(self, reason: str) -> None:
        """The connection is over: fail every stream still open, wake every waiter."""
        if self.closed_reason is None:
            # After our GOAWAY, the peer closing the transport is the plan.
            self.closed_reason = (
                "the connection was drained and closed"
                if self.phase == Phase.GOAWAY_SENT
                else reason
            )
        self.phase = Phase.CLOSED
        lost = StreamError(self.closed_reason, h2.errors.ErrorCodes.INTERNAL_ERROR)
        for stream in list(self.streams.values()):
            if stream.reset is None:
                stream.reset = lost
            stream._notify()
            if stream._window is not None:
                stream._window.set()
            stream._stop()
        self.streams.clear()
        if self.settings_waiter is not None:
            self.settings_waiter.set()
        self._wake_capacity_waiter()
        for ping in self.pings.values():
            if ping.waiter is not None:
                ping.waiter.set()

    def start_drain(self) -> None:
        """Take no new streams; the answerer tells its peer so."""
        if self.phase < Phase.DRAINING:
            self.phase = Phase.DRAINING
        if self.role is Role.ANSWERER and self.can_send:
            # h2 lets nothing but GOAWAY through once a GOAWAY is sent, so the
            # answerer stops new streams with SETTINGS_MAX_CONCURRENT_STREAMS = 0
            # and keeps GOAWAY for last. The opener never receives streams: its
            # drain is GOAWAY alone.
            self._conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
            self._frames_queued()
        self._wake_capacity_waiter()  # they fail now: no new streams

    def send_goaway(self) -> None:
        """Queue our GOAWAY (once); the streams still open fail now."""
        if self.phase < Phase.GOAWAY_SENT:
            self.phase = Phase.GOAWAY_SENT
            self._conn.close_connection()
            self._frames_queued()
            # h2 will send nothing more for them: they fail now, not at close.
            self._fail_streams("the connection closed before the request finished")

    def peer_goaway_closed_h2(self) -> None:
        """An h2 the compat module was not verified with closed itself on the peer's GOAWAY."""
        # As h2 4 does unpatched. Nothing but GOAWAY can be sent now, so say it
        # too: that is the truth the phase must tell.
        self.phase = Phase.GOAWAY_SENT
        self._conn.close_connection()
        self._frames_queued()

    def _fail_streams(self, reason: str, code: int = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        for stream in list(self.streams.values()):
            if stream.reset is None:
                stream.reset = StreamError(reason, code)
            self._forget(stream)

    def _wake_capacity_waiter(self) -> None:
        if self.capacity_waiter is not None:
            self.capacity_waiter.set()
            self.capacity_waiter = None

    # -- keepalive -------------------------------------------------------------

    def send_ping(self, now: float) -> Ping | None:
        """Queue a keepalive PING; None when h2 can send none (after our GOAWAY)."""
        if not self.can_send:
            return None
        ping = Ping(os.urandom(8), now, self.bytes_received)
        self.pings[ping.data] = ping
        self._conn.ping(ping.data)
        self._frames_queued()
        return ping

    def ping_late(self, ping: Ping) -> bool:
        """At a timeout with no answer: whether the peer still sent since the last look.

        A peer that is still sending is alive, even when its answer is late:
        with many thousands of streams answering at once, one side's loop took
        longer than the timeout to get to the PING, and the connection was
        dropped with every stream on it. Flow control stops a peer that is not
        read, so waiting while bytes arrive is bounded, and it ends after
        KEEPALIVE_BUSY_PERIODS more timeouts all the same.
        """
        if (
            ping.answered
            or self.bytes_received == ping.received_mark
            or ping.late_periods >= KEEPALIVE_BUSY_PERIODS
        ):
            return False
        ping.received_mark = self.bytes_received
        ping.late_periods += 1
        return True

    def ping_finished(self, ping: Ping, now: float) -> bool:
        """Done waiting for ``ping``: whether it was answered (then ``rtt`` is measured)."""
        del self.pings[ping.data]
        if ping.answered:
            self.rtt = now - ping.sent_at
        return ping.answered

    # -- received events -------------------------------------------------------

    def _dispatch(self, event: h2.events.Event, opened: list[S]) -> None:
        if isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None
            assert event.data is not None
            stream = self.streams.get(event.stream_id)
            flow = event.flow_controlled_length or 0
            if stream is None or stream.reset is not None:
                # Nobody will consume it; give the window back at once. A few
                # such frames are in flight after a reset; a stream of them is
                # a peer gone bad.
                self.abuse.stray_frames.count()
                if flow:
                    self._conn.acknowledge_received_data(flow, event.stream_id)
                return
            if not event.data:
                # An empty (or padding-only) frame carries no body: queued, it
                # would read as the end of the body (an empty take_data) when
                # it happened to arrive alone. What padding took goes back now.
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
            stream = self._new_stream(event.stream_id)
            stream.headers = event.headers
            stream.remote_ended = stream.headers_ended = event.stream_ended is not None
            self.streams[event.stream_id] = stream
            self.streams_opened += 1
            if not self.accepts_streams or self.phase != Phase.OPEN:
                # Refused, so the peer knows no work began and may retry it.
                self.reset_stream(stream, h2.errors.ErrorCodes.REFUSED_STREAM)
            else:
                opened.append(stream)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.headers = event.headers
                stream.remote_ended = stream.headers_ended = event.stream_ended is not None
                stream._notify()
                self._forget_if_done(stream)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.trailers = event.headers
                stream.remote_ended = True
                stream._notify()
                self._forget_if_done(stream)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.remote_ended = True
                stream._notify()
                self._forget_if_done(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id or 0)
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
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream._window is not None:
                    stream._window.set()
            else:
                # Only an update that opens the connection's window from
                # nothing can unblock a sender, and an h2 peer sends those only
                # once we sent all it allowed, so they cost it data. The rest
                # (and slivers) only cost us: they count as free frames.
                delta = event.delta or 0
                opened_window = self._conn.outbound_flow_control_window - delta <= 0
                if not opened_window or delta < MIN_USEFUL_WINDOW_UPDATE:
                    self.abuse.free_frames.count()
                if opened_window:
                    self._wake_all_senders()
        elif isinstance(
            event,
            h2.events.PriorityUpdated
            | h2.events.UnknownFrameReceived
            | h2.events.AlternativeServiceAvailable,
        ):
            self.abuse.free_frames.count()
        elif isinstance(event, h2.events.PingReceived):
            self.abuse.control_frames.count()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.abuse.control_frames.count()
            self._conn.clamp_header_table(MAX_HEADER_TABLE)
            self.settings_received = True
            if self.settings_waiter is not None:
                self.settings_waiter.set()
            self._wake_all_senders()
            self._wake_capacity_waiter()
        elif isinstance(event, h2.events.PingAckReceived):
            ping = self.pings.get(event.ping_data or b"")
            if ping is not None:
                ping.answered = True
                if ping.waiter is not None:
                    ping.waiter.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            if event.error_code:
                raise TransportClosed(f"the peer closed the connection ({event.error_code!s})")
            self._goaway_received(event.last_stream_id or 0)

    def _goaway_received(self, last_stream_id: int) -> None:
        # RFC 9113 section 6.8: streams we opened above the peer's last stream
        # ID were never processed, so they are refused (and may be retried);
        # ours up to it finish, while h2 can still send for them. The peer's
        # own streams end here: our peers' h2 sends nothing after its GOAWAY.
        opener = self.role is Role.OPENER
        for stream in list(self.streams.values()):
            ours = (stream.id % 2 == 1) == opener
            if ours and stream.id > last_stream_id:
                stream.reset = StreamError(
                    "the request was refused before any work began (the other side is going away)",
                    h2.errors.ErrorCodes.REFUSED_STREAM,
                )
            elif ours and self.can_send:
                continue
            elif stream.reset is None:
                stream.reset = StreamError(
                    "the other side went away before the request finished",
                    h2.errors.ErrorCodes.INTERNAL_ERROR,
                )
            self._forget(stream)
        if not self.streams:
            raise TransportClosed("the peer went away (GOAWAY)")

    def _wake_all_senders(self) -> None:
        for stream in self.streams.values():
            if stream._window is not None:
                stream._window.set()

    def _forget_if_done(self, stream: S) -> None:
        if stream.local_ended and stream.remote_ended:
            self._forget(stream)

    def _forget(self, stream: StreamState) -> None:
        if self.streams.pop(stream.id, None) is None:
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
            stream._stop()
            stream._chunks.clear()
        if pending and self.can_send:
            self._conn.acknowledge_received_data(pending, stream.id)
            self.kick_if_queued()
        self._conn.forget_stream(stream.id)
        self._wake_capacity_waiter()
        if self.phase == Phase.GOAWAY_RECEIVED and not self.streams:
            # Not at once: the frames that finished the last stream (its END_STREAM,
            # a WINDOW_UPDATE) are still to be written.
            self.final_reason = "the peer went away (GOAWAY) and every stream has finished"
            self._frames_queued()
