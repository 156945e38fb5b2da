"""A graceful rolling restart under GET load loses nothing (the long run: ``nox -s soak``).

An agent alone on its host is stopped with SIGTERM and started again, then a
worker of ``tunnel server --workers 2``; see ``tests/rolling.py``. Every GET
must be answered, and none with a 502.
"""

from __future__ import annotations

import httpx
import trio
from rolling import rolling_restarts

import tunnel
from helpers import LocalService, eventually


async def test_rolling_restart_of_an_agent_and_a_server_worker_under_load() -> None:
    with trio.fail_after(120):
        # GETs of up to a second: both of the agent's connections (one per
        # worker) have some in flight when it drains, ending at different times.
        restarts = await rolling_restarts(
            0, rounds=1, visitors=4, pool=False, worker_restarts=1, service_time=0.5
        )
    assert restarts.agent_restarts == 1
    assert restarts.worker_restarts == 1
    # A warm-up and a pause after each step, each of 2 GETs per visitor.
    assert restarts.sent >= 3 * 8, restarts.summary()
    assert restarts.lost == 0, restarts.summary()
    assert restarts.bad_gateway == 0, restarts.summary()
    assert restarts.unclean == [], restarts.summary()


async def test_an_agent_stopping_finishes_requests_on_every_worker_connection(
    nursery: trio.Nursery, local_service: LocalService, agent_config
) -> None:
    # The agent holds a connection to each of the two workers and drains them
    # all when it stops. The one with nothing in flight ends first, and that
    # used to cancel the other: its request in flight was a 502.
    config = tunnel.ServerConfig(address="127.0.0.1:0", tokens=frozenset({"s3cret"}), workers=2)
    port = int((await nursery.start(tunnel.serve, config))[0].rsplit(":", 1)[1])
    answers: dict[int, httpx.Response] = {}
    with trio.fail_after(60):
        client = tunnel.Client(agent_config(port, local_service.port))
        async with trio.open_nursery() as agent_nursery:
            await agent_nursery.start(client.connect)
            await eventually(lambda: client.server_connections == 2, 30)
            # Slots are (node, worker): one node here, with two workers.
            links = {worker: client._links[(0, worker)] for worker in (0, 1)}
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                headers={"host": "app.localhost", "connection": "close"},
                trust_env=False,
                timeout=20,
            ) as http:

                async def hold(n: int) -> None:
                    answers[n] = await http.get("/hold")

                async with trio.open_nursery() as visits:
                    # New connections until one request waits on the second
                    # worker's connection and none on the first's.
                    sent = 0
                    while links[1].open_streams == 0:
                        if links[0].open_streams:
                            local_service.release_hold.set()
                            await eventually(lambda: links[0].open_streams == 0)
                            local_service.release_hold = trio.Event()
                        sent += 1
                        visits.start_soon(hold, sent)
                        await eventually(lambda: links[0].open_streams + links[1].open_streams > 0)
                    async with trio.open_nursery() as closing:
                        closing.start_soon(client.aclose)
                        await trio.sleep(0.5)
                        assert sent not in answers  # still waiting on the local service
                        local_service.release_hold.set()
            agent_nursery.cancel_scope.cancel()
    assert answers[sent].status_code == 200, answers[sent].text
