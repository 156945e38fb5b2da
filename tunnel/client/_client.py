"""The agent's life: connect, serve streams, reconnect with backoff when lost.

It ends when its user closes it or the server refuses it for good.

Connections live in slots ``(group, worker)``, each with a reconnect loop of
its own. A group holds one node of the cluster; its slots hold every worker of
that node. The agent keeps ``min(ha_connections, nodes)`` groups, the node
count being what the servers say in their handshakes: a server on its own says
1, so there the agent keeps exactly one group, one connection per worker.

Why every worker of each node held, rather than one connection per node: the
workers of a node do not forward to each other, so a worker without the
agent's connection can only make its visitors wait, then refuse them; and a
request forwarded from another node lands on any of the holder's workers.
Holding a node means holding all of it. The cost is bounded: at most
``MAX_CONNECTIONS`` in all (a node with many workers takes fewer nodes).

A slot whose group has a node asks for that node (another of its workers); a
slot whose group has none looks for a node no other group holds, dialling the
addresses in turn (the next one after a failure). Either kind of landing in
the wrong place is refused by the server before anything costs it a thing,
and retried after a short, growing delay; a search for a new node that keeps
landing on held ones goes over to the ordinary reconnect backoff after
``NODE_PROBES_IN_A_ROW`` attempts.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import trio

from .._compat import warn_fixes_off
from .._config import ClientConfig
from .._config.values import ServerAddress
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
    HAVE_NODES_HEADER,
    HAVE_WORKERS_HEADER,
    HOST_HEADER,
    NODE_HEADER,
    NODES_HEADER,
    POOL_HEADER,
    REPLACED_CLOSE_CODE,
    SUBPROTOCOL,
    TCP_PORT_HEADER,
    WANT_NODE_HEADER,
    WORKER_HEADER,
    WORKERS_HEADER,
)
from .._transport.handshake import ClientHandshake, open_client_websocket
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
#: MAX_MESSAGE; the margin is for a server of another version.
MAX_MESSAGE_SIZE = 4 * MAX_MESSAGE
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
#: The most connections an agent keeps in all (one per worker of each node held).
MAX_CONNECTIONS = 64
#: After this many attempts in a row that land on nodes the agent holds
#: already, the search for another node waits the ordinary reconnect backoff
#: (which grows to ``backoff_max``): the cluster may have fewer live nodes than
#: it says, or a load balancer may send this agent to the same ones.
NODE_PROBES_IN_A_ROW = 8

#: While a cluster says it has fewer nodes than ``ha_connections`` and the
#: agent holds them all, it looks for one more this often (seconds): a node
#: that left and came back (a restart, a deploy) is joined again. Each look
#: costs a node the cheap refusal of one handshake when there is none.
CENSUS_INTERVAL = 60.0

#: A connection's place: (node group, worker of that node).
Slot = tuple[int, int]
#: The first connection's slot; its loop runs for as long as the agent does.
PRIMARY: Final[Slot] = (0, 0)


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
        # One connection per worker of each node held, each in a slot of its
        # own with its own reconnect loop (see the module's docstring);
        # PRIMARY is the first and always runs.
        self._servers = config.servers
        #: Slot → its HTTP/2 session, while that connection is up.
        self._links: dict[Slot, Link] = {}
        #: Slot → the worker its connection reached (while up, or handshaking).
        self._workers: dict[Slot, str] = {}
        #: Slot → the node its connection reached (while up, or handshaking).
        self._nodes: dict[Slot, str] = {}
        #: Slot → when its connection came up (trio time).
        self._connected_at: dict[Slot, float] = {}
        #: How many nodes the cluster has, as the last handshake said.
        self._node_count = 1
        #: Whether any server said its cluster has several nodes: only then
        #: does the agent look for nodes beyond the count (see CENSUS_INTERVAL).
        self._in_cluster = False
        #: Group → how many workers its node has, as the node last said.
        self._group_workers: dict[int, int] = {}
        #: Group → the index (in ``_servers``) of the address that reached its node.
        self._group_address: dict[int, int] = {}
        #: Group → the address its next search for a node dials first.
        self._next_address: dict[int, int] = {}
        #: Slot → whether its attempt under way looks for a new node.
        self._searching: dict[Slot, bool] = {}
        #: The slots whose reconnect loops run now.
        self._running: set[Slot] = set()
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

        A TCP tunnel's is ``tcp://<server host>:<public port>``. With several
        addresses, an HTTP tunnel's comes from the first (the nodes of one
        cluster serve the same names); a TCP tunnel's from the one whose
        server bound its port.
        """
        server = self.config.server
        if self.config.tcp:
            server = self._servers[self._group_address.get(0, 0)]
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
        """How many connections to servers are up now.

        When all are: one per worker process of each node held (``ha_connections``
        nodes of a cluster, one server on its own).
        """
        return len(self._links)

    @property
    def server_nodes(self) -> list[str]:
        """The ids of the nodes (servers of a cluster) the agent is connected to now, sorted."""
        return sorted({self._nodes[slot] for slot in self._links if self._nodes.get(slot)})

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
            task_status: Receives the public URL once every connection the
                agent wants is up (one per worker of each node it holds; see
                ``config.ha_connections``), or ``connect_timeout`` after the
                first one if some stay out of reach.

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
                nursery.start_soon(self._census)
                await self._slot_loop(PRIMARY)
                if self._is_closing():
                    # aclose() drains every connection at once, and PRIMARY's
                    # may end first: cancelling the others now would cut their
                    # requests in flight (502s for the server's visitors).
                    with trio.move_on_after(self.config.drain_timeout + 1.0):
                        while self._running:
                            await self._slot_ended.wait()
                # PRIMARY ends only when the agent does; the others go with it.
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

    async def _slot_loop(self, slot: Slot) -> None:
        """Keep connection ``slot`` up, reconnecting with backoff, while it is wanted."""
        self._running.add(slot)
        try:
            await self._keep_slot(slot)
        finally:
            self._running.discard(slot)
            self._slot_ended.set()
            self._slot_ended = trio.Event()

    async def _keep_slot(self, slot: Slot) -> None:
        failures = 0
        duplicates = 0
        searches = 0
        while not self._is_closing() and (slot == PRIMARY or self._wanted(slot)):
            if slot == PRIMARY:
                self._phase = ClientState.CONNECTING
                self._update_state()
            try:
                await self._connect_once(slot)
            except DuplicateWorker as refusal:
                if refusal.nodes is not None:
                    # The cluster's size now: if it shrank, this slot (or
                    # others) may be wanted no more.
                    self._node_count = max(1, refusal.nodes)
                    self._in_cluster = self._in_cluster or refusal.nodes > 1
                    if slot != PRIMARY and not self._wanted(slot):
                        break
                    self._start_missing()
                searching = self._searching.get(slot, False)
                searches = searches + 1 if searching else 0
                if searches >= NODE_PROBES_IN_A_ROW:
                    # Bounded: a cluster that says it has more live nodes
                    # than this agent can find costs it one short run of
                    # attempts per reconnect delay, not a steady stream.
                    searches = 0
                    logger.info(
                        "agent for %s: %s%d attempts in a row reached nodes it holds already",
                        self._host,
                        self._which(slot),
                        NODE_PROBES_IN_A_ROW,
                    )
                    await self._backoff(slot, failures)
                    failures += 1
                    continue
                # Routine while looking for the workers (or nodes) not reached
                # yet; the delay grows only if the attempts keep landing on
                # held ones.
                duplicates = min(duplicates + 1, 32)
                cap = min(
                    DUPLICATE_BACKOFF_MAX,
                    self.config.backoff_max,
                    DUPLICATE_BACKOFF * 2**duplicates,
                )
                await self._pause(random.uniform(0, cap))
                if duplicates == DUPLICATE_WARN_AFTER and not searching:
                    # (A search for a node says so itself, above.)
                    logger.warning(
                        "agent for %s: %s%d attempts in a row reached server workers it holds "
                        "already (or another node); still trying (is the server told of more "
                        "worker processes than it runs?)",
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
            searches = 0
            if self._uptime(slot) >= STABLE_AFTER:
                failures = 0
            if self._is_closing():
                break
            if slot == PRIMARY:
                self._phase = ClientState.DISCONNECTED
                self._update_state()
            await self._backoff(slot, failures)
            failures += 1

    async def _backoff(self, slot: Slot, failures: int) -> None:
        """Wait before slot's next attempt, after ``failures`` failures in a row before this one."""
        cap = min(self.config.backoff_max, self.config.backoff_initial * 2 ** min(failures, 32))
        delay = random.uniform(0, cap)
        which = self._which(slot)
        logger.info("agent for %s: %sreconnecting in %.1fs", self._host, which, delay)
        if slot != PRIMARY:
            await self._pause(delay)
            return
        # Published for a display's countdown (such as tunnel.cli's panel).
        self._reconnect_wait = ReconnectWait(failures + 1, delay, trio.current_time() + delay)
        try:
            await self._pause(delay)
        finally:
            self._reconnect_wait = None

    async def _census(self) -> None:
        """Now and then, while a cluster has fewer nodes than wanted, look for one more.

        The count a node gives goes down when another leaves, and the agent
        stops looking for it; nothing tells it when the node is back. So it
        assumes one more node and lets a connection search for it, as for any
        node: it lands on a held one, whose refusal says the count again (and
        the search ends), or on the new one.
        """
        while True:
            await trio.sleep(CENSUS_INTERVAL)
            if (
                self._in_cluster
                and not self.config.tcp
                and not self._is_closing()
                and self._node_count < self.config.ha_connections
                and len(self.server_nodes) >= self._wanted_nodes()
            ):
                self._node_count += 1
                self._start_missing()

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or until :meth:`aclose` is called."""
        with trio.move_on_after(seconds):
            await self._closed.wait()

    def _wanted_nodes(self) -> int:
        """How many groups (distinct nodes) to keep: ``ha_connections``, up to the cluster's."""
        if self.config.tcp:
            # A TCP tunnel's public port lives in the worker that bound it.
            return 1
        return max(1, min(self.config.ha_connections, self._node_count, MAX_CONNECTIONS))

    def _wanted_workers(self, group: int) -> int:
        """How many connections group ``group`` keeps: one per worker of its node."""
        if self.config.tcp:
            return 1
        told = self._group_workers.get(group, 1)
        return max(1, min(told, MAX_CONNECTIONS // self._wanted_nodes()))

    def _wanted_total(self) -> int:
        return sum(self._wanted_workers(group) for group in range(self._wanted_nodes()))

    def _wanted(self, slot: Slot) -> bool:
        group, worker = slot
        return group < self._wanted_nodes() and worker < self._wanted_workers(group)

    def _group_node(self, group: int) -> str | None:
        """The node group ``group`` holds (through any of its slots), if it holds one."""
        for (other, _), node in self._nodes.items():
            if other == group and node:
                return node
        return None

    def _which(self, slot: Slot) -> str:
        group, worker = slot
        nodes = self._wanted_nodes()
        workers = self._wanted_workers(group)
        if nodes == 1:
            return "" if workers == 1 else f"connection {worker + 1} of {workers}: "
        if workers == 1:
            return f"node connection {group + 1} of {nodes}: "
        return f"node connection {group + 1} of {nodes}, worker {worker + 1} of {workers}: "

    def _update_state(self) -> None:
        """The tunnel is CONNECTED while any of its connections is up."""
        self._set_state(ClientState.CONNECTED if self._links else self._phase)

    def _is_closing(self) -> bool:
        return self._closing

    def _uptime(self, slot: Slot) -> float:
        """How long slot's last connection has been up; 0 if it never came up."""
        # Counted from CONNECTED, not from the attempt's start: attempts that
        # time out slowly must not pass for a stable connection.
        connected_at = self._connected_at.pop(slot, None)
        if connected_at is None:
            return 0.0
        return trio.current_time() - connected_at

    async def _connect_once(self, slot: Slot) -> None:
        """One connection: handshake, then serve streams until it ends.

        Returns when closed by :meth:`aclose`; raises when the connection could
        not be made or was lost.
        """
        config = self.config
        group = slot[0]
        locked = True
        await self._handshake_lock.acquire()
        # What the other connections hold (read under the lock: it is what
        # they hold now). Only a refusal of a handshake that named some (or
        # the node it wants) is this server saying "not here"; a 421
        # otherwise comes from something else (a proxy's Misdirected
        # Request) and is reported. The workers named are those of this
        # group's node only: the node it wants (or, searching for a new node,
        # the nodes held) says the rest, and a worker id is only ever
        # compared within its node.
        held = [
            worker for other, worker in self._workers.items() if other != slot and other[0] == group
        ]
        want = self._group_node(group)
        if want is None:
            # Looking for a node no other group holds: the next address in
            # turn, so that a failed one is not dialled again first.
            index = self._next_address.get(group, group) % len(self._servers)
            nodes = sorted({node for (other, _), node in self._nodes.items() if node})
        else:
            index = self._group_address.get(group, 0)
            nodes = []
        server = self._servers[index]
        # A server on its own is one node whatever ids its workers give (under
        # Hypercorn's own workers each makes up its own): asking for one there
        # would shut the others out.
        asked = want if self._node_count > 1 else None
        self._searching[slot] = bool(nodes)
        probing = bool(held or nodes or asked)
        try:
            stream = await self._open_stream(server)
        except BaseException:
            self._handshake_lock.release()
            if want is None:
                self._next_address[group] = index + 1
            raise
        try:
            # We own the byte stream, so it is closed on every path, a
            # refused handshake included.
            authority = server.host if server.default_port else f"{server.host}:{server.port}"
            try:
                with trio.fail_after(config.connect_timeout):
                    ws = await open_client_websocket(
                        stream,
                        authority=authority,
                        path=config.control_path,
                        subprotocols=[SUBPROTOCOL],
                        headers=await self._handshake_headers(
                            stream, authority, held, nodes, asked
                        ),
                        max_message=MAX_MESSAGE_SIZE,
                        where=f"{server.host}:{server.port}",
                    )
                self._note_worker(slot, ws, index)
            finally:
                locked = False
                self._handshake_lock.release()
            await self._serve(slot, ws)
        except BaseExceptionGroup as errors:
            raise self._translate(first_error(errors), server, probing=probing) from None
        except Exception as exc:
            raise self._translate(exc, server, probing=probing) from None
        finally:
            if locked:
                self._handshake_lock.release()
            if want is None and self._nodes.get(slot) is None:
                # Never reached a node (or lost it in the handshake): the
                # next search starts from the next address.
                self._next_address[group] = index + 1
            elif self._nodes.get(slot) is not None and self._group_node_elsewhere(slot) is None:
                # The group's last connection to its node ends: replace it by
                # dialling another address first.
                self._next_address[group] = index + 1
            self._workers.pop(slot, None)
            self._nodes.pop(slot, None)
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
        if len(self._links) >= self._wanted_total():
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
                self._wanted_total(),
            )
            self._task_status.started(self.url)
            self._task_status = trio.TASK_STATUS_IGNORED

    def _group_node_elsewhere(self, slot: Slot) -> str | None:
        """The node of slot's group, held through another of its slots."""
        group = slot[0]
        for (other, worker), node in self._nodes.items():
            if other == group and (other, worker) != slot and node:
                return node
        return None

    def _note_worker(self, slot: Slot, ws: ClientHandshake, index: int = 0) -> None:
        """Record which worker of which node ``slot`` reached, and how many there are."""
        answer = dict(ws.headers)
        worker = answer.get(WORKER_HEADER.encode(), b"").decode("ascii", "replace")
        node = answer.get(NODE_HEADER.encode(), b"").decode("ascii", "replace")
        count = answer.get(WORKERS_HEADER.encode(), b"1")
        nodes = answer.get(NODES_HEADER.encode(), b"1")
        group = slot[0]
        mine = self._group_node(group)
        others = {held for (other, _), held in self._nodes.items() if other != group}
        # The server refuses these before accepting; this is the same rule
        # for a server that could not tell (say, behind a proxy that dropped
        # our headers). Closing before HTTP/2 starts means the server never
        # hands this connection a request.
        if worker and any(
            held == worker and other[0] == group for other, held in self._workers.items()
        ):
            raise DuplicateWorker(worker)
        told = int(nodes) if nodes.isdigit() else 1
        if node and told > 1 and (node != mine if mine is not None else node in others):
            raise DuplicateWorker(node)
        if worker:
            self._workers[slot] = worker
        if node:
            self._nodes[slot] = node
        self._group_address[group] = index
        self._group_workers[group] = int(count) if count.isdigit() else 1
        # What the newest handshake says: a cluster that shrank keeps fewer
        # connections (those beyond it end when they fail, not at once).
        self._node_count = told
        self._in_cluster = self._in_cluster or told > 1
        self._start_missing()

    def _start_missing(self) -> None:
        """Start the loop of every slot wanted now that has none."""
        nursery = self._nursery
        if nursery is None:
            return
        for group in range(self._wanted_nodes()):
            for worker in range(self._wanted_workers(group)):
                missing = (group, worker)
                if missing in self._running:
                    continue
                # Marked running now, not when the task starts, so that a
                # second handshake before then does not start it twice.
                self._running.add(missing)
                nursery.start_soon(self._slot_loop, missing)

    async def _open_stream(
        self, server: ServerAddress
    ) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        return await open_server_stream(self.config, server)

    async def _serve(self, slot: Slot, ws: ClientHandshake) -> None:
        config = self.config
        answer = dict(ws.headers)
        granted = answer.get(HOST_HEADER.encode())
        if granted:
            host = granted.decode("ascii", "replace")
            if self._links and host != self._host:
                # The nodes of one cluster grant the same name; this one's
                # settings (its domain) differ from the others'.
                logger.warning(
                    "agent for %s: %sthis server granted %s instead; its visitors use that name",
                    self._host,
                    self._which(slot),
                    host,
                )
            else:
                self._host = host
        port = answer.get(TCP_PORT_HEADER.encode(), b"")
        if config.tcp:
            if not port.isdigit():
                raise ConnectionLostError("the server accepted a TCP tunnel but gave no port")
            # Ask for the same port after a reconnect, so the address holds.
            self._remote_port = int(port)
        link = Link.answerer(
            ws.transport,
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
                    node = self._nodes.get(slot)
                    logger.debug(
                        "%s: %sup%s", self.url, self._which(slot), f" (node {node})" if node else ""
                    )
                self._report_started()
        finally:
            self._links.pop(slot, None)
            # PRIMARY's loop says DISCONNECTED itself, at once and together
            # with the reconnect wait; another slot's loss shows only if it
            # was the last connection up.
            if slot == PRIMARY:
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
        self,
        stream: trio.abc.Stream,
        authority: str,
        held: list[str],
        nodes: list[str] | None = None,
        want: str | None = None,
    ) -> list[tuple[bytes, bytes]]:
        config = self.config
        headers = [
            (HOST_HEADER.encode(), config.claimed_host.encode()),
            (AGENT_ID_HEADER.encode(), self._agent_id.encode()),
        ]
        if held:
            headers.append((HAVE_WORKERS_HEADER.encode(), ",".join(held).encode()))
        if nodes:
            headers.append((HAVE_NODES_HEADER.encode(), ",".join(nodes).encode()))
        if want is not None:
            headers.append((WANT_NODE_HEADER.encode(), want.encode()))
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

    def _translate(
        self, exc: BaseException, server: ServerAddress | None = None, *, probing: bool = False
    ) -> BaseException:
        return translate_error(exc, self.config, server=server, probing=probing)

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
    the public URL: once every connection it wants is up (one per worker of
    each node it holds, see ``ha_connections``), or ``connect_timeout`` after
    the first if a node stays out of reach. Connection losses inside the block are repaired in the
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
