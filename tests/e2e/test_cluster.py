"""Servers sharing one Redis (``ServerConfig.store``): one owner per host, shared limits,
and what happens when Redis or a node goes away.

Every test runs real ``redis-server`` (``tests/redis_server.py``), real nodes
(``tunnel.serve`` in this process, or ``tunnel server`` in a child process
where one must die by SIGKILL) and real agents.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import coredis
import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trio_websocket
import trustme
from conftest import TOKEN, RunningServer, StartServer
from redis_server import RedisServer

import tunnel
from helpers import echo_websocket, eventually, free_port
from tunnel._protocol.handshake import HOST_HEADER, SUBPROTOCOL
from tunnel.server._app import LOCATE_FOR

MakeConfig = Callable[..., tunnel.ClientConfig]
SECRET = "a-cluster-secret-for-tests"
BOB = "b0b-token"
HOST = "app.localhost"
#: Short heartbeats: entries live two intervals (1 s) without one.
KEEPALIVE = 0.5


@pytest.fixture
def agent_config(
    agent_config: Callable[..., tunnel.ClientConfig],
) -> Callable[..., tunnel.ClientConfig]:
    """conftest's, with one node connection: these agents are given one node's address.

    (An agent given a single address in a cluster of two would keep dialling it
    for a second node, by design: that address could be a load balancer's.)
    """

    def make(server_port: int, local_port: int, **overrides: Any) -> tunnel.ClientConfig:
        overrides.setdefault("ha_connections", 1)
        return agent_config(server_port, local_port, **overrides)

    return make


async def start_node(
    start: StartServer, redis: RedisServer, name: str, **overrides: Any
) -> RunningServer:
    settings: dict[str, Any] = {
        "store": redis.url,
        "cluster_secret": SECRET,
        "node_id": name,
        "tokens": frozenset({TOKEN, BOB}),
        "keepalive_interval": KEEPALIVE,
        "keepalive_timeout": 2.0,
    }
    settings.update(overrides)
    return await start(**settings)


@asynccontextmanager
async def redis_client(redis: RedisServer) -> AsyncIterator[Any]:
    async with coredis.Redis.from_url(redis.url, decode_responses=True) as client:
        yield client


async def until(check: Callable[[], Awaitable[bool]], limit: float = 10.0) -> None:
    """Poll the async ``check`` until it holds; fail after ``limit`` seconds."""
    for _ in range(int(limit / 0.05)):
        if await check():
            return
        await trio.sleep(0.05)
    assert await check()


async def owner(redis: RedisServer, host: str = HOST) -> str | None:
    """The digest (hex) that owns ``host`` in the store now, if any."""
    async with redis_client(redis) as client:
        found: str | None = await client.get(f"tunnel:owner:{host}")
        return found


class Claim:
    """A raw agent handshake for a host, held open until told to close."""

    def __init__(self, port: int, token: str, host: str = HOST) -> None:
        self.port, self.token, self.host = port, token, host
        self.status: int | None = None
        self.retry_after: str | None = None
        self.close = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        headers = [
            (b"authorization", f"Bearer {self.token}".encode()),
            (HOST_HEADER.encode(), self.host.encode()),
        ]
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        try:
            async with trio.open_nursery() as nursery:
                ws = await trio_websocket.wrap_client_stream(
                    nursery, stream, "127.0.0.1", "/_tunnel",
                    subprotocols=[SUBPROTOCOL], extra_headers=headers,
                )  # fmt: skip
                self.status = 101
                task_status.started()
                await self.close.wait()
                await ws.aclose()
        except* trio_websocket.ConnectionRejected as group:
            rejected = group.exceptions[0]
            assert isinstance(rejected, trio_websocket.ConnectionRejected)
            self.status = rejected.status_code
            self.retry_after = dict(rejected.headers or []).get(b"retry-after", b"").decode()
            task_status.started()
        finally:
            await stream.aclose()


async def claim_once(port: int, token: str, host: str = HOST) -> Claim:
    """One raw handshake, closed at once (or refused): its status."""
    claim = Claim(port, token, host)
    claim.close.set()
    async with trio.open_nursery() as nursery:
        await nursery.start(claim.run)
    return claim


async def _is_none(value: Awaitable[object]) -> bool:
    return await value is None


async def _is_not_none(value: Awaitable[object]) -> bool:
    return await value is not None


# -- start -----------------------------------------------------------------------


async def test_a_store_that_cannot_be_reached_stops_the_server_at_start(tmp_path) -> None:
    closed = RedisServer(str(tmp_path))  # never started: nothing listens on its port
    url = f"redis://tunnel:hunter2-password@127.0.0.1:{closed.port}/0"
    config = tunnel.ServerConfig(address="127.0.0.1:0", store=url, cluster_secret=SECRET)
    with trio.fail_after(10), pytest.raises(tunnel.StoreUnavailableError) as raised:
        await tunnel.serve(config)
    message = str(raised.value)
    assert f"127.0.0.1:{closed.port}" in message
    assert "hunter2" not in message


def test_tunnel_server_exits_2_with_one_line_when_the_store_is_unreachable(tmp_path) -> None:
    closed = RedisServer(str(tmp_path))
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    store = tmp_path / "store"
    store.write_text(f"redis://:hunter2-password@127.0.0.1:{closed.port}/0\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunnel",
            "server",
            "--address",
            "127.0.0.1:0",
            "--store-file",
            str(store),
            "--cluster-secret-file",
            str(secret),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"127.0.0.1:{closed.port}" in lines[0], lines[0]
    assert "hunter2" not in lines[0]


def test_tunnel_server_needs_a_cluster_secret_with_a_store(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tunnel", "server", "--store", "redis://127.0.0.1:1/0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "--cluster-secret-file" in done.stderr


# -- ownership --------------------------------------------------------------------


async def test_a_host_has_one_owner_across_nodes(
    start_tunnel_server, redis_server, local_service, open_agent
) -> None:
    one = await start_node(start_tunnel_server, redis_server, "one")
    two = await start_node(start_tunnel_server, redis_server, "two")
    with trio.fail_after(20):
        async with open_agent(one.port, local_service.port):
            with pytest.raises(tunnel.HostInUseError):
                async with open_agent(two.port, local_service.port, token=BOB):
                    pass
            # The same identity on another node is its agent's second connection.
            assert (await claim_once(two.port, TOKEN)).status == 101
        # Gone from every node (the release is made in the background): now
        # anyone may have it.
        await until(lambda: _is_none(owner(redis_server)))
        async with open_agent(two.port, local_service.port, token=BOB):
            pass


async def test_a_hundred_concurrent_claims_over_three_nodes_make_one_owner(
    start_tunnel_server, redis_server
) -> None:
    nodes = [
        await start_node(start_tunnel_server, redis_server, name, handshake_timeout=30)
        for name in ("one", "two", "three")
    ]
    claims = [Claim(nodes[i % 3].port, (TOKEN, BOB)[(i // 3) % 2]) for i in range(100)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for claim in claims:
                nursery.start_soon(claim.run)
            await eventually(lambda: all(c.status is not None for c in claims), limit=50)
            accepted = {c.token for c in claims if c.status == 101}
            refused = {c.status for c in claims if c.status != 101}
            for claim in claims:
                claim.close.set()
    assert len(accepted) == 1, accepted
    assert refused == {409}, refused
    (winner,) = accepted
    # Every claim of the winner was accepted: its agent's many connections.
    assert all(c.status == 101 for c in claims if c.token == winner)


async def test_the_tunnel_limit_of_an_identity_is_one_limit_across_nodes(
    start_tunnel_server, redis_server, local_service, open_agent
) -> None:
    one = await start_node(start_tunnel_server, redis_server, "one", max_tunnels_per_identity=1)
    two = await start_node(start_tunnel_server, redis_server, "two", max_tunnels_per_identity=1)
    with trio.fail_after(20):
        async with open_agent(one.port, local_service.port, host="a.localhost"):
            with pytest.raises(tunnel.RejectedError) as raised:
                async with open_agent(two.port, local_service.port, host="b.localhost"):
                    pass
            assert raised.value.status == 403
            assert "1 tunnel" in str(raised.value)


# -- losing Redis, losing a node ---------------------------------------------------------


async def test_without_redis_nodes_serve_what_they_hold_and_refuse_new_agents(
    start_tunnel_server, redis_server, local_service, open_agent, visitor
) -> None:
    one = await start_node(start_tunnel_server, redis_server, "one")
    two = await start_node(start_tunnel_server, redis_server, "two")
    with trio.fail_after(30):
        async with open_agent(one.port, local_service.port), visitor(one.port) as http:
            await redis_server.stop()
            for i in range(5):
                assert (await http.get(f"/while-redis-is-down/{i}")).status_code == 200
            refused = await claim_once(two.port, BOB, "other.localhost")
            assert refused.status == 503
            assert refused.retry_after == "5"
            # Redis comes back empty: within one heartbeat the nodes have
            # published what they hold again, with nothing else done.
            await redis_server.start()
            await until(lambda: _is_not_none(owner(redis_server)), limit=KEEPALIVE * 4)
            assert (await claim_once(two.port, BOB)).status == 409
            assert (await http.get("/after")).status_code == 200


async def test_a_node_cut_off_from_redis_lets_go_of_a_host_given_to_another(
    start_tunnel_server, redis_server, local_service, start_local_service, open_agent, visitor
) -> None:
    one = await start_node(start_tunnel_server, redis_server, "one")
    two = await start_node(start_tunnel_server, redis_server, "two")
    bobs = await start_local_service("bob's")

    async def alice_loses_the_host() -> None:
        async with open_agent(one.port, local_service.port):
            # As if node one had been cut off for longer than its entries live:
            # they are gone, and Bob claims the host through node two.
            async with redis_client(redis_server) as client:
                await client.flushall()
            async with open_agent(two.port, bobs.port, token=BOB), visitor(one.port) as http:
                # Node one's next heartbeat finds the host given away and lets
                # Alice's agent go; it no longer answers for the host.
                async def let_go() -> bool:
                    return (await http.get("/who")).status_code != 200

                await until(let_go, limit=KEEPALIVE * 4)
                assert await owner(redis_server) == hashlib.sha256(BOB.encode()).hexdigest()
                # Alice's agent, back, is refused: the host is Bob's now.
                await trio.sleep_forever()

    with trio.fail_after(30), pytest.raises(tunnel.HostInUseError):
        await alice_loses_the_host()


async def test_a_killed_nodes_hosts_are_free_within_two_keepalive_intervals(
    tmp_path, start_tunnel_server, redis_server, local_service, open_agent, nursery
) -> None:
    two = await start_node(start_tunnel_server, redis_server, "two")
    process, port = await _node_process(nursery, tmp_path, redis_server, "one")
    try:
        with trio.fail_after(30):
            async with open_agent(port, local_service.port):
                assert (await claim_once(two.port, BOB)).status == 409
                os.kill(process.pid, signal.SIGKILL)
                killed = trio.current_time()

                async def free() -> bool:
                    return (await claim_once(two.port, BOB)).status == 101

                await until(free)
                # Two intervals, and a little for the scheduling of this test.
                assert trio.current_time() - killed < 2 * KEEPALIVE + 1.0
    finally:
        process.kill()
        await process.wait()


async def _listening_port(process: trio.Process) -> int:
    """The port ``tunnel server`` logs that it listens on."""
    assert process.stderr is not None
    seen = b""
    while b"http://127.0.0.1:" not in seen or not seen.endswith(b"\n"):
        chunk = await process.stderr.receive_some()
        assert chunk, seen.decode()
        seen += chunk
    text = seen.decode()
    start = text.index("http://127.0.0.1:") + len("http://127.0.0.1:")
    digits = ""
    for char in text[start:]:
        if not char.isdigit():
            break
        digits += char
    return int(digits)


# -- limits ----------------------------------------------------------------------------


async def test_a_visitor_rate_limit_is_one_limit_across_nodes(
    start_tunnel_server, redis_server, local_service, open_agent, visitor
) -> None:
    limit = tunnel.RateLimit(requests_per_second=0.5, burst=6)
    one = await start_node(start_tunnel_server, redis_server, "one", visitor_rate_limit=limit)
    two = await start_node(start_tunnel_server, redis_server, "two", visitor_rate_limit=limit)
    with trio.fail_after(30):
        async with (
            open_agent(one.port, local_service.port, host="a.localhost"),
            open_agent(two.port, local_service.port, host="b.localhost", token=BOB),
            visitor(one.port, host="a.localhost") as on_one,
            visitor(two.port, host="b.localhost") as on_two,
        ):
            statuses = []
            for i in range(8):
                statuses.append((await on_one.get(f"/a/{i}")).status_code)
                statuses.append((await on_two.get(f"/b/{i}")).status_code)
    # Six at once, then one every two seconds: per node it would be twelve.
    assert statuses.count(200) in (6, 7), statuses
    assert set(statuses) == {200, 429}


# -- operations ------------------------------------------------------------------------

ADMIN = "admin-secret"


async def test_any_nodes_admin_api_lists_and_disconnects_the_clusters_tunnels(
    start_tunnel_server, redis_server, local_service, agent_config, nursery
) -> None:
    one = await start_node(start_tunnel_server, redis_server, "one", admin_token=ADMIN)
    two = await start_node(start_tunnel_server, redis_server, "two", admin_token=ADMIN)
    client = tunnel.Client(agent_config(two.port, local_service.port))
    stopped = trio.Event()
    errors: list[tunnel.RejectedError] = []

    async def run_agent(*, task_status: trio.TaskStatus[str]) -> None:
        try:
            await client.connect(task_status=task_status)
        except tunnel.RejectedError as exc:
            errors.append(exc)
        stopped.set()

    with trio.fail_after(20):
        await nursery.start(run_agent)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{one.port}/_tunnel/admin",
            headers={"authorization": f"Bearer {ADMIN}", "host": "localhost"},
        ) as admin:
            # Node one lists what node two serves, once node two has published it.
            async def listed() -> bool:
                tunnels = (await admin.get("/tunnels")).json()["tunnels"]
                return [(t["host"], t["node"]) for t in tunnels] == [(HOST, "two")]

            await until(listed, limit=KEEPALIVE * 4)
            described = (await admin.get(f"/tunnels/{HOST}")).json()
            assert (described["node"], described["agents"]) == ("two", 1)

            answer = await admin.delete(f"/tunnels/{HOST}", params={"reason": "abuse report"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["disconnected"]["node"] == "two"
            # Answered once node two let go of it.
            assert await owner(redis_server) is None
            await stopped.wait()
            assert client.state is tunnel.ClientState.CLOSED
            assert (await admin.delete(f"/tunnels/{HOST}")).status_code == 404
    (error,) = errors
    assert "operator disconnected" in str(error)
    assert "abuse report" in str(error)


async def test_a_nodes_metrics_carry_its_node_id(
    start_tunnel_server, redis_server, local_service, open_agent
) -> None:
    one = await start_node(start_tunnel_server, redis_server, "one", admin_token=ADMIN)
    with trio.fail_after(20):
        async with (
            open_agent(one.port, local_service.port),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{one.port}") as http,
        ):
            answer = await http.get(
                "/_tunnel/admin/metrics",
                headers={"authorization": f"Bearer {ADMIN}", "host": "localhost"},
            )
    assert 'tunnel_agents_connected{node="one"} 1.0' in answer.text
    samples = [line for line in answer.text.splitlines() if line and not line.startswith("#")]
    assert all('node="one"' in line for line in samples), samples


async def test_a_store_with_a_password(tmp_path, start_tunnel_server, local_service, open_agent):
    async with RedisServer(str(tmp_path), password="n0t-in-any-message").running() as redis:
        await _serve_one_tunnel(start_tunnel_server, redis, local_service, open_agent)
        wrong = redis.url.replace("n0t-in-any-message", "wrong-password")
        config = tunnel.ServerConfig(address="127.0.0.1:0", store=wrong, cluster_secret=SECRET)
        with trio.fail_after(10), pytest.raises(tunnel.StoreUnavailableError) as raised:
            await tunnel.serve(config)
    message = str(raised.value)
    assert f"redis://:***@127.0.0.1:{redis.port}/0" in message, message
    assert "wrong-password" not in message


async def test_a_store_over_tls(tmp_path, start_tunnel_server, local_service, open_agent):
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    paths = tmp_path / "ca.pem", tmp_path / "redis.pem", tmp_path / "redis.key"
    ca.cert_pem.write_to_path(paths[0])
    issued.cert_chain_pems[0].write_to_path(paths[1])
    issued.private_key_pem.write_to_path(paths[2])
    tls = (str(paths[0]), str(paths[1]), str(paths[2]))
    async with RedisServer(str(tmp_path), tls=tls).running() as redis:
        await _serve_one_tunnel(start_tunnel_server, redis, local_service, open_agent)


async def _serve_one_tunnel(
    start_tunnel_server: StartServer, redis: RedisServer, local_service: Any, open_agent: Any
) -> None:
    """A node on ``redis`` takes a tunnel, and the store records its owner."""
    with trio.fail_after(20):
        node = await start_node(start_tunnel_server, redis, "one")
        async with open_agent(node.port, local_service.port):
            assert await owner(redis) == hashlib.sha256(TOKEN.encode()).hexdigest()


# -- any node serves any tunnel ----------------------------------------------------------


async def test_a_visitor_of_any_node_reaches_an_agent_connected_to_one(
    start_tunnel_server, redis_server, local_service, open_agent
) -> None:
    nodes = [await start_node(start_tunnel_server, redis_server, n) for n in ("a", "b", "c")]
    with trio.fail_after(30):
        async with open_agent(nodes[0].port, local_service.port, ha_connections=1) as agent:
            assert agent.server_connections == 1
            for node in nodes:
                # From 127.0.0.2: the agent's service must see the visitor's
                # address, not the forwarding node's.
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{node.port}",
                    headers={"host": HOST},
                    transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2"),
                ) as http:
                    answer = await http.post(f"/via/{node.port}", content=b"x" * 1000)
                assert answer.status_code == 200, answer.text
                echoed = answer.json()
                assert echoed["body"] == "x" * 1000
                assert ["x-forwarded-for", "127.0.0.2"] in echoed["headers"]


async def test_a_websocket_through_a_forwarding_node(
    start_tunnel_server, redis_server, open_agent, nursery
) -> None:
    one = await start_node(start_tunnel_server, redis_server, "one")
    two = await start_node(start_tunnel_server, redis_server, "two")
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    (url,) = await nursery.start(hypercorn.trio.serve, echo_websocket, config)
    with trio.fail_after(30):
        async with open_agent(one.port, int(url.rsplit(":", 1)[1]), ha_connections=1):
            stream = await trio.open_tcp_stream("127.0.0.1", two.port)
            async with stream, trio.open_nursery() as inner:
                ws = await trio_websocket.wrap_client_stream(inner, stream, HOST, "/ws")
                await ws.send_message("hello")
                assert await ws.get_message() == "echo: hello"
                await ws.send_message(b"x" * 100_000)
                assert await ws.get_message() == b"x" * 100_000
                await ws.aclose()


async def test_without_redis_a_visitor_of_another_node_gets_a_page_that_says_so(
    start_tunnel_server, redis_server, local_service, open_agent, visitor
) -> None:
    one = await start_node(start_tunnel_server, redis_server, "one")
    two = await start_node(start_tunnel_server, redis_server, "two")
    with trio.fail_after(30):
        async with open_agent(one.port, local_service.port, ha_connections=1):
            async with visitor(two.port) as http:
                assert (await http.get("/before")).status_code == 200
                await redis_server.stop()
                # What node two learnt a moment ago still serves (for at most
                # LOCATE_FOR seconds); then it needs the store, which is gone.
                await trio.sleep(LOCATE_FOR)
                answer = await http.get("/without-redis")
            assert answer.status_code == 502
            assert "state is unavailable" in answer.text
            async with visitor(one.port) as http:
                assert (await http.get("/on-its-own-node")).status_code == 200


async def test_a_node_killed_under_load_costs_only_the_requests_in_flight_on_it(
    tmp_path, start_tunnel_server, redis_server, local_service, agent_config, nursery
) -> None:
    """An agent holds nodes one and two; visitors come through nodes two and three.

    Node one dies by SIGKILL under load: only requests it was carrying may
    fail, and every request that starts after it died is served, through the
    agent's connection to node two (node three forwards there at once).
    """
    two = await start_node(start_tunnel_server, redis_server, "two")
    three = await start_node(start_tunnel_server, redis_server, "three")
    one, one_port = await _node_process(nursery, tmp_path, redis_server, "one")
    outcomes: list[tuple[float, float, int | None]] = []  # (start, end, status or None)
    killed_at = math.inf
    stop = trio.Event()

    async def visit(port: int) -> None:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"host": HOST}, timeout=10
        ) as http:
            for i in itertools.count():
                if stop.is_set():
                    return
                started = trio.current_time()
                status = None
                with contextlib.suppress(httpx.HTTPError):
                    status = (await http.get(f"/load/{i}")).status_code
                outcomes.append((started, trio.current_time(), status))

    try:
        with trio.fail_after(60):
            config = agent_config(
                one_port,
                local_service.port,
                address=[f"127.0.0.1:{one_port}", f"127.0.0.1:{two.port}"],
                ha_connections=2,
            )
            async with tunnel.open_tunnel(config) as agent:
                await eventually(lambda: agent.server_connections == 2, limit=20)
                async with trio.open_nursery() as load:
                    for port in (two.port, three.port, three.port, three.port):
                        load.start_soon(visit, port)
                    await trio.sleep(1.0)
                    one.kill()
                    killed_at = trio.current_time()
                    await trio.sleep(2.0)
                    stop.set()
                assert agent.state is tunnel.ClientState.CONNECTED
    finally:
        one.kill()
        await one.wait()
    before = [o for o in outcomes if o[1] < killed_at]
    after = [o for o in outcomes if o[0] > killed_at]
    in_flight = [o for o in outcomes if o[0] <= killed_at <= o[1]]
    assert len(before) > 20, len(before)
    assert len(after) > 20, len(after)
    assert all(status == 200 for _, _, status in before)
    assert all(status == 200 for _, _, status in after), [s for _, _, s in after if s != 200]
    assert len(in_flight) <= 4


async def _node_process(
    nursery: trio.Nursery, tmp_path: Any, redis: RedisServer, name: str
) -> tuple[trio.Process, int]:
    """``tunnel server`` as a node of the cluster, in a process of its own (to kill).

    Its log is read to the end (a full pipe would stop the node).
    """
    settings = tmp_path / f"{name}.toml"
    settings.write_text(
        f'address = "127.0.0.1:0"\nstore = "{redis.url}"\n'
        f'cluster_secret = "{SECRET}"\nnode_id = "{name}"\ntokens = ["{TOKEN}", "{BOB}"]\n'
        f"keepalive_interval = {KEEPALIVE}\nkeepalive_timeout = 2.0\n"
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tunnel", "server", "--config", str(settings)],
        stderr=subprocess.PIPE,
    )
    with trio.fail_after(30):
        port = await _listening_port(process)
    nursery.start_soon(_drain, process.stderr)
    return process, port


async def _drain(stream: Any) -> None:
    with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
        while await stream.receive_some():
            pass


async def test_a_tcp_tunnel_is_reached_through_every_node(
    start_tunnel_server, redis_server, nursery
) -> None:
    """Node one (on 127.0.0.1) holds the agent; node two listens on the same
    public port (on 127.0.0.2: one machine) and carries each connection there."""
    port = free_port()
    ports = range(port, port + 1)
    one = await start_node(start_tunnel_server, redis_server, "one", tcp_ports=ports)
    await start_node(
        start_tunnel_server, redis_server, "two", tcp_ports=ports, tcp_host="127.0.0.2"
    )

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    (listener,) = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    config = tunnel.ClientConfig(
        address=f"127.0.0.1:{one.port}",
        port=listener.socket.getsockname()[1],
        tcp=True,
        token=TOKEN,
        ha_connections=1,
    )

    async def echoes(host: str) -> bool:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        async with stream:
            await stream.send_all(b"ping " + host.encode())
            with trio.move_on_after(2):
                return await stream.receive_some(100) == b"ping " + host.encode()
        return False

    with trio.fail_after(30):
        async with tunnel.open_tunnel(config) as agent:
            assert agent.url == f"tcp://127.0.0.1:{port}"
            assert await echoes("127.0.0.1")
            # Node two listens once its heartbeat has seen the tunnel.
            await until(lambda: echoes("127.0.0.2"), limit=KEEPALIVE * 6)
        # The agent gone, node two lets the port go (its next heartbeat).
        await until(lambda: _refused("127.0.0.2", port), limit=KEEPALIVE * 6)


async def _refused(host: str, port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_an_agent_with_one_connection_moves_to_another_node_when_its_node_dies(
    tmp_path, start_tunnel_server, redis_server, local_service, agent_config, visitor, nursery
) -> None:
    two = await start_node(start_tunnel_server, redis_server, "two")
    one, one_port = await _node_process(nursery, tmp_path, redis_server, "one")
    states_in, states = trio.open_memory_channel[tunnel.ClientState](64)
    config = agent_config(
        one_port,
        local_service.port,
        address=[f"127.0.0.1:{one_port}", f"127.0.0.1:{two.port}"],
        state=states_in,
    )
    try:
        with trio.fail_after(30):
            async with tunnel.open_tunnel(config) as agent, visitor(two.port) as http:
                assert agent.server_connections == 1
                assert (await http.get("/via-one")).status_code == 200  # forwarded
                one.kill()
                killed = trio.current_time()
                while await states.receive() is not tunnel.ClientState.DISCONNECTED:
                    pass
                while await states.receive() is not tunnel.ClientState.CONNECTED:
                    pass
                # Back, on node two, within the agent's backoff (0.05 s doubling
                # to 0.2 s here) and the time to notice the loss.
                assert trio.current_time() - killed < 2.0
                assert (await http.get("/on-two")).status_code == 200
    finally:
        one.kill()
        await one.wait()
