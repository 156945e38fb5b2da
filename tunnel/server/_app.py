"""The ASGI app: routes each connection to the control endpoint, a tunnel, or a fallback."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict
from functools import partial
from typing import Any, Final
from urllib.parse import unquote

import trio
from prometheus_client import CollectorRegistry

from .._asgi import ASGIApp, Receive, Scope, Send
from .._compat import warn_fixes_off
from .._config import ServerConfig
from .._exceptions import StoreUnavailableError
from .._protocol.handshake import CHALLENGE_HEADER, CHALLENGE_SUFFIX, SUBPROTOCOL
from .._protocol.headers import Headers, header_value
from .._protocol.hosts import TargetError, host_from_authority, in_domain, origin_form
from .._protocol.peer import PEER_PATH_SUFFIX, PEER_SUBPROTOCOL
from .._settings import for_cli, server_setting
from .._transport.masking import use_fast_masking
from ._access import AccessControl
from ._admin import AdminAPI, describe_tunnel, disconnect_session
from ._control import serve_agent
from ._ingress import forward_visitor_http
from ._ingress_ws import forward_visitor_websocket
from ._limits import Limiter, Pacer
from ._metrics import ServerMetrics
from ._pages import refuse_websocket, send_error_page
from ._peer_serve import NonceLedger, serve_peer
from ._peers import Locate, Peers, PeerSession, no_other_nodes
from ._redis_store import RedisStore, open_store
from ._registry import AgentSession, Registry, Session, TunnelStatistics
from ._tcp import TcpForwarders, serve_forwarded_tcp
from ._telemetry import Telemetry, log_event
from ._worker_id import node_id
from .hypercorn._guard import install_hypercorn_guard
from .hypercorn._patches import apply_hypercorn_patches

__all__ = ["ASGIApp", "TunnelApp"]

logger = logging.getLogger("tunnel.server")


#: Seconds a node remembers which other nodes serve a host (and that none does).
LOCATE_FOR: Final = 1.0
NOT_LOCATED_FOR: Final = 0.5
#: Hosts whose nodes are remembered at once; the least recent go first.
MAX_LOCATED: Final = 10_000

_CHALLENGE_HEADER = CHALLENGE_HEADER.encode()
_AGENT_PROTOCOL = SUBPROTOCOL.encode()


class TunnelApp:
    """The tunnel server as an ASGI 3 application, for Hypercorn's trio worker.

    Agents connect with a WebSocket to ``config.control_path`` (on any host);
    every other request is routed by its ``Host`` header to the agent that
    claimed that host.

    Args:
        config: The server's settings. ``address``, ``certificate`` and ``key``
            are used only by :func:`tunnel.serve`; when you run the app under
            your own Hypercorn, its settings decide those.
        fallback: An ASGI app for requests to hosts no agent has claimed
            (instead of a 404 page). It also receives the lifespan events.
        locate: For a node of a cluster: ``await locate(key)`` names the other
            nodes that hold an agent for ``key`` (a host, or ``tcp:<port>``),
            as ``(node_id, peer_address)`` pairs (see :attr:`locate`).

    Example:
        In ``mytunnel.py``, run with
        ``hypercorn --worker-class trio mytunnel:app``::

            import tunnel

            app = tunnel.TunnelApp(tunnel.ServerConfig(tokens=frozenset({"s3cret"})))
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        fallback: ASGIApp | None = None,
        locate: Locate | None = None,
    ):
        # Here, not only in serve(): under the ``hypercorn`` command the app is
        # all of ours that runs, and it is imported before any connection.
        install_hypercorn_guard()
        apply_hypercorn_patches()
        warn_fixes_off()
        # Hypercorn unmasks every byte agents send through wsproto; see masking.py.
        use_fast_masking()
        self.config = config if config is not None else ServerConfig()
        self.fallback = fallback
        self.registry = Registry()
        self.access = AccessControl(self.config)
        self.limiter = Limiter(self.config)
        self.registry.on_released = self.limiter.forget
        self._metrics = ServerMetrics(
            self.registry, node_id(self.config) if self.config.store is not None else None
        )
        self._telemetry = Telemetry(self.config, self._metrics)
        self._admin: AdminAPI | None = None
        if self.config.admin_token is not None:
            self._admin = AdminAPI(self.config, self.registry, self._metrics)
            hosts = ",".join(sorted(self._admin.hosts))
            log_event(logger, "admin_api", path=self._admin.prefix, hosts=hosts)
        self._challenge_path = self.config.control_path + CHALLENGE_SUFFIX
        #: Finds a host's agents in the cluster. ``await locate(key)`` gives
        #: ``(node_id, peer_address)`` for each node holding an agent for ``key``.
        #: A visitor whose host has no agent here is carried to the first of
        #: those this node reaches (needs ``config.cluster_secret``). The
        #: default knows no other nodes. Exceptions it raises answer the
        #: visitor 502 (the cluster's state is unavailable).
        self.locate: Locate = locate if locate is not None else no_other_nodes
        #: The links to the other nodes; they live in the lifespan's task.
        self.peers = Peers(self.config)
        self._peer_path = self.config.control_path + PEER_PATH_SUFFIX
        self._nonces = NonceLedger()
        self._told_inactive = False
        # What the store said of each key lately: (until when, the nodes).
        self._located: OrderedDict[str, tuple[float, list[tuple[str, str]]]] = OrderedDict()
        #: Where the other nodes of a cluster reach this one (see :meth:`listening_on`).
        self.peer_address = self.config.peer_address
        # When this worker began: a worker of several that has just started
        # (or restarted) knows no agent yet, while its siblings serve them.
        self._started = time.monotonic()
        if self.access.open:
            hook = "" if for_cli() else f", or an auth hook ({server_setting('auth')})"
            logger.warning(
                "tunnel server has no tokens, keys or auth hook: ANYONE can open a tunnel; "
                f"give tokens ({server_setting('tokens')} or {server_setting('tokens_file')}) "
                f"or keys ({server_setting('authorized_keys_file')}){hook}"
            )

    def statistics(self) -> list[TunnelStatistics]:
        """A snapshot of every active tunnel, sorted by host."""
        return self.registry.statistics()

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """This server's Prometheus metrics, to serve wherever you like.

        Each app has a registry of its own, not prometheus-client's global one.
        :func:`tunnel.serve` serves it at ``ServerConfig.metrics_address``, and
        the admin API at ``<control_path>/admin/metrics``; under your own
        Hypercorn, mount ``prometheus_client.make_asgi_app(app.metrics_registry)``.
        """
        return self._metrics.collectors

    def begin_shutdown(self) -> None:
        """Start a graceful shutdown; returns at once.

        New agents are refused (503, so they retry), requests for a host no
        longer wait for its agent, every agent stops getting new requests, and
        once its requests in flight have finished (or ``graceful_timeout`` has
        passed) it is sent GOAWAY and reconnects, to the restarted server.

        :func:`tunnel.serve` calls this when its ``shutdown_trigger`` returns;
        call it from your own trigger when you run the app under Hypercorn
        yourself, since the ASGI lifespan shutdown only comes after Hypercorn
        has waited out its graceful timeout.
        """
        self.registry.begin_shutdown()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "lifespan" and not scope["path"].startswith("/"):
            refusal = _to_origin_form(scope)
            if refusal is not None:
                if kind == "http":
                    await send_error_page(send, 400, refusal)
                else:
                    await receive()  # websocket.connect
                    await refuse_websocket(scope, send, 400, refusal)
                return
        if kind == "http":
            if self._admin is not None and self._admin.claims(scope):
                # Before any routing: the admin token never reaches an agent.
                await self._admin(scope, receive, send)
            else:
                await self._telemetry.http(self._http, scope, receive, send)
        elif kind == "websocket":
            await self._telemetry.websocket(self._websocket, scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)

    async def _find(self, host: str) -> AgentSession | PeerSession | tuple[int, str] | None:
        """The session for ``host``; else the refusal to give, or None for the fallback.

        An agent of this node first; else another node that holds one; else
        this node's own rules (wait for a reconnecting agent, 404, 502).
        """
        registry = self.registry
        session = registry.lookup(host)
        if session is not None:
            return session
        elsewhere = await self._on_other_node(host)
        if elsewhere is not None:
            return elsewhere
        if registry.knows(host) and registry.shutting_down.is_set():
            # The agent cannot come back to a server that is going away.
            return 503, f"This server is shutting down; {host} will be back shortly."
        if registry.knows(host):
            # Its agent is reconnecting (or draining): wait for it a little.
            session = await registry.wait_for(host, self.config.grace_period)
            if session is not None:
                return session
            return (
                502,
                f"The agent for {host} is offline; it did not reconnect within "
                f"{self.config.grace_period:g} seconds.",
            )
        if self._may_be_elsewhere(host):
            # The agents of a server with several workers find a new worker
            # within moments; until then its visitors wait for them rather than
            # get a 404 that another worker would not have given.
            left = self._started + self.config.grace_period - time.monotonic()
            if left > 0:
                session = await registry.wait_for(host, left)
                if session is not None:
                    return session
        if self.fallback is not None:
            return None
        return 404, f"No tunnel is serving {host or 'this host'} on this server."

    async def _on_other_node(self, host: str) -> PeerSession | tuple[int, str] | None:
        """A session on another node that holds an agent for ``host``, or the refusal.

        None when no other node holds one (or this node is in no cluster).
        """
        peers = self.peers
        # Also while this node shuts down: its links outlive its visitors'
        # connections (they live in the lifespan), and the other node is not
        # going away.
        if not host:
            return None
        if not peers.active:
            if self.locate is not no_other_nodes and not self._told_inactive:
                self._told_inactive = True
                logger.warning(
                    "this node cannot carry visitors to other nodes: %s",
                    f"give it {server_setting('cluster_secret')}"
                    if self.config.cluster_secret is None
                    else "its links live in the ASGI lifespan, which the server has not run",
                )
            return None
        deadline = trio.current_time() + self.config.grace_period
        located = False
        try:
            with trio.move_on_at(deadline):
                nodes = [
                    (node, address)
                    for node, address in await self.locate(host)
                    if node != peers.node_id
                ]
                located = True
                if not nodes:
                    return None
                session = await peers.session(host, nodes, deadline)
                if session is not None:
                    return session
        except Exception as exc:
            log_event(logger, "locate_failed", logging.WARNING, host=host, reason=repr(exc))
            located = False
        if not located:
            return (
                502,
                f"The cluster's state is unavailable, so this node cannot tell which node "
                f"serves {host}; try again shortly.",
            )
        return (
            502,
            f"The agent for {host} is on another node of this cluster, which this node "
            "cannot reach now; try again shortly.",
        )

    async def serve_tcp_port(
        self, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve public TCP ``port`` on this node for a TCP tunnel held by another node.

        Each visitor's connection is carried to a node that :attr:`locate`
        names for ``tcp:<port>`` (or to an agent of this node's, if one holds
        the port here meanwhile), and closed when none can take it. Runs until
        cancelled; ``task_status.started()`` once it listens.

        Raises:
            OSError: The port cannot be bound on ``config.tcp_listen_host``.
        """
        await serve_forwarded_tcp(self.config, self._find_another, port, task_status=task_status)

    async def _find_another(self, host: str) -> Session | None:
        """A session for a request the one tried refused unread (``_ingress.py``)."""
        session: Session | None = self.registry.lookup(host)
        if session is None:
            found = await self._on_other_node(host)
            session = found if isinstance(found, PeerSession) else None
        if session is None:
            session = await self.registry.find_another(host, self.config.grace_period)
        return session

    def _may_be_elsewhere(self, host: str) -> bool:
        """Whether an unknown ``host`` may have an agent this worker has not seen yet."""
        config = self.config
        if config.workers == 1 or not host or self.registry.shutting_down.is_set():
            return False
        if config.domain is not None:
            # Only names agents may claim; the operator's own site (the
            # domain itself, a fallback's other hosts) answers at once.
            return host != config.domain and in_domain(host, config.domain)
        # Without a domain any name might be a tunnel's, but a fallback app
        # serves the unknown ones, and must not wait for a tunnel that isn't.
        return self.fallback is None

    def _admit(
        self, scope: Scope, session: Session
    ) -> tuple[tuple[int, str, Headers] | None, Pacer | None]:
        """Whether this visitor may use ``session`` (the checks this process makes).

        Returns:
            The refusal (status, message, headers) if it may not, and the pacer
            for its transfers if bandwidth limits apply.
        """
        client = scope.get("client")
        visitor = client[0] if client else None
        policy = session.policy
        if policy.restricts:
            refusal = policy.refusal(visitor, header_value(scope["headers"], b"authorization"))
            if refusal is not None:
                status, message = refusal
                challenge = [(b"www-authenticate", b'Basic realm="tunnel", charset="UTF-8"')]
                return (status, message, challenge if status == 401 else []), None
        if self.limiter.active:
            # A cluster counts request rates in its store (see _admit_shared).
            retry_after, pacer = self.limiter.admit(
                session.key, visitor, requests=not self.registry.store.clustered
            )
            if retry_after:
                return _too_many(session, retry_after), None
            return None, pacer
        return None, None

    async def _admit_shared(
        self, scope: Scope, session: Session
    ) -> tuple[int, str, Headers] | None:
        """The refusal of a request over a cluster-wide request rate, if it is."""
        client = scope.get("client")
        visitor = client[0] if client else None
        store = self.registry.store
        wait = 0.0
        for prefix, limit in self.limiter.shared:
            name = session.key if prefix == "tunnel:" else visitor
            if name is None:
                continue
            taken = await store.take(prefix + name, limit)
            if taken is None:
                # The store is unreachable: each node counts on its own meanwhile.
                retry_after, _ = self.limiter.admit(session.key, visitor)
                return _too_many(session, retry_after) if retry_after else None
            wait = max(wait, taken)
        return _too_many(session, max(1, math.ceil(wait))) if wait > 0 else None

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == self._challenge_path and (
            header_value(scope["headers"], _CHALLENGE_HEADER) == _AGENT_PROTOCOL
        ):
            await self._challenge(send)
            return
        # Counted as HTTP/2 counts a header list (32 bytes per field on top),
        # so no visitor can send the agent a list larger than it accepts.
        size = sum(len(key) + len(value) + 32 for key, value in scope["headers"])
        if size > self.config.max_header_bytes:
            await send_error_page(
                send,
                431,
                f"The request's headers ({size} bytes) are larger than the "
                f"{self.config.max_header_bytes} bytes this server accepts.",
            )
            return
        host = _host_of(scope)
        found = await self._find(host)
        if isinstance(found, AgentSession | PeerSession):
            refusal, pacer = self._admit(scope, found)
            if refusal is None and self.registry.store.clustered and self.limiter.shared:
                refusal = await self._admit_shared(scope, found)
            if refusal is not None:
                await send_error_page(send, *refusal)
                return
            reroute = partial(self._find_another, host)
            await forward_visitor_http(self.config, found, scope, receive, send, pacer, reroute)
        elif found is None:
            assert self.fallback is not None
            await self.fallback(scope, receive, send)
        else:
            await send_error_page(send, *found)

    async def _challenge(self, send: Send) -> None:
        if not self.access.keys_enabled:
            await send_error_page(send, 404, "This server does not accept public keys.")
            return
        body = self.access.new_challenge().encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == self.config.control_path:
            await serve_agent(self.config, self.access, self.registry, scope, receive, send)
            return
        if scope["path"] == self._peer_path and PEER_SUBPROTOCOL in (
            scope.get("subprotocols") or ()
        ):
            # Another node of the cluster. Without the subprotocol the path is
            # a tunnel's like any other.
            await serve_peer(self.config, self.registry, self._nonces, scope, receive, send)
            return
        found = await self._find(_host_of(scope))
        if isinstance(found, AgentSession | PeerSession):
            refusal, _ = self._admit(scope, found)
            if refusal is None and self.registry.store.clustered and self.limiter.shared:
                refusal = await self._admit_shared(scope, found)
            if refusal is not None:
                await receive()  # websocket.connect
                await refuse_websocket(scope, send, refusal[0], refusal[1])
                return
            await forward_visitor_websocket(self.config, found, scope, receive, send)
        elif found is None:
            assert self.fallback is not None
            await self.fallback(scope, receive, send)
        else:
            await receive()  # websocket.connect
            await refuse_websocket(scope, send, *found)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The lifespan task lives as long as the server: the cluster's store
        # (whose Redis client this task opens and closes, as coredis asks)
        # and the links to the other nodes live in it, and close when it ends.
        async with contextlib.AsyncExitStack() as stack:
            store = None
            if self.config.store is not None:
                try:
                    store = await stack.enter_async_context(
                        open_store(self.config, self.peer_address)
                    )
                except Exception as exc:
                    # Any failure (Redis unreachable, coredis missing, a bad
                    # TLS file) fails the start: a node serving without its
                    # cluster would give hosts away that others hold.
                    message = str(exc) or type(exc).__name__
                    logger.error("tunnel server: %s", message)
                    await receive()  # lifespan.startup
                    await send({"type": "lifespan.startup.failed", "message": message})
                    return
                self.registry.store = store
                if self.locate is no_other_nodes:
                    self.locate = self._locate_in_store
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.peers.serve)
                    if store is not None:
                        if self.config.tcp_ports is not None:
                            # A TCP tunnel's port is bound on every node.
                            forwarders = TcpForwarders(self.config, self._find_another)
                            await nursery.start(forwarders.run)
                            self.registry.tcp_forwarders = forwarders
                        await nursery.start(store.run, _Holder(self))
                        with contextlib.suppress(StoreUnavailableError):
                            peers = [node for node in await store.nodes() if node != store.node]
                            log_event(
                                logger,
                                "cluster_node",
                                node=store.node,
                                address=store.address,
                                store=store.url,
                                peers=",".join(peers) or "none yet",
                            )
                    await self._lifespan_events(scope, receive, send)
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # A fallback's own lifespan error reaches Hypercorn as itself.
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise

    def listening_on(self, address: str) -> None:
        """Tell the app the ``host:port`` it is served on (:func:`tunnel.serve` does).

        Without ``ServerConfig.node_address``, that is where the other nodes of
        a cluster reach this one; the port bound for port 0 is known only now.
        """
        if self.config.node_address is not None:
            return
        # The host as configured (a wildcard made the machine's name), the
        # port as bound.
        host = self.config.peer_address.rsplit(":", 1)[0]
        address = f"{host}:{address.rsplit(':', 1)[1]}"
        if address == self.peer_address:
            return
        self.peer_address = address
        store = self.registry.store
        if isinstance(store, RedisStore):
            store.move_to(address)

    async def _locate_in_store(self, key: str) -> list[tuple[str, str]]:
        """The other nodes that serve ``key``, as the cluster's store knows them.

        Remembered for a moment (:data:`LOCATE_FOR`, :data:`NOT_LOCATED_FOR`):
        a round trip to Redis for every forwarded request would cost more than
        the forwarding itself, and which nodes hold a host rarely changes.
        """
        now = trio.current_time()
        known = self._located.get(key)
        if known is not None and known[0] > now:
            return known[1]
        found = [(member.node, member.address) for member in await self.registry.store.holders(key)]
        self._located[key] = (now + (LOCATE_FOR if found else NOT_LOCATED_FOR), found)
        self._located.move_to_end(key)
        while len(self._located) > MAX_LOCATED:
            self._located.popitem(last=False)
        return found

    async def _lifespan_events(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fallback is not None:
            await self.fallback(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # Sessions still up (under a server that shuts down through
                # lifespan alone) drain in their own tasks.
                self.begin_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


class _Holder:
    """What the cluster's store asks of this process (``_store.Holder``)."""

    def __init__(self, app: TunnelApp) -> None:
        self.registry = app.registry
        self.node = node_id(app.config)
        self.holdings = self.registry.holdings
        # What a handshake is claiming counts as held: its release would undo it.
        self.holds = self.registry.claimed

    def lost(self, key: str) -> None:
        self.registry.let_go(
            key, f"{key} was given to another agent while this node could not reach the cluster"
        )

    def tunnels(self) -> list[dict[str, Any]]:
        return [describe_tunnel(stats, self.node) for stats in self.registry.statistics()]

    def forward_tcp(self, keys: list[str]) -> None:
        forwarders = self.registry.tcp_forwarders
        if forwarders is not None:
            registry = self.registry
            forwarders.sync({int(key[4:]) for key in keys if not registry.claimed(key)})

    async def disconnect(self, key: str, reason: str, reconnect: bool) -> None:
        async with trio.open_nursery() as nursery:
            for session in self.registry.sessions_of(key):
                nursery.start_soon(
                    partial(
                        disconnect_session, session, reason, reconnect=reconnect, by="another node"
                    )
                )


def _too_many(session: Session, retry_after: int) -> tuple[int, str, Headers]:
    message = f"Too many requests for {session.host}; try again in {retry_after} s."
    return 429, message, [(b"retry-after", str(retry_after).encode())]


def _to_origin_form(scope: Scope) -> str | None:
    """Rewrite ``scope``'s target to origin-form, before any routing; else why not."""
    host = (header_value(scope["headers"], b"host") or b"").decode("latin-1")
    try:
        target = scope.get("raw_path") or scope["path"].encode("latin-1")
        raw_path = origin_form(target, scope.get("method", "GET"), host)
    except TargetError as exc:
        return str(exc)
    scope["raw_path"] = raw_path
    # As Hypercorn derives ``path`` from the target (http_stream.py).
    scope["path"] = unquote(raw_path.decode("ascii"))
    return None


def _host_of(scope: Scope) -> str:
    return host_from_authority((header_value(scope["headers"], b"host") or b"").decode("latin-1"))
