"""What the servers of one deployment share: who holds each host, and where.

One small interface, two backends. :class:`LocalStore` is the default and needs
nothing: one process knows everything itself, and the workers of one server
share a :class:`~tunnel.server._ledger.HostLedger`. :class:`RedisStore`
(``ServerConfig.store``, in ``_redis_store.py``) makes servers on several
machines one cluster.

Only decisions live in the store: which identity owns a host, which nodes
serve it, how many tunnels an identity holds, the request-rate buckets of
cluster-wide limits. The streams themselves never pass through it, and a
request on a host this process serves never waits for it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from .._protocol.limits import RateLimit
from ._ledger import HostLedger

__all__ = ["Claim", "Holder", "LocalStore", "Member", "Store"]


class Claim(enum.Enum):
    """The store's answer to a claim of a host."""

    #: The identity holds the host now (it may have held it already).
    OK = "ok"
    #: Another identity holds it, on some node.
    HELD = "held"
    #: The identity holds as many tunnels as it may.
    LIMIT = "limit"


@dataclass(frozen=True, slots=True)
class Member:
    """One server process of the cluster, as the store knows it.

    Attributes:
        node: Its node's id (``ServerConfig.node_id``); a node's workers share it.
        address: Where the other nodes reach its node (``host:port``).
    """

    node: str
    address: str


class Holder(Protocol):
    """What a store's background task asks of the server process it serves."""

    def holdings(self) -> dict[str, bytes]:
        """Each key this process serves, with its owner's digest."""

    def holds(self, key: str) -> bool:
        """Whether this process serves ``key`` now."""

    def lost(self, key: str) -> None:
        """Let go of ``key``: the store gave it to another identity meanwhile.

        That happens while this process could not reach the store.
        """

    def tunnels(self) -> list[dict[str, Any]]:
        """This process's tunnels, as the admin API lists them."""

    async def disconnect(self, key: str, reason: str, reconnect: bool) -> None:
        """The admin API of another node disconnects ``key``: end its sessions here."""

    def forward_tcp(self, keys: list[str]) -> None:
        """The TCP tunnels (``tcp:<port>``) other nodes serve now: listen for them here."""


class Store:
    """The interface of both backends; every method is safe to call from any task.

    A claim is made in the agent's handshake, before the connection is
    accepted, so a refusal is an HTTP status the agent understands. Releases
    are synchronous (they happen in ``finally`` blocks) and may be carried out
    later; an entry whose release was lost expires with its heartbeat.
    """

    #: Whether this is a cluster's store (more than one machine may be in it).
    clustered = False

    async def claim(self, key: str, digest: bytes, limit: int | None) -> Claim:
        """Record that this process serves ``key`` for the identity ``digest``.

        Args:
            key: The host, or ``tcp:<port>``.
            digest: The identity's digest.
            limit: The most tunnels the identity may hold (``None``: no limit).

        Raises:
            StoreUnavailableError: The store could not be asked.
        """
        raise NotImplementedError

    async def held_by_other(self, key: str, digest: bytes) -> bool:
        """Whether another identity than ``digest`` holds ``key`` anywhere.

        Raises:
            StoreUnavailableError: The store could not be asked.
        """
        raise NotImplementedError

    def release(self, key: str) -> None:
        """Record that this process no longer serves ``key`` (now or soon)."""
        raise NotImplementedError

    async def holders(self, key: str) -> list[Member]:
        """The other nodes that serve ``key`` now; empty on a server of its own.

        Raises:
            StoreUnavailableError: The store could not be asked.
        """
        return []

    async def take(self, bucket: str, limit: RateLimit) -> float | None:
        """Take one request from the cluster-wide bucket ``bucket``.

        Returns:
            The seconds to wait before the next request would be admitted (0:
            admitted), or ``None`` when this store keeps no shared buckets
            (the process counts on its own).
        """
        return None

    def node_count(self) -> int:
        """How many nodes the cluster has now, as last seen (1 on a server of its own)."""
        return 1

    async def tunnels(self) -> list[dict[str, Any]]:
        """The tunnels the other nodes serve, as they last published them.

        Raises:
            StoreUnavailableError: The store could not be asked.
        """
        return []

    async def tcp_elsewhere(self) -> list[str]:
        """The TCP tunnels (``tcp:<port>``) that other nodes serve now.

        Raises:
            StoreUnavailableError: The store could not be asked.
        """
        return []

    async def disconnect_elsewhere(self, key: str, reason: str, reconnect: bool) -> None:
        """Ask the other nodes to disconnect ``key`` (the admin API's DELETE).

        Raises:
            StoreUnavailableError: The store could not be asked.
        """

    async def run(
        self,
        holder: Holder,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep this process's entries alive until cancelled (nothing to do here)."""
        task_status.started()
        await trio.sleep_forever()


class LocalStore(Store):
    """The store of a server that is not in a cluster.

    One process knows every claim itself; the workers of one server share a
    ``ledger`` of files (the parent clears a worker's entries when it dies).

    Args:
        ledger: The workers' shared ledger; ``None`` for a server of one process.
    """

    def __init__(self, ledger: HostLedger | None = None) -> None:
        self.ledger = ledger

    async def claim(self, key: str, digest: bytes, limit: int | None) -> Claim:
        ledger = self.ledger
        if ledger is None:
            return Claim.OK  # the registry's own checks are all there is
        # No await in here, and the ledger's lock makes the checks and the
        # entry one step across processes.
        recorded = ledger.claim(key, digest, limit)
        return Claim.OK if recorded else Claim.HELD if recorded is False else Claim.LIMIT

    async def held_by_other(self, key: str, digest: bytes) -> bool:
        return self.ledger is not None and self.ledger.held_by_other(key, digest)

    def release(self, key: str) -> None:
        if self.ledger is not None:
            self.ledger.release(key)
