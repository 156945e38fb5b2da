"""The agent's connection states, as :class:`~tunnel.ClientConfig.state` reports them."""

from __future__ import annotations

import enum

__all__ = ["ClientState"]


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
