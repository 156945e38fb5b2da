"""What the agent's display reads from the agent, and the words it shows for it.

Shared by the live panel (``_panel.py``) and the plain lines (``_report.py``).
"""

from __future__ import annotations

import http
from typing import Protocol

from ..client import ClientState, Exchange, ReconnectWait

__all__ = ["AgentView", "duration_text", "reason_phrase", "status_text", "waiting_text"]


class AgentView(Protocol):
    """What the display reads from the agent (a :class:`~tunnel.Client`)."""

    @property
    def state(self) -> ClientState:
        """The connection state."""
        ...

    @property
    def url(self) -> str:
        """The public URL."""
        ...

    @property
    def rtt(self) -> float | None:
        """The last keepalive round trip, in seconds."""
        ...

    @property
    def open_streams(self) -> int:
        """Requests and connections in flight."""
        ...

    @property
    def server_connections(self) -> int:
        """Connections to the server up now (one per server worker process)."""
        ...

    @property
    def inspector_url(self) -> str | None:
        """The traffic inspector's address, if it runs."""
        ...

    @property
    def reconnect_wait(self) -> ReconnectWait | None:
        """The wait before the next connection attempt, while there is one."""
        ...


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.001 else f"{seconds * 1000:.2f} ms"
    return f"{seconds:.2f} s"


def status_text(exchange: Exchange) -> str:
    if exchange.status is None:
        return "…" if not exchange.done else "error"
    return str(exchange.status)


def waiting_text(wait: ReconnectWait, left: float) -> str:
    return f"in {left:.1f} s, attempt {wait.attempt}"


def reason_phrase(status: int | None) -> str:
    if status is None:
        return ""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""
