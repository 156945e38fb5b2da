"""The agent's life: connect, serve streams, reconnect with backoff when lost.

It ends when its user closes it or the server refuses it for good.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio_websocket

from .._compat import warn_fixes_off
from .._config import ClientConfig
from .._exceptions import (
    ConnectionLostError,
    HostInUseError,
    RejectedError,
    ServerUnreachableError,
    TunnelError,
)
from .._protocol.handshake import (
    AGENT_ID_HEADER,
    DISCONNECTED_CLOSE_CODE,
    HAVE_WORKERS_HEADER,
    HOST_HEADER,
    POOL_HEADER,
    REPLACED_CLOSE_CODE,
    SUBPROTOCOL,
    TCP_PORT_HEADER,
    WORKER_HEADER,
    WORKERS_HEADER,
)
from .._transport.websocket import HandshakeGuard, WebSocketTransport
from ..link import MAX_MESSAGE, Link, Stream
from ._dial import DuplicateWorker, first_error, open_server_stream, translate_error
from ._inspector import open_inspector
from ._keys import AgentKey
from ._local import local_h2, local_pool, relay_to_local
from ._observe import Observer, Recorder, agent_observers
from ._state import ClientState, ReconnectWait

__all__ = ["Client", "open_tunnel"]

logger = logging.getLogger("tunnel.client")

#: Largest WebSocket message accepted from the server, which sends at most
#: MAX_MESSAGE; the margin is for a server of another version. With the 4
#: messages trio-websocket queues, what the agent holds unread stays near the
#: HTTP/2 connection window.
MAX_MESSAGE_SIZE = 4 * MAX_MESSAGE
#: trio-websocket's default of 4 KiB per read makes uploads crawl.
RECEIVE_BUFFER_SIZE = 256 << 10
#: How long closing the connection to the server may take.
CLOSE_TIMEOUT = 2.0
#: A connection that stayed up this long (seconds) resets the backoff.
STABLE_AFTER = 10.0
#: The first delay's bound (seconds) after landing on a server worker this
#: agent is connected to already; it doubles up to ``backoff_max`` while the
#: attempts keep landing there.
DUPLICATE_BACKOFF = 0.05
#: The cap on that delay: a refusal that costs the server nothing is worth
#: retrying soon, since visitors on the missing worker wait meanwhile.
DUPLICATE_BACKOFF_MAX = 1.0
#: After this many such refusals in a row, the agent says so.
DUPLICATE_WARN_AFTER = 30
#: The most connections an agent keeps to one server (one per worker process).
MAX_CONNECTIONS = 64


class Client:
    """An agent: exposes ``config.port`` on the server at ``config.address``.

    Args:
        config: The agent's settings.

    Example::

        client = tunnel.Client(tunnel.ClientConfig(
            address="tunnel.example.com:443", token="s3cret", port=8080))
        await client.connect()  # runs until cancelled
    """

    def __init__(self, config: ClientConfig) -> None:
        warn_fixes_off()
        self.config = config
        self._state = ClientState.DISCONNECTED
        self._host = config.claimed_host
        self._closing = False
        #: Set by aclose(): ends a reconnect wait at once.
        self._closed = trio.Event()
        # One connection per server worker process, each in a slot of its own
        # with its own reconnect loop; slot 0 is the first and always runs.
        #: Slot → its HTTP/2 session, while that connection is up.
        self._links: dict[int, Link] = {}
        #: Slot → the worker its connection reached (while up, or handshaking).
        self._workers: dict[int, str] = {}
        #: Slot → when its connection came up (trio time).
        self._connected_at: dict[int, float] = {}
        #: Connections to keep: the server's worker count, as it last said.
        self._wanted = 1
        #: The slots whose reconnect loops run now.
        self._running: set[int] = set()
        #: Set (and replaced) whenever a slot's loop ends.
        self._slot_ended = trio.Event()
        self._nursery: trio.Nursery | None = None
        # One handshake at a time, so each names every worker held by the
        # others, and two never land on one new worker unknowingly.
        self._handshake_lock = trio.Lock()
        #: What slot 0 is doing (CONNECTING or DISCONNECTED) when no link is up.
        self._phase = ClientState.DISCONNECTED
        #: Sent on every connection: the server knows the connections of one
        #: agent, and replaces a stale one rather than pooling with it.
        self._agent_id = secrets.token_hex(8)
        self._task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
        self._remote_port = config.remote_port
        self._policy = config.visitor_policy
        self._key = (
            None if config.key_file is None else AgentKey(config.key_file, config.key_passphrase)
        )
        self._state_open = config.state is not None
        self._pool = local_pool(config)
        self._local_h2 = local_h2(config)
        self._observer: Observer | None
        self._observer, self._recorder = agent_observers(
            config.observer, inspector=config.inspector is not None
        )
        self._inspector_url: str | None = None
        self._reconnect_wait: ReconnectWait | None = None

    @property
    def state(self) -> ClientState:
        """The current connection state."""
        return self._state

    @property
    def host(self) -> str:
        """The public host name, as the server registered it."""
        return self._host

    @property
    def url(self) -> str:
        """The public URL of the tunnel, such as ``https://myapp.example.com``.

        A TCP tunnel's is ``tcp://<server host>:<public port>``.
        """
        server = self.config.server
        if self.config.tcp:
            host = f"[{server.host}]" if ":" in server.host else server.host
            return f"tcp://{host}:{self._remote_port or 0}"
        scheme = "https" if server.scheme == "wss" else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        port = "" if server.default_port else f":{server.port}"
        return f"{scheme}://{host}{port}"

    @property
    def rtt(self) -> float | None:
        """The last keepalive round-trip time to the server, in seconds."""
        for slot in sorted(self._links):
            rtt = self._links[slot].rtt
            if rtt is not None:
                return rtt
        return None

    @property
    def open_streams(self) -> int:
        """Requests, WebSockets and TCP connections in flight through the tunnel now."""
        return sum(link.open_streams for link in self._links.values())

    @property
    def server_connections(self) -> int:
        """How many connections to the server are up now (one per server worker, when all are)."""
        return len(self._links)

    @property
    def recorder(self) -> Recorder | None:
        """The recent requests, if ``config.observer`` is a recorder or the inspector is on."""
        return self._recorder

    @property
    def inspector_url(self) -> str | None:
        """The traffic inspector's address, such as ``http://127.0.0.1:4040``.

        None while :meth:`connect` is not running, or when ``config.inspector``
        is None or none of its ports was free.
        """
        return self._inspector_url

    @property
    def reconnect_wait(self) -> ReconnectWait | None:
        """The wait before the next connection attempt, while the agent waits; else None."""
        return self._reconnect_wait

    def _set_state(self, state: ClientState) -> None:
        if state is self._state:
            return
        self._state = state
        logger.debug("agent for %s: %s", self._host, state.value)
        channel = self.config.state
        if channel is None or not self._state_open:
            return
        try:
            channel.send_nowait(state)
        except trio.WouldBlock:
            # The reader is behind; the tunnel must not wait for it.
            logger.debug("state channel full; dropped %s", state.value)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._state_open = False

    async def connect(
        self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the tunnel until cancelled, reconnecting whenever it is lost.

        Failed attempts and lost connections are retried after a delay drawn
        from zero to ``min(backoff_max, backoff_initial * 2**n)`` for the n-th
        failure in a row. A connection that stayed up for ``STABLE_AFTER`` (10)
        seconds counts as a success: the next delay starts from
        ``backoff_initial`` again.

        With ``config.inspector`` set, the traffic inspector is served for as
        long as this runs.

        Args:
            task_status: Receives the public URL once the first connection is up.

        Raises:
            RejectedError: The server refused the agent for a reason retrying
                cannot fix (bad token, host reserved, in use or outside the
                domain, protocol version). Raised at once, never retried.
            UntrustedCertificateError: The server's TLS certificate failed
                verification (see ``config.ca_file``). Raised at once, never
                retried; a server that is down or a broken connection is.
        """
        inspector = open_inspector(
            self.config.inspector_address, self._recorder, self._pool, self._inspector_status
        )
        async with inspector as url:
            self._inspector_url = url
            try:
                await self._reconnect_loop(task_status)
            finally:
                self._inspector_url = None

    def _inspector_status(self) -> dict[str, object]:
        rtt = self.rtt
        return {
            "state": self._state.value,
            "url": self.url,
            "target": f"http://{self._pool.label}",
            "rtt_ms": None if rtt is None else round(rtt * 1000, 1),
        }

    async def _reconnect_loop(self, task_status: trio.TaskStatus[str]) -> None:
        self._task_status = task_status
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._local_h2 is not None:
                    await nursery.start(self._local_h2.serve)
                await self._slot_loop(0)
                if self._is_closing():
                    # aclose() drains every connection at once, and slot 0's
                    # may end first: cancelling the others now would cut their
                    # requests in flight (502s for the server's visitors).
                    with trio.move_on_after(self.config.drain_timeout + 1.0):
                        while self._running:
                            await self._slot_ended.wait()
                # Slot 0 ends only when the agent does; the others go with it.
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            error = first_error(group)
            if error is group:
                raise
            raise error from None
        finally:
            self._nursery = None
            self._set_state(ClientState.CLOSED)
            with trio.CancelScope(shield=True):
                await self._pool.aclose()

    async def _slot_loop(self, slot: int) -> None:
        """Keep connection ``slot`` up, reconnecting with backoff, while it is wanted."""
        self._running.add(slot)
        try:
            await self._keep_slot(slot)
        finally:
            self._running.discard(slot)
            self._slot_ended.set()
            self._slot_ended = trio.Event()

    async def _keep_slot(self, slot: int) -> None:
        failures = 0
        duplicates = 0
        while not self._is_closing() and slot < self._wanted:
            if slot == 0:
                self._phase = ClientState.CONNECTING
                self._update_state()
            try:
                await self._connect_once(slot)
            except DuplicateWorker:
                # Routine while looking for the workers not reached yet; the
                # delay grows only if the attempts keep landing on held ones.
                duplicates = min(duplicates + 1, 32)
                cap = min(
                    DUPLICATE_BACKOFF_MAX,
                    self.config.backoff_max,
                    DUPLICATE_BACKOFF * 2**duplicates,
                )
                await self._pause(random.uniform(0, cap))
                if duplicates == DUPLICATE_WARN_AFTER:
                    logger.warning(
                        "agent for %s: %s%d attempts in a row reached server workers it holds "
                        "already; still trying (is the server told of more worker processes "
                        "than it runs?)",
                        self._host,
                        self._which(slot),
                        duplicates,
                    )
                continue
            except (ServerUnreachableError, ConnectionLostError) as exc:
                logger.warning("agent for %s: %s%s", self._host, self._which(slot), exc)
            except TunnelError:
                raise  # a refusal, a bad certificate or setting: retrying cannot help
            except Exception:
                # A bug in a connection's handling must cost that connection,
                # never the agent: report it with its traceback and reconnect.
                logger.exception(
                    "agent for %s: %sunexpected error; reconnecting", self._host, self._which(slot)
                )
            duplicates = 0
            if self._uptime(slot) >= STABLE_AFTER:
                failures = 0
            if self._is_closing():
                break
            if slot == 0:
                self._phase = ClientState.DISCONNECTED
                self._update_state()
            cap = min(self.config.backoff_max, self.config.backoff_initial * 2 ** min(failures, 32))
            failures += 1
            delay = random.uniform(0, cap)
            which = self._which(slot)
            logger.info("agent for %s: %sreconnecting in %.1fs", self._host, which, delay)
            if slot != 0:
                await self._pause(delay)
                continue
            # Published for a display's countdown (such as tunnel.cli's panel).
            self._reconnect_wait = ReconnectWait(failures, delay, trio.current_time() + delay)
            try:
                await self._pause(delay)
            finally:
                self._reconnect_wait = None

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or until :meth:`aclose` is called."""
        with trio.move_on_after(seconds):
            await self._closed.wait()

    def _which(self, slot: int) -> str:
        return "" if self._wanted == 1 else f"connection {slot + 1} of {self._wanted}: "

    def _update_state(self) -> None:
        """The tunnel is CONNECTED while any of its connections is up."""
        self._set_state(ClientState.CONNECTED if self._links else self._phase)

    def _is_closing(self) -> bool:
        return self._closing

    def _uptime(self, slot: int) -> float:
        """How long slot's last connection has been up; 0 if it never came up."""
        # Counted from CONNECTED, not from the attempt's start: attempts that
        # time out slowly must not pass for a stable connection.
        connected_at = self._connected_at.pop(slot, None)
        if connected_at is None:
            return 0.0
        return trio.current_time() - connected_at

    async def _connect_once(self, slot: int) -> None:
        """One connection: handshake, then serve streams until it ends.

        Returns when closed by :meth:`aclose`; raises when the connection could
        not be made or was lost.
        """
        config = self.config
        server = config.server
        locked = True
        await self._handshake_lock.acquire()
        # The workers the other connections hold (read under the lock: it is
        # what they hold now). Only a refusal of a handshake that named some is
        # this server saying "a worker you hold"; a 421 otherwise comes from
        # something else (a proxy's Misdirected Request) and is reported.
        held = [worker for other, worker in self._workers.items() if other != slot]
        try:
            stream = await self._open_stream()
        except BaseException:
            self._handshake_lock.release()
            raise
        try:
            async with trio.open_nursery() as nursery:
                # We own the byte stream (not trio-websocket), so it is closed
                # on every path, a refused handshake included.
                authority = server.host if server.default_port else f"{server.host}:{server.port}"
                guard = HandshakeGuard(stream, f"{server.host}:{server.port}")
                try:
                    with trio.fail_after(config.connect_timeout):
                        ws = await trio_websocket.wrap_client_stream(
                            nursery,
                            guard,  # type: ignore[arg-type]  # any trio Stream works; the hint is narrow
                            authority,
                            config.control_path,
                            subprotocols=[SUBPROTOCOL],
                            extra_headers=await self._handshake_headers(stream, authority, held),
                            max_message_size=MAX_MESSAGE_SIZE,
                            receive_buffer_size=RECEIVE_BUFFER_SIZE,
                            message_queue_size=4,
                        )
                    guard.handshaking = False
                    self._note_worker(slot, ws)
                finally:
                    locked = False
                    self._handshake_lock.release()
                await self._serve(slot, ws)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise self._translate(first_error(group), probing=bool(held)) from None
        except Exception as exc:
            raise self._translate(exc, probing=bool(held)) from None
        finally:
            if locked:
                self._handshake_lock.release()
            self._workers.pop(slot, None)
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await stream.aclose()

    def _report_started(self) -> None:
        """Hand the URL to ``connect``'s caller once every wanted connection is up.

        On a server of several workers, a visitor can reach any worker; the
        caller of ``open_tunnel`` must be able to count on every one of them.
        A worker that stays out of reach holds it up for ``connect_timeout``
        at most (see :meth:`_start_anyway`).
        """
        if self._task_status is trio.TASK_STATUS_IGNORED:
            return
        if len(self._links) >= self._wanted:
            self._task_status.started(self.url)
            self._task_status = trio.TASK_STATUS_IGNORED
        elif len(self._links) == 1 and self._nursery is not None:
            self._nursery.start_soon(self._start_anyway)

    async def _start_anyway(self) -> None:
        await trio.sleep(self.config.connect_timeout)
        if self._task_status is not trio.TASK_STATUS_IGNORED and self._links:
            logger.warning(
                "agent for %s: up on %d of %d server connections; going on",
                self._host,
                len(self._links),
                self._wanted,
            )
            self._task_status.started(self.url)
            self._task_status = trio.TASK_STATUS_IGNORED

    def _note_worker(self, slot: int, ws: trio_websocket.WebSocketConnection) -> None:
        """Record which server worker ``slot`` reached, and how many there are."""
        answer = dict(ws.handshake_headers)
        worker = answer.get(WORKER_HEADER.encode(), b"").decode("ascii", "replace")
        count = answer.get(WORKERS_HEADER.encode(), b"1")
        if worker and worker in self._workers.values():
            # The server refuses these before accepting; this is the same
            # rule for a server that could not tell (say, behind a proxy
            # that dropped our header). Closing before HTTP/2 starts means
            # the server never hands this connection a request.
            raise DuplicateWorker(worker)
        if worker:
            self._workers[slot] = worker
        # A TCP tunnel's public port lives in the worker that bound it.
        wanted = 1 if self.config.tcp or not count.isdigit() else int(count)
        self._wanted = max(1, min(wanted, MAX_CONNECTIONS))
        nursery = self._nursery
        if nursery is not None:
            for missing in set(range(self._wanted)) - self._running:
                # Marked running now, not when the task starts, so that a
                # second handshake before then does not start it twice.
                self._running.add(missing)
                nursery.start_soon(self._slot_loop, missing)

    async def _open_stream(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        return await open_server_stream(self.config)

    async def _serve(self, slot: int, ws: trio_websocket.WebSocketConnection) -> None:
        config = self.config
        answer = dict(ws.handshake_headers)
        granted = answer.get(HOST_HEADER.encode())
        if granted:
            self._host = granted.decode("ascii", "replace")
        port = answer.get(TCP_PORT_HEADER.encode(), b"")
        if config.tcp:
            if not port.isdigit():
                raise ConnectionLostError("the server accepted a TCP tunnel but gave no port")
            # Ask for the same port after a reconnect, so the address holds.
            self._remote_port = int(port)
        link = Link.answerer(
            WebSocketTransport(ws),
            keepalive_interval=config.keepalive_interval,
            keepalive_timeout=config.keepalive_timeout,
            max_concurrent_streams=config.max_concurrent_streams,
            on_stream=self._serve_stream,
            trusted_peer=True,
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(link.run)
                self._links[slot] = link
                if self._is_closing():
                    # Up just as aclose() drained the others: it drains too.
                    nursery.start_soon(link.drain, config.drain_timeout)
                self._connected_at[slot] = trio.current_time()
                self._update_state()
                if len(self._links) == 1:
                    logger.info("tunnel up: %s → %s", self.url, self._pool.label)
                else:
                    logger.debug("%s: %sup", self.url, self._which(slot))
                self._report_started()
        finally:
            self._links.pop(slot, None)
            # Slot 0's loop says DISCONNECTED itself, at once and together with
            # the reconnect wait; another slot's loss shows only if it was the
            # last connection up.
            if slot == 0:
                self._phase = ClientState.DISCONNECTED
            elif not self._is_closing():
                self._update_state()
        if link.peer_close_code == REPLACED_CLOSE_CODE:
            raise HostInUseError(
                f"another agent with the same identity took over {self.url}; this one stops "
                "(two agents with one token and host replace each other: give each its own, "
                "or set pool on both to share the host)"
            )
        if link.peer_close_code == DISCONNECTED_CLOSE_CODE:
            raise RejectedError(
                f"the server's operator disconnected {self.url}; this agent stops "
                f"({link.closed_reason})",
                status=403,
            )
        if not self._is_closing():
            raise ConnectionLostError(f"lost the connection to the server: {link.closed_reason}")

    async def _handshake_headers(
        self, stream: trio.abc.Stream, authority: str, held: list[str]
    ) -> list[tuple[bytes, bytes]]:
        config = self.config
        headers = [
            (HOST_HEADER.encode(), config.claimed_host.encode()),
            (AGENT_ID_HEADER.encode(), self._agent_id.encode()),
        ]
        if held:
            headers.append((HAVE_WORKERS_HEADER.encode(), ",".join(held).encode()))
        if config.pool:
            headers.append((POOL_HEADER.encode(), b"1"))
        if self._key is not None:
            headers += await self._key.handshake_headers(
                stream, authority, config.control_path, config.claimed_host
            )
        else:
            assert config.token is not None  # checked by ClientConfig
            headers.append((b"authorization", b"Bearer " + config.token.encode()))
        if config.tcp:
            headers.append((TCP_PORT_HEADER.encode(), str(self._remote_port or 0).encode()))
        return headers + self._policy.handshake_headers()

    def _translate(self, exc: BaseException, *, probing: bool = False) -> BaseException:
        return translate_error(exc, self.config, probing=probing)

    async def _serve_stream(self, stream: Stream) -> None:
        assert stream.headers is not None
        try:
            await relay_to_local(stream, self.config, self._pool, self._local_h2, self._observer)
        except Exception:
            # A bug here must cost one request, not the whole tunnel.
            logger.exception("agent for %s failed to serve a request", self._host)
            if not stream.done:
                stream.cancel()

    async def aclose(self) -> None:
        """Stop: finish requests in flight (up to ``config.drain_timeout``) and close.

        :meth:`connect` then returns.
        """
        self._closing = True
        self._closed.set()
        links = list(self._links.values())
        if len(links) == 1:
            await links[0].drain(self.config.drain_timeout)
            return
        async with trio.open_nursery() as nursery:
            for link in links:
                nursery.start_soon(link.drain, self.config.drain_timeout)


@asynccontextmanager
async def open_tunnel(config: ClientConfig) -> AsyncIterator[Client]:
    """Open a tunnel for the duration of an ``async with`` block.

    Returns once the tunnel is connected, as a :class:`Client` whose ``url`` is
    the public URL. Connection losses inside the block are repaired in the
    background. Leaving the block finishes requests in flight and closes.

    Raises:
        RejectedError: The server refused the agent (bad token, host taken…).
        UntrustedCertificateError: The server's TLS certificate failed
            verification.

    Example::

        async with tunnel.open_tunnel(tunnel.ClientConfig(
                address="localhost:8000", token="s3cret", port=8080)) as t:
            print("public URL:", t.url)
            await trio.sleep_forever()
    """
    client = Client(config)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.connect)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A context manager holding one error raises that error, not a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
