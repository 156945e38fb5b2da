"""TCP tunnels: a public port per agent, each connection to it one CONNECT stream.

The agent joins each stream to its configured local port, whatever the stream
says: the CONNECT carries no target the agent would honour, so a TCP tunnel can
never be turned into a proxy to somewhere else.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import h2.errors
import trio

from .._config import ServerConfig
from .._protocol.handshake import REPLACED_CLOSE_CODE
from .._protocol.headers import header_value
from .._settings import server_setting
from ..link import StreamError, pipe
from ._access import Denied
from ._registry import AgentSession, HostInUse, Registry, Session

__all__ = [
    "TCP_AUTHORITY",
    "TcpForwarders",
    "bind_tcp_port",
    "serve_forwarded_tcp",
    "serve_tcp",
    "tcp_port_of",
]

logger = logging.getLogger("tunnel.server")

#: The CONNECT target towards an agent, which dials its own local port whatever
#: it is told. Towards another node of a cluster the target is
#: ``<TCP_AUTHORITY>:<public port>``: the port names the tunnel there.
TCP_AUTHORITY: Final = b"local"


def tcp_port_of(authority: bytes) -> int | None:
    """The public port a node's CONNECT for a TCP tunnel names, if it names one."""
    name, _, port = authority.rpartition(b":")
    if name != TCP_AUTHORITY or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return int(port)


class TcpForwarders:
    """The public TCP ports this node listens on for tunnels other nodes serve.

    In a cluster, a TCP tunnel's port is bound on every node: on the node its
    agent is connected to, for that agent (``serve_tcp``); on every other, a
    listener that carries each visitor to that node (``serve_forwarded_tcp``).
    The store's heartbeat says which ports other nodes serve (:meth:`sync`);
    a local agent claiming one of them takes the port over (:meth:`stop`).

    Args:
        config: The node's settings (``tcp_ports``, ``tcp_listen_host``).
        find: Finds the session for ``tcp:<port>``: an agent here, or a node.
    """

    def __init__(
        self, config: ServerConfig, find: Callable[[str], Awaitable[Session | None]]
    ) -> None:
        self._config = config
        self._find = find
        self._nursery: trio.Nursery | None = None
        self._running: dict[int, tuple[trio.CancelScope, trio.Event]] = {}

    def __contains__(self, port: int) -> bool:
        return port in self._running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the listeners until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def sync(self, ports: set[int]) -> None:
        """Listen on exactly ``ports`` (those of ``tcp_ports``) for the other nodes."""
        nursery = self._nursery
        if nursery is None or self._config.tcp_ports is None:
            return
        wanted = {port for port in ports if port in self._config.tcp_ports}
        for port in set(self._running) - wanted:
            self._running[port][0].cancel()
        for port in wanted - set(self._running):
            scope, done = trio.CancelScope(), trio.Event()
            self._running[port] = (scope, done)
            nursery.start_soon(self._serve, port, scope, done)

    async def stop(self, port: int) -> None:
        """Stop listening on ``port`` for the other nodes; return once it is free."""
        running = self._running.get(port)
        if running is not None:
            running[0].cancel()
            await running[1].wait()

    async def _serve(self, port: int, scope: trio.CancelScope, done: trio.Event) -> None:
        try:
            with scope:
                await serve_forwarded_tcp(self._config, self._find, port)
        except OSError as exc:
            # Bound by another program, or by this node's own agent meanwhile:
            # tried again at the next heartbeat.
            logger.debug("cannot listen on TCP port %d for another node: %s", port, exc)
        finally:
            if self._running.get(port, (None,))[0] is scope:
                del self._running[port]
            done.set()


async def bind_tcp_port(
    config: ServerConfig,
    registry: Registry,
    requested: int,
    digest: bytes,
    skip: frozenset[int] = frozenset(),
) -> tuple[list[trio.SocketListener], int]:
    """Listen on the requested port (0: any free port of ``config.tcp_ports`` not in ``skip``).

    In a cluster, a port this node listens on for another node's tunnel is
    taken over for the requested port, and passed over for port 0.

    A port held by an earlier connection with the same token is taken over: that
    session is closed and the port bound once it has let go.

    Raises:
        Denied: The port is outside the range, held by another agent or
            another program, or no port is free.
    """
    ports = config.tcp_ports
    assert ports is not None
    if requested:
        if requested not in ports:
            raise Denied(
                403,
                f"port {requested} is outside this server's TCP ports "
                f"{ports.start}-{ports.stop - 1}",
            )
        try:
            holders = registry.check_claim(f"tcp:{requested}", digest)
        except HostInUse:
            raise Denied(409, f"port {requested} is in use by another agent") from None
        for holder in holders:
            holder.link.close(
                f"replaced by a newer connection for port {requested}", REPLACED_CLOSE_CODE
            )
        for holder in holders:
            await holder.done.wait()
        forwarders = registry.tcp_forwarders
        if forwarders is not None:
            await forwarders.stop(requested)
        listeners = await _listen(config, requested)
        if listeners is None and config.workers > 1:
            # Likely this agent's own stale connection on another worker,
            # which lets go once its keepalive fails: worth retrying.
            raise Denied(503, f"port {requested} is still in use on the server; try again")
        if listeners is None:
            raise Denied(409, f"port {requested} is in use on the server")
        return listeners, requested
    forwarders = registry.tcp_forwarders
    for port in ports:
        if (
            port in skip
            or registry.holds(f"tcp:{port}")
            or (forwarders is not None and port in forwarders)
        ):
            continue
        listeners = await _listen(config, port)
        if listeners is not None:
            return listeners, port
    raise Denied(503, "every TCP port of this server is in use; try again later")


async def _listen(config: ServerConfig, port: int) -> list[trio.SocketListener] | None:
    try:
        return await trio.open_tcp_listeners(port, host=config.tcp_listen_host)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            return None
        raise


class _Slots:
    """The connections one TCP tunnel may have open at once."""

    __slots__ = ("limiter", "warned")

    def __init__(self, limit: int) -> None:
        self.limiter = trio.CapacityLimiter(limit)
        self.warned = False


async def serve_tcp(
    config: ServerConfig,
    session: AgentSession,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``listeners`` for ``session`` until cancelled."""
    # Each open connection holds a stream on the agent, two tasks and a
    # descriptor here; a visitor may open them by the thousand.
    slots = _Slots(config.max_tcp_connections)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    trio.serve_listeners,
                    partial(_connection, config, session, slots),
                    listeners,
                    handler_nursery=nursery,
                )
            )
            task_status.started()
    finally:
        for listener in listeners:
            # Synchronous: under cancellation an await would raise Cancelled
            # after the first listener and leak the rest.
            listener.socket.close()


async def serve_forwarded_tcp(
    config: ServerConfig,
    find: Callable[[str], Awaitable[Session | None]],
    port: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept visitors on public TCP ``port`` for a tunnel whose agent may be on another node.

    Each connection goes to the session ``find("tcp:<port>")`` gives then (an
    agent here, or another node that holds one); with none it is closed.

    Raises:
        OSError: The port cannot be bound here.
    """
    key = f"tcp:{port}"
    listeners = await trio.open_tcp_listeners(port, host=config.tcp_listen_host)
    slots = _Slots(config.max_tcp_connections)

    async def connection(socket: trio.SocketStream) -> None:
        session = await find(key)
        if session is None:
            await trio.aclose_forcefully(socket)
            return
        await _connection(config, session, slots, socket)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(trio.serve_listeners, connection, listeners, handler_nursery=nursery)
            )
            task_status.started()
    finally:
        for listener in listeners:
            listener.socket.close()


async def _connection(
    config: ServerConfig,
    session: Session,
    slots: _Slots,
    socket: trio.SocketStream,
) -> None:
    if session.policy.address_refusal(socket.socket.getpeername()[0]) is not None:
        # All a TCP client can be told is a closed connection.
        await trio.aclose_forcefully(socket)
        return
    try:
        slots.limiter.acquire_nowait()
    except trio.WouldBlock:
        # Once per tunnel: a visitor opening connections in a loop would
        # otherwise fill the log.
        log = logger.debug if slots.warned else logger.warning
        slots.warned = True
        log(
            "TCP tunnel %s refuses connections beyond %d open at once (%s)",
            session.key,
            slots.limiter.total_tokens,
            server_setting("max_tcp_connections"),
        )
        await trio.aclose_forcefully(socket)
        return
    try:
        await _relay(config, session, socket)
    finally:
        slots.limiter.release()


async def _relay(config: ServerConfig, session: Session, socket: trio.SocketStream) -> None:
    try:
        if isinstance(session, AgentSession):
            headers = [(b":method", b"CONNECT"), (b":authority", TCP_AUTHORITY)]
        else:
            # Another node: the port names the tunnel, and the visitor's address
            # travels along for the agent's policy, which is enforced there.
            port = session.key.removeprefix("tcp:")
            visitor = socket.socket.getpeername()[0]
            headers = [
                (b":method", b"CONNECT"),
                (b":authority", TCP_AUTHORITY + b":" + port.encode()),
                (b"x-forwarded-for", str(visitor).encode()),
            ]
        try:
            with trio.fail_after(config.grace_period):
                stream = await session.link.open_stream(headers, end_stream=False)
        except (StreamError, trio.TooSlowError):
            await trio.aclose_forcefully(socket)
            return
        session.requests_served += 1
        try:
            with trio.fail_after(config.response_timeout):
                headers = await stream.receive_headers()
        except (StreamError, trio.TooSlowError):
            headers = [(b":status", b"504")]
        if header_value(headers, b":status") != b"200":
            # The agent could not reach its local port: all a TCP client can be
            # told is a closed connection.
            if not stream.done:
                stream.cancel(h2.errors.ErrorCodes.CONNECT_ERROR)
            await trio.aclose_forcefully(socket)
            return
        await pipe(stream, socket)
    except Exception:
        # One connection's failure must never end the port's accept loop.
        logger.exception("TCP connection for %s failed", session.key)
        await trio.aclose_forcefully(socket)
