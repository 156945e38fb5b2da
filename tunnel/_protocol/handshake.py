"""The agent's WebSocket handshake (protocol version 1).

The agent names the protocol version as its WebSocket subprotocol, sends its
token as a bearer credential and the host it claims in a header. The server
answers with the canonical host it registered, or refuses with an HTTP status
and a plain-text reason. Inside the accepted WebSocket runs HTTP/2, the server
as client and the agent as server.
"""

from __future__ import annotations

__all__ = [
    "CHALLENGE_SUFFIX",
    "DISCONNECTED_CLOSE_CODE",
    "HOST_HEADER",
    "KEY_HEADER",
    "NONCE_HEADER",
    "PROTOCOL_VERSION",
    "REPLACED_CLOSE_CODE",
    "SIGNATURE_HEADER",
    "SUBPROTOCOL",
    "SUBPROTOCOL_PREFIX",
    "TCP_PORT_HEADER",
    "bearer_token",
    "signed_challenge",
]

PROTOCOL_VERSION = 1
SUBPROTOCOL_PREFIX = "tunnel.v"
SUBPROTOCOL = f"{SUBPROTOCOL_PREFIX}{PROTOCOL_VERSION}"

#: Request: the host the agent claims. Response: the canonical host it got.
HOST_HEADER = "tunnel-host"
#: WebSocket close code telling an agent that a newer connection with the same
#: identity took its tunnel over: it must stop, not reconnect and fight back.
REPLACED_CLOSE_CODE = 4000
#: WebSocket close code telling an agent that the server's operator ended its
#: tunnel (admin API): it must stop, not reconnect.
DISCONNECTED_CLOSE_CODE = 4001

#: Request: a TCP tunnel, on this public port (0: any). Response: the port it got.
TCP_PORT_HEADER = "tunnel-tcp-port"

# Public-key authentication. The agent first GETs ``<control path>/challenge``
# for a single-use nonce, then connects with its public key, the nonce, and its
# signature of :func:`signed_challenge` (the nonce, the claimed host and the
# protocol version), so a captured handshake can be replayed neither later nor
# for another host.
CHALLENGE_SUFFIX = "/challenge"
KEY_HEADER = "tunnel-key"
NONCE_HEADER = "tunnel-nonce"
SIGNATURE_HEADER = "tunnel-signature"


def signed_challenge(nonce: str, host: str) -> bytes:
    """The bytes an agent signs to prove it holds its key."""
    return f"{SUBPROTOCOL} challenge\n{nonce}\n{host}".encode()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
