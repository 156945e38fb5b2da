"""Every error this library raises derives from :class:`TunnelError`.

Foreign errors (trio, h2, wsproto, OSError) are translated where they happen, so a
user catches one family and reads a message that names the problem and the fix.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "ConnectionLostError",
    "HostInUseError",
    "HostRejectedError",
    "ProtocolVersionError",
    "RejectedError",
    "ServerUnreachableError",
    "StoreUnavailableError",
    "TunnelError",
    "UntrustedCertificateError",
]


class TunnelError(Exception):
    """Base class of every error raised by tunnel."""


class ConfigError(TunnelError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class ServerUnreachableError(TunnelError):
    """The agent could not reach the tunnel server (refused, DNS, TLS, timeout).

    The agent retries these on its own; :func:`tunnel.open_tunnel` raises it only
    when the first connection cannot be made within its deadline.
    """


class StoreUnavailableError(TunnelError):
    """The cluster's store (``ServerConfig.store``, Redis) did not answer.

    :func:`tunnel.serve` raises it at start when Redis cannot be reached (the
    message names the URL, without its password); while running, a server
    that loses Redis keeps serving the tunnels it holds and refuses new agents
    (503 with ``Retry-After``) until Redis is back.
    """


class UntrustedCertificateError(TunnelError):
    """The server's TLS certificate failed verification; retrying cannot help.

    Its certificate authority is not trusted (give ``ca_file``), or it names
    another host. Raised at once, never retried, like a refused token.
    """


class ConnectionLostError(TunnelError):
    """An established connection between agent and server ended unexpectedly."""


class RejectedError(TunnelError):
    """The server refused the agent; retrying with the same settings cannot help.

    Attributes:
        status: The HTTP status the server answered with.
        reason: The server's explanation, as sent in the response body.
    """

    status: int = 0

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        if status is not None:
            self.status = status
        self.reason = reason
        super().__init__(f"tunnel server refused the agent ({self.status}): {reason}")


class AuthenticationError(RejectedError):
    """The token was missing or not accepted (HTTP 401)."""

    status = 401


class HostRejectedError(RejectedError):
    """The server refused the claimed host, or the agent (HTTP 400 or 403).

    The host may be reserved, invalid or outside the server's domain, or an auth
    hook or connection callback refused the agent.
    """

    status = 403


class HostInUseError(RejectedError):
    """Another agent with a different token holds the claimed host (HTTP 409)."""

    status = 409


class ProtocolVersionError(RejectedError):
    """Agent and server speak different protocol versions (HTTP 426)."""

    status = 426


def rejection_for_status(status: int, reason: str) -> RejectedError:
    """Map a handshake refusal's HTTP status to the matching exception.

    Only call this for statuses that retrying cannot fix; see :func:`is_permanent`.
    """
    cls: type[RejectedError] = {
        401: AuthenticationError,
        400: HostRejectedError,
        403: HostRejectedError,
        409: HostInUseError,
        426: ProtocolVersionError,
    }.get(status, RejectedError)
    return cls(reason, status=status)


def is_permanent(status: int) -> bool:
    """Whether a handshake refusal with this status is final.

    Server errors and 429 come from overload, restarts or a proxy in front of the
    server, so the agent retries them; any other refusal needs a changed setting.
    """
    return status != 429 and not 500 <= status <= 599
