"""The link: one HTTP/2 connection inside the agent's WebSocket, shared by its streams.

Three layers, each in its own module:

* :mod:`._core`: the sans-IO core. It owns every piece of connection state
  (streams, windows, the GOAWAY/drain phase, abuse counters), takes bytes in
  and gives frames out, and imports no trio.
* :mod:`._trio`: the trio shell, :class:`Link` and :class:`Stream`. Its reader,
  writer, keepalive and drain move bytes and wake tasks.
* :mod:`._h2compat`: every use of h2's and hyperframe's private code.

One end opens streams (:meth:`Link.opener`: the server, and the agent towards
a local HTTP/2 service); the other answers them (:meth:`Link.answerer`: the
agent). :func:`pipe` joins a stream to a socket; :func:`answer_error` answers one with an
error page.
"""

from __future__ import annotations

from ._answer import answer_error as answer_error
from ._core import LinkCore as LinkCore
from ._pipe import pipe as pipe
from ._state import KEEPALIVE_BUSY_PERIODS as KEEPALIVE_BUSY_PERIODS
from ._state import MAX_MESSAGE as MAX_MESSAGE
from ._state import Role as Role
from ._state import StreamError as StreamError
from ._stream import StreamState as StreamState
from ._trio import Link as Link
from ._trio import Stream as Stream

__all__ = [
    "KEEPALIVE_BUSY_PERIODS",
    "MAX_MESSAGE",
    "Link",
    "LinkCore",
    "Role",
    "Stream",
    "StreamError",
    "StreamState",
    "answer_error",
    "pipe",
]
