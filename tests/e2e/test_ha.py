"""Agents with HA connections: one connection to each of several nodes of a cluster.

Each node here is a real :class:`tunnel.TunnelApp` under real Hypercorn, with
its own ``node_id`` and its node count (``Registry.node_count``) set to what a
cluster store would say. The nodes share nothing: an agent connected to both
serves the visitors of each, and one that is not connected to a node leaves
that node's visitors without an answer, so every test can see which nodes the
agent holds by asking the nodes' visitors.
"""

from __future__ import annotations

import contextvars
import itertools
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import hypercorn.trio
import pytest
import trio
import trio.testing
from faultproxy import FaultProxy

import tunnel
import tunnel.client._client
import tunnel.server._control
from helpers import eventually, free_port
from tunnel._protocol.handshake import HAVE_NODES_HEADER, SUBPROTOCOL, WANT_NODE_HEADER
from tunnel.cli._commands import _agent_config, _parser
from tunnel.server import hypercorn_config

TOKEN = "s3cret"
CONNECTED = tunnel.ClientState.CONNECTED


class Node:
    """One server of a would-be cluster, which a test can stop and start again on its port."""

    def __init__(self, nursery: trio.Nursery, node_id: str, nodes: int | None = 2) -> None:
        self.nursery = nursery
        self.node_id = node_id
        #: What this node tells agents about the cluster's size (None: what
        #: a server says by default).
        self.nodes = nodes
        self.port = 0
        self.app: tunnel.TunnelApp | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    async def start(self) -> Node:
        """Serve (again, on the same port once it has one)."""
        config = tunnel.ServerConfig(
            address=f"127.0.0.1:{self.port}",
            tokens=frozenset({TOKEN}),
            node_id=self.node_id,
            grace_period=0.5,
        )
        app = tunnel.TunnelApp(config)
        if self.nodes is not None:
            app.registry.node_count = lambda: self.nodes or 1
        self.app = app
        self._stopped = trio.Event()
        urls: list[str] = await self.nursery.start(self._serve, app, hypercorn_config(config))
        self.port = int(urls[0].rsplit(":", 1)[1])
        return self

    async def _serve(
        self, app: tunnel.TunnelApp, hc: Any, *, task_status: trio.TaskStatus[list[str]]
    ) -> None:
        try:
            with trio.CancelScope() as self._scope:
                await hypercorn.trio.serve(app, hc, task_status=task_status)  # type: ignore[arg-type]
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        """Stop at once, as a crashed node would: every connection to it ends."""
        assert self._scope is not None
        self._scope.cancel()
        await self._stopped.wait()

    @property
    def sessions(self) -> int:
        """Agent connections this node holds now."""
        assert self.app is not None
        return len(self.app.registry.sessions())

    @property
    def refused_as_duplicate(self) -> int:
        """Handshakes this node refused as "not here" (421)."""
        assert self.app is not None
        return self.app._metrics.handshakes_refused.get(421, 0)

    def visitor(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"host": "app.localhost"},
            trust_env=False,
            timeout=10,
        )


class RoundRobin:
    """A load balancer in front of several servers: each new TCP connection goes to the next.

    ``run_length`` connections in a row go to one server before the next one
    gets its turn, as a balancer by connection count might send them.
    """

    def __init__(self, ports: list[int], run_length: int = 1) -> None:
        self._targets: Iterator[int] = itertools.cycle(
            [port for port in ports for _ in range(run_length)]
        )
        self.port = 0
        self.sent: list[int] = []

    async def run(self, *, task_status: trio.TaskStatus[RoundRobin]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)

    async def _handle(self, client: trio.SocketStream) -> None:
        target = next(self._targets)
        self.sent.append(target)
        async with client:
            try:
                server = await trio.open_tcp_stream("127.0.0.1", target)
            except OSError:
                return
            async with server, trio.open_nursery() as nursery:

                async def pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                    try:
                        while data := await source.receive_some(65536):
                            await sink.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pipe, client, server)
                nursery.start_soon(pipe, server, client)


@pytest.fixture
async def two_nodes(nursery: trio.Nursery) -> tuple[Node, Node]:
    return await Node(nursery, "node-a").start(), await Node(nursery, "node-b").start()


def agent(addresses: list[int] | int, local_port: int, **overrides: Any) -> tunnel.ClientConfig:
    ports = addresses if isinstance(addresses, list) else [addresses]
    settings: dict[str, Any] = {
        "address": [f"127.0.0.1:{port}" for port in ports],
        "token": TOKEN,
        "port": local_port,
        "host": "app.localhost",
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        "connect_timeout": 5,
    }
    settings.update(overrides)
    return tunnel.ClientConfig(**settings)


async def served(node: Node, path: str) -> tuple[int, str | None]:
    """A visitor of ``node`` asks for ``path``: the status, and which local service answered."""
    async with node.visitor() as http:
        response = await http.get(path)
    service = response.json()["service"] if response.status_code == 200 else None
    return response.status_code, service


async def test_an_agent_given_two_nodes_holds_one_connection_to_each(
    two_nodes, start_local_service
):
    a, b = two_nodes
    local = await start_local_service("ha")
    with trio.fail_after(15):
        async with tunnel.open_tunnel(agent([a.port, b.port], local.port)) as client:
            # open_tunnel returns once every connection it wants is up.
            assert client.server_connections == 2
            assert client.server_nodes == ["node-a", "node-b"]
            # The agent counts a connection up once the server's HTTP/2 preface
            # arrives; the server registers the session just after sending it.
            await eventually(lambda: (a.sessions, b.sessions) == (1, 1), limit=2)
            # One public URL, from the first address; the same host on both.
            assert client.url == f"http://app.localhost:{a.port}"
            assert await served(a, "/on-a") == (200, "ha")
            assert await served(b, "/on-b") == (200, "ha")
            assert ("GET", "/on-a") in local.requests
            assert ("GET", "/on-b") in local.requests
            # Two nodes wanted and held: nobody dials a third time.
            await trio.sleep(0.3)
            assert (a.refused_as_duplicate, b.refused_as_duplicate) == (0, 0)
            assert (a.sessions, b.sessions) == (1, 1)


@pytest.mark.parametrize("lost", ["node-a", "node-b"])
async def test_a_stopped_node_costs_only_its_own_visitors_and_is_rejoined(
    lost, two_nodes, start_local_service
):
    # node-a holds the agent's first connection, whose loop runs the agent's
    # state: losing either node must leave the agent CONNECTED.
    a, b = two_nodes
    gone, kept = (a, b) if lost == "node-a" else (b, a)
    local = await start_local_service("ha")
    states_in, states = trio.open_memory_channel[tunnel.ClientState](64)
    with trio.fail_after(30):
        async with (
            tunnel.open_tunnel(agent([a.port, b.port], local.port, state=states_in)) as client,
            kept.visitor() as http,
        ):
            assert client.server_connections == 2
            assert [states.receive_nowait(), states.receive_nowait()] == [
                tunnel.ClientState.CONNECTING,
                CONNECTED,
            ]
            async with trio.open_nursery() as visits:
                statuses: list[int] = []

                async def visit_kept_node_all_along() -> None:
                    for i in range(40):
                        statuses.append((await http.get(f"/during/{i}")).status_code)
                        await trio.sleep(0.02)

                visits.start_soon(visit_kept_node_all_along)
                await trio.sleep(0.1)
                await gone.stop()
                await eventually(lambda: client.server_connections == 1)
                assert client.server_nodes == [kept.node_id]
                assert client.state is CONNECTED
            assert statuses == [200] * 40
            # Back on the same port: the agent finds it within its backoff.
            await gone.start()
            await eventually(lambda: client.server_connections == 2)
            assert client.server_nodes == ["node-a", "node-b"]
            assert await served(gone, "/back") == (200, "ha")
            # Never anything but CONNECTED since the start.
            with pytest.raises(trio.WouldBlock):
                states.receive_nowait()


async def test_a_cut_connection_is_replaced_and_the_other_node_serves_meanwhile(
    two_nodes, start_local_service, nursery
):
    a, b = two_nodes
    local = await start_local_service("ha")
    proxy: FaultProxy = await nursery.start(FaultProxy(b.port).run)
    with trio.fail_after(30):
        async with (
            tunnel.open_tunnel(agent([a.port, proxy.port], local.port)) as client,
            a.visitor() as http,
        ):
            assert client.server_nodes == ["node-a", "node-b"]
            async with trio.open_nursery() as visits:
                held: list[int] = []

                async def hold() -> None:
                    held.append((await http.get("/hold")).status_code)

                visits.start_soon(hold)
                await eventually(lambda: local.holding == 1)
                # The network between the agent and node-b fails, and stays
                # down: node-b's connection is reset, new ones too.
                proxy.refuse()
                proxy.cut()
                await eventually(lambda: client.server_nodes == ["node-a"])
                assert client.state is CONNECTED
                # The request in flight on node-a is untouched; new ones flow.
                assert (await http.get("/meanwhile")).status_code == 200
                local.release_hold.set()
            assert held == [200]
            # The search for another node lands on node-a, which refuses it
            # cheaply, and on the broken address, which refuses to connect.
            await eventually(lambda: a.refused_as_duplicate >= 1)
            assert a.sessions == 1
            proxy.pass_through()
            await eventually(lambda: client.server_nodes == ["node-a", "node-b"])
            assert await served(b, "/again") == (200, "ha")


async def test_a_node_out_of_reach_holds_the_start_up_for_connect_timeout_only(
    nursery, start_local_service
):
    a = await Node(nursery, "node-a").start()
    local = await start_local_service("ha")
    nowhere = free_port()
    with trio.fail_after(20):
        started = trio.current_time()
        async with tunnel.open_tunnel(
            agent([a.port, nowhere], local.port, connect_timeout=1)
        ) as client:
            assert 1 <= trio.current_time() - started < 3
            assert client.server_nodes == ["node-a"]
            assert client.state is CONNECTED
            assert await served(a, "/up") == (200, "ha")


async def test_through_one_load_balanced_address_the_agent_finds_two_nodes(
    two_nodes, start_local_service, nursery
):
    a, b = two_nodes
    local = await start_local_service("ha")
    # Three connections in a row to each: the agent's second and third land
    # on the node it holds already, and must be refused there, cheaply.
    balancer: RoundRobin = await nursery.start(RoundRobin([a.port, b.port], run_length=3).run)
    with trio.fail_after(20):
        async with tunnel.open_tunnel(agent(balancer.port, local.port)) as client:
            assert client.server_nodes == ["node-a", "node-b"]
            assert client.server_connections == 2
            assert balancer.sent == [a.port] * 3 + [b.port]
            assert a.refused_as_duplicate == 2
            await eventually(lambda: (a.sessions, b.sessions) == (1, 1), limit=2)
            assert await served(a, "/a") == (200, "ha")
            assert await served(b, "/b") == (200, "ha")


async def test_a_search_for_a_node_that_is_not_there_is_bounded(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    start_local_service: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The cluster says two nodes, but only one answers behind the address.
    # Every delay drawn is its upper bound, so every time below is exact.
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    only = await Node(nursery, "node-a", nodes=2).start()
    assert only.app is not None
    # The node count is asked once per answer: the agent's first connection's
    # acceptance, then each refusal of its search for a second node.
    answered: list[float] = []

    def count_and_note() -> int:
        answered.append(trio.current_time())
        return 2

    only.app.registry.node_count = count_and_note
    local = await start_local_service("ha")
    config = agent(only.port, local.port, backoff_initial=0.5, backoff_max=30, connect_timeout=1)
    with trio.fail_after(700):
        async with tunnel.open_tunnel(config) as client:
            assert client.server_connections == 1
            await trio.sleep(600)
            assert client.server_nodes == ["node-a"]
            assert client.state is CONNECTED
    refused = [at - answered[1] for at in answered[1:]]
    assert len(refused) == only.refused_as_duplicate
    gaps = [round(later - earlier, 6) for earlier, later in itertools.pairwise(refused)]
    # The first NODE_PROBES_IN_A_ROW (8) attempts come quickly, as a worker
    # search's do: 0.05 s doubling, 1 s at most...
    assert gaps[:7] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    # ...then the ordinary reconnect backoff (0.5 s doubling up to 30 s)
    # comes between each 8 and the next.
    streak_ends = gaps[7::8]
    assert streak_ends[:9] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert all(gap == 1.0 for index, gap in enumerate(gaps[8:], 8) if index % 8 != 7)
    # Left to the short retry of a duplicate worker, the search would have
    # been refused once a second, ~600 times; bounded, 8 every 37 s or so.
    assert len(refused) <= 200, len(refused)


async def test_a_cluster_that_shrank_is_not_searched_for_its_lost_node(
    two_nodes, start_local_service
):
    a, b = two_nodes
    local = await start_local_service("ha")
    with trio.fail_after(20):
        async with tunnel.open_tunnel(agent([a.port, b.port], local.port)) as client:
            assert client.server_nodes == ["node-a", "node-b"]
            # node-b leaves the cluster for good; node-a's store sees it gone.
            a.nodes = 1
            await b.stop()
            await eventually(lambda: client.server_nodes == ["node-a"])
            # The search for a second node lands on node-a, whose refusal
            # says the cluster has one node now: the search ends there.
            await eventually(lambda: a.refused_as_duplicate >= 1)
            await eventually(lambda: client._running == {(0, 0)})
            refused = a.refused_as_duplicate
            await trio.sleep(1)
            assert a.refused_as_duplicate == refused
            assert client.state is CONNECTED
            assert await served(a, "/still") == (200, "ha")


async def test_a_node_back_in_the_cluster_is_joined_again(
    two_nodes, start_local_service, monkeypatch
):
    # The census runs every CENSUS_INTERVAL; a short one here.
    monkeypatch.setattr(tunnel.client._client, "CENSUS_INTERVAL", 0.5)
    a, b = two_nodes
    local = await start_local_service("ha")
    with trio.fail_after(20):
        async with tunnel.open_tunnel(agent([a.port, b.port], local.port)) as client:
            assert client.server_nodes == ["node-a", "node-b"]
            a.nodes = 1
            await b.stop()
            await eventually(lambda: client._running == {(0, 0)})
            # While the cluster is one node, each census costs node-a one
            # cheap refusal, and nothing more.
            refused = a.refused_as_duplicate
            await trio.sleep(1.6)
            assert 1 <= a.refused_as_duplicate - refused <= 5
            assert client.server_nodes == ["node-a"]
            # node-b is back: the next census finds it.
            await b.start()
            a.nodes = 2
            await eventually(lambda: client.server_nodes == ["node-a", "node-b"])
            assert await served(b, "/back") == (200, "ha")


async def test_ha_connections_1_holds_one_node_and_fails_over(two_nodes, start_local_service):
    a, b = two_nodes
    local = await start_local_service("ha")
    with trio.fail_after(20):
        async with tunnel.open_tunnel(
            agent([a.port, b.port], local.port, ha_connections=1)
        ) as client:
            await trio.sleep(0.3)
            assert client.server_nodes == ["node-a"]
            assert (a.sessions, b.sessions) == (1, 0)
            assert await served(b, "/not-held") == (404, None)
            await a.stop()
            # Its one connection lost, the agent dials the next address.
            await eventually(lambda: client.server_nodes == ["node-b"])
            assert await served(b, "/failed-over") == (200, "ha")


async def test_a_server_on_its_own_gets_one_connection_as_before(
    nursery, start_local_service, monkeypatch
):
    # Nor does it look, now and then, for nodes a cluster may have gained.
    monkeypatch.setattr(tunnel.client._client, "CENSUS_INTERVAL", 0.1)
    server = await Node(nursery, "alone", nodes=None).start()
    local = await start_local_service("one")
    with trio.fail_after(10):
        async with tunnel.open_tunnel(agent(server.port, local.port)) as client:
            assert client.config.ha_connections == 2
            await trio.sleep(0.5)
            assert client.server_connections == 1
            assert server.sessions == 1
            # Nothing probed for a second node that the server said is not there.
            assert server.refused_as_duplicate == 0
            assert await served(server, "/one") == (200, "one")


async def test_servers_that_are_not_one_cluster_are_failovers(nursery, start_local_service):
    # Each says it is the only node: the agent holds the first it reaches.
    a = await Node(nursery, "solo-a", nodes=1).start()
    b = await Node(nursery, "solo-b", nodes=1).start()
    local = await start_local_service("solo")
    with trio.fail_after(20):
        async with tunnel.open_tunnel(agent([a.port, b.port], local.port)) as client:
            await trio.sleep(0.3)
            assert client.server_nodes == ["solo-a"]
            assert (a.sessions, b.sessions) == (1, 0)
            await a.stop()
            await eventually(lambda: client.server_nodes == ["solo-b"])
            assert await served(b, "/solo") == (200, "solo")


async def handshake_answer(port: int, headers: dict[str, str]) -> bytes:
    """The head of the answer to an agent's handshake with ``headers`` (and a wrong token)."""
    request = (
        "GET /_tunnel HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        + "Authorization: Bearer wrong-token\r\n\r\n"
    )
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request.encode())
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = await stream.receive_some()
                assert chunk, answer
                answer += chunk
    return answer.split(b"\r\n\r\n")[0].lower()


async def test_a_node_not_wanted_refuses_before_anything_else(nursery):
    # The token is wrong too: the node checks come first and cost nothing.
    node = await Node(nursery, "node-a", nodes=3).start()
    held = await handshake_answer(node.port, {HAVE_NODES_HEADER: "node-x, node-a"})
    assert held.startswith(b"http/1.1 421 "), held
    # The refusal says how big the cluster is now, and names no node.
    assert b"\r\ntunnel-nodes: 3" in held, held
    assert b"node-a" not in held
    other = await handshake_answer(node.port, {WANT_NODE_HEADER: "node-b"})
    assert other.startswith(b"http/1.1 421 "), other
    # Wanted, or not held: on to the token, which is refused.
    wanted = await handshake_answer(node.port, {WANT_NODE_HEADER: "node-a"})
    assert wanted.startswith(b"http/1.1 401 "), wanted
    elsewhere = await handshake_answer(node.port, {HAVE_NODES_HEADER: "node-x"})
    assert elsewhere.startswith(b"http/1.1 401 "), elsewhere
    assert b"tunnel-nodes" not in elsewhere
    assert node.refused_as_duplicate == 2


# -- nodes of several worker processes ---------------------------------------------

#: The worker id an app in this test process answers with (see ``simulated_workers``).
WORKER: contextvars.ContextVar[str] = contextvars.ContextVar("test_ha_worker")


@pytest.fixture
def simulated_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let apps in this one process stand for worker processes, each with its own id.

    A worker's id is its process's; here each app's serving tasks see the id
    their node set for them (trio tasks inherit the context they are started in).
    """
    real = tunnel.server._control.worker_id
    monkeypatch.setattr(tunnel.server._control, "worker_id", lambda: WORKER.get(real()))


class WorkerNode:
    """A node of ``workers`` worker apps (one node id) behind one address, as one machine."""

    def __init__(
        self, nursery: trio.Nursery, node_id: str, workers: int, nodes: int, *, ids: bool = True
    ) -> None:
        self.nursery = nursery
        self.node_id = node_id
        #: Whether the workers say the node's id (as tunnel.serve's do), or
        #: each one its own made-up id (as under Hypercorn's own workers).
        self.ids = ids
        self.apps: list[tunnel.TunnelApp] = []
        self.workers = workers
        self.nodes = nodes
        self.port = 0

    async def start(self) -> WorkerNode:
        ports = []
        for index in range(self.workers):
            config = tunnel.ServerConfig(
                address="127.0.0.1:0",
                tokens=frozenset({TOKEN}),
                node_id=self.node_id if self.ids else None,
                workers=self.workers,
                grace_period=0.5,
            )
            app = tunnel.TunnelApp(config)
            app.registry.node_count = lambda: self.nodes
            self.apps.append(app)
            urls = await self.nursery.start(
                self._serve, app, hypercorn_config(config), f"{self.node_id}-w{index}"
            )
            ports.append(int(urls[0].rsplit(":", 1)[1]))
        # The kernel spreads connections over a port's workers; a balancer here.
        balancer: RoundRobin = await self.nursery.start(RoundRobin(ports).run)
        self.port = balancer.port
        return self

    async def _serve(
        self, app: tunnel.TunnelApp, hc: Any, worker: str, *, task_status: Any
    ) -> None:
        WORKER.set(worker)
        await hypercorn.trio.serve(app, hc, task_status=task_status)  # type: ignore[arg-type]

    @property
    def sessions(self) -> list[int]:
        return [len(app.registry.sessions()) for app in self.apps]


@pytest.fixture
def simulated_node_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apps without a ``node_id`` make up one each, as separate processes would."""
    real = tunnel.server._control.node_id
    monkeypatch.setattr(
        tunnel.server._control,
        "node_id",
        lambda config: real(config) if config.node_id else f"node-{WORKER.get()}",
    )


async def test_workers_of_a_server_on_its_own_are_all_held_whatever_node_ids_they_give(
    simulated_workers, simulated_node_ids, nursery, start_local_service
):
    # Under Hypercorn's own worker processes (not tunnel.serve's), each worker
    # makes up a node id of its own; the server says it is one node.
    alone = await WorkerNode(nursery, "alone", workers=2, nodes=1, ids=False).start()
    local = await start_local_service("ha")
    with trio.fail_after(20):
        async with tunnel.open_tunnel(agent(alone.port, local.port)) as client:
            assert client.server_connections == 2
            await eventually(lambda: alone.sessions == [1, 1], limit=2)


@pytest.mark.parametrize(("ha", "held"), [(2, ["node-a", "node-b"]), (1, ["node-a"])])
async def test_the_agent_holds_every_worker_of_each_node_it_holds(
    ha, held, simulated_workers, nursery, start_local_service
):
    a = await WorkerNode(nursery, "node-a", workers=2, nodes=2).start()
    b = await WorkerNode(nursery, "node-b", workers=2, nodes=2).start()
    local = await start_local_service("ha")
    with trio.fail_after(20):
        async with tunnel.open_tunnel(
            agent([a.port, b.port], local.port, ha_connections=ha)
        ) as client:
            # open_tunnel waited for all of them: each worker of each node held.
            assert client.server_connections == 2 * len(held)
            assert client.server_nodes == held
            await eventually(lambda: a.sessions == [1, 1], limit=2)
            await eventually(lambda: b.sessions == ([1, 1] if ha == 2 else [0, 0]), limit=2)
            await trio.sleep(0.3)
            assert client.server_connections == 2 * len(held)


# -- the command line ------------------------------------------------------------


def test_server_repeated_and_ha_connections_are_parsed() -> None:
    servers = ["--server", "a.example:8000", "--server", "https://b.example"]
    args = _parser().parse_args(
        ["http", "8080", *servers, "--ha-connections", "3", "--token", "t", "--no-inspector"]
    )
    config = _agent_config(args)
    assert config.addresses == ("a.example:8000", "https://b.example")
    assert [(s.scheme, s.host, s.port) for s in config.servers] == [
        ("ws", "a.example", 8000),
        ("wss", "b.example", 443),
    ]
    assert config.ha_connections == 3
    assert config.claimed_host == "a.example"
    # Once, it is one address, as before; the default is two nodes.
    single = _agent_config(
        _parser().parse_args(["http", "8080", "--server", "a.example:8000", "--token", "t"])
    )
    assert single.address == "a.example:8000"
    assert single.ha_connections == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ha-connections", "0"], "--ha-connections: give a whole number of 1 or more, not '0'"),
        (["--ha-connections", "two"], "--ha-connections: give a whole number of 1 or more"),
        (["--ha-connections", "17"], "--ha-connections 17: give how many nodes"),
        (["--server", "x:1"], "--server names x:1 twice; give each server once"),
        (["--server", "y"], "--server 'y' has no port"),
    ],
)
def test_bad_ha_arguments_get_one_line_and_status_2(extra: list[str], message: str) -> None:
    argv = ["http", "8080", "--server", "x:1", "--token", "t", *extra]
    result = subprocess.run(
        [sys.executable, "-m", "tunnel", *argv], capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.count("\n") == 1, err
    assert message in err, err
    assert "Config" not in err, err


def test_the_node_count_hook_defaults_to_one() -> None:
    app = tunnel.TunnelApp(tunnel.ServerConfig(tokens=frozenset({TOKEN})))
    assert app.registry.nodes() == 1
    app.registry.node_count = lambda: 3
    assert app.registry.nodes() == 3
    # Nonsense from a store is not passed on to agents.
    app.registry.node_count = lambda: 0
    assert app.registry.nodes() == 1
