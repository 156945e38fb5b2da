"""The node-to-node handshake of a cluster: how two tunnel servers prove they share a secret.

A node that has a visitor for a host whose agent is on another node opens a
WebSocket to that node's ``<control path>/peer`` with :data:`PEER_SUBPROTOCOL`,
its node id, the time, a fresh nonce and an HMAC-SHA256 of those made with the
cluster secret (:func:`dial_signature`). The secret itself never travels. The
node dialled checks the signature and the time (so a captured handshake is no
good for long, nor for another node) and answers with its own id and an HMAC of
the dialler's nonce (:func:`accept_signature`), so the dialler knows it reached
a node of its own cluster. Inside the WebSocket runs HTTP/2, the dialler as the
client: one stream per forwarded request, with the same head an agent gets.

Everything here is plain computation; nothing imports trio.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

__all__ = [
    "MAX_CLOCK_SKEW",
    "PEER_NODE_HEADER",
    "PEER_NONCE_HEADER",
    "PEER_PATH_SUFFIX",
    "PEER_SIGNATURE_HEADER",
    "PEER_SUBPROTOCOL",
    "PEER_TIME_HEADER",
    "accept_signature",
    "dial_signature",
    "signatures_match",
]

#: The WebSocket subprotocol of a node dialling another (not an agent's).
PEER_SUBPROTOCOL: Final = "tunnel.peer.v1"
#: Appended to ``ServerConfig.control_path``: where nodes dial each other.
PEER_PATH_SUFFIX: Final = "/peer"
#: Request: the dialling node's id. Response: the id of the node dialled.
PEER_NODE_HEADER: Final = "tunnel-peer-node"
#: Request: the dialler's clock, whole seconds since the epoch.
PEER_TIME_HEADER: Final = "tunnel-peer-time"
#: Request: a random hex string, new for each dial.
PEER_NONCE_HEADER: Final = "tunnel-peer-nonce"
#: Request: :func:`dial_signature`. Response: :func:`accept_signature`.
PEER_SIGNATURE_HEADER: Final = "tunnel-peer-signature"
#: Seconds the clocks of two nodes may disagree, and how long a dial's
#: signature is good for.
MAX_CLOCK_SKEW: Final = 120


def _sign(secret: str, *parts: str) -> str:
    message = "\n".join((PEER_SUBPROTOCOL, *parts)).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def dial_signature(secret: str, node: str, target: str, timestamp: int, nonce: str) -> str:
    """The signature a node sends when it dials ``target`` (that node's address).

    Args:
        secret: The cluster secret.
        node: The dialling node's id.
        target: The address dialled, as it is written in the request's
            ``Host``, so a dial signed for one node is no good at another.
        timestamp: The dialler's clock, in whole seconds.
        nonce: A random string, new for each dial.
    """
    return _sign(secret, "dial", node, target.lower(), str(timestamp), nonce)


def accept_signature(secret: str, node: str, nonce: str) -> str:
    """The signature the dialled ``node`` answers with, over the dialler's ``nonce``."""
    return _sign(secret, "accept", node, nonce)


def signatures_match(given: str, expected: str) -> bool:
    """Compare two signatures in constant time."""
    return hmac.compare_digest(given.encode(), expected.encode())
