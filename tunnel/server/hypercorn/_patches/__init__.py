"""Every fix tunnel makes to Hypercorn's code, one module each, applied together.

Each module replaces one piece of Hypercorn (its docstring names the file, the function
and the versions it was written against) to fix a defect that a tunnel server cannot live
with. They are pinned to the versions they were verified on (``HYPERCORN_FIXES`` and
``HYPERCORN_DISCONNECT_NOTICE`` in ``tunnel/_compat.py``; :mod:`.h2_responses` checks its
own), applied once (idempotent) when a :class:`~tunnel.TunnelApp` is created, so they hold
both under :func:`tunnel.serve` and under a user's own ``hypercorn`` command.

- :mod:`.pathless_request`: an HTTP/2 request without ``:path`` no longer crashes the server.
- :mod:`.forgotten_streams`: late DATA for an answered stream no longer stops the server.
- :mod:`.priority`: PRIORITY frames for unknown streams no longer stop the server.
- :mod:`.websocket_close_code`: a visitor's WebSocket close code reaches the app.
- :mod:`.websocket_pieces`: incoming WebSocket messages are not copied over and over.
- :mod:`.read_size`: connections are read in larger pieces.
- :mod:`.disconnect_notice`: an HTTP app hears of a visitor leaving without a task.
- :mod:`.websocket_queue`: what a WebSocket's app has not read is bounded in bytes.
- :mod:`.h2_responses`: bounded HTTP/2 response buffering, unfinished responses reset.
- :mod:`.response_head`: an HTTP/1.1 response's head leaves with its body, in one write
  (pinned by ``HYPERCORN_HEAD_WITH_BODY``).
"""

from __future__ import annotations

from ...._compat import HYPERCORN_DISCONNECT_NOTICE, HYPERCORN_FIXES, HYPERCORN_HEAD_WITH_BODY
from .disconnect_notice import notify_disconnect
from .forgotten_streams import answer_forgotten_streams
from .h2_responses import fix_http2_responses
from .pathless_request import refuse_pathless_requests
from .priority import ignore_priority_of_unknown_streams
from .read_size import read_in_larger_pieces
from .response_head import write_head_with_body
from .websocket_close_code import pass_on_close_codes
from .websocket_pieces import join_websocket_pieces_once
from .websocket_queue import bound_websocket_queues

__all__ = ["apply_hypercorn_patches"]

_applied = False


def apply_hypercorn_patches() -> None:
    """Apply the fixes if the installed Hypercorn needs them (at most once)."""
    global _applied
    if _applied:
        return
    _applied = True
    # Off on other versions; warn_fixes_off() says so.
    if not HYPERCORN_FIXES.on:
        return
    pass_on_close_codes()
    refuse_pathless_requests()
    answer_forgotten_streams()
    ignore_priority_of_unknown_streams()
    read_in_larger_pieces()
    join_websocket_pieces_once()
    if HYPERCORN_DISCONNECT_NOTICE.on:
        notify_disconnect()
        bound_websocket_queues()
    fix_http2_responses()
    if HYPERCORN_HEAD_WITH_BODY.on:
        write_head_with_body()
