"""Configuration: frozen, keyword-only dataclasses that validate on creation.

A bad value fails here, with a :class:`~tunnel.ConfigError` naming the field and
the fix, rather than later as a confusing network error.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal

from ._exceptions import ConfigError
from ._protocol.hosts import normalize_host
from ._protocol.limits import RateLimit
from ._protocol.policy import VisitorPolicy
from ._settings import Setting, client_setting, server_setting

if TYPE_CHECKING:
    import trio

    from .client._observe import Observer
    from .client._state import ClientState
    from .server._hooks import Callbacks, ConnectRequest

__all__ = ["ClientConfig", "ServerConfig", "parse_listen_address", "parse_server_address"]

AuthHook = Callable[["ConnectRequest"], "Awaitable[None] | None"]

#: The most server worker processes; each agent keeps a connection to each.
MAX_WORKERS = 64


def _positive(setting: Setting, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{setting} must be a positive number of seconds, got {value!r}")


def _split_host_port(text: str, *, what: str) -> tuple[str, int | None]:
    """Split ``host:port``, ``[v6]:port``, ``:port`` or ``host``."""
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise ConfigError(f"{what} {text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{what} {text!r}: expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what} {text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def parse_listen_address(address: str) -> tuple[str, int]:
    """Parse a server's ``host:port``; ``:port`` listens on every interface.

    Example:
        >>> parse_listen_address(":8000")
        ('0.0.0.0', 8000)
    """
    what = server_setting("address")
    host, port = _split_host_port(address.strip(), what=f"{what}")
    if port is None:
        raise ConfigError(
            f"{what} {address!r} has no port; write it as 'host:port', "
            "for example '127.0.0.1:8000', or ':8000' for every interface"
        )
    return host or "0.0.0.0", port


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Where the agent dials: WebSocket scheme, host name and port."""

    scheme: Literal["ws", "wss"]
    host: str
    port: int

    @property
    def default_port(self) -> bool:
        return self.port == (443 if self.scheme == "wss" else 80)


def parse_server_address(address: str) -> ServerAddress:
    """Parse the agent's ``address``: ``host:port`` or a URL.

    ``http://`` and ``ws://`` mean plain, ``https://`` and ``wss://`` mean TLS.
    Without a scheme, port 443 means TLS and any other port plain, as in the Go
    library this API comes from (``sub.example.com:443``).
    """
    text = address.strip()
    what = client_setting("address")
    scheme: Literal["ws", "wss"] | None = None
    if "://" in text:
        given, text = text.split("://", 1)
        schemes: dict[str, Literal["ws", "wss"]] = {
            "http": "ws",
            "ws": "ws",
            "https": "wss",
            "wss": "wss",
        }
        if given.lower() not in schemes:
            raise ConfigError(
                f"{what} {address!r}: unknown scheme {given!r}; use http, https, ws or wss"
            )
        scheme = schemes[given.lower()]
        text = text.split("/", 1)[0]
    if "@" in text:
        raise ConfigError(
            f"{what} {address!r}: credentials do not belong in the address; "
            f"pass the secret as {client_setting('token')}"
        )
    host, port = _split_host_port(text, what=f"{what}")
    if not host:
        raise ConfigError(f"{what} {address!r} has no host name")
    if port is None:
        if scheme is None:
            raise ConfigError(
                f"{what} {address!r} has no port; write 'host:port' "
                "or a URL such as 'https://tunnel.example.com'"
            )
        port = 443 if scheme == "wss" else 80
    if port == 0:
        raise ConfigError(f"{what} {address!r}: port 0 cannot be dialled")
    if scheme is None:
        scheme = "wss" if port == 443 else "ws"
    return ServerAddress(scheme, host.lower(), port)


def _default_callbacks() -> Callbacks:
    from .server._hooks import Callbacks

    return Callbacks()


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
    callbacks: Callbacks = field(default_factory=_default_callbacks)
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

    def __post_init__(self) -> None:
        parse_listen_address(self.address)
        self._check_visitor_limits()
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
            _, port = _split_host_port(self.metrics_address.strip(), what=f"{what}")
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
            _positive(server_setting(name), getattr(self, name))

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
        _positive(server_setting("header_timeout"), self.header_timeout)
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
    def tls(self) -> bool:
        """Whether the server serves HTTPS (a certificate and key are set)."""
        return self.certificate is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientConfig:
    """Settings of an agent.

    Attributes:
        address: The tunnel server, ``"host:port"`` or a URL with ``http://``,
            ``https://``, ``ws://`` or ``wss://``. Without a scheme port 443
            means TLS.
        token: The secret that identifies this agent to the server; not needed
            with ``key_file``.
        port: The local port to forward requests to.
        host: The public host name to claim. Default: the host name of
            ``address``, as in the Go library (``sub.example.com:443`` claims
            ``sub.example.com``).
        local_host: Where the local service listens.
        insecure_skip_verify: Accept any TLS certificate from the server. For
            tests only: it makes the connection open to interception.
        ca_file: A PEM file of certificate authorities to trust for the server,
            for servers with a private or self-signed certificate.
        control_path: The server's control path (``ServerConfig.control_path``).
        key_file: An OpenSSH private key file (``ssh-keygen -t ed25519``) to
            authenticate with instead of a token; its public key must be in the
            server's ``authorized_keys_file``.
        key_passphrase: The passphrase of an encrypted ``key_file``.
        state: A channel that receives every :class:`~tunnel.ClientState`
            change. Changes are sent without waiting: when the channel's buffer
            is full the change is dropped, so a slow or absent reader never
            stalls the tunnel; :attr:`tunnel.Client.state` is always current.
        connect_timeout: Seconds one connection attempt (TCP, TLS, handshake)
            may take.
        backoff_initial: The first reconnect delay's upper bound, in seconds.
        backoff_max: The cap on reconnect delays, in seconds. Delays are drawn
            uniformly from zero to ``min(backoff_max, backoff_initial * 2**n)``
            ("full jitter") after the n-th failure in a row.
        keepalive_interval: Seconds between HTTP/2 PINGs to the server.
        keepalive_timeout: Seconds to wait for a PING's answer before the
            connection is taken for dead and replaced.
        max_concurrent_streams: How many requests the server may have in
            flight on this agent at once; more wait at the server.
        local_connect_timeout: Seconds to wait for the local service to accept a
            connection before the visitor gets 502.
        local_pool_size: Idle keep-alive connections kept to the local service.
        drain_timeout: Seconds in-flight requests get to finish when the agent
            is closed.
        basic_auth: ``"user:password"`` that visitors must give (HTTP basic
            authentication), checked by the server; the password travels to the
            server only as its SHA-256.
        allow_ips: Networks (CIDR) visitors must come from; empty: any.
        deny_ips: Networks (CIDR) whose visitors are refused.
        tcp: Forward raw TCP instead of HTTP (for SSH, databases, …): the
            server gives the tunnel a public port of its own.
        remote_port: The public port to ask for, with ``tcp``; default: any
            free port of the server's range. After a reconnect the agent asks
            for the port it had.
        inspector: ``"host:port"`` where the agent serves its traffic inspector,
            a web page of the recent requests with a Replay button, such as
            ``"127.0.0.1:4040"``; None serves none. A port in use is skipped for
            the next free one of the following nine (``tunnel http`` defaults
            to ``127.0.0.1:4040``). ``":4040"`` means ``127.0.0.1``: the page
            shows request bodies, so listen beyond loopback only on purpose.
        observer: Told about every HTTP request the agent forwards (see
            :class:`~tunnel.Observer`); a :class:`~tunnel.Recorder` keeps the
            recent ones. With ``inspector`` set the inspector shows this
            recorder's exchanges (it makes one when none is given).
        pool: Share the host with other agents that have the same token (or
            key) and set ``pool`` too: the server sends each request to the
            least busy of them, and when one leaves the others take its share.
            Without it, a newer agent for the host replaces the older one.
        local_protocol: How the agent speaks to the local service: ``"http1"``
            (HTTP/1.1), ``"h2c"`` (HTTP/2 with prior knowledge over cleartext, as
            gRPC servers listen), ``"h2"`` (HTTP/2 over TLS, agreed with ALPN) or
            ``"auto"``: HTTP/1.1, except for requests that need HTTP/2 (gRPC, or
            a visitor that asked for trailers with ``TE: trailers``) when the
            local service speaks it (tried once with prior knowledge, then
            remembered).
        local_tls: Speak TLS to the local service (implied by ``"h2"``); with
            ``"http1"`` or ``"auto"`` that is HTTP/1.1 over TLS.
        local_ca_file: A PEM file of certificate authorities to trust for the
            local service's certificate.
        local_insecure_skip_verify: Accept any certificate from the local
            service (a self-signed one on 127.0.0.1, say).
    """

    address: str
    port: int
    token: str | None = None
    host: str | None = None
    local_host: str = "127.0.0.1"
    insecure_skip_verify: bool = False
    ca_file: str | os.PathLike[str] | None = None
    control_path: str = "/_tunnel"
    key_file: str | os.PathLike[str] | None = None
    key_passphrase: str | None = None
    state: trio.MemorySendChannel[ClientState] | None = None
    connect_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    keepalive_interval: float = 15.0
    keepalive_timeout: float = 15.0
    max_concurrent_streams: int = 1000
    local_connect_timeout: float = 10.0
    local_pool_size: int = 32
    drain_timeout: float = 10.0
    basic_auth: str | None = None
    allow_ips: tuple[str, ...] = ()
    deny_ips: tuple[str, ...] = ()
    tcp: bool = False
    remote_port: int | None = None
    inspector: str | None = None
    observer: Observer | None = None
    pool: bool = False
    local_protocol: Literal["http1", "h2c", "h2", "auto"] = "auto"
    local_tls: bool = False
    local_ca_file: str | os.PathLike[str] | None = None
    local_insecure_skip_verify: bool = False

    def __post_init__(self) -> None:
        server = parse_server_address(self.address)
        _check_local_protocol(self)
        if self.pool and self.tcp:
            raise ConfigError(
                f"{client_setting('pool')} works for HTTP tunnels only: a TCP tunnel's "
                f"public port has one agent; drop {client_setting('pool')} or "
                f"{client_setting('tcp')}"
            )
        object.__setattr__(self, "allow_ips", tuple(self.allow_ips))
        object.__setattr__(self, "deny_ips", tuple(self.deny_ips))
        self.visitor_policy  # noqa: B018 - validates basic_auth and the networks
        if self.remote_port is not None and (
            not self.tcp
            or isinstance(self.remote_port, bool)
            or not isinstance(self.remote_port, int)
            or not 0 < self.remote_port <= 65535
        ):
            raise ConfigError(
                f"{client_setting('remote_port')} {self.remote_port!r}: give a port from 1 "
                f"to 65535, for a TCP tunnel ({client_setting('tcp')}): only those have "
                "ports of their own"
            )
        if self.key_file is None and (not isinstance(self.token, str) or not self.token):
            raise ConfigError(
                f"give a token with {client_setting('token')} (or a key to authenticate "
                f"with, with {client_setting('key_file')})"
            )
        if self.key_file is not None and not os.path.isfile(self.key_file):
            raise ConfigError(
                f"{client_setting('key_file')}: no file at {os.fspath(self.key_file)!r}"
            )
        port: int | str = self.port
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
            raise ConfigError(
                f"{client_setting('port')} {self.port!r}: give the local service's port, 1 to 65535"
            )
        object.__setattr__(self, "port", port)
        host = self.host if self.host is not None else server.host
        host = normalize_host(host, what=f"{client_setting('host')}")
        object.__setattr__(self, "host", host)
        if not self.control_path.startswith("/"):
            raise ConfigError(
                f"{client_setting('control_path')} {self.control_path!r} must start with '/'"
            )
        if self.ca_file is not None and not os.path.isfile(self.ca_file):
            raise ConfigError(
                f"{client_setting('ca_file')}: no file at {os.fspath(self.ca_file)!r}"
            )
        for name in (
            "connect_timeout",
            "backoff_initial",
            "backoff_max",
            "keepalive_interval",
            "keepalive_timeout",
            "local_connect_timeout",
            "drain_timeout",
        ):
            _positive(client_setting(name), getattr(self, name))
        if self.max_concurrent_streams < 1:
            raise ConfigError(f"{client_setting('max_concurrent_streams')} must be at least 1")
        if self.local_pool_size < 0:
            raise ConfigError(f"{client_setting('local_pool_size')} must be 0 or more")
        if self.inspector is not None:
            self.inspector_address  # noqa: B018 - validates it

    @property
    def server(self) -> ServerAddress:
        """The parsed server address."""
        return parse_server_address(self.address)

    @property
    def visitor_policy(self) -> VisitorPolicy:
        """Basic auth and IP lists, as the server will enforce them."""
        return VisitorPolicy.for_agent(self.basic_auth, self.allow_ips, self.deny_ips)

    @property
    def inspector_address(self) -> tuple[str, int] | None:
        """Where to serve the inspector, parsed from ``inspector``; None for nowhere."""
        if self.inspector is None:
            return None
        what = client_setting("inspector")
        host, port = _split_host_port(self.inspector.strip(), what=f"{what}")
        if port is None:
            raise ConfigError(
                f"{what} {self.inspector!r} has no port; write it as "
                "'host:port', for example '127.0.0.1:4040'"
            )
        return host or "127.0.0.1", port

    @property
    def claimed_host(self) -> str:
        """The host name this agent claims (``host``, or the server's name)."""
        assert self.host is not None  # set in __post_init__
        return self.host


LOCAL_PROTOCOLS: Final = ("http1", "h2c", "h2", "auto")


def _check_local_protocol(config: ClientConfig) -> None:
    protocol = client_setting("local_protocol")
    if config.local_protocol not in LOCAL_PROTOCOLS:
        raise ConfigError(
            f"{protocol} {config.local_protocol!r}: give one of "
            + ", ".join(repr(name) for name in LOCAL_PROTOCOLS)
        )
    if config.local_protocol == "h2c" and config.local_tls:
        raise ConfigError(
            f"{protocol} 'h2c' is HTTP/2 without TLS, but {client_setting('local_tls')} is "
            f"set; for HTTP/2 over TLS give {protocol} 'h2'"
        )
    if config.tcp and (config.local_tls or config.local_protocol in ("h2c", "h2")):
        raise ConfigError(
            f"{protocol} and {client_setting('local_tls')} are for HTTP tunnels; a TCP tunnel "
            "carries the local service's bytes as they are"
        )
    if config.local_ca_file is not None and not os.path.isfile(config.local_ca_file):
        raise ConfigError(
            f"{client_setting('local_ca_file')}: no file at {os.fspath(config.local_ca_file)!r}"
        )
