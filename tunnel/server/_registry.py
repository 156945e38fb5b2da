"""Which agent serves which host: the in-memory registry of one server process.

Every change to the host → session mapping happens here, synchronously, so a
claim and a lookup never see a half-made change.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from .._config.hooks import TunnelInfo
from .._protocol.policy import VisitorPolicy
from ..link import Link
from ._store import LocalStore, Store

if TYPE_CHECKING:
    from ._tcp import TcpForwarders

__all__ = ["AgentSession", "HostInUse", "Registry", "Session", "TunnelStatistics"]

#: How many hosts whose agent left are remembered (for 502 instead of 404).
MAX_REMEMBERED_HOSTS = 10_000


class HostInUse(Exception):
    """Another agent, with another token, holds the host."""


@dataclass(frozen=True, slots=True)
class TunnelStatistics:
    """A snapshot of one active tunnel.

    Attributes:
        host: The public host name, or ``tcp:<port>`` for a TCP tunnel.
        peer: The agent's ``(address, port)``.
        connected_since: When the agent connected (seconds since the epoch).
        streams_in_flight: Requests being served right now.
        requests_served: Requests forwarded since the agent connected.
        bytes_received: Bytes received from the agent (HTTP/2, all streams).
        bytes_sent: Bytes sent to the agent (HTTP/2, all streams).
        rtt: The last keepalive round-trip time in seconds, if measured.
    """

    host: str
    peer: tuple[str, int] | None
    connected_since: float
    streams_in_flight: int
    requests_served: int
    bytes_received: int
    bytes_sent: int
    rtt: float | None


class Session(Protocol):
    """What the ingress uses of a session: an agent's here, or another node's.

    :class:`AgentSession` is one; ``_peers.PeerSession`` (a node that holds
    the agent, reached over the link to it) is the other.
    """

    link: Link
    policy: VisitorPolicy
    requests_served: int
    #: Whether a safe request (GET, HEAD, OPTIONS) whose connection was lost
    #: before any answer goes again to another session: for another node, whose
    #: loss says nothing of the agent; not for an agent's own connection.
    retried_when_lost: bool

    @property
    def host(self) -> str:
        """The public host name (or ``tcp:<port>``)."""
        ...

    @property
    def key(self) -> str:
        """The registry key."""
        ...


class AgentSession:
    """One accepted agent connection and its counters."""

    retried_when_lost = False

    __slots__ = ("agent_id", "digest", "done", "info", "link", "policy", "pool", "requests_served")

    def __init__(
        self,
        info: TunnelInfo,
        digest: bytes,
        link: Link,
        policy: VisitorPolicy | None = None,
        *,
        pool: bool = False,
        agent_id: str = "",
    ) -> None:
        self.info = info
        self.digest = digest
        self.link = link
        #: Who may visit: what the agent asked the server to enforce.
        self.policy = policy or VisitorPolicy()
        #: The agent asked to share its host with other agents of its identity.
        self.pool = pool
        #: The agent process's own random id ("" if it sent none): a newer
        #: connection from the same agent replaces this one, pool or not.
        self.agent_id = agent_id
        self.requests_served = 0
        #: Set once the session has ended and let go of everything it held.
        self.done = trio.Event()

    @property
    def host(self) -> str:
        return self.info.host

    @property
    def key(self) -> str:
        """The registry key: the host, or ``tcp:<port>`` for a TCP tunnel."""
        return self.info.key

    @property
    def available(self) -> bool:
        """Whether the session takes new requests now."""
        # Not before the agent's SETTINGS: a connection the agent has already
        # given up on never sends them, and must not be handed requests.
        link = self.link
        return link.ready and link.accepting

    def statistics(self) -> TunnelStatistics:
        link = self.link
        return TunnelStatistics(
            host=self.key,
            peer=self.info.peer,
            connected_since=self.info.connected_at,
            streams_in_flight=link.open_streams,
            requests_served=self.requests_served,
            bytes_received=link.bytes_received,
            bytes_sent=link.bytes_sent,
            rtt=link.rtt,
        )


class Registry:
    """Maps each claimed host to the agent sessions serving it.

    A host has one session, or several when agents of one identity asked to
    pool (``ClientConfig.pool``); a request goes to the least busy of them.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, list[AgentSession]] = {}
        self._gone: OrderedDict[str, float] = OrderedDict()
        self._arrivals: dict[str, trio.Event] = {}
        # Rotates the first pool member looked at, so that idle members
        # (all with no stream open) share the requests instead of the first
        # one taking them all.
        self._turn = 0
        #: Set when the server begins a graceful shutdown: sessions drain, no
        #: new agent is accepted and nobody waits for an agent to come back.
        self.shutting_down = trio.Event()
        #: Who holds which host in the other worker processes or cluster nodes.
        self.store: Store = LocalStore()
        #: In a cluster, the TCP ports this node listens on for other nodes.
        self.tcp_forwarders: TcpForwarders | None = None
        # Keys a handshake has claimed in the store (or is claiming) for a
        # session not registered yet: nothing may release them meanwhile.
        self._reserved: dict[str, int] = {}
        self._shutdown_scopes: set[trio.CancelScope] = set()
        #: Called with a key when its last session is released (the server
        #: drops what it kept for that tunnel, such as its rate limits).
        self.on_released: Callable[[str], None] | None = None
        #: How many nodes the cluster has now, told to every agent in its
        #: handshake (agents keep connections to that many distinct nodes, up
        #: to their ``ha_connections``). A server on its own is one node; a
        #: cluster's store counts the live nodes. Called once per accepted
        #: agent connection, so it must not block: it returns what the store
        #: last saw.
        self.node_count: Callable[[], int] = lambda: self.store.node_count()

    def nodes(self) -> int:
        """The cluster's node count for a handshake: :attr:`node_count`, at least 1."""
        count = self.node_count()
        return count if isinstance(count, int) and count > 1 else 1

    def begin_shutdown(self) -> None:
        """Set :attr:`shutting_down` and cancel every :meth:`cancelled_on_shutdown` scope."""
        self.shutting_down.set()
        for scope in self._shutdown_scopes:
            scope.cancel()

    @contextlib.contextmanager
    def cancelled_on_shutdown(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that the server's shutdown cancels (at once if it began)."""
        with trio.CancelScope() as scope:
            if self.shutting_down.is_set():
                scope.cancel()
            self._shutdown_scopes.add(scope)
            try:
                yield scope
            finally:
                self._shutdown_scopes.discard(scope)

    def lookup(self, host: str) -> AgentSession | None:
        """The session to serve a request for ``host`` now: the least busy available."""
        members = self._sessions.get(host)
        if members is None:
            return None
        if len(members) == 1:
            session = members[0]
            return session if session.available else None
        self._turn += 1
        count = len(members)
        best: AgentSession | None = None
        for index in range(count):
            session = members[(self._turn + index) % count]
            if session.available and (
                best is None or session.link.open_streams < best.link.open_streams
            ):
                best = session
        return best

    def knows(self, host: str) -> bool:
        """Whether ``host`` has (or recently had) an agent."""
        return host in self._sessions or host in self._gone

    async def wait_for(self, host: str, grace: float) -> AgentSession | None:
        """Wait up to ``grace`` seconds for an agent for ``host`` to (re)connect."""
        try:
            with trio.move_on_after(grace):
                while True:
                    session = self.lookup(host)
                    if session is not None:
                        return session
                    pending = next(
                        (
                            member
                            for member in self._sessions.get(host, ())
                            if member.link.closed_reason is None and not member.link.ready
                        ),
                        None,
                    )
                    if pending is not None:
                        # Just connected: ready (or gone) within a round trip.
                        await pending.link.wait_peer_settings()
                        continue
                    arrival = self._arrivals.get(host)
                    if arrival is None:
                        arrival = self._arrivals[host] = trio.Event()
                    await arrival.wait()
        finally:
            arrival = self._arrivals.get(host)
            if arrival is not None and not arrival.statistics().tasks_waiting:
                # Nobody waits for this host any more; an agent that never comes
                # back must not leave its event behind.
                del self._arrivals[host]
        return None

    async def find_another(self, host: str, grace: float) -> AgentSession | None:
        """A session for a request another session refused unread.

        Another one available now (a pool member), else the agent's new
        connection if it arrives within ``grace`` seconds; never waits on a
        server that is going away, where no agent comes back.
        """
        session = self.lookup(host)
        if session is None and not self.shutting_down.is_set():
            session = await self.wait_for(host, grace)
        return session

    def check_claim(self, key: str, digest: bytes) -> list[AgentSession]:
        """Raise HostInUse if another identity holds ``key`` here; return its sessions.

        Only this process's sessions: the handshake has asked :attr:`store`
        about the other processes and nodes (and recorded the claim there).
        """
        current = self._sessions.get(key, [])
        if current and current[0].digest != digest:
            raise HostInUse(key)
        return list(current)

    def claim(self, session: AgentSession, limit: int | None = None) -> list[AgentSession]:
        """Make ``session`` serve its host; return the sessions it replaced.

        A new connection with the same identity replaces the old ones at once,
        so a reconnecting agent never waits for its stale session to time out;
        unless the new one and all the old ones asked to pool, when it joins
        them. A connection from an agent (``agent_id``) already there always
        replaces that agent's old connection: it is the same agent, back.

        Raises:
            HostInUse: Another identity holds the host, or this identity holds
                ``limit`` tunnels already (checked here, with no await since
                the handshake's check, so concurrent handshakes cannot race it).
        """
        current = self.check_claim(session.key, session.digest)
        if not current and limit is not None and self.count(session.digest) >= limit:
            raise HostInUse(f"{session.key}: limit of {limit} tunnels reached")
        if session.pool and all(member.pool for member in current):
            replaced = [
                member
                for member in current
                if session.agent_id and member.agent_id == session.agent_id
            ]
        else:
            replaced = current
        self._sessions[session.key] = [m for m in current if m not in replaced] + [session]
        self._gone.pop(session.key, None)
        arrival = self._arrivals.pop(session.key, None)
        if arrival is not None:
            arrival.set()
        return replaced

    def release(self, session: AgentSession) -> None:
        """Forget ``session``; a host left with no session is remembered as recently served."""
        members = self._sessions.get(session.key)
        if members is None or session not in members:
            return
        if len(members) > 1:
            self._sessions[session.key] = [m for m in members if m is not session]
            return
        del self._sessions[session.key]
        if session.key not in self._reserved:
            # Else a handshake for it is under way; it releases it if refused.
            self.store.release(session.key)
        if self.on_released is not None:
            self.on_released(session.key)
        self._gone[session.key] = time.time()
        self._gone.move_to_end(session.key)
        while len(self._gone) > MAX_REMEMBERED_HOSTS:
            self._gone.popitem(last=False)

    def holdings(self) -> dict[str, bytes]:
        """Each key this process serves, with its owner's digest (for the store)."""
        return {key: members[0].digest for key, members in self._sessions.items()}

    def let_go(self, key: str, reason: str) -> None:
        """Close every session of ``key`` (the store gave it to another identity)."""
        for session in self._sessions.get(key, ()):
            session.link.close(reason)

    def count(self, digest: bytes) -> int:
        """How many tunnels (hosts and TCP ports) the identity ``digest`` holds now."""
        return sum(1 for members in self._sessions.values() if members[0].digest == digest)

    def holds(self, key: str) -> bool:
        """Whether a session holds ``key`` now."""
        return key in self._sessions

    def claimed(self, key: str) -> bool:
        """Whether a session holds ``key``, or a handshake is claiming it: the store keeps it."""
        return key in self._sessions or key in self._reserved

    def reserve(self, key: str) -> None:
        """A handshake claims ``key`` in the store; :meth:`unreserve` once it is over."""
        self._reserved[key] = self._reserved.get(key, 0) + 1

    def unreserve(self, key: str) -> None:
        """A handshake that claimed ``key`` is over: its session holds it, or it was refused.

        The store lets go of ``key`` if nothing here holds or claims it any more.
        """
        left = self._reserved.get(key, 0) - 1
        if left > 0:
            self._reserved[key] = left
            return
        self._reserved.pop(key, None)
        if key not in self._sessions:
            self.store.release(key)

    def sessions(self) -> list[AgentSession]:
        """The sessions serving hosts now (a pool's members one by one)."""
        return [session for members in self._sessions.values() for session in members]

    def sessions_of(self, key: str) -> list[AgentSession]:
        """The sessions serving ``key`` now."""
        return list(self._sessions.get(key, ()))

    def statistics(self) -> list[TunnelStatistics]:
        """A snapshot of every active tunnel's sessions, sorted by host."""
        return [
            session.statistics()
            for host in sorted(self._sessions)
            for session in self._sessions[host]
        ]
