"""The control endpoint: an agent's WebSocket handshake, then its HTTP/2 session.

Checks run cheapest first (protocol version, token, host name, domain, the
auth hook, the host claim, the connection callback); the first that fails
answers with an HTTP status and a plain-text reason the agent shows its user.
"""

from __future__ import annotations

import inspect
import logging
import time

import trio

from .._asgi import Receive, Scope, Send
from .._config import ServerConfig
from .._config.hooks import ConnectRequest, TunnelInfo
from .._exceptions import ConfigError, StoreUnavailableError
from .._protocol.handshake import (
    AGENT_ID_HEADER,
    DUPLICATE_STATUS,
    HAVE_NODES_HEADER,
    HAVE_WORKERS_HEADER,
    HOST_HEADER,
    KEY_HEADER,
    NODE_HEADER,
    NODES_HEADER,
    NONCE_HEADER,
    POOL_HEADER,
    REPLACED_CLOSE_CODE,
    SIGNATURE_HEADER,
    SUBPROTOCOL,
    SUBPROTOCOL_PREFIX,
    TCP_PORT_HEADER,
    WANT_NODE_HEADER,
    WORKER_HEADER,
    WORKERS_HEADER,
    bearer_token,
)
from .._protocol.hosts import host_from_authority, in_domain, normalize_host
from .._protocol.policy import ALLOW_HEADER, BASIC_AUTH_HEADER, DENY_HEADER, VisitorPolicy
from .._transport import ABNORMAL_CLOSURE, MessageTransport
from .._transport.asgi import ASGIWebSocketTransport
from .._transport.stream import StreamWebSocketTransport
from ..link import Link
from ._access import AccessControl, Denied, Identity
from ._pages import refuse_websocket
from ._registry import AgentSession, HostInUse, Registry
from ._store import Claim
from ._tcp import bind_tcp_port, serve_tcp
from ._telemetry import claimed_host, log_event, peer_text
from ._worker_id import node_id, worker_id
from .hypercorn._takeover import take_over_websocket

__all__ = ["serve_agent"]

logger = logging.getLogger("tunnel.server")

#: Seconds an agent refused for want of the cluster's store is told to wait.
STORE_RETRY_AFTER = 5


async def serve_agent(
    config: ServerConfig,
    access: AccessControl,
    registry: Registry,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """Handle one agent connection from handshake to close."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    peer = tuple(scope["client"]) if scope.get("client") else None
    # The keys this handshake claims in the store, held (``Registry.reserve``)
    # until the session holds them or the agent is refused, however it ends.
    reserved: list[str] = []
    try:
        await _serve_agent(config, access, registry, scope, receive, send, peer, reserved)
    finally:
        for key in reserved:
            registry.unreserve(key)


async def _serve_agent(
    config: ServerConfig,
    access: AccessControl,
    registry: Registry,
    scope: Scope,
    receive: Receive,
    send: Send,
    peer: tuple[str, int] | None,
    reserved: list[str],
) -> None:
    listeners: list[trio.SocketListener] = []
    try:
        if registry.shutting_down.is_set():
            # 503, not a permanent refusal: the agent retries, and finds the
            # restarted server.
            raise Denied(503, "the server is shutting down; try again shortly")
        with trio.fail_after(config.handshake_timeout):
            request, identity, policy = await _check(
                config, access, registry, scope, peer, reserved
            )
            port = None
            if request.tcp_port is not None:
                listeners, port = await _bind_and_reserve(
                    config, registry, request.tcp_port, identity, reserved
                )
            info = TunnelInfo(request.host, request.peer, time.time(), request, port)
            if config.callbacks.on_connection is not None:
                try:
                    await config.callbacks.on_connection(info)
                except Exception as exc:
                    raise Denied(403, str(exc) or type(exc).__name__) from None
    except (trio.TooSlowError, Denied) as exc:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        if isinstance(exc, trio.TooSlowError):
            exc = Denied(503, "the server's auth hook or callback took too long")
        log_event(
            logger,
            "agent_refused",
            # An agent's probe for a worker it lacks is routine, not news.
            logging.DEBUG if exc.status == DUPLICATE_STATUS else logging.INFO,
            peer=peer_text(peer),
            claimed=claimed_host(scope),
            status=exc.status,
            reason=exc.reason,
        )
        headers = [] if exc.retry_after is None else [(b"retry-after", b"%d" % exc.retry_after)]
        if exc.status == DUPLICATE_STATUS:
            # A refusal as "not here" tells the cluster's size too: an agent
            # searching for a node that has left learns to stop searching.
            headers.append((NODES_HEADER.encode(), str(registry.nodes()).encode()))
        await refuse_websocket(scope, send, exc.status, exc.reason, headers)
        return

    accept_headers = [
        (HOST_HEADER.encode(), request.host.encode()),
        (WORKER_HEADER.encode(), worker_id().encode()),
        (WORKERS_HEADER.encode(), str(config.workers).encode()),
        (NODE_HEADER.encode(), node_id(config).encode()),
        (NODES_HEADER.encode(), str(registry.nodes()).encode()),
    ]
    if port is not None:
        accept_headers.append((TCP_PORT_HEADER.encode(), str(port).encode()))
    taken = await take_over_websocket(scope, SUBPROTOCOL, accept_headers)
    try:
        # Taken over, Hypercorn ignores this; the telemetry counts the handshake.
        await send(
            {"type": "websocket.accept", "subprotocol": SUBPROTOCOL, "headers": accept_headers}
        )
        transport: MessageTransport
        if taken is None:
            transport = ASGIWebSocketTransport(receive, send)
        else:
            transport = StreamWebSocketTransport(taken.stream, max_message=taken.max_message)
        await _serve_session(
            config, registry, request, identity, policy, info, listeners, peer, transport
        )
    finally:
        if taken is not None:
            taken.release()


async def _serve_session(
    config: ServerConfig,
    registry: Registry,
    request: ConnectRequest,
    identity: Identity,
    policy: VisitorPolicy,
    info: TunnelInfo,
    listeners: list[trio.SocketListener],
    peer: tuple[str, int] | None,
    transport: MessageTransport,
) -> None:
    """Run an accepted agent's link and session until it ends."""
    link = Link.opener(
        transport,
        keepalive_interval=config.keepalive_interval,
        keepalive_timeout=config.keepalive_timeout,
    )
    session = AgentSession(
        info,
        identity.digest,
        link,
        policy,
        pool=request.pool,
        agent_id=request.header(AGENT_ID_HEADER) or "",
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            if registry.holds(session.key):
                # Taking over is for a live agent only. A connection its agent
                # already gave up on (its handshake held up in the network) may
                # arrive after the one it uses now; it must not take the host
                # from it. A live agent sends its SETTINGS at once.
                alive = False
                with trio.move_on_after(config.handshake_timeout):
                    alive = await link.wait_peer_settings()
                if not alive:
                    link.close("the agent did not start HTTP/2", ABNORMAL_CLOSURE)
                    return
            try:
                replaced = registry.claim(session, config.max_tunnels_per_identity)
            except HostInUse as exc:
                # Another token claimed the host, or this identity reached its
                # limit, between our check and now.
                link.close(f"refused: {exc}")
                await transport.aclose(4409, f"refused: {exc}")
                return
            for old in replaced:
                if not old.link.accepting:
                    # Draining (its agent leaving, as in a rolling restart): it
                    # finishes its requests in flight and takes no new ones.
                    continue
                if session.agent_id and old.agent_id == session.agent_id:
                    # The same agent, back after losing that connection: the
                    # old one is stale, and nobody must be told to stop.
                    old.link.close(f"replaced by the agent's newer connection for {session.key}")
                else:
                    old.link.close(
                        f"replaced by a newer connection for {session.key}", REPLACED_CLOSE_CODE
                    )
            if listeners:
                await nursery.start(serve_tcp, config, session, listeners)
                listeners = []  # serve_tcp owns (and closes) them now
            log_event(
                logger,
                "agent_connected",
                tunnel=session.key,
                peer=peer_text(peer),
                identity=identity.label,
                # "direct" when the server reads the agent's socket itself
                # (hypercorn/_takeover.py), "asgi" through Hypercorn's WebSocket.
                transport="direct" if isinstance(transport, StreamWebSocketTransport) else "asgi",
            )
            # The TCP listeners serve until the agent's connection ends. The
            # server's shutdown is waited for in this same task: a task per
            # agent only for that is memory held for every idle agent.
            with registry.cancelled_on_shutdown():
                await link.wait_closed()
            if registry.shutting_down.is_set():
                # New requests stop at once, requests in flight get the graceful
                # timeout, then GOAWAY sends the agent off to reconnect (to the
                # restarted server); the connection is closed when it returns.
                await link.drain(config.graceful_timeout)
            nursery.cancel_scope.cancel()
    finally:
        for listener in listeners:
            # Closed synchronously: when the session is being cancelled, an
            # await here raises Cancelled after the first listener, leaking
            # the others and skipping the release below.
            listener.socket.close()
        registry.release(session)
        session.done.set()
        log_event(
            logger,
            "agent_disconnected",
            tunnel=session.key,
            peer=peer_text(peer),
            duration=time.time() - info.connected_at,
            reason=link.closed_reason or "closed",
        )
        if config.callbacks.on_disconnection is not None:
            with trio.move_on_after(config.handshake_timeout) as scope_:
                scope_.shield = True
                try:
                    await config.callbacks.on_disconnection(info)
                except Exception:
                    logger.exception("on_disconnection callback failed for %s", request.host)


#: The header names agents send, one string each for all sessions: every
#: session keeps its handshake's headers (``ConnectRequest.headers``), and its
#: own copies of the same dozen names add up over thousands of idle agents.
_NAMES = {
    name: name
    for name in (
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "authorization",
        "user-agent",
        HOST_HEADER,
        AGENT_ID_HEADER,
        HAVE_WORKERS_HEADER,
        HAVE_NODES_HEADER,
        WANT_NODE_HEADER,
        POOL_HEADER,
        TCP_PORT_HEADER,
        KEY_HEADER,
        NONCE_HEADER,
        SIGNATURE_HEADER,
        ALLOW_HEADER,
        BASIC_AUTH_HEADER,
        DENY_HEADER,
    )
}


#: And the values that are the same in every agent's handshake.
_VALUES = {value: value for value in ("websocket", "Upgrade", "upgrade", "13", "1", SUBPROTOCOL)}


def _name(name: str) -> str:
    return _NAMES.get(name, name)


def _value(value: str) -> str:
    return _VALUES.get(value, value)


def _refuse_duplicate(config: ServerConfig, values: dict[str, str]) -> None:
    """Refuse, before anything costs a thing, a connection the agent does not want here.

    A worker or node it holds already, or a node other than the one it asked
    for: it tries again, to land elsewhere (see ``tunnel._protocol.handshake``).
    This comes before the token is checked, so the reasons name no node.
    """
    held = values.get(HAVE_WORKERS_HEADER, "")
    if held and worker_id() in {part.strip() for part in held.split(",")}:
        raise Denied(
            DUPLICATE_STATUS,
            "this agent is connected to this server worker already; "
            "it tries again to reach the others",
        )
    if HAVE_NODES_HEADER not in values and WANT_NODE_HEADER not in values:
        return
    node = node_id(config)
    held = values.get(HAVE_NODES_HEADER, "")
    if held and node in {part.strip() for part in held.split(",")}:
        raise Denied(
            DUPLICATE_STATUS,
            "this agent is connected to this node already; it tries again to reach another",
        )
    wanted = values.get(WANT_NODE_HEADER, "").strip()
    if wanted and wanted != node:
        raise Denied(
            DUPLICATE_STATUS,
            "this connection is meant for another node; the agent tries again",
        )


async def _check(
    config: ServerConfig,
    access: AccessControl,
    registry: Registry,
    scope: Scope,
    peer: tuple[str, int] | None,
    reserved: list[str],
) -> tuple[ConnectRequest, Identity, VisitorPolicy]:
    subprotocols: list[str] = list(scope.get("subprotocols") or [])
    if SUBPROTOCOL not in subprotocols:
        offered = [p for p in subprotocols if p.startswith(SUBPROTOCOL_PREFIX)]
        raise Denied(
            426,
            f"this server speaks tunnel protocol {SUBPROTOCOL}; the agent offered "
            f"{', '.join(offered) or 'none'}: install matching versions of agent and server",
        )
    headers = tuple(
        (_name(key.decode("latin-1").lower()), _value(value.decode("latin-1")))
        for key, value in scope["headers"]
    )
    values = dict(headers)
    if config.workers > 1 and not values.get(AGENT_ID_HEADER):
        # An agent that predates worker processes would hold one connection
        # and serve only the visitors of that one worker.
        raise Denied(
            426,
            f"this server runs {config.workers} worker processes and needs an agent that "
            "connects to each: upgrade the agent (pip install --upgrade trio-tunnel)",
        )
    _refuse_duplicate(config, values)

    tcp_port: int | None = None
    if TCP_PORT_HEADER in values:
        text = values[TCP_PORT_HEADER].strip()
        if not text.isdigit() or int(text) > 65535:
            raise Denied(400, f"invalid {TCP_PORT_HEADER} {text!r}: give a port number")
        if config.tcp_ports is None:
            raise Denied(
                403,
                "this server offers no TCP tunnels: its operator has not given it a range of "
                "public ports for them",
            )
        tcp_port = int(text)
    pool = values.get(POOL_HEADER, "").strip() == "1"
    if pool and tcp_port is not None:
        raise Denied(400, "TCP tunnels cannot pool: a public port has one agent")
    claimed = values.get(HOST_HEADER) or host_from_authority(values.get("host", ""))
    if config.domain is not None and "." not in claimed and claimed != config.domain:
        claimed = f"{claimed}.{config.domain}"
    try:
        host = normalize_host(claimed, what="the claimed host")
    except ConfigError as exc:
        raise Denied(400, str(exc)) from None

    key = values.get(KEY_HEADER)
    token = ""
    if key is not None:
        if not access.keys_enabled:
            raise Denied(401, "this server does not accept public keys; use a token")
        identity = access.check_signature(
            key, values.get(NONCE_HEADER, ""), values.get(SIGNATURE_HEADER, ""), host
        )
    else:
        given = bearer_token(values.get("authorization"))
        if given is None:
            raise Denied(401, "no token: the agent must send 'Authorization: Bearer <token>'")
        token = given
        identity = access.check_token(token)

    if config.domain is not None and not in_domain(host, config.domain):
        raise Denied(
            403,
            f"host {host} is outside this server's domain {config.domain}; "
            f"claim a name under it, such as 'myapp.{config.domain}'",
        )
    if tcp_port is None:
        access.check_reserved(host, identity)
    request = ConnectRequest(
        headers, token, host, peer, scope.get("path", ""), tcp_port, key, pool=pool
    )
    if config.auth is not None:
        try:
            result = config.auth(request)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            raise Denied(403, str(exc) or type(exc).__name__) from None
    limit = config.max_tunnels_per_identity
    if tcp_port is None:
        try:
            holders = registry.check_claim(host, identity.digest)
        except HostInUse:
            raise Denied(
                409, f"host {host} is in use by another agent; claim another host"
            ) from None
    else:
        holders = []  # a TCP tunnel is known by its port, checked when bound
    if limit is not None and not holders and registry.count(identity.digest) >= limit:
        raise Denied(
            403,
            f"this {identity.label.split()[0]} already holds {limit} tunnel(s), the most the "
            "server allows; close one first",
        )
    try:
        policy = VisitorPolicy.from_handshake(values)
    except ConfigError as exc:
        raise Denied(400, str(exc)) from None
    if tcp_port is None:
        await _reserve(registry, host, identity, limit, reserved)
    return request, identity, policy


async def _reserve(
    registry: Registry, key: str, identity: Identity, limit: int | None, reserved: list[str]
) -> None:
    """Claim ``key`` in the store (other workers, other nodes), or raise Denied.

    Reserved in the registry (and listed in ``reserved``) before the store is
    asked: from then on nothing here releases it, and ``serve_agent`` lets go
    of it if the agent is refused, even when the answer never came (cancelled).
    """
    registry.reserve(key)
    reserved.append(key)
    try:
        answer = await registry.store.claim(key, identity.digest, limit)
    except StoreUnavailableError:
        raise Denied(
            503,
            "the cluster's shared state is unavailable, so no new tunnel can be opened; "
            f"try again in {STORE_RETRY_AFTER} s",
            retry_after=STORE_RETRY_AFTER,
        ) from None
    if answer is Claim.HELD:
        what = f"port {key[4:]}" if key.startswith("tcp:") else f"host {key}"
        raise Denied(409, f"{what} is in use by another agent; claim another")
    if answer is Claim.LIMIT:
        raise Denied(
            403,
            f"this {identity.label.split()[0]} already holds {limit} tunnel(s), the most the "
            "server allows; close one first",
        )


async def _bind_and_reserve(
    config: ServerConfig,
    registry: Registry,
    requested: int,
    identity: Identity,
    reserved: list[str],
) -> tuple[list[trio.SocketListener], int]:
    """Bind a TCP tunnel's port here and claim it in the store, or raise Denied.

    For any port (0), a port another identity holds on another node (which
    this node has not heard of yet) is passed over for the next one.
    """
    skip: set[int] = set()
    while True:
        listeners, port = await bind_tcp_port(
            config, registry, requested, identity.digest, frozenset(skip)
        )
        try:
            limit = config.max_tunnels_per_identity
            await _reserve(registry, f"tcp:{port}", identity, limit, reserved)
        except Denied as exc:
            for listener in listeners:
                listener.socket.close()
            if requested or exc.status != 409:
                raise
            skip.add(port)
            continue
        return listeners, port
