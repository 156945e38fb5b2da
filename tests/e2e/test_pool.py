"""Agent pools: agents of one token that ask to pool share a host.

Real server, real agents, real local services; each local service names itself
in its answers, so a test sees which agent served a request.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import trio
from faultproxy import FaultProxy

import tunnel
from helpers import eventually


@pytest.fixture
async def services(start_local_service):
    """Two local services, "one" and "two", for two agents of one pool."""
    return await start_local_service("one"), await start_local_service("two")


async def _served_by(http, count: int, prefix: str = "/r") -> Counter[str]:
    served: Counter[str] = Counter()
    for i in range(count):
        response = await http.get(f"{prefix}/{i}")
        assert response.status_code == 200, response.text
        served[response.json()["service"]] += 1
    return served


async def test_pooled_agents_share_a_host_and_one_leaving_moves_its_share(
    tunnel_server, services, open_agent, visitor
):
    one, two = services
    port = tunnel_server.port
    with trio.fail_after(15):
        async with open_agent(port, two.port, pool=True) as agent_two, visitor(port) as http:
            async with open_agent(port, one.port, pool=True) as agent_one:
                assert agent_one.url == agent_two.url
                # Idle agents take turns, so both serve at any concurrency.
                shared = await _served_by(http, 20)
                assert shared == {"one": 10, "two": 10}
            # Agent one left (its requests done): the other takes everything.
            assert await _served_by(http, 10, "/after") == {"two": 10}
            assert agent_two.state is tunnel.ClientState.CONNECTED


async def test_requests_go_to_the_least_busy_agent(tunnel_server, services, open_agent, visitor):
    one, two = services
    port = tunnel_server.port
    with trio.fail_after(15):
        async with (
            open_agent(port, one.port, pool=True),
            open_agent(port, two.port, pool=True),
            visitor(port) as http,
            trio.open_nursery() as nursery,
        ):
            held: list[str] = []

            async def hold() -> None:
                response = await http.get("/hold")
                held.append(response.json()["service"])

            # Three requests held open: two on one agent, one on the other
            # (idle agents take turns, and then the tie breaks either way).
            for _ in range(3):
                nursery.start_soon(hold)
            await eventually(lambda: one.holding + two.holding == 3)
            assert sorted([one.holding, two.holding]) == [1, 2]
            quieter = "one" if one.holding == 1 else "two"
            # New requests go to the agent with fewer in flight, every time.
            assert await _served_by(http, 4, "/while-busy") == {quieter: 4}
            one.release_hold.set()
            two.release_hold.set()
        assert len(held) == 3


async def test_pool_needs_the_same_token(start_tunnel_server, local_service, open_agent, visitor):
    server = await start_tunnel_server(tokens=frozenset({"s3cret", "other"}))
    with trio.fail_after(10):
        async with (
            open_agent(server.port, local_service.port, pool=True),
            visitor(server.port) as http,
        ):
            with pytest.raises(tunnel.HostInUseError) as in_use:
                async with open_agent(server.port, local_service.port, pool=True, token="other"):
                    pytest.fail("an agent with another token joined the pool")
            assert in_use.value.status == 409
            assert (await http.get("/mine")).status_code == 200


async def test_agent_without_pool_takes_over_a_pool(tunnel_server, services, open_agent, visitor):
    one, two = services
    port = tunnel_server.port
    connected = trio.Event()
    replaced = trio.Event()

    async def pooled() -> None:
        with pytest.raises(tunnel.HostInUseError, match="took over"):  # noqa: PT012
            async with open_agent(port, one.port, pool=True):
                connected.set()
                await trio.sleep_forever()
        replaced.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, visitor(port) as http:
            nursery.start_soon(pooled)
            await connected.wait()
            async with open_agent(port, two.port):
                # The newcomer did not ask to share: it has the host alone, and
                # the pooled agent is told to stop.
                await replaced.wait()
                assert await _served_by(http, 5) == {"two": 5}
    assert one.requests == []


async def test_pooled_agent_cut_off_costs_only_its_requests_in_flight(
    tunnel_server, services, open_agent, visitor, nursery
):
    one, two = services
    port = tunnel_server.port
    # Agent one reaches the server through a proxy that can reset its connection.
    proxy: FaultProxy = await nursery.start(FaultProxy(port).run)
    statuses: Counter[int] = Counter()
    with trio.fail_after(20):
        async with (
            open_agent(port, two.port, pool=True),
            open_agent(proxy.port, one.port, pool=True, host="app.localhost"),
            visitor(port) as http,
            trio.open_nursery() as load_nursery,
        ):
            done = trio.Event()

            async def load(worker: int) -> None:
                i = 0
                while not done.is_set():
                    try:
                        response = await http.get(f"/load/{worker}/{i}")
                    except httpx.TransportError:
                        # Its headers came before the cut: a response ended early.
                        statuses[0] += 1
                    else:
                        statuses[response.status_code] += 1
                    i += 1

            for worker in range(4):
                load_nursery.start_soon(load, worker)
            await eventually(lambda: len(one.requests) >= 5 and len(two.requests) >= 5)
            # Reset, and kept from coming back: the way a crashed host looks.
            proxy.cut()
            proxy.refuse()
            cut_at = len(one.requests)
            before = len(two.requests)
            await eventually(lambda: len(two.requests) >= before + 100, limit=15)
            done.set()
    assert len(one.requests) <= cut_at + 4
    # At most the four requests in flight on agent one when it went failed.
    failed = sum(n for status, n in statuses.items() if status != 200)
    assert failed <= 4, statuses
    assert statuses[200] >= 110
