"""The admin API: JSON over HTTP for the server's operator, under ``<control path>/admin``.

The rule of this module: a request is authenticated before anything else is
looked at, so a caller without the token learns nothing, not even which routes
or tunnels exist.

It answers only for requests whose ``Host`` is the admin host
(``ServerConfig.admin_host``; by default ``localhost``, ``127.0.0.1`` or
``[::1]``), and it does so before any routing to tunnels. So the admin token is
never forwarded to an agent, even if an agent claimed the admin host, and a
tunnel's own ``/_tunnel/admin`` paths reach its service under every other host.
The host only routes; the token is what grants access.

Routes (``Authorization: Bearer <admin token>`` on every one):

``GET <prefix>/tunnels``
    ``{"tunnels": [<tunnel>, …]}``, sorted by key.
``GET <prefix>/tunnels/<key>``
    One ``<tunnel>``: the fields of :class:`~tunnel.TunnelStatistics` and
    ``uptime`` (seconds). The key is the host, or ``tcp:<port>``.
``DELETE <prefix>/tunnels/<key>[?reason=…][&reconnect=true]``
    Ends the agent's connection at once (requests in flight fail). The agent is
    told it was disconnected by the operator and stops; with ``reconnect=true``
    it is told the server restarts, and reconnects as after any lost connection.
``GET <prefix>/metrics``
    The Prometheus metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import time
from functools import partial
from typing import Any, Final
from urllib.parse import parse_qs

import trio

from .._asgi import Receive, Scope, Send
from .._config import ServerConfig
from .._exceptions import StoreUnavailableError
from .._protocol.handshake import DISCONNECTED_CLOSE_CODE, bearer_token
from .._protocol.headers import Headers, header_value
from .._protocol.hosts import host_from_authority
from .._settings import server_setting
from ._metrics import ServerMetrics, render
from ._registry import AgentSession, Registry, TunnelStatistics
from ._telemetry import log_event, peer_text
from ._worker_id import node_id

__all__ = ["ADMIN_SUFFIX", "LOOPBACK_HOSTS", "AdminAPI", "describe_tunnel", "disconnect_session"]

logger = logging.getLogger("tunnel.server")


#: The admin API's path under ``ServerConfig.control_path``.
ADMIN_SUFFIX: Final = "/admin"
#: The hosts the admin API answers on when ``ServerConfig.admin_host`` is unset.
LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
#: WebSocket close code "service restart": the agent reconnects.
RESTART_CLOSE_CODE: Final = 1012
#: How long a disconnect waits for the tunnel to be gone before answering.
DISCONNECT_WAIT: Final = 5.0
#: How often a disconnect looks whether the other nodes have let go.
DISCONNECT_POLL: Final = 0.05
#: Longest ``reason`` passed on to the agent (a close frame holds 123 bytes).
MAX_REASON: Final = 80


class AdminAPI:
    """The admin API of one server, an ASGI app for the requests it :meth:`claims`.

    Args:
        config: ``admin_token`` (required), ``admin_host`` and ``control_path``
            are read from it.
        registry: The agents to list and disconnect.
        metrics: The metrics served at ``<prefix>/metrics``.
    """

    def __init__(self, config: ServerConfig, registry: Registry, metrics: ServerMetrics) -> None:
        if config.admin_token is None:
            raise ValueError(f"the admin API needs {server_setting('admin_token')}")
        self._digest = _digest(config.admin_token)
        self.registry = registry
        self.metrics = metrics
        #: This server's node id, in every tunnel it lists.
        self.node = node_id(config)
        #: Where the admin API lives, such as ``/_tunnel/admin``.
        self.prefix = config.control_path + ADMIN_SUFFIX
        self.hosts = (
            frozenset({config.admin_host}) if config.admin_host is not None else LOOPBACK_HOSTS
        )

    def claims(self, scope: Scope) -> bool:
        """Whether this HTTP request is for the admin API (path, then host)."""
        path: str = scope["path"]
        if not path.startswith(self.prefix):
            return False
        if len(path) > len(self.prefix) and path[len(self.prefix)] != "/":
            return False
        authority = (header_value(scope["headers"], b"host") or b"").decode("latin-1")
        return host_from_authority(authority) in self.hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = bearer_token(
            (header_value(scope["headers"], b"authorization") or b"").decode("latin-1") or None
        )
        if given is None or not hmac.compare_digest(_digest(given), self._digest):
            log_event(
                logger,
                "admin_unauthorized",
                logging.WARNING,
                peer=peer_text(scope.get("client")),
                path=scope["path"],
                token="missing" if given is None else "wrong",
            )
            await _error(
                send,
                401,
                "unauthorized",
                "send the server's admin token as 'Authorization: Bearer <token>'"
                if given is None
                else "the admin token is not valid",
                [(b"www-authenticate", b'Bearer realm="tunnel admin"')],
            )
            return
        route = scope["path"][len(self.prefix) :].strip("/")
        method: str = scope["method"]
        if route in ("tunnels", "metrics"):
            allow: tuple[str, ...] = ("GET",)
        elif route.startswith("tunnels/"):
            allow = ("GET", "DELETE")
        else:
            await _error(
                send,
                404,
                "not_found",
                f"no admin route {scope['path']!r}; the routes are {self.prefix}/tunnels, "
                f"{self.prefix}/tunnels/<host or tcp:port> and {self.prefix}/metrics",
            )
            return
        if method not in allow:
            await _error(
                send,
                405,
                "method_not_allowed",
                f"{method} is not allowed on {scope['path']}; use {' or '.join(allow)}",
                [(b"allow", ", ".join(allow).encode())],
            )
        elif route == "tunnels":
            tunnels = [describe_tunnel(s, self.node) for s in self.registry.statistics()]
            document: dict[str, Any] = {"tunnels": tunnels}
            if self.registry.store.clustered:
                try:
                    tunnels += await self.registry.store.tunnels()
                except StoreUnavailableError as exc:
                    document["incomplete"] = f"only this node's tunnels: {exc}"
                tunnels.sort(key=lambda tunnel: (tunnel["host"], tunnel["node"]))
            await _json(send, 200, document)
        elif route == "metrics":
            accept = (header_value(scope["headers"], b"accept") or b"").decode("latin-1")
            body, content_type = render(self.metrics.collectors, accept)
            await _send(send, 200, body, content_type.encode())
        else:
            await self._tunnel(scope, send, method, route.removeprefix("tunnels/"))

    async def _tunnel(self, scope: Scope, send: Send, method: str, key: str) -> None:
        sessions = self.registry.sessions_of(key)
        store = self.registry.store
        elsewhere: list[dict[str, Any]] = []
        if store.clustered:
            try:
                elsewhere = [t for t in await store.tunnels() if t["host"] == key]
            except StoreUnavailableError as exc:
                if not sessions:
                    await _error(send, 503, "store_unavailable", str(exc))
                    return
        if not sessions and not elsewhere:
            where = "the cluster" if store.clustered else "this server"
            await _error(send, 404, "not_found", f"no tunnel {key!r} is connected to {where}")
            return
        described = (
            describe_tunnel(sessions[0].statistics(), self.node) if sessions else elsewhere[0]
        )
        agents = len(sessions) + len(elsewhere)
        if method != "DELETE":
            # A pooled host's agents are listed one by one under /tunnels.
            await _json(send, 200, {**described, "agents": agents})
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        reason = (query.get("reason") or [""])[0].strip()[:MAX_REASON]
        reconnect = (query.get("reconnect") or ["false"])[0].lower() in ("1", "true", "yes")
        by = peer_text(scope.get("client"))
        async with trio.open_nursery() as nursery:
            for session in sessions:
                nursery.start_soon(
                    partial(disconnect_session, session, reason, reconnect=reconnect, by=by)
                )
            if elsewhere:
                nursery.start_soon(self._disconnect_elsewhere, key, reason, reconnect)
        await _json(
            send,
            200,
            {"disconnected": described, "agents": agents, "reconnect": reconnect},
        )

    async def _disconnect_elsewhere(self, key: str, reason: str, reconnect: bool) -> None:
        """Have the nodes that serve ``key`` disconnect it; return once they have."""
        store = self.registry.store
        with contextlib.suppress(StoreUnavailableError), trio.move_on_after(DISCONNECT_WAIT):
            await store.disconnect_elsewhere(key, reason, reconnect)
            # Each node releases the key in the store once its sessions let go.
            for _ in range(int(DISCONNECT_WAIT / DISCONNECT_POLL)):
                if not await store.holders(key):
                    break
                await trio.sleep(DISCONNECT_POLL)

    async def disconnect(
        self,
        session: AgentSession,
        reason: str = "",
        *,
        reconnect: bool = False,
        peer: Any = None,
    ) -> None:
        """End ``session``'s connection; return once it let go of its tunnel."""
        await disconnect_session(session, reason, reconnect=reconnect, by=peer_text(peer))


async def disconnect_session(
    session: AgentSession, reason: str = "", *, reconnect: bool = False, by: str | None = None
) -> None:
    """End ``session``'s connection for the operator; return once it let go of its tunnel.

    Args:
        session: The agent's connection.
        reason: Told to the agent (and logged).
        reconnect: Tell the agent to come back (a reset) rather than to stop.
        by: Who asked: the admin API caller's address, or the node that passed
            the request on.
    """
    log_event(
        logger,
        "admin_disconnect",
        tunnel=session.key,
        by=by,
        reason=reason or None,
        reconnect=reconnect,
    )
    said = f": {reason}" if reason else ""
    if reconnect:
        session.link.close(f"the server's operator reset the connection{said}", RESTART_CLOSE_CODE)
    else:
        session.link.close(f"disconnected by the server's operator{said}", DISCONNECTED_CLOSE_CODE)
    # The session's own task releases the host; answering after that means
    # a list right after a disconnect no longer shows the tunnel.
    with trio.move_on_after(DISCONNECT_WAIT):
        await session.done.wait()


def _digest(token: str) -> bytes:
    # Comparing digests takes the same time whatever the given token's length.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def describe_tunnel(stats: TunnelStatistics, node: str) -> dict[str, Any]:
    """One tunnel's entry in the admin API's lists, served by ``node``."""
    fields = dataclasses.asdict(stats)
    fields["uptime"] = round(max(0.0, time.time() - stats.connected_since), 3)
    fields["node"] = node
    return fields


async def _error(
    send: Send, status: int, error: str, message: str, headers: Headers | None = None
) -> None:
    await _json(send, status, {"error": error, "message": message}, headers)


async def _json(send: Send, status: int, document: object, headers: Headers | None = None) -> None:
    body = json.dumps(document, indent=2).encode() + b"\n"
    await _send(send, status, body, b"application/json", headers)


async def _send(
    send: Send, status: int, body: bytes, content_type: bytes, headers: Headers | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
