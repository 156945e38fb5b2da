"""The server's settings: :class:`ServerConfig`, frozen and keyword-only, checked on creation.

A bad value fails here, with a :class:`~tunnel.ConfigError` naming the field and
the fix, rather than later as a confusing network error.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigError
from .._protocol.hosts import normalize_host
from .._protocol.limits import RateLimit
from .._settings import server_setting
from .hooks import Callbacks
from .values import check_store_url, parse_listen_address, positive_seconds, split_host_port

if TYPE_CHECKING:
    from .hooks import ConnectRequest

__all__ = ["MAX_WORKERS", "AuthHook", "ServerConfig"]

AuthHook = Callable[["ConnectRequest"], "Awaitable[None] | None"]

#: The most server worker processes; each agent keeps a connection to each.
MAX_WORKERS = 64


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """Settings of a tunnel server.

    Attributes:
        address: Where to listen, ``"host:port"``; ``":8000"`` means every
            interface. Port 0 picks a free port (see :func:`tunnel.serve`).
        certificate: Path of a PEM certificate chain; with ``key``, the server
            speaks HTTPS to visitors and ``wss`` to agents.
        key: Path of the PEM private key for ``certificate``.
        tokens: The tokens agents may present. ``None`` accepts any token
            (then use ``auth`` or a private network); an empty set accepts none.
        tokens_file: A file of accepted tokens' SHA-256 hashes, one per line
            (``tunnel hash-token TOKEN`` prints one); read again whenever it
            changes, without dropping connected agents.
        authorized_keys_file: An OpenSSH ``authorized_keys``-style file of
            ``ssh-ed25519`` public keys that may connect (read again on change).
        reserved_hosts: Hosts only one identity may claim: host name →
            the token, its ``sha256:<hex>`` hash, or an ``ssh-ed25519`` key.
        max_tunnels_per_identity: How many tunnels one token or key may hold at
            once; ``None`` for no limit.
        auth: Called with each agent's :class:`~tunnel.ConnectRequest` before it
            is accepted; sync or async. Raising refuses the agent with HTTP 403
            and the exception's message.
        callbacks: Functions called when agents connect and leave and when
            requests arrive; see :class:`~tunnel.Callbacks`.
        domain: The base domain this server answers for. When set, an agent may
            claim only the domain itself or a name under it, and a bare label
            such as ``"myapp"`` is taken to mean ``"myapp.<domain>"``.
        control_path: The path agents connect to. Visitors' requests for it
            under a tunnel's host are still forwarded to that tunnel.
        response_timeout: Seconds a visitor waits for the response headers
            from the agent, once its request is sent, before getting 504.
        request_idle_timeout: Seconds a visitor's request body may pause
            before the request is dropped (408).
        grace_period: Seconds a visitor's request waits for a host whose agent
            is reconnecting (or busy at its stream limit) before getting 502
            (or 503).
        handshake_timeout: Seconds the auth hook and ``on_connection``
            callback may take before the agent is refused.
        keepalive_interval: Seconds between HTTP/2 PINGs to each agent.
        keepalive_timeout: Seconds to wait for a PING's answer before the agent
            is taken for dead and its session removed.
        graceful_timeout: Seconds in-flight requests get to finish on shutdown.
        trust_forwarded_headers: Keep ``X-Forwarded-*`` headers that visitors
            send and append to them. Only set this when a proxy you trust sits
            in front of the server; otherwise visitors could forge them.
        tunnel_rate_limit: Requests and bytes per second for each tunnel.
        visitor_rate_limit: Requests and bytes per second for each visitor
            address, across all tunnels.
        max_request_body: The largest request body, in bytes, a visitor may
            send through a tunnel (413 beyond it); ``None`` for no limit.
        max_header_bytes: The largest request header block a visitor may send
            (431 beyond it).
        tcp_ports: The public ports TCP tunnels may use, such as
            ``range(20000, 20100)``; ``None`` offers no TCP tunnels.
        tcp_host: The interface TCP tunnels listen on; default: the host of
            ``address``.
        admin_token: The secret of the admin API (list tunnels, disconnect
            one, metrics) at ``<control_path>/admin``, sent as ``Authorization:
            Bearer <token>``; ``None`` turns the admin API off.
        admin_host: The ``Host`` the admin API answers on; requests for it
            under every other host go to the tunnels as usual. Default:
            ``localhost``, ``127.0.0.1`` and ``[::1]``. Pick a name no agent
            may claim (outside ``domain``).
        metrics_address: ``"host:port"`` where :func:`tunnel.serve` serves
            Prometheus metrics at ``/metrics``, over plain HTTP and without a
            token: keep it on loopback or a private network. ``None``: only
            through the admin API.
        access_log: Log one line per visitor request (logger
            ``tunnel.server.access``).
        workers: How many worker processes :func:`tunnel.serve` runs on the
            port, to use more than one core. Agents keep a connection to every
            worker, so each serves every tunnel; the handshake tells agents
            this number, so when you run :class:`~tunnel.TunnelApp` under your
            own Hypercorn, set it to Hypercorn's worker count.
        max_websocket_message: The largest WebSocket message, in bytes, relayed
            either way between a visitor and the local service; a larger one
            closes that WebSocket with code 1009 (message too big).
        max_websocket_buffer: The bytes of a visitor's WebSocket messages the
            server holds while the local service (or the tunnel) is slower than
            the visitor; the visitor is then read no faster. At least
            ``max_websocket_message``.
        max_tcp_connections: The public connections one TCP tunnel may have
            open at once (per server process); more are closed at once.
        header_timeout: Seconds a visitor's connection may take to send a
            request's complete headers, from its opening or from the end of the
            previous response (so also how long an idle keep-alive connection
            is kept).
        min_request_body_rate: The slowest average, in bytes per second, a
            request body may arrive at: the body's deadline starts at
            ``request_idle_timeout`` and grows by a second for each this many
            bytes received, so a pause is fine once earned; a body behind it
            is refused (408). ``None`` for no minimum.
        store: Where the servers of a cluster share what they know: a Redis URL,
            ``redis://[user:password@]host:6379/0`` (``rediss://`` for TLS).
            ``None`` (the default) keeps it in this server: one process, or
            its ``workers`` on one machine.
        node_id: This server's name in the cluster, as agents, peers and the
            admin API see it. Default: made up at start, new on each start.
        node_address: ``"host:port"`` where the other nodes of the cluster reach
            this one. Default: ``address`` (its host name when ``address``
            listens on every interface).
        cluster_secret: The secret every node of one cluster shares; a peer
            that does not know it is refused. Required with ``store``.
    """

    address: str = "127.0.0.1:8000"
    certificate: str | os.PathLike[str] | None = None
    key: str | os.PathLike[str] | None = None
    tokens: frozenset[str] | None = None
    tokens_file: str | os.PathLike[str] | None = None
    authorized_keys_file: str | os.PathLike[str] | None = None
    reserved_hosts: Mapping[str, str] = field(default_factory=dict)
    max_tunnels_per_identity: int | None = None
    auth: AuthHook | None = None
    callbacks: Callbacks = field(default_factory=Callbacks)
    domain: str | None = None
    control_path: str = "/_tunnel"
    response_timeout: float = 60.0
    request_idle_timeout: float = 60.0
    grace_period: float = 5.0
    handshake_timeout: float = 10.0
    keepalive_interval: float = 15.0
    keepalive_timeout: float = 15.0
    graceful_timeout: float = 10.0
    trust_forwarded_headers: bool = False
    tcp_ports: range | None = None
    tcp_host: str | None = None
    tunnel_rate_limit: RateLimit | None = None
    visitor_rate_limit: RateLimit | None = None
    max_request_body: int | None = None
    max_header_bytes: int = 32 * 1024
    admin_token: str | None = None
    admin_host: str | None = None
    metrics_address: str | None = None
    access_log: bool = False
    workers: int = 1
    max_websocket_message: int = 1 << 20
    max_websocket_buffer: int = 4 << 20
    max_tcp_connections: int = 100
    header_timeout: float = 10.0
    min_request_body_rate: int | None = 500
    store: str | None = None
    node_id: str | None = None
    node_address: str | None = None
    cluster_secret: str | None = None

    def __post_init__(self) -> None:
        parse_listen_address(self.address)
        self._check_visitor_limits()
        self._check_cluster()
        if (
            isinstance(self.workers, bool)
            or not isinstance(self.workers, int)
            or not 1 <= self.workers <= MAX_WORKERS
        ):
            raise ConfigError(
                f"{server_setting('workers')} {self.workers!r}: give a number of processes "
                f"from 1 to {MAX_WORKERS} (one per core is a good start)"
            )
        if self.admin_token is not None and (
            not isinstance(self.admin_token, str)
            or not self.admin_token
            or any(c.isspace() for c in self.admin_token)
        ):
            raise ConfigError(
                f"{server_setting('admin_token')} must be a non-empty string without spaces"
            )
        if self.admin_host is not None:
            host = normalize_host(self.admin_host, what=f"{server_setting('admin_host')}")
            object.__setattr__(self, "admin_host", host)
        if self.metrics_address is not None:
            what = server_setting("metrics_address")
            _, port = split_host_port(self.metrics_address.strip(), what=f"{what}")
            if port is None:
                raise ConfigError(
                    f"{what} {self.metrics_address!r} has no port; "
                    "write it as 'host:port', for example '127.0.0.1:9100'"
                )
        if self.max_request_body is not None and self.max_request_body < 0:
            raise ConfigError(f"{server_setting('max_request_body')} must be 0 or more bytes")
        if self.max_header_bytes < 1024:
            raise ConfigError(f"{server_setting('max_header_bytes')} must be at least 1024")
        if self.tcp_ports is not None and (
            not isinstance(self.tcp_ports, range)
            or not self.tcp_ports
            or self.tcp_ports.start < 1
            or self.tcp_ports.stop > 65536
        ):
            raise ConfigError(
                f"{server_setting('tcp_ports')} {self.tcp_ports!r} must be a non-empty range of "
                "ports from 1 to 65535, such as range(20000, 20100)"
            )
        if (self.certificate is None) != (self.key is None):
            raise ConfigError(
                f"give both {server_setting('certificate')} and {server_setting('key')} "
                "for HTTPS, or neither for HTTP"
            )
        for path_field in ("certificate", "key", "tokens_file", "authorized_keys_file"):
            path = getattr(self, path_field)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{server_setting(path_field)}: no file at {os.fspath(path)!r}")
        if self.tokens is not None:
            tokens = frozenset(self.tokens)
            if any(not isinstance(t, str) or not t for t in tokens):
                raise ConfigError(f"{server_setting('tokens')}: a token cannot be empty")
            object.__setattr__(self, "tokens", tokens)
        if self.domain is not None:
            domain = normalize_host(self.domain, what=f"{server_setting('domain')}")
            object.__setattr__(self, "domain", domain)
        reserved = {
            normalize_host(host, what=f"{server_setting('reserved_hosts')} host"): owner
            for host, owner in dict(self.reserved_hosts).items()
        }
        object.__setattr__(self, "reserved_hosts", MappingProxyType(reserved))
        if self.max_tunnels_per_identity is not None and self.max_tunnels_per_identity < 1:
            raise ConfigError(f"{server_setting('max_tunnels_per_identity')} must be at least 1")
        if not self.control_path.startswith("/") or self.control_path == "/":
            raise ConfigError(
                f"{server_setting('control_path')} {self.control_path!r} must start with '/' "
                "and name a path, such as '/_tunnel'"
            )
        for name in (
            "response_timeout",
            "request_idle_timeout",
            "grace_period",
            "handshake_timeout",
            "keepalive_interval",
            "keepalive_timeout",
            "graceful_timeout",
        ):
            positive_seconds(server_setting(name), getattr(self, name))

    def _check_cluster(self) -> None:
        if self.store is not None:
            check_store_url(self.store)
            if not self.cluster_secret:
                raise ConfigError(
                    f"{server_setting('store')} makes this server a node of a cluster; give "
                    f"{server_setting('cluster_secret')} too, the same on every node"
                )
        if self.cluster_secret is not None and (
            not isinstance(self.cluster_secret, str) or len(self.cluster_secret) < 16
        ):
            raise ConfigError(
                f"{server_setting('cluster_secret')} must be at least 16 characters "
                "(python -c 'import secrets; print(secrets.token_urlsafe())' makes one)"
            )
        if self.node_id is not None and (
            not isinstance(self.node_id, str)
            or not 1 <= len(self.node_id) <= 64
            or not all(c.isalnum() or c in "-_." for c in self.node_id)
        ):
            raise ConfigError(
                f"{server_setting('node_id')} {self.node_id!r}: give 1 to 64 letters, digits, "
                "'-', '_' or '.'"
            )
        if self.node_address is not None:
            what = server_setting("node_address")
            host, port = split_host_port(self.node_address.strip(), what=f"{what}")
            if not host or not port:
                raise ConfigError(
                    f"{what} {self.node_address!r}: write it as 'host:port' that the other "
                    "nodes can reach, for example '10.0.0.5:8000'"
                )

    def _check_visitor_limits(self) -> None:
        def count(name: str, least: int) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(
                    f"{server_setting(name)} {value!r}: give a whole number, at least {least}"
                )
            return value

        message = count("max_websocket_message", 1)
        if count("max_websocket_buffer", 1) < message:
            raise ConfigError(
                f"{server_setting('max_websocket_buffer')} {self.max_websocket_buffer!r} is "
                f"smaller than {server_setting('max_websocket_message')} {message!r}: the "
                "buffer must hold at least one message; raise it or lower the message limit"
            )
        count("max_tcp_connections", 1)
        positive_seconds(server_setting("header_timeout"), self.header_timeout)
        if self.min_request_body_rate is not None:
            rate = self.min_request_body_rate
            if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
                raise ConfigError(
                    f"{server_setting('min_request_body_rate')} {rate!r}: give bytes per "
                    "second, at least 1 (or None for no minimum)"
                )

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # A copy for each server worker process; a mappingproxy cannot be
        # pickled, so the copy is made anew (and checked again) from plain values.
        values = {name.name: getattr(self, name.name) for name in fields(self)}
        values["reserved_hosts"] = dict(self.reserved_hosts)
        return partial(ServerConfig, **values), ()

    @property
    def tcp_listen_host(self) -> str:
        """The host TCP tunnels listen on, ``tcp_host`` or else the host of ``address``."""
        return self.tcp_host or parse_listen_address(self.address)[0]

    @property
    def peer_address(self) -> str:
        """The ``host:port`` the other nodes reach this one at (``node_address`` or ``address``)."""
        if self.node_address is not None:
            return self.node_address.strip()
        host, port = parse_listen_address(self.address)
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def tls(self) -> bool:
        """Whether the server serves HTTPS (a certificate and key are set)."""
        return self.certificate is not None
