"""The agent's settings: :class:`ClientConfig`, frozen and keyword-only, checked on creation.

A bad value fails here, with a :class:`~tunnel.ConfigError` naming the field and
the fix, rather than later as a confusing network error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from .._exceptions import ConfigError
from .._protocol.hosts import normalize_host
from .._protocol.policy import VisitorPolicy
from .._settings import client_setting
from .values import ServerAddress, parse_server_address, positive_seconds, split_host_port

if TYPE_CHECKING:
    import trio

    from ..client._observe import Observer
    from ..client._state import ClientState

__all__ = ["LOCAL_PROTOCOLS", "MAX_HA_CONNECTIONS", "ClientConfig"]

#: The most nodes an agent keeps connections to at once. Big hosted tunnels
#: keep 2 to 4; beyond a handful, each one more costs every node a session and
#: buys almost nothing.
MAX_HA_CONNECTIONS: Final = 16


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientConfig:
    """Settings of an agent.

    Attributes:
        address: The tunnel server, ``"host:port"`` or a URL with ``http://``,
            ``https://``, ``ws://`` or ``wss://``. Without a scheme port 443
            means TLS. Or a sequence of them: the nodes of one cluster (or
            load-balanced addresses of it), which the agent spreads its
            ``ha_connections`` over, dialling the next address when one
            fails. Servers that are not one cluster each say they are the
            only node, so the agent holds one of them and fails over to the
            next. The public URL is made from the first address.
        token: The secret that identifies this agent to the server; not needed
            with ``key_file``.
        port: The local port to forward requests to.
        host: The public host name to claim. Default: the host name of
            ``address`` (of its first), as in the Go library
            (``sub.example.com:443`` claims ``sub.example.com``).
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
            A burst of more requests than this at once opens connections that
            are closed again when it ends, so it should cover the requests a
            busy tunnel has in flight.
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
        ha_connections: How many distinct nodes of a cluster the agent keeps
            connections to (1 to 16), so that losing a node loses only the
            requests in flight on it. The server tells the agent how many
            nodes its cluster has, and the agent holds as many as both allow:
            a server on its own is one node, so there it holds one connection
            (one per worker process, with ``ServerConfig.workers``). In a
            cluster, it holds every worker of each node it holds, and while
            the cluster has fewer nodes than this it looks for one more each
            minute, so a node back from a restart is joined again. TCP
            tunnels hold one node (their public port lives where it was bound).
    """

    address: str | Sequence[str]
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
    local_pool_size: int = 64
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
    ha_connections: int = 2

    def __post_init__(self) -> None:
        server = self._check_addresses()[0]
        if (
            isinstance(self.ha_connections, bool)
            or not isinstance(self.ha_connections, int)
            or not 1 <= self.ha_connections <= MAX_HA_CONNECTIONS
        ):
            raise ConfigError(
                f"{client_setting('ha_connections')} {self.ha_connections!r}: give how many "
                f"nodes of a cluster to keep connections to, 1 to {MAX_HA_CONNECTIONS} "
                "(2 survives the loss of a node)"
            )
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
            positive_seconds(client_setting(name), getattr(self, name))
        if self.max_concurrent_streams < 1:
            raise ConfigError(f"{client_setting('max_concurrent_streams')} must be at least 1")
        if self.local_pool_size < 0:
            raise ConfigError(f"{client_setting('local_pool_size')} must be 0 or more")
        if self.inspector is not None:
            self.inspector_address  # noqa: B018 - validates it

    def _check_addresses(self) -> tuple[ServerAddress, ...]:
        """Parse ``address``, a string or a sequence of them; keep a sequence as a tuple."""
        what = client_setting("address")
        if isinstance(self.address, str):
            return (parse_server_address(self.address),)
        if not isinstance(self.address, Sequence):
            raise ConfigError(
                f"{what} {self.address!r}: give the server as 'host:port' or a URL, "
                "or a list of them"
            )
        addresses = tuple(self.address)
        if not addresses:
            raise ConfigError(f"{what} is empty: give at least one server, as 'host:port' or a URL")
        servers = []
        for address in addresses:
            if not isinstance(address, str):
                raise ConfigError(
                    f"{what} holds {address!r}: give each server as 'host:port' or a URL"
                )
            server = parse_server_address(address)
            if server in servers:
                raise ConfigError(
                    f"{what} names {server.host}:{server.port} twice; give each server once"
                )
            servers.append(server)
        object.__setattr__(self, "address", addresses)
        return tuple(servers)

    @property
    def addresses(self) -> tuple[str, ...]:
        """``address`` as a tuple: the one address, or each of several."""
        return (self.address,) if isinstance(self.address, str) else tuple(self.address)

    @property
    def servers(self) -> tuple[ServerAddress, ...]:
        """Every server address, parsed, in the order given."""
        return tuple(parse_server_address(address) for address in self.addresses)

    @property
    def server(self) -> ServerAddress:
        """The parsed server address (the first, when ``address`` names several)."""
        return parse_server_address(self.addresses[0])

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
        host, port = split_host_port(self.inspector.strip(), what=f"{what}")
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
