"""What a peer may make us do before the link takes it for hostile.

Every frame a peer sends costs us work, and some make h2 queue an answer
(a PING ACK, a SETTINGS ACK, an RST_STREAM for DATA on a finished stream).
A legitimate peer sends few of them; these counters end the connection of a
peer that floods them, or that stops reading while its frames keep asking for
answers. Time comes from a clock the caller passes, so nothing here waits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from .._transport import TransportClosed

__all__ = ["Abuse", "AbuseCounters", "Rate"]

#: PINGs and SETTINGS a peer may send per second; a legitimate one sends a
#: few a minute, and each costs us an answer to queue.
MAX_CONTROL_FRAMES_PER_SECOND: Final = 100
#: Frames that cost the peer nothing and ask for nothing, but cost us work:
#: WINDOW_UPDATE on the connection that unblocks nothing, PRIORITY and frames
#: of unknown types. An h2 peer sends such a WINDOW_UPDATE per half window it
#: acknowledged (a few a second at full speed) and never the others.
MAX_FREE_FRAMES_PER_SECOND: Final = 1000
#: DATA frames for finished streams a peer may send per second (some follow
#: every reset; thousands a second only follow a peer gone bad).
MAX_STRAY_DATA_PER_SECOND: Final = 5000
#: Answers (not DATA) queued for a peer that does not read, before we give up.
MAX_UNREAD_ANSWERS: Final = 16 << 20


class Abuse(TransportClosed):
    """The peer misbehaved; the connection is closed on our initiative."""


class Rate:
    """Counts one kind of frame per second; too many in one second is abuse.

    Args:
        limit: How many may arrive in one second.
        what: The frames counted, for the reason the connection ends with.
        clock: Returns the current time in seconds.
    """

    __slots__ = ("_clock", "_count", "_limit", "_start", "_what")

    def __init__(self, limit: int, what: str, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._what = what
        self._clock = clock
        self._count = 0
        self._start = 0.0

    def count(self) -> None:
        """Count one frame.

        Raises:
            Abuse: More than ``limit`` arrived within the last second.
        """
        now = self._clock()
        if now - self._start >= 1.0:
            self._start, self._count = now, 0
        self._count += 1
        if self._count > self._limit:
            raise Abuse(f"the peer flooded the connection with {self._what}")


class _Uncounted:
    """A :class:`Rate` without a limit, for frames a trusted peer may flood."""

    __slots__ = ()

    def count(self) -> None:
        pass


class AbuseCounters:
    """The counters of one connection.

    Args:
        clock: Returns the current time in seconds.
        trusted_peer_frames: Do not count PINGs, SETTINGS and free frames.
            For a local HTTP/2 service the agent's user runs: gRPC servers
            send a PING to estimate bandwidth after bursts of DATA, and
            connection WINDOW_UPDATEs as they tune their windows, which under
            load passes limits meant for hostile peers.
    """

    __slots__ = ("control_frames", "free_frames", "stray_frames")

    def __init__(self, clock: Callable[[], float], *, trusted_peer_frames: bool = False) -> None:
        self.control_frames: Rate | _Uncounted
        self.free_frames: Rate | _Uncounted
        if trusted_peer_frames:
            self.control_frames = self.free_frames = _Uncounted()
        else:
            # Each PING or SETTINGS makes h2 queue an answer; a peer sending
            # them endlessly (and not reading) would fill our memory.
            self.control_frames = Rate(
                MAX_CONTROL_FRAMES_PER_SECOND, "PING or SETTINGS frames", clock
            )
            self.free_frames = Rate(
                MAX_FREE_FRAMES_PER_SECOND, "WINDOW_UPDATE, PRIORITY or unknown frames", clock
            )
        self.stray_frames = Rate(MAX_STRAY_DATA_PER_SECOND, "DATA for finished streams", clock)
