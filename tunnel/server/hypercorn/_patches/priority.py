"""PRIORITY frames for unknown streams are ignored, so a thousand of them stop nothing.

Replaces ``H2Protocol._priority_updated`` (``hypercorn/protocol/h2.py``, Hypercorn 0.17
and 0.18), which inserts every stream a PRIORITY frame names into the priority tree, known
or not, and never takes the unknown ones out: the 1001st raised
``priority.TooManyStreamsError`` out of the connection. The replacement ignores priority
for streams Hypercorn is not sending on (RFC 9113 deprecates these signals; section 5.3.2
lets a server ignore them) and puts a stream whose named parent is unknown at the root.
"""

from __future__ import annotations

from typing import Any

import h2.events
from hypercorn.protocol.h2 import H2Protocol
from priority.priority import PriorityError

__all__ = ["ignore_priority_of_unknown_streams"]


def ignore_priority_of_unknown_streams() -> None:
    """Install the replacement (the caller checks the version, once)."""

    async def _priority_updated(self: Any, event: h2.events.PriorityUpdated) -> None:
        # Hypercorn 0.18's method, but for streams it is not sending on: those
        # it inserted into the tree (without bound, and never removed), and
        # this ignores. The tree holds exactly the streams of ``stream_buffers``.
        if event.stream_id not in self.stream_buffers:
            return
        depends_on = event.depends_on if event.depends_on in self.stream_buffers else None
        try:
            self.priority.reprioritize(
                stream_id=event.stream_id,
                depends_on=depends_on,
                weight=event.weight,
                exclusive=event.exclusive,
            )
        except PriorityError:
            return
        await self.has_data.set()

    H2Protocol._priority_updated = _priority_updated  # type: ignore[method-assign]
