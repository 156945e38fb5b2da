"""An HTTP/2 frame for a stream Hypercorn has forgotten is answered, not a crash.

Replaces the dict that ``H2Protocol.__init__`` sets up (``self.streams = {}``,
``hypercorn/protocol/h2.py``, Hypercorn 0.17 and 0.18), leaving ``_handle_events`` as it
is. That method looks a DATA frame's stream up with ``self.streams[event.stream_id]``.
Once a stream is answered Hypercorn forgets it, while the client may still be sending its
body (it may: RFC 9113 section 8.1), so the next DATA frame raised ``KeyError`` out of the
connection and ``serve`` ended. Here a lookup of a forgotten stream finds a stand-in that
tells the client to stop sending (``RST_STREAM(NO_ERROR)``, as section 8.1 has it);
Hypercorn then returns the flow-control credit as it would.
"""

from __future__ import annotations

import contextlib
from typing import Any

import h2.exceptions
from h2.errors import ErrorCodes
from hypercorn.protocol.h2 import H2Protocol

__all__ = ["answer_forgotten_streams"]


class _ForgottenStream:
    """What Hypercorn's ``H2Protocol`` finds for a stream it no longer knows."""

    __slots__ = ("_connection", "_stream_id")

    def __init__(self, connection: Any, stream_id: int) -> None:
        self._connection = connection
        self._stream_id = stream_id

    async def handle(self, event: Any) -> None:
        # Only DATA (and END_STREAM) reach here: the stream was answered and
        # Hypercorn forgot it while the client still sends. NO_ERROR asks it
        # to stop without failing the answer it has (RFC 9113 section 8.1);
        # Hypercorn's caller flushes the frame. A stream h2 has closed needs
        # no answer.
        with contextlib.suppress(h2.exceptions.H2Error):
            self._connection.reset_stream(self._stream_id, ErrorCodes.NO_ERROR)


class _Streams(dict[int, Any]):
    """``H2Protocol.streams``, where a stream Hypercorn forgot is a :class:`_ForgottenStream`.

    ``__missing__`` runs only for a lookup that would have raised ``KeyError``,
    so Hypercorn's own lookups of live streams cost what they did.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: H2Protocol) -> None:
        super().__init__()
        self._protocol = protocol

    def __missing__(self, stream_id: int) -> _ForgottenStream:
        return _ForgottenStream(self._protocol.connection, stream_id)


def answer_forgotten_streams() -> None:
    """Install the replacement (the caller checks the version, once)."""
    original_init = H2Protocol.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.streams = _Streams(self)

    H2Protocol.__init__ = __init__  # type: ignore[method-assign]
