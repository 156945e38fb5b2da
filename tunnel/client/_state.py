"""Where the agent's connection stands: its state, and the wait before its next attempt.

:class:`ClientState` is what :class:`~tunnel.ClientConfig.state` reports;
:class:`ReconnectWait` is what ``Client.reconnect_wait`` holds while the agent waits.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["ClientState", "ReconnectWait"]


class ClientState(enum.Enum):
    """Where an agent's connection to the server stands.

    A connection goes ``CONNECTING`` → ``CONNECTED`` → ``DISCONNECTED`` and then,
    after a backoff delay, ``CONNECTING`` again; a failed attempt goes from
    ``CONNECTING`` straight to ``DISCONNECTED``. ``CLOSED`` is last: the agent
    was closed by its user, or stopped for a refusal that retrying cannot fix.
    """

    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ReconnectWait:
    """The agent's wait before its next connection attempt.

    Attributes:
        attempt: Which attempt in a row it waits for: 1 for the first after a
            lost connection or a failed attempt, 2 after two failures, and so on.
        delay: How long the wait is, in seconds.
        until: When it ends, on trio's clock (:func:`trio.current_time`).
    """

    attempt: int
    delay: float
    until: float

    def remaining(self, now: float) -> float:
        """Seconds left at ``now`` (trio's clock), never below zero."""
        return max(0.0, self.until - now)
