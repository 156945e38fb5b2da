"""The agent's WebSocket handshake (protocol version 1).

The agent names the protocol version as its WebSocket subprotocol, sends its
token as a bearer credential and the host it claims in a header. The server
answers with the canonical host it registered, or refuses with an HTTP status
and a plain-text reason. Inside the accepted WebSocket runs HTTP/2, the server
as client and the agent as server.
"""

from __future__ import annotations

__all__ = [
    "AGENT_ID_HEADER",
    "CHALLENGE_HEADER",
    "CHALLENGE_SUFFIX",
    "DISCONNECTED_CLOSE_CODE",
    "DUPLICATE_STATUS",
    "HAVE_NODES_HEADER",
    "HAVE_WORKERS_HEADER",
    "HOST_HEADER",
    "KEY_HEADER",
    "NODES_HEADER",
    "NODE_HEADER",
    "NONCE_HEADER",
    "POOL_HEADER",
    "PROTOCOL_VERSION",
    "REPLACED_CLOSE_CODE",
    "SIGNATURE_HEADER",
    "SUBPROTOCOL",
    "SUBPROTOCOL_PREFIX",
    "TCP_PORT_HEADER",
    "WANT_NODE_HEADER",
    "WORKERS_HEADER",
    "WORKER_HEADER",
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

# Several server processes. A server run as N worker processes answers each
# handshake with the id of the worker that took the connection and N; the agent
# opens connections until it holds one to every worker, so that each worker can
# serve the agent's host to the visitors it accepts. The agent names the workers
# it already holds; a worker among them refuses the connection with
# DUPLICATE_STATUS before anything else (no claim, no callback), and the agent
# tries again, landing on another worker.
#: Request: this agent process's random id, the same on all its connections.
AGENT_ID_HEADER = "tunnel-agent"
#: Request: comma-separated ids of the workers the agent is connected to now.
HAVE_WORKERS_HEADER = "tunnel-have-workers"
#: Response: the id of the worker process that accepted this connection.
WORKER_HEADER = "tunnel-worker"
#: Response: how many worker processes serve this server.
WORKERS_HEADER = "tunnel-workers"
#: Response: the id of the cluster node (server) that accepted this connection;
#: its workers all send the same. An agent keeps connections to distinct nodes.
NODE_HEADER = "tunnel-node"
#: Response: how many nodes the cluster has now (1 for a server on its own).
NODES_HEADER = "tunnel-nodes"

# Several nodes (servers of one cluster). The agent keeps connections to
# ``min(ha_connections, nodes)`` distinct nodes, and to every worker of each node
# it holds. A connection looking for one more node names the nodes the agent
# holds; one looking for another worker of a node it holds names that node. A
# node that is not wanted refuses with DUPLICATE_STATUS before anything else,
# as a held worker does, so dialling a load-balanced address until it lands on
# a new node costs the nodes it lands on nothing but the refusal.
#: Request: comma-separated ids of the nodes the agent is connected to now and
#: does not want another connection to.
HAVE_NODES_HEADER = "tunnel-have-nodes"
#: Request: the id of the one node this connection is meant for (another of
#: its workers); any other node refuses it.
WANT_NODE_HEADER = "tunnel-want-node"
#: The refusal of a connection to a worker (or node) the agent is connected to
#: already, or to a node this connection was not meant for.
DUPLICATE_STATUS = 421

#: Request: "1" to share the host with other agents of the same identity that
#: ask the same (a pool); the server sends each request to the least busy.
POOL_HEADER = "tunnel-pool"

# Public-key authentication. The agent first GETs ``<control path>/challenge``
# for a single-use nonce, then connects with its public key, the nonce, and its
# signature of :func:`signed_challenge` (the nonce, the claimed host and the
# protocol version), so a captured handshake can be replayed neither later nor
# for another host.
CHALLENGE_SUFFIX = "/challenge"
#: Request: the protocol (:data:`SUBPROTOCOL`) of an agent asking for a
#: challenge. Agents dial their own tunnel's host, so the path alone cannot
#: tell an agent from a visitor of that tunnel, whose path it is: without this
#: header the request is the tunnel's, and visitors cannot mint nonces.
CHALLENGE_HEADER = "tunnel-challenge"
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
