"""Serving another node of the cluster: its link, and each of its streams spliced to an agent.

Another node dials ``<control path>/peer`` (``_peers.py``) when a visitor there
wants a host whose agent is here. Once it has proven it knows the cluster
secret, this node is the HTTP/2 server on that link; each stream the other node
opens is one visitor's request, whose head (X-Forwarded-* included) the other
node built as it would for an agent. Here it is spliced, untouched, onto a new
stream on the agent's link: headers, DATA both ways, trailers, the end of
each side, and resets both ways with their codes.

The rules:

* A forwarded request is served by an agent of this node or refused (502); it
  is never forwarded again, whatever the cluster's store says.
* Flow control is end to end: a chunk is acknowledged to the side that sent
  it only once the other side's window took it, so a slow visitor slows the
  local service, and nothing is held whole.
* The agent's visitor policy (allowed addresses, password) is enforced here,
  where the agent is, with the visitor's address from the head.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from functools import partial
from typing import Final

import h2.errors
import trio

from .._asgi import Receive, Scope, Send
from .._config import ServerConfig
from .._protocol.headers import Headers, header_value
from .._protocol.hosts import host_from_authority
from .._protocol.peer import (
    MAX_CLOCK_SKEW,
    PEER_NODE_HEADER,
    PEER_NONCE_HEADER,
    PEER_SIGNATURE_HEADER,
    PEER_SUBPROTOCOL,
    PEER_TIME_HEADER,
    accept_signature,
    dial_signature,
    signatures_match,
)
from .._transport.asgi import ASGIWebSocketTransport
from ..link import Link, Stream, StreamError, answer_error
from ._pages import refuse_websocket
from ._peers import PEER_CONNECTION_WINDOW, PEER_MAX_STREAMS, PEER_STREAM_WINDOW
from ._registry import AgentSession, Registry
from ._tcp import TCP_AUTHORITY, tcp_port_of
from ._telemetry import log_event, peer_text
from ._worker_id import node_id

__all__ = ["NonceLedger", "serve_peer"]

logger = logging.getLogger("tunnel.server")

#: Dials remembered to refuse a replay: at most this many within MAX_CLOCK_SKEW.
MAX_NONCES: Final = 10_000


class NonceLedger:
    """The nonces of recent dials, so that a captured handshake cannot be replayed."""

    def __init__(self) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_use(self, nonce: str, now: float) -> bool:
        """Record ``nonce``; False if it was used within the last MAX_CLOCK_SKEW * 2 s."""
        seen = self._seen
        while seen and (next(iter(seen.values())) < now or len(seen) >= MAX_NONCES):
            seen.popitem(last=False)
        if nonce in seen:
            return False
        seen[nonce] = now + 2 * MAX_CLOCK_SKEW
        return True


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _check(config: ServerConfig, scope: Scope, nonces: NonceLedger) -> str:
    """The dialling node's id, if its handshake proves it knows the secret; else _Refused."""
    secret = config.cluster_secret
    if secret is None:
        raise _Refused(404, "this server is not a node of a cluster (no cluster secret)")
    values: dict[str, str] = {
        key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]
    }
    node = values.get(PEER_NODE_HEADER, "")
    nonce = values.get(PEER_NONCE_HEADER, "")
    stamp = values.get(PEER_TIME_HEADER, "")
    signature = values.get(PEER_SIGNATURE_HEADER, "")
    if not node or not nonce or not stamp.isdigit() or not signature:
        raise _Refused(400, "a peer must send its node id, the time, a nonce and a signature")
    expected = dial_signature(secret, node, values.get("host", ""), int(stamp), nonce)
    if not signatures_match(signature, expected):
        raise _Refused(403, "wrong signature: the dialling node has another cluster secret")
    now = time.time()
    if abs(now - int(stamp)) > MAX_CLOCK_SKEW:
        raise _Refused(
            403, f"the dialling node's clock is more than {MAX_CLOCK_SKEW}s off this node's"
        )
    if not nonces.first_use(nonce, now):
        raise _Refused(403, "this handshake was used before (a replay)")
    return node


async def serve_peer(
    config: ServerConfig,
    registry: Registry,
    nonces: NonceLedger,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """Handle one link from another node, from its handshake to its close."""
    if (await receive())["type"] != "websocket.connect":
        return
    client = tuple(scope["client"]) if scope.get("client") else None
    try:
        if registry.shutting_down.is_set():
            raise _Refused(503, "this node is shutting down")
        peer = _check(config, scope, nonces)
    except _Refused as refused:
        log_event(
            logger,
            "peer_refused",
            logging.WARNING,
            peer=peer_text(client),
            status=refused.status,
            reason=refused.reason,
        )
        await refuse_websocket(scope, send, refused.status, refused.reason)
        return
    me = node_id(config)
    assert config.cluster_secret is not None
    nonce = header_value(scope["headers"], PEER_NONCE_HEADER.encode()) or b""
    await send(
        {
            "type": "websocket.accept",
            "subprotocol": PEER_SUBPROTOCOL,
            "headers": [
                (PEER_NODE_HEADER.encode(), me.encode()),
                (
                    PEER_SIGNATURE_HEADER.encode(),
                    accept_signature(config.cluster_secret, me, nonce.decode("latin-1")).encode(),
                ),
            ],
        }
    )
    link = Link.answerer(
        ASGIWebSocketTransport(receive, send, peer=f"node {peer}"),
        on_stream=partial(_serve_stream, config, registry, me),
        keepalive_interval=config.keepalive_interval,
        keepalive_timeout=config.keepalive_timeout,
        max_concurrent_streams=PEER_MAX_STREAMS,
        stream_window=PEER_STREAM_WINDOW,
        connection_window=PEER_CONNECTION_WINDOW,
    )
    log_event(logger, "peer_accepted", node=peer, peer=peer_text(client))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            with registry.cancelled_on_shutdown():
                await link.wait_closed()
            if registry.shutting_down.is_set():
                await link.drain(config.graceful_timeout)
            nursery.cancel_scope.cancel()
    finally:
        log_event(
            logger,
            "peer_left",
            node=peer,
            peer=peer_text(client),
            reason=link.closed_reason or "closed",
        )


def _visitor(headers: Headers) -> str | None:
    """The visitor's address: the last X-Forwarded-For entry, which the first node wrote."""
    value = header_value(headers, b"x-forwarded-for")
    if not value:
        return None
    last = value.rsplit(b",", 1)[-1].strip().decode("latin-1")
    return None if last == "unknown" else last


async def _find(config: ServerConfig, registry: Registry, host: str) -> AgentSession | None:
    """This node's own session for ``host``: the cluster's store is never asked here."""
    session = registry.lookup(host)
    if session is None and registry.knows(host) and not registry.shutting_down.is_set():
        # Its agent is reconnecting to this node: wait for it, as for a visitor here.
        session = await registry.wait_for(host, config.grace_period)
    return session


async def _serve_stream(config: ServerConfig, registry: Registry, me: str, stream: Stream) -> None:
    try:
        with stream.cancel_scope:
            await _forward(config, registry, me, stream)
    except Exception:
        # A bug here must cost one request, not the link that carries them all.
        logger.exception("a request forwarded by another node failed")
        if not stream.done:
            stream.cancel(h2.errors.ErrorCodes.INTERNAL_ERROR)


def _tunnel_of(headers: Headers) -> tuple[str, Headers] | None:
    """The registry key a forwarded stream is for, and the head to send its agent.

    An HTTP request or WebSocket goes on as it came (the first node built its
    head); a TCP tunnel's connection (a CONNECT without ``:protocol``) names
    its public port, and its agent gets the CONNECT that ``_tcp.py`` sends.
    None if a TCP connection names no port.
    """
    authority = header_value(headers, b":authority") or b""
    if header_value(headers, b":method") == b"CONNECT" and (
        header_value(headers, b":protocol") is None
    ):
        port = tcp_port_of(authority)
        if port is None:
            return None
        return f"tcp:{port}", [(b":method", b"CONNECT"), (b":authority", TCP_AUTHORITY)]
    return host_from_authority(authority.decode("latin-1")), headers


async def _forward(config: ServerConfig, registry: Registry, me: str, stream: Stream) -> None:
    assert stream.headers is not None
    tunnel = _tunnel_of(stream.headers)
    if tunnel is None:
        stream.cancel(h2.errors.ErrorCodes.PROTOCOL_ERROR)
        return
    host, headers = tunnel
    session = await _find(config, registry, host)
    if session is None:
        await answer_error(
            stream,
            502,
            f"No agent for {host or 'this host'} is connected to node {me}, which the cluster "
            "sent this request to; try again shortly.",
        )
        return
    policy = session.policy
    if policy.restricts:
        visitor = _visitor(stream.headers)
        if host.startswith("tcp:"):
            # A TCP client has no password to give: its address alone decides.
            address = policy.address_refusal(visitor)
            refusal = None if address is None else (403, address)
        else:
            refusal = policy.refusal(visitor, header_value(stream.headers, b"authorization"))
        if refusal is not None:
            status, message = refusal
            challenge = [(b"www-authenticate", b'Basic realm="tunnel", charset="UTF-8"')]
            await answer_error(stream, status, message, challenge if status == 401 else [])
            return
        if policy.user is not None:
            # The tunnel's own password is for the tunnel, not for the service.
            headers = [(k, v) for k, v in headers if k != b"authorization"]
    end_stream = stream.headers_ended
    upstream: Stream | None = None
    for _ in range(4):
        try:
            upstream = session.link.open_stream_nowait(headers, end_stream=end_stream)
            if upstream is None:
                with trio.move_on_after(config.grace_period):
                    upstream = await session.link.open_stream(headers, end_stream=end_stream)
                if upstream is None:
                    await answer_error(
                        stream,
                        503,
                        f"The agent for {host} is at its limit of requests in flight; "
                        "try again shortly.",
                    )
                    return
            break
        except StreamError:
            # Nothing was sent: another connection of the agent may take it.
            found = await registry.find_another(host, config.grace_period)
            if found is None:
                break
            session = found
    if upstream is None:
        await answer_error(stream, 502, f"The agent for {host} is unavailable.")
        return
    session.requests_served += 1
    try:
        await _splice(stream, upstream, session, host)
    finally:
        if not upstream.done:
            # Whatever ended this early (the visitor left, the other node's
            # link was lost, a bug), the agent stops too, with the same code.
            code = stream.reset.code if stream.reset is not None else h2.errors.ErrorCodes.CANCEL
            upstream.cancel(code)


async def _splice(stream: Stream, upstream: Stream, session: AgentSession, host: str) -> None:
    """Relay ``stream`` (from the other node) and ``upstream`` (to the agent) both ways."""
    request = _RequestCopy(stream, upstream)
    unanswered: StreamError | None = None
    async with trio.open_nursery() as nursery:
        if not stream.headers_ended:
            nursery.start_soon(request.run)
        try:
            headers = await upstream.receive_headers()
        except StreamError as exc:
            nursery.cancel_scope.cancel()
            unanswered = exc
        else:
            try:
                await _copy_response(upstream, stream, headers)
            except StreamError as exc:
                nursery.cancel_scope.cancel()
                if upstream.reset is exc and not stream.done:
                    # The agent (or its link) ended it: the other node learns how.
                    stream.cancel(exc.code)
                return
        # The response is whole; the request's copy goes on until the other
        # node ends or resets it (a WebSocket's or TCP connection's other half).
    if unanswered is not None:
        if unanswered.code != h2.errors.ErrorCodes.REFUSED_STREAM and (
            session.link.closed_reason is not None
        ):
            # The agent is gone: the visitor learns that from the page, as
            # from a node of its own agent.
            await answer_error(
                stream, 502, f"The agent for {host} could not answer: {unanswered.reason}."
            )
        elif not stream.done:
            # REFUSED_STREAM included: the first node may send it again elsewhere.
            stream.cancel(unanswered.code)
        return
    if request.stopped and not stream.done:
        # The agent answered without reading the whole body and asked for no
        # more (RFC 9113 section 8.1): the other node is told the same.
        stream.cancel(h2.errors.ErrorCodes.NO_ERROR)


async def _copy_response(upstream: Stream, stream: Stream, headers: Headers) -> None:
    """The agent's response, from its headers on, to the other node."""
    # A trailers-only answer (a gRPC error) stays one HEADERS frame with END_STREAM.
    stream.send_headers(headers, end_stream=upstream.headers_ended)
    if upstream.headers_ended:
        return
    while True:
        data = await upstream.receive_data()
        if not data:
            break
        await stream.send_data(data)
        # Only now that the other node's window took it: end-to-end backpressure.
        upstream.acknowledge()
    if upstream.trailers is not None:
        stream.send_headers(upstream.trailers, end_stream=True)
    else:
        stream.end()


class _RequestCopy:
    """The request's body (and trailers) from the other node to the agent."""

    __slots__ = ("stopped", "stream", "upstream")

    def __init__(self, stream: Stream, upstream: Stream) -> None:
        self.stream = stream
        self.upstream = upstream
        #: The agent stopped reading (after its answer) without a reset.
        self.stopped = False

    async def run(self) -> None:
        stream, upstream = self.stream, self.upstream
        try:
            while True:
                data = await stream.receive_data()
                if not data:
                    break
                await upstream.send_data(data)
                # Only now that the agent's window took it: end-to-end backpressure.
                stream.acknowledge()
            if stream.trailers is not None:
                upstream.send_headers(stream.trailers, end_stream=True)
            elif not upstream.local_ended:
                upstream.end()
        except StreamError:
            # A reset of ours stops everything through the stream's cancel
            # scope, and the agent's reaches the response side; what is left
            # is an agent that answered and stopped reading.
            if stream.reset is None and upstream.reset is None:
                self.stopped = True
