"""What a stream's task asks of the link core: open a stream, send on it, end it.

These are :class:`~._core.LinkCore`'s methods for the streams' side (it
inherits them); received frames and the connection's life are in
:mod:`._core`. Each call is synchronous and queues frames in h2, then tells
the shell through ``frames_queued``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Generic, TypeVar

import h2.exceptions

from .._protocol.headers import Headers
from ._h2compat import OUTBOUND_BUFFER, H2Connection
from ._state import OUTBOUND_HIGH_WATER, Phase, StreamError
from ._stream import StreamState

__all__ = ["StreamOperations"]

S = TypeVar("S", bound=StreamState)


class StreamOperations(Generic[S]):
    """The operations on streams; :class:`~._core.LinkCore` holds the state they use."""

    __slots__ = ("queued", "streams_opened")

    _conn: H2Connection
    _frames_queued: Callable[[], None]
    _new_stream: Callable[[int], S]
    closed_reason: str | None
    phase: Phase
    #: Bytes of our DATA queued in h2 since the last ``data_to_send()``.
    queued: int
    settings_received: bool
    streams: dict[int, S]
    streams_opened: int

    @property
    def can_send(self) -> bool:
        """Whether h2 may still send frames other than GOAWAY."""
        return self.phase < Phase.GOAWAY_SENT

    @property
    def accepting(self) -> bool:
        """Whether new streams may be opened (not draining, no GOAWAY either way)."""
        return self.phase == Phase.OPEN and self._conn.remote_settings.max_concurrent_streams > 0

    def _forget(self, stream: StreamState) -> None:
        raise NotImplementedError

    def kick_if_queued(self) -> None:
        """Call ``frames_queued`` if h2 holds anything to send."""
        # Most received frames and acknowledgements make h2 queue nothing (it
        # sends WINDOW_UPDATE only once half a window is used up); waking the
        # writer for nothing cost a task switch per request on each side.
        if getattr(self._conn, OUTBOUND_BUFFER, True):
            self._frames_queued()

    # -- opening streams -------------------------------------------------------

    def open_stream_nowait(self, headers: Headers, end_stream: bool) -> S | None:
        """Open a stream with ``headers``; None while the peer's SETTINGS or capacity lack.

        Raises:
            StreamError: The connection is closing or closed (REFUSED_STREAM:
                nothing was sent).
        """
        if not self.settings_received and self.closed_reason is None:
            return None
        if not self.accepting:
            raise self.refusal()
        conn = self._conn
        if len(self.streams) >= conn.remote_settings.max_concurrent_streams:
            return None
        # Nothing runs between taking a stream ID and queueing its headers:
        # stream IDs must be used in increasing order.
        stream_id = conn.get_next_available_stream_id()
        stream = self._new_stream(stream_id)
        try:
            conn.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError:
            # h2's text names its internals; the visitor's page gets ours.
            raise self.refusal() from None
        # Counted only now: h2 asks for the open streams while sending headers.
        self.streams[stream_id] = stream
        stream.local_ended = end_stream
        self.streams_opened += 1
        self._frames_queued()
        return stream

    def refusal(self) -> StreamError:
        """Why no stream can be opened now; REFUSED_STREAM: nothing was sent."""
        reason = self.closed_reason
        if reason is None:
            reason = (
                "the other side has stopped taking new requests"
                if self._conn.remote_settings.max_concurrent_streams == 0
                else "the connection is going away"
            )
        return StreamError(reason, h2.errors.ErrorCodes.REFUSED_STREAM)

    # -- sending on streams ----------------------------------------------------

    def cannot_send(self, stream: StreamState) -> StreamError:
        """Why a frame for ``stream`` cannot be sent, in words a visitor may read."""
        if stream.reset is not None:
            return stream.reset
        if self.closed_reason is not None:
            return StreamError(self.closed_reason, h2.errors.ErrorCodes.INTERNAL_ERROR)
        if not self.can_send:
            return StreamError(
                "the connection closed before the request finished",
                h2.errors.ErrorCodes.INTERNAL_ERROR,
            )
        return StreamError("the other side already ended this request")

    def send_headers(self, stream: StreamState, headers: Headers, end_stream: bool) -> None:
        """Queue a header block on ``stream``; raises :class:`StreamError` if it can't."""
        if stream.reset is not None or not self.can_send:
            raise self.cannot_send(stream)
        try:
            self._conn.send_headers(stream.id, headers, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            raise self.cannot_send(stream) from None
        self._frames_queued()
        if end_stream:
            stream.local_ended = True
            if stream.remote_ended:
                self._forget(stream)

    def send_data(self, stream: StreamState, data: bytes, offset: int, end_stream: bool) -> int:
        """Queue ``data[offset:]`` on ``stream`` as far as the windows allow.

        Returns the offset reached. It stops short of the end when the
        stream's or connection's window is used up (wait for ``_window``),
        and after the frame that took ``queued`` past OUTBOUND_HIGH_WATER
        (wait for the writer). END_STREAM goes with the last byte; the caller
        calls :meth:`data_ended` once it is sent.

        Raises:
            StreamError: The stream or its connection can send no more.
        """
        conn = self._conn
        size = len(data)
        while offset < size:
            if stream.reset is not None or self.phase >= Phase.GOAWAY_SENT:
                raise self.cannot_send(stream)
            if stream.id not in self.streams:
                raise StreamError("the peer no longer reads this stream")
            window = conn.local_flow_control_window(stream.id)
            if window <= 0:
                return offset
            n = min(window, size - offset, conn.max_outbound_frame_size)
            # A view, not a copy: h2 queues it as it is (_h2compat._Outbound).
            chunk = data if n == size else memoryview(data)[offset : offset + n]
            offset += n
            try:
                conn.send_data(stream.id, chunk, end_stream=end_stream and offset == size)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                raise self.cannot_send(stream) from None
            self.queued += n
            self._frames_queued()
            if self.queued > OUTBOUND_HIGH_WATER:
                return offset
        return offset

    def data_ended(self, stream: StreamState, size: int) -> None:
        """:meth:`send_data` sent all ``size`` bytes of a body that ends the stream."""
        if size == 0:
            self.end_stream(stream)
        else:
            stream.local_ended = True
            if stream.remote_ended:
                self._forget(stream)

    def end_stream(self, stream: StreamState) -> None:
        """End our side of ``stream``; raises :class:`StreamError` if it can't."""
        if stream.reset is not None or not self.can_send:
            raise self.cannot_send(stream)
        try:
            self._conn.end_stream(stream.id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            raise self.cannot_send(stream) from None
        stream.local_ended = True
        self._frames_queued()
        if stream.remote_ended:
            self._forget(stream)

    def reset_stream(self, stream: StreamState, code: int) -> None:
        """Reset ``stream`` with ``code`` (once), and forget it."""
        if stream.reset is None:
            stream.reset = StreamError("the stream was cancelled", code)
            if stream.id in self.streams and self.can_send:
                # Already closed at the h2 level means nothing to tell the peer.
                with contextlib.suppress(
                    h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError
                ):
                    self._conn.reset_stream(stream.id, code)
                self._frames_queued()
        self._forget(stream)

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Open the windows for ``size`` bytes the consumer of ``stream_id`` took."""
        if not self.can_send:
            return
        self._conn.acknowledge_received_data(size, stream_id)
        self.kick_if_queued()
