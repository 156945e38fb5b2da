"""Which worker process this is, as agents see it.

With ``ServerConfig.workers`` above 1 an agent connects to each worker, and tells each
which ones it holds already (``tunnel._protocol.handshake``); the control endpoint answers
with this id, and refuses an agent that holds it already.
"""

from __future__ import annotations

import os
import secrets

from .._config import ServerConfig

__all__ = ["node_id", "worker_id"]

_worker_identity: tuple[int, str] | None = None


def worker_id() -> str:
    """This process's worker id, as agents see it: random, new in every process."""
    global _worker_identity
    pid = os.getpid()
    # Keyed by the pid: a process forked from one that had an id gets its own.
    if _worker_identity is None or _worker_identity[0] != pid:
        _worker_identity = (pid, secrets.token_hex(6))
    return _worker_identity[1]


def node_id(config: ServerConfig) -> str:
    """This server's node id: ``config.node_id``, else one made for this process.

    The workers of one server are one node: their parent sets ``node_id`` in
    the settings it gives them, so they all answer with the same id.
    """
    return config.node_id or f"node-{worker_id()}"
