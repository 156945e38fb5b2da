"""Which identity holds each host, across the worker processes of one server.

Each worker process has a registry of its own. Without this ledger, a worker
that has just (re)started, and knows no agent yet, would give a host to any
identity that asks first, while the host's agent still serves it through the
other workers. The rule of this module: a host is held by one identity on all
workers at once, or by none.

An entry is a file in a directory the parent process made: named after the
host's hash and the worker's index, holding the identity's digest. A lock file
makes a check and its entry one step across processes. The parent removes a
worker's entries before it starts (or restarts) that worker, so the claims of a
worker that died do not outlive it. The work per claim is a few small local
file operations, once per agent handshake, never per request.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator

__all__ = ["HostLedger", "clear_worker"]

_LOCK = ".lock"


def _name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def clear_worker(directory: str, index: int) -> None:
    """Forget every claim of worker ``index`` (it is not running)."""
    suffix = f".{index}"
    for name in os.listdir(directory):
        if name.endswith(suffix):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))


class HostLedger:
    """This worker's view of the ledger in ``directory``.

    Args:
        directory: The ledger's directory, shared by the workers.
        index: This worker's index.
        workers: How many workers there are.
    """

    def __init__(self, directory: str, index: int, workers: int) -> None:
        self.directory = directory
        self.index = index
        self.workers = workers
        self._lock = os.open(os.path.join(directory, _LOCK), os.O_RDWR | os.O_CREAT, 0o600)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Held for microseconds; a worker that dies holding it releases it.
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def _holder(self, name: str, worker: int) -> str | None:
        try:
            with open(os.path.join(self.directory, f"{name}.{worker}")) as entry:
                return entry.read()
        except FileNotFoundError:
            return None

    def held_by_other(self, key: str, digest: bytes) -> bool:
        """Whether another identity than ``digest`` holds ``key`` on any worker."""
        name, mine = _name(key), digest.hex()
        holders = {self._holder(name, worker) for worker in range(self.workers)}
        return bool(holders - {None, mine})

    def held_by(self, key: str, digest: bytes) -> bool:
        """Whether the identity ``digest`` holds ``key`` on any worker."""
        name, mine = _name(key), digest.hex()
        return any(self._holder(name, worker) == mine for worker in range(self.workers))

    def count(self, digest: bytes) -> int:
        """How many hosts the identity ``digest`` holds, on all workers together."""
        mine = digest.hex()
        names = set()
        for entry in os.listdir(self.directory):
            name, dot, worker = entry.partition(".")
            if not dot or not worker.isdigit() or name in names:
                continue  # the lock, a file being written, a host counted already
            if self._holder(name, int(worker)) == mine:
                names.add(name)
        return len(names)

    def claim(self, key: str, digest: bytes, limit: int | None = None) -> bool | None:
        """Record that this worker serves ``key`` for ``digest``.

        Returns:
            True when recorded; False if another identity holds ``key``; None
            if ``digest`` holds ``limit`` other hosts already.
        """
        name = _name(key)
        with self._locked():
            if self.held_by_other(key, digest):
                return False
            if limit is not None and not self.held_by(key, digest) and self.count(digest) >= limit:
                return None
            path = os.path.join(self.directory, f"{name}.{self.index}")
            # Written aside and renamed: ``held_by_other`` also reads without
            # the lock (a handshake's first check), and a file read between
            # its truncation and its write held "" (another identity, to that
            # check), which refused an agent's own second connection.
            with open(f"{path}.new", "w") as entry:
                entry.write(digest.hex())
            os.replace(f"{path}.new", path)
        return True

    def release(self, key: str) -> None:
        """Record that this worker no longer serves ``key``."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.directory, f"{_name(key)}.{self.index}"))
