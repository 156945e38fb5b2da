"""What the server's user code sees: the agent's connect request and the callbacks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ["Callbacks", "ConnectRequest", "RequestInfo", "TunnelInfo"]


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """An agent's request to open a tunnel, as the auth hook receives it.

    Attributes:
        headers: The WebSocket handshake's headers, lower-case names, in order.
        token: The token the agent presented.
        host: The canonical host name the agent claims.
        peer: The agent's ``(address, port)``, if known.
        path: The path the agent connected to (the control path).
        tcp_port: For a TCP tunnel, the public port asked for (0: any);
            ``None`` for an HTTP tunnel.
        key: The agent's ``ssh-ed25519`` public key when it authenticated with
            a key (then ``token`` is empty).
        pool: The agent asked to share its host with the other agents of its
            identity that ask the same (``ClientConfig.pool``).
    """

    headers: tuple[tuple[str, str], ...]
    token: str
    host: str
    peer: tuple[str, int] | None
    path: str
    tcp_port: int | None = None
    key: str | None = None
    pool: bool = False

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


@dataclass(frozen=True, slots=True)
class TunnelInfo:
    """One connected agent, as callbacks receive it.

    Attributes:
        host: The public host name the tunnel serves.
        peer: The agent's ``(address, port)``, if known.
        connected_at: When the agent connected (seconds since the epoch).
        request: The connect request the agent was accepted with.
        tcp_port: The public port of a TCP tunnel; ``None`` for HTTP.
    """

    host: str
    peer: tuple[str, int] | None
    connected_at: float
    request: ConnectRequest = field(repr=False)
    tcp_port: int | None = None

    @property
    def key(self) -> str:
        """The registry's key for the tunnel, its host or ``tcp:<port>``."""
        return self.host if self.tcp_port is None else f"tcp:{self.tcp_port}"


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A visitor's request about to go through a tunnel.

    Attributes:
        host: The tunnel's host.
        method: The HTTP method.
        path: The request target, with the query string.
        client: The visitor's address, if known.
    """

    host: str
    method: str
    path: str
    client: str | None


@dataclass(frozen=True, slots=True)
class Callbacks:
    """Async functions the server calls as tunnels come and go.

    Attributes:
        on_connection: Called when an agent has passed authentication, before
            it is accepted. Raising refuses that agent with HTTP 403 and the
            exception's message.
        on_disconnection: Called when an accepted agent's connection ends.
            Errors are logged; they never affect the server.
        on_request: Called before each visitor request is forwarded. It
            observes; errors are logged and the request goes on.
    """

    on_connection: Callable[[TunnelInfo], Awaitable[None]] | None = None
    on_disconnection: Callable[[TunnelInfo], Awaitable[None]] | None = None
    on_request: Callable[[RequestInfo], Awaitable[None]] | None = None
