"""The agent's WebSocket handshake (protocol version 1).

The agent names the protocol version as its WebSocket subprotocol, sends its
token as a bearer credential and the host it claims in a header. The server
answers with the canonical host it registered, or refuses with an HTTP status
and a plain-text reason. Inside the accepted WebSocket runs HTTP/2, the server
as client and the agent as server.
"""

from __future__ import annotations

__all__ = [
    "HOST_HEADER",
    "PROTOCOL_VERSION",
    "SUBPROTOCOL",
    "SUBPROTOCOL_PREFIX",
    "TCP_PORT_HEADER",
    "bearer_token",
]

PROTOCOL_VERSION = 1
SUBPROTOCOL_PREFIX = "tunnel.v"
SUBPROTOCOL = f"{SUBPROTOCOL_PREFIX}{PROTOCOL_VERSION}"

#: Request: the host the agent claims. Response: the canonical host it got.
HOST_HEADER = "tunnel-host"
#: Request: a TCP tunnel, on this public port (0: any). Response: the port it got.
TCP_PORT_HEADER = "tunnel-tcp-port"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
