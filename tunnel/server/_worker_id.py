"""Which worker process this is, as agents see it.

With ``ServerConfig.workers`` above 1 an agent connects to each worker, and tells each
which ones it holds already (``tunnel._protocol.handshake``); the control endpoint answers
with this id, and refuses an agent that holds it already.
"""

from __future__ import annotations

import os
import secrets

__all__ = ["worker_id"]

_worker_identity: tuple[int, str] | None = None


def worker_id() -> str:
    """This process's worker id, as agents see it: random, new in every process."""
    global _worker_identity
    pid = os.getpid()
    # Keyed by the pid: a process forked from one that had an id gets its own.
    if _worker_identity is None or _worker_identity[0] != pid:
        _worker_identity = (pid, secrets.token_hex(6))
    return _worker_identity[1]
