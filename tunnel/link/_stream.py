"""A stream's state in the link core, and the operations on it that never wait.

The trio shell subclasses :class:`StreamState` (its ``Stream``) to add the
waiting; the core wakes that through the hooks below and the ``_window``
:class:`Waker`. Nothing here imports trio.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import h2.errors

from .._protocol.headers import Headers
from ._state import StreamError

__all__ = ["Ping", "StreamState", "Waker"]


class Waker(Protocol):
    """What the core wakes a waiting task with (a trio Event, in the shell)."""

    def set(self) -> None:
        """Wake whoever waits."""

    async def wait(self) -> None:
        """Wait to be woken (used by the shell only)."""


class _Core(Protocol):
    """What a stream asks of its core (:class:`~._core.LinkCore`)."""

    def acknowledge(self, stream_id: int, size: int) -> None: ...

    def send_headers(self, stream: StreamState, headers: Headers, end_stream: bool) -> None: ...

    def end_stream(self, stream: StreamState) -> None: ...

    def reset_stream(self, stream: StreamState, code: int) -> None: ...


class StreamState:
    """One HTTP/2 stream's state, and the operations on it that never wait.

    The shell subclasses it to add waiting (its ``Stream``); the hooks
    :meth:`_notify` and :meth:`_stop` are how the core wakes that.
    """

    __slots__ = (
        "_chunks",
        "_core",
        "_flow",
        "_settled",
        "_taken",
        "_window",
        "headers",
        "headers_ended",
        "id",
        "local_ended",
        "remote_ended",
        "reset",
        "trailers",
    )

    def __init__(self, core: _Core, stream_id: int) -> None:
        self._core = core
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
        #: Set by a sender waiting for flow-control window; the core sets it
        #: when the window may have opened.
        self._window: Waker | None = None
        self._settled = False  # the core gave back all flow control already

    def _notify(self) -> None:
        """Headers, data, the end or a reset arrived: wake the stream's reader."""

    def _stop(self) -> None:
        """The stream was reset or its connection ended: stop its handler."""

    # -- receiving -------------------------------------------------------------

    def take_data(self) -> bytes:
        """Take every body chunk buffered, as one piece (``b""`` if none)."""
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._taken += self._flow
        self._flow = 0
        return data

    def data_buffered(self) -> bool:
        """Whether body bytes are waiting to be taken."""
        return bool(self._chunks)

    def acknowledge(self) -> None:
        """Open the flow-control window for what was taken since the last call."""
        if self._taken and not self._settled:
            self._core.acknowledge(self.id, self._taken)
        self._taken = 0

    # -- sending ---------------------------------------------------------------

    def send_headers(self, headers: Headers, *, end_stream: bool = False) -> None:
        """Queue a header block (response headers or trailers).

        Raises:
            StreamError: The stream or its connection can send no more.
        """
        self._core.send_headers(self, headers, end_stream)

    def end(self) -> None:
        """End our side of the stream (an empty DATA frame with END_STREAM).

        Raises:
            StreamError: The stream or its connection can send no more.
        """
        self._core.end_stream(self)

    def cancel(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Reset the stream: tell the peer to stop, and forget it."""
        self._core.reset_stream(self, code)

    @property
    def done(self) -> bool:
        """Whether both sides have ended, or the stream was reset."""
        return self.reset is not None or (self.local_ended and self.remote_ended)


class Ping:
    """One keepalive PING in flight."""

    __slots__ = ("answered", "data", "late_periods", "received_mark", "sent_at", "waiter")

    def __init__(self, data: bytes, sent_at: float, received_mark: int) -> None:
        self.data = data
        self.sent_at = sent_at
        #: ``bytes_received`` when last looked at: whether the peer still sends.
        self.received_mark = received_mark
        #: Extra timeouts granted so far because the peer kept sending.
        self.late_periods = 0
        self.answered = False
        self.waiter: Waker | None = None
