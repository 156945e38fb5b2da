"""The ``tunnel`` command: ``server``, ``http`` and ``demo``.

Bad arguments get one line on stderr and exit status 2; Ctrl-C ends any of them
quietly with status 130. SIGTERM (from systemd, Docker, ``kill``) ends ``server``
and the agents gracefully, with status 0: requests in flight finish first.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

import trio

from .. import __version__
from .._config import ClientConfig
from .._configfile import load_client_config, load_server_config, parse_port_range
from .._exceptions import (
    ConfigError,
    RejectedError,
    StoreUnavailableError,
    TunnelError,
    UntrustedCertificateError,
)
from .._malloc import keep_freed_buffers
from .._scheduling import instruments_from_environment
from .._settings import cli_messages
from ..client import Client, ClientState, Recorder
from ..server import serve
from ._demo import run_demo
from ._show import show_agent

__all__ = ["main"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Where ``tunnel http`` serves its traffic inspector unless told otherwise.
DEFAULT_INSPECTOR = "127.0.0.1:4040"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tunnel",
        description="Expose a local service through a tunnel server you run yourself.",
    )
    parser.add_argument("--version", action="version", version=f"tunnel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = commands.add_parser(
        "server", help="run a tunnel server", description="Run a tunnel server."
    )
    server.add_argument("--config", help="TOML file of settings (flags win over it)")
    server.add_argument(
        "--address", help="host:port to listen on (':8000': all; default 127.0.0.1:8000)"
    )
    server.add_argument("--domain", help="base domain; agents claim names under it")
    server.add_argument("--certificate", help="PEM certificate chain, for HTTPS")
    server.add_argument("--key", help="PEM private key of --certificate")
    server.add_argument(
        "--token",
        action="append",
        dest="tokens",
        metavar="TOKEN",
        help="a token agents may use (repeat for more); without any, every token is accepted",
    )
    server.add_argument("--control-path", help="where agents connect (default /_tunnel)")
    server.add_argument(
        "--tokens-file",
        help="file of accepted tokens' SHA-256 hashes (see 'tunnel hash-token'); re-read on change",
    )
    server.add_argument(
        "--authorized-keys", help="file of ssh-ed25519 public keys that may connect"
    )
    server.add_argument(
        "--reserve",
        action="append",
        default=[],
        metavar="HOST=OWNER",
        help="reserve HOST for one token, sha256:<hash> or 'ssh-ed25519 AAAA…' key (repeatable)",
    )
    server.add_argument(
        "--max-tunnels", type=int, help="most tunnels one token or key may hold at once"
    )
    server.add_argument(
        "--tcp-ports",
        type=_port_range,
        metavar="FIRST-LAST",
        help="public ports for TCP tunnels, such as 20000-20099 (default: none)",
    )
    server.add_argument(
        "--max-request-body", type=int, metavar="BYTES", help="largest request body (413 above)"
    )
    server.add_argument(
        "--tunnel-rps", type=_rate, metavar="N", help="requests per second per tunnel (429 above)"
    )
    server.add_argument(
        "--visitor-rps",
        type=_rate,
        metavar="N",
        help="requests per second per visitor address (429 above)",
    )
    server.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help="turn on the admin API (<control path>/admin) with this bearer token; "
        "visible in the process list, so prefer admin_token in a --config file",
    )
    server.add_argument(
        "--admin-host",
        metavar="HOST",
        help="the Host the admin API answers on (default: localhost, 127.0.0.1, [::1])",
    )
    server.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, without a token "
        "(keep it private, such as 127.0.0.1:9100)",
    )
    server.add_argument(
        "--access-log",
        action="store_true",
        default=None,
        help="log one line per visitor request",
    )
    server.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes on the port, to use N cores (default 1); agents connect to each",
    )
    cluster = server.add_argument_group("cluster (several servers sharing one Redis)")
    store = cluster.add_mutually_exclusive_group()
    store.add_argument(
        "--store",
        metavar="URL",
        help="share tunnels, limits and ports with the other nodes through this Redis, "
        "redis://[user:password@]host:6379/0 or rediss://; a password here is visible in "
        "the process list, so prefer --store-file",
    )
    store.add_argument(
        "--store-file",
        metavar="PATH",
        help="read the --store URL from this file (its first line)",
    )
    cluster.add_argument(
        "--node-id", metavar="ID", help="this node's name in the cluster (default: made up)"
    )
    cluster.add_argument(
        "--node-address",
        metavar="HOST:PORT",
        help="where the other nodes reach this one (default: --address)",
    )
    cluster.add_argument(
        "--cluster-secret-file",
        metavar="PATH",
        help="a file holding the secret all nodes of the cluster share (required with --store)",
    )
    server.add_argument(
        "--max-websocket-message",
        type=int,
        metavar="BYTES",
        help="largest WebSocket message relayed either way (default 1 MiB; 1009 above)",
    )
    server.add_argument(
        "--max-websocket-buffer",
        type=int,
        metavar="BYTES",
        help="bytes of a visitor's WebSocket messages held for a slower service (default 4 MiB)",
    )
    server.add_argument(
        "--max-tcp-connections",
        type=int,
        metavar="N",
        help="connections one TCP tunnel may have open at once (default 100)",
    )
    server.add_argument(
        "--header-timeout",
        type=float,
        metavar="SECONDS",
        help="time a visitor has to send a request's headers (default 10)",
    )
    server.add_argument(
        "--min-request-body-rate",
        type=int,
        metavar="BYTES",
        help="slowest average bytes per second of a request body (default 500; 408 below)",
    )

    http = commands.add_parser(
        "http",
        help="expose a local HTTP service",
        description="Expose http://LOCAL_HOST:PORT through a tunnel server.",
    )
    _agent_arguments(http)
    http.add_argument("--host", help="public host name to claim (default: the server's name)")
    http.add_argument(
        "--inspector",
        metavar="HOST:PORT",
        help=f"where to serve the traffic inspector page (default {DEFAULT_INSPECTOR})",
    )
    http.add_argument("--no-inspector", action="store_true", help="serve no traffic inspector page")
    http.add_argument(
        "--pool",
        action="store_true",
        default=None,
        help="share the host with other agents of this token that pass --pool too "
        "(the server balances requests between them)",
    )
    http.add_argument(
        "--local-protocol",
        choices=["http1", "h2c", "h2", "auto"],
        help="how to speak to the local service: HTTP/1.1, HTTP/2 in cleartext (h2c, as "
        "gRPC servers listen), HTTP/2 over TLS (h2), or auto (default): HTTP/1.1, and "
        "HTTP/2 for gRPC when the service speaks it",
    )
    http.add_argument(
        "--local-tls",
        action="store_true",
        default=None,
        help="speak TLS to the local service (implied by --local-protocol h2)",
    )
    http.add_argument("--local-ca-file", help="PEM file of CAs to trust for the local service")
    http.add_argument(
        "--local-insecure-skip-verify",
        action="store_true",
        default=None,
        help="accept any TLS certificate from the local service",
    )
    http.add_argument(
        "--log-requests",
        action="store_true",
        help="when output is not a terminal, print a line per request too",
    )

    tcp = commands.add_parser(
        "tcp",
        help="expose a local TCP service (SSH, a database, ...)",
        description="Expose LOCAL_HOST:PORT on a public port of the tunnel server.",
    )
    _agent_arguments(tcp)
    tcp.add_argument(
        "--remote-port", type=int, help="public port to ask for (default: any free one)"
    )

    hash_token = commands.add_parser(
        "hash-token",
        help="print a token's SHA-256, for the server's --tokens-file",
        description="Print TOKEN's SHA-256 as a line for the server's --tokens-file.",
    )
    hash_token.add_argument("token", help="the token an agent will use")

    demo = commands.add_parser(
        "demo",
        help="run server, sample app and agent on loopback",
        description="Start a tunnel server, a sample app and an agent in this process, "
        "send a request through the tunnel and print it; then keep running.",
    )
    demo.add_argument("--once", action="store_true", help="exit after the check")
    return parser


def _agent_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("port", type=int, nargs="?", help="the local service's port")
    parser.add_argument("--config", help="TOML file of settings (flags win over it)")
    parser.add_argument(
        "--server",
        action="append",
        metavar="ADDRESS",
        help="the tunnel server, host:port or a URL; repeat for the nodes of a cluster",
    )
    parser.add_argument(
        "--ha-connections",
        type=_count,
        metavar="N",
        help="keep connections to N distinct nodes of a cluster (default 2; a server on "
        "its own is one node)",
    )
    parser.add_argument("--token", help="this agent's token")
    parser.add_argument("--key", help="OpenSSH Ed25519 private key to authenticate with")
    parser.add_argument("--local-host", help="where the service listens (default 127.0.0.1)")
    parser.add_argument("--ca-file", help="PEM file of CAs to trust for the server")
    parser.add_argument(
        "--insecure-skip-verify",
        action="store_true",
        default=None,
        help="accept any TLS certificate from the server (testing only)",
    )
    parser.add_argument("--control-path", help="the server's control path (default /_tunnel)")
    parser.add_argument("--basic-auth", metavar="USER:PASSWORD", help="visitors must log in")
    parser.add_argument(
        "--allow-ip",
        action="append",
        dest="allow_ips",
        metavar="CIDR",
        help="admit visitors only from this network (repeatable)",
    )
    parser.add_argument(
        "--deny-ip",
        action="append",
        dest="deny_ips",
        metavar="CIDR",
        help="refuse visitors from this network (repeatable)",
    )


def _reservation(text: str) -> tuple[str, str]:
    host, sep, owner = text.partition("=")
    if not sep or not host or not owner:
        raise ConfigError(f"--reserve {text!r}: write HOST=OWNER, such as app.example.com=s3cret")
    return host, owner


def _port_range(text: str) -> range:
    ports = parse_port_range(text)
    if ports is None:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a range of ports from 1 to 65535 such as 20000-20099"
        )
    return ports


def _count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"give a whole number of 1 or more, not '{text}'")
    return int(text)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"give a positive number of requests per second, not '{text}'"
        )
    return value


def _rps(value: float | None) -> dict[str, float] | None:
    return None if value is None else {"requests_per_second": value, "burst": max(1, int(value))}


def _first_line(path: str, flag: str) -> str:
    """The first line of the file at ``path``, given with ``flag``."""
    try:
        with open(path, encoding="utf-8") as file:
            line = file.readline().strip()
    except OSError as exc:
        raise ConfigError(f"{flag} {path!r}: cannot read it: {exc.strerror}") from None
    if not line:
        raise ConfigError(f"{flag} {path!r}: the file is empty")
    return line


def _addresses(given: list[str] | None) -> str | tuple[str, ...] | None:
    """``--server`` once is one address, as in a config file; repeated, several."""
    if not given:
        return None
    return given[0] if len(given) == 1 else tuple(given)


async def _hash_token(args: argparse.Namespace) -> int:
    print(f"sha256:{hashlib.sha256(args.token.encode()).hexdigest()}")
    return 0


async def _run_server(args: argparse.Namespace) -> int:
    config = load_server_config(
        args.config,
        address=args.address,
        domain=args.domain,
        certificate=args.certificate,
        key=args.key,
        tokens=args.tokens,
        control_path=args.control_path,
        tcp_ports=args.tcp_ports,
        tokens_file=args.tokens_file,
        authorized_keys_file=args.authorized_keys,
        reserved_hosts=dict(_reservation(text) for text in args.reserve) or None,
        max_tunnels_per_identity=args.max_tunnels,
        max_request_body=args.max_request_body,
        tunnel_rate_limit=_rps(args.tunnel_rps),
        visitor_rate_limit=_rps(args.visitor_rps),
        admin_token=args.admin_token,
        admin_host=args.admin_host,
        metrics_address=args.metrics_address,
        access_log=args.access_log,
        workers=args.workers,
        max_websocket_message=args.max_websocket_message,
        max_websocket_buffer=args.max_websocket_buffer,
        max_tcp_connections=args.max_tcp_connections,
        header_timeout=args.header_timeout,
        min_request_body_rate=args.min_request_body_rate,
        store=_first_line(args.store_file, "--store-file") if args.store_file else args.store,
        node_id=args.node_id,
        node_address=args.node_address,
        cluster_secret=(
            _first_line(args.cluster_secret_file, "--cluster-secret-file")
            if args.cluster_secret_file
            else None
        ),
    )
    await serve(config, shutdown_trigger=_terminated)
    return 0


async def _terminated() -> None:
    """Return once the process receives SIGTERM."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            return


def _agent_config(
    args: argparse.Namespace,
    state: trio.MemorySendChannel[ClientState] | None = None,
    recorder: Recorder | None = None,
) -> ClientConfig:
    """The agent's settings from ``tunnel http`` / ``tunnel tcp`` arguments (and --config)."""
    tcp = args.command == "tcp"
    config = load_client_config(
        args.config,
        address=_addresses(args.server),
        ha_connections=args.ha_connections,
        token=args.token,
        key_file=args.key,
        port=args.port,
        host=None if tcp else args.host,
        local_host=args.local_host,
        ca_file=args.ca_file,
        insecure_skip_verify=args.insecure_skip_verify,
        control_path=args.control_path,
        basic_auth=args.basic_auth,
        allow_ips=args.allow_ips,
        deny_ips=args.deny_ips,
        state=state,
        tcp=tcp or None,
        remote_port=args.remote_port if tcp else None,
        inspector=None if tcp else args.inspector,
        observer=recorder,
        pool=None if tcp else args.pool,
        local_protocol=None if tcp else args.local_protocol,
        local_tls=None if tcp else args.local_tls,
        local_ca_file=None if tcp else args.local_ca_file,
        local_insecure_skip_verify=None if tcp else args.local_insecure_skip_verify,
    )
    if tcp or args.no_inspector:
        config = dataclasses.replace(config, inspector=None)
    elif config.inspector is None:
        config = dataclasses.replace(config, inspector=DEFAULT_INSPECTOR)
    return config


async def _run_agent(args: argparse.Namespace) -> int:
    send, receive = trio.open_memory_channel[ClientState](16)
    tcp = args.command == "tcp"
    # Requests feed the panel (and the inspector); TCP tunnels carry none.
    recorder = None if tcp else Recorder()
    config = _agent_config(args, send, recorder)
    client = Client(config)
    tls = config.local_tls or config.local_protocol == "h2"
    scheme = "tcp" if tcp else "https" if tls else "http"
    target = f"{scheme}://{config.local_host}:{config.port}"
    async with trio.open_nursery() as nursery:

        async def report() -> None:
            log_requests = not tcp and args.log_requests
            await show_agent(client, receive, target, recorder, log_requests=log_requests)

        async def leave_on_sigterm() -> None:
            await _terminated()
            await client.aclose()  # finishes the requests in flight
            nursery.cancel_scope.cancel()

        nursery.start_soon(report)
        nursery.start_soon(leave_on_sigterm)
        try:
            await client.connect()
        finally:
            nursery.cancel_scope.cancel()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tunnel`` command; return the exit status."""
    # Messages name settings by their flags here, not by their Python fields.
    with cli_messages():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("server", "http", "tcp"):
        keep_freed_buffers()  # see tunnel/_malloc.py: large buffers without page faults
    logging.basicConfig(
        level=logging.INFO if args.command == "server" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The Redis client of a cluster's node logs each retry of a call at INFO;
    # the node says itself, once, when it loses and finds the store again.
    logging.getLogger("coredis").setLevel(logging.WARNING)
    runners = {
        "server": _run_server,
        "http": _run_agent,
        "tcp": _run_agent,
        "demo": lambda a: run_demo(once=a.once),
        "hash-token": _hash_token,
    }
    try:
        instruments = (
            instruments_from_environment() if args.command in ("server", "http", "tcp") else []
        )
        return trio.run(runners[args.command], args, instruments=instruments)
    except (ConfigError, StoreUnavailableError) as exc:
        # A store that cannot be reached at start is a setting to fix (its URL).
        print(f"tunnel: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RejectedError, UntrustedCertificateError) as exc:
        print(f"tunnel: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TunnelError as exc:
        # Not the user's input: a server worker that would not start, say.
        print(f"tunnel: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:
        interrupted, rest = group.split(KeyboardInterrupt)
        if rest is None and interrupted is not None:
            return EXIT_INTERRUPTED
        single = rest.exceptions[0] if rest is not None and len(rest.exceptions) == 1 else None
        if isinstance(
            single, ConfigError | StoreUnavailableError | RejectedError | UntrustedCertificateError
        ):
            print(f"tunnel: {single}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(single, TunnelError):
            print(f"tunnel: {single}", file=sys.stderr)
            return EXIT_FAILURE
        raise
