"""Reaching the other nodes of a cluster: one persistent HTTP/2 link to each, as a session.

A visitor whose host has no agent on this node, but has one on another node, is
carried there over a link this node dials (``_protocol/peer.py`` says how the
two prove they share the cluster secret). This node is the HTTP/2 client on it,
exactly as towards an agent, and the ingress (``_ingress.py``, ``_ingress_ws.py``)
sends the same request head, X-Forwarded-* included: a :class:`PeerSession`
looks to it like an agent's session. The other node splices each stream onto
its agent (``_peer_serve.py``) and never forwards it again.

Each link is dialled when a request first needs it, shared by every request to
that node, kept alive by the link's PINGs, and dialled again by the next
request after it is lost, no sooner than a backoff that grows while dials fail.
Its task lives in :class:`Peers`' nursery, which the app's lifespan owns.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

import trio

from .._config import ServerConfig
from .._protocol.policy import VisitorPolicy
from .._transport.handshake import ClientHandshake
from ..link import Link
from ._peer_dial import PeerDialer, PeerError, describe
from ._telemetry import log_event
from ._worker_id import node_id

__all__ = ["Locate", "PeerSession", "PeerStatistics", "Peers", "no_other_nodes"]

logger = logging.getLogger("tunnel.server")

#: Where a host's agents are: ``await locate(key)`` gives ``(node_id,
#: peer_address)`` for each node that holds an agent for ``key`` (a host, or
#: ``tcp:<port>``). The cluster's store provides it.
Locate = Callable[[str], Awaitable[Sequence[tuple[str, str]]]]

#: Backoff between dials of one node while they fail (seconds): the first
#: bound, and the cap it doubles up to.
BACKOFF_INITIAL: Final = 0.1
BACKOFF_MAX: Final = 5.0
#: A link that stayed up this long (seconds) resets the backoff.
STABLE_AFTER: Final = 10.0
#: Streams this node may have open to one other node at once; past it new
#: requests wait (then 503), as towards an agent at its limit.
PEER_MAX_STREAMS: Final = 1000
#: The windows of a link between nodes. It carries the requests of every
#: tunnel between the two, so no few slow visitors may stall it: the
#: connection's window is the sum of PEER_WINDOWS_FULL streams' windows, and
#: only that many streams all stalled at once (their readers taking nothing)
#: stop the others. It also bounds what one link can make a node hold.
PEER_STREAM_WINDOW: Final = 1 << 20
PEER_WINDOWS_FULL: Final = 256
PEER_CONNECTION_WINDOW: Final = PEER_WINDOWS_FULL * PEER_STREAM_WINDOW
CLOSE_TIMEOUT: Final = 2.0


async def no_other_nodes(key: str) -> list[tuple[str, str]]:
    """The default ``locate``: a server on its own knows no other nodes."""
    return []


@dataclass(frozen=True, slots=True)
class PeerStatistics:
    """A snapshot of this node's link to another node.

    Attributes:
        node: The other node's id, as the store named it.
        address: Where it is dialled.
        up: Whether the link is up and takes new requests.
        streams_in_flight: Requests on the link now.
        dials: Dials begun so far.
        failed_dials: Dials that failed so far.
        last_error: Why the last dial failed or the last link was lost, if one did.
        rtt: The last keepalive round-trip time in seconds, if measured.
    """

    node: str
    address: str
    up: bool
    streams_in_flight: int
    dials: int
    failed_dials: int
    last_error: str | None
    rtt: float | None


class PeerSession:
    """Another node holding an agent for ``key``, as the ingress sees a session.

    Attributes:
        key: The registry key (the host, or ``tcp:<port>``).
        node: The other node's id.
        link: The link to that node, shared by all its requests.
        policy: Empty: the node that holds the agent enforces the agent's
            policy (allowed addresses, password), from the head this node sends.
        requests_served: Counted like an agent session's (per request here).
    """

    __slots__ = ("key", "link", "node", "policy", "requests_served")

    #: A node lost before it answered says nothing of the agent, which another
    #: node may reach: a safe request goes again (``_ingress_relay.py``).
    retried_when_lost = True

    def __init__(self, key: str, node: str, link: Link) -> None:
        self.key = key
        self.node = node
        self.link = link
        self.policy = VisitorPolicy()
        self.requests_served = 0

    @property
    def host(self) -> str:
        """The public host name (or ``tcp:<port>``)."""
        return self.key


class _Peer:
    """The link to one other node: dialled on need, shared, dialled again after a loss."""

    __slots__ = (
        "_changed",
        "_failures",
        "_next_dial",
        "_peers",
        "_up_since",
        "address",
        "attempts",
        "dialling",
        "failed",
        "last_error",
        "link",
        "node",
    )

    def __init__(self, peers: Peers, node: str, address: str) -> None:
        self._peers = peers
        self.node = node
        self.address = address
        self.link: Link | None = None
        self.dialling = False
        #: Dials begun, and dials that failed, so far.
        self.attempts = 0
        self.failed = 0
        self.last_error: str | None = None
        self._failures = 0  # in a row, for the backoff
        self._next_dial = 0.0
        self._up_since: float | None = None
        self._changed = trio.Event()

    def usable(self) -> Link | None:
        link = self.link
        if link is not None and link.ready and link.accepting:
            return link
        return None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def get(self, nursery: trio.Nursery) -> Link | None:
        """The link, dialling it if needed; None if the dial begun for us failed."""
        failed_before = self.failed
        while True:
            link = self.usable()
            if link is not None:
                return link
            if self.failed > failed_before:
                return None
            if self.link is not None and self.link.ready and not self.link.accepting:
                # The node is going away (its GOAWAY came): another node that
                # holds the host may serve; this one takes nothing new, and is
                # dialled again once its link has ended.
                return None
            if not self.dialling:
                # Marked now, not when the task starts: two requests must not dial twice.
                self.dialling = True
                nursery.start_soon(self._keep)
            await self._changed.wait()

    async def _keep(self) -> None:
        """Dial (after the backoff), then run the link until it is lost."""
        try:
            delay = self._next_dial - trio.current_time()
            if delay > 0:
                await trio.sleep(delay)
            self.attempts += 1
            try:
                async with trio.open_nursery() as nursery:
                    await self._run(nursery)
                    nursery.cancel_scope.cancel()
            except* Exception as group:
                # Whatever went wrong costs this link only, never the node.
                error = group.exceptions[0]
                while isinstance(error, BaseExceptionGroup):
                    error = error.exceptions[0]
                if self.link is None:
                    self.failed += 1
                self.last_error = describe(error)
                log_event(
                    logger,
                    "peer_unreachable" if self.link is None else "peer_failed",
                    logging.WARNING,
                    node=self.node,
                    address=self.address,
                    reason=self.last_error,
                )
        finally:
            self.link = None
            self.dialling = False
            up_since = self._up_since
            if up_since is not None and trio.current_time() - up_since >= STABLE_AFTER:
                self._failures = 0
            else:
                self._failures += 1
            cap = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** min(self._failures - 1, 32))
            self._next_dial = (
                trio.current_time() + random.uniform(0, cap) if self._failures else 0.0
            )
            self._notify()

    async def _run(self, nursery: trio.Nursery) -> None:
        peers = self._peers
        self._up_since = None
        ws, stream = await peers.dial(self.address)
        try:
            link = Link.opener(
                ws.transport,
                keepalive_interval=peers.config.keepalive_interval,
                keepalive_timeout=peers.config.keepalive_timeout,
                stream_window=PEER_STREAM_WINDOW,
                connection_window=PEER_CONNECTION_WINDOW,
            )
            await nursery.start(link.run)
            # Ready once the other node's SETTINGS came: within a round trip.
            with trio.move_on_after(peers.config.handshake_timeout):
                await link.wait_peer_settings()
            if not link.ready:
                raise PeerError("the node did not start HTTP/2")
            self.link = link
            self._up_since = trio.current_time()
            log_event(logger, "peer_connected", node=self.node, address=self.address)
            self._notify()
            await link.wait_closed()
            self.last_error = link.closed_reason or "closed"
            log_event(
                logger,
                "peer_disconnected",
                node=self.node,
                address=self.address,
                reason=self.last_error,
            )
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await stream.aclose()


class Peers:
    """The links from this node to the others, keyed by their address.

    Run :meth:`serve` (the app's lifespan does) for the links to have a home;
    until then no peer can be reached and :meth:`session` finds none.

    Args:
        config: This node's settings (``cluster_secret``, ``node_id``, TLS,
            timeouts).
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.node_id = node_id(config)
        self._peers: dict[str, _Peer] = {}
        self._nursery: trio.Nursery | None = None
        self._dialer = PeerDialer(config, self.node_id)

    @property
    def active(self) -> bool:
        """Whether other nodes can be dialled (a cluster secret, and :meth:`serve` runs)."""
        return self._nursery is not None and self.config.cluster_secret is not None

    def links(self) -> dict[str, Link]:
        """The links up now, by the address of the node at the other end."""
        return {address: p.link for address, p in self._peers.items() if p.link is not None}

    def statistics(self) -> list[PeerStatistics]:
        """A snapshot of every other node this node has dialled, by address."""
        return [
            PeerStatistics(
                node=peer.node,
                address=address,
                up=peer.usable() is not None,
                streams_in_flight=0 if peer.link is None else peer.link.open_streams,
                dials=peer.attempts,
                failed_dials=peer.failed,
                last_error=peer.last_error,
                rtt=None if peer.link is None else peer.link.rtt,
            )
            for address, peer in sorted(self._peers.items())
        ]

    def attempts(self, address: str) -> int:
        """How many dials of the node at ``address`` have begun."""
        peer = self._peers.get(address)
        return 0 if peer is None else peer.attempts

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Be the home of the links until cancelled; they close with it."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def session(
        self, key: str, nodes: Sequence[tuple[str, str]], deadline: float
    ) -> PeerSession | None:
        """A session on one of ``nodes`` (never this one), at once if a link is up.

        A node whose link is up wins at once, the first in ``nodes`` order.
        Else every node is dialled at once, and the first link up wins: a dead
        node (a dial that hangs until its timeout) must not keep the visitor
        from a live one. Waits until ``deadline`` (trio time) at most; None if
        no link came up.
        """
        nursery = self._nursery
        if nursery is None or self.config.cluster_secret is None:
            return None
        candidates: list[_Peer] = []
        for node, address in nodes:
            if node == self.node_id or address == self.config.peer_address:
                continue  # never to ourselves
            peer = self._peers.get(address)
            if peer is None:
                peer = self._peers[address] = _Peer(self, node, address)
            peer.node = node
            link = peer.usable()
            if link is not None:
                return PeerSession(key, node, link)
            candidates.append(peer)
        won: list[PeerSession] = []
        with trio.move_on_at(deadline):
            if len(candidates) == 1:
                link = await candidates[0].get(nursery)
                if link is not None:
                    won.append(PeerSession(key, candidates[0].node, link))
            elif candidates:
                async with trio.open_nursery() as race:

                    async def reach(peer: _Peer) -> None:
                        link = await peer.get(nursery)
                        if link is not None and not won:
                            won.append(PeerSession(key, peer.node, link))
                            race.cancel_scope.cancel()

                    for peer in candidates:
                        race.start_soon(reach, peer)
        return won[0] if won else None

    async def dial(self, address: str) -> tuple[ClientHandshake, trio.abc.Stream]:
        """Open the WebSocket to the node at ``address``, both sides proven.

        Raises:
            PeerError: The node is unreachable, refused us, or did not prove
                it knows the cluster secret.
        """
        return await self._dialer.dial(address)
