"""Reconnect and grace-period timing, in virtual time, asserting exact times.

A real server, agent and :class:`faultproxy.FaultProxy` talk over loopback
while ``autojump_clock`` skips every wait on a timer: a loopback round trip
takes no virtual time, so each timestamp below is the sum of the configured
delays and nothing else. ``random.uniform`` is fixed to its upper bound, so the
"full jitter" backoff draws its largest delay every time.
"""

from __future__ import annotations

import io
import itertools
import random
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from faultproxy import FaultProxy
from rich.console import Console

import tunnel
from tunnel.cli._panel import LivePanel
from tunnel.cli._report import PlainReport
from tunnel.client._client import STABLE_AFTER
from tunnel.client._state import ReconnectWait

CONNECTING = tunnel.ClientState.CONNECTING
CONNECTED = tunnel.ClientState.CONNECTED
DISCONNECTED = tunnel.ClientState.DISCONNECTED


@pytest.fixture
def largest_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: high)


class Timeline:
    """The agent's state changes and the virtual times they happened at."""

    def __init__(self) -> None:
        self.send, self._receive = trio.open_memory_channel[tunnel.ClientState](256)
        self.start = trio.current_time()

    async def next(self) -> tuple[tunnel.ClientState, float]:
        state = await self._receive.receive()
        return state, trio.current_time() - self.start

    async def until(self, wanted: tunnel.ClientState) -> float:
        while True:
            state, at = await self.next()
            if state is wanted:
                return at


async def start(
    nursery: trio.Nursery, start_tunnel_server: Any, local_port: int, **server: Any
) -> tuple[Any, FaultProxy]:
    running = await start_tunnel_server(**server)
    proxy: FaultProxy = await nursery.start(FaultProxy(running.port).run)
    return running, proxy


async def test_backoff_doubles_while_connections_are_short_and_resets_once_stable(
    autojump_clock: trio.testing.MockClock,
    largest_delays: None,
    nursery: trio.Nursery,
    start_tunnel_server: Any,
    local_service: Any,
    agent_config: Any,
) -> None:
    _, proxy = await start(nursery, start_tunnel_server, local_service.port)
    timeline = Timeline()
    config = agent_config(
        proxy.port, local_service.port, state=timeline.send, backoff_initial=1, backoff_max=8
    )
    with trio.fail_after(120):
        async with tunnel.open_tunnel(config):
            assert await timeline.until(CONNECTED) == 0
            # Three connections in a row that die at once: 1 s, 2 s, 4 s.
            reconnected = []
            for _ in range(3):
                proxy.cut()
                assert (await timeline.next())[0] is DISCONNECTED
                reconnected.append(await timeline.until(CONNECTED))
            assert reconnected == [1, 3, 7]
            # Up for exactly STABLE_AFTER: stable, so the backoff starts over.
            await trio.sleep(STABLE_AFTER)
            proxy.cut()
            assert await timeline.until(CONNECTED) == 7 + STABLE_AFTER + 1
            # Just short of it: not stable, the backoff doubles again.
            await trio.sleep(STABLE_AFTER - 1)
            proxy.cut()
            assert await timeline.until(CONNECTED) == 7 + STABLE_AFTER + 1 + STABLE_AFTER - 1 + 2


async def test_slow_failed_attempts_never_count_as_stable(
    autojump_clock: trio.testing.MockClock,
    largest_delays: None,
    nursery: trio.Nursery,
    start_tunnel_server: Any,
    local_service: Any,
    agent_config: Any,
) -> None:
    # Attempts into a black hole each take connect_timeout, longer than
    # STABLE_AFTER; they are failures all the same, so the delays keep growing.
    timeout = STABLE_AFTER + 2
    _, proxy = await start(nursery, start_tunnel_server, local_service.port)
    timeline = Timeline()
    config = agent_config(
        proxy.port,
        local_service.port,
        state=timeline.send,
        backoff_initial=1,
        backoff_max=8,
        connect_timeout=timeout,
        keepalive_interval=1,
        keepalive_timeout=1,
    )
    with trio.fail_after(300):
        async with tunnel.open_tunnel(config):
            await timeline.until(CONNECTED)
            proxy.black_hole()
            # The keepalive declares the server dead at 2 s.
            assert await timeline.until(DISCONNECTED) == 2
            starts = []
            for _ in range(4):
                starts.append(await timeline.until(CONNECTING))
                assert await timeline.until(DISCONNECTED) == starts[-1] + timeout
            delays = [b - (a + timeout) for a, b in itertools.pairwise(starts)]
            assert starts[0] == 2 + 1
            assert delays == [2, 4, 8]
            proxy.pass_through()


async def test_grace_period_in_exact_time(
    autojump_clock: trio.testing.MockClock,
    largest_delays: None,
    nursery: trio.Nursery,
    start_tunnel_server: Any,
    local_service: Any,
    agent_config: Any,
    visitor: Any,
) -> None:
    grace = 4.0
    server, proxy = await start(
        nursery, start_tunnel_server, local_service.port, grace_period=grace
    )
    timeline = Timeline()
    config = agent_config(
        proxy.port, local_service.port, state=timeline.send, backoff_initial=1, backoff_max=1
    )
    with trio.fail_after(60):
        async with tunnel.open_tunnel(config), visitor(server.port) as http:
            await timeline.until(CONNECTED)
            # Down: every attempt is refused (one per second).
            proxy.refuse()
            proxy.cut()
            await timeline.until(DISCONNECTED)
            # ...and the server has seen the cut too (a request that races it
            # is answered 502, as one in flight on the lost connection would).
            await trio.testing.wait_all_tasks_blocked()
            asked_at = trio.current_time()
            async with trio.open_nursery() as requests:
                answers: list[tuple[httpx.Response, float]] = []

                async def ask() -> None:
                    response = await http.get("/held")
                    answers.append((response, trio.current_time() - asked_at))

                requests.start_soon(ask)
                await trio.sleep(2.5)
                proxy.pass_through()  # the attempt at 3 s gets through
            ((response, waited),) = answers
            assert response.status_code == 200
            assert waited == 3

            proxy.refuse()
            proxy.cut()
            await timeline.until(DISCONNECTED)
            await trio.testing.wait_all_tasks_blocked()
            asked_at = trio.current_time()
            response = await http.get("/too-late")
            assert response.status_code == 502
            assert trio.current_time() - asked_at == grace
            proxy.pass_through()


async def test_the_reconnect_wait_is_shown_counting_down_in_exact_time(
    autojump_clock: trio.testing.MockClock,
    largest_delays: None,
    nursery: trio.Nursery,
    start_tunnel_server: Any,
    local_service: Any,
    agent_config: Any,
) -> None:
    _, proxy = await start(nursery, start_tunnel_server, local_service.port)
    timeline = Timeline()
    config = agent_config(
        proxy.port, local_service.port, state=timeline.send, backoff_initial=1, backoff_max=8
    )
    out = io.StringIO()
    with trio.fail_after(60):
        async with tunnel.open_tunnel(config) as client:
            report = PlainReport(out, client, "http://127.0.0.1")
            panel = LivePanel(client, "http://127.0.0.1", None, wall_clock=lambda: 0.0)
            assert await timeline.until(CONNECTED) == 0
            assert client.reconnect_wait is None
            # Lost, then every attempt refused: waits of 1, 2 and 4 s.
            proxy.refuse()
            proxy.cut()
            lost = await timeline.until(DISCONNECTED)
            for attempt, delay in [(1, 1), (2, 2), (3, 4)]:
                report.state_changed(DISCONNECTED)
                assert client.reconnect_wait == ReconnectWait(
                    attempt, delay, timeline.start + lost + delay
                )
                assert f"● reconnecting in {delay:.1f} s, attempt {attempt}" in _text(panel)
                await trio.sleep(delay / 4)
                left = delay * 3 / 4
                assert f"● reconnecting in {left:.1f} s, attempt {attempt}" in _text(panel)
                # The attempt at the end of the wait is refused at once.
                assert await timeline.until(CONNECTING) == lost + delay
                assert client.reconnect_wait is None
                lost = await timeline.until(DISCONNECTED)
            proxy.pass_through()
            assert await timeline.until(CONNECTED) == 1 + 2 + 4 + 8
    assert out.getvalue().splitlines() == [
        "disconnected",
        "reconnecting  in 1.0 s, attempt 1",
        "disconnected",
        "reconnecting  in 2.0 s, attempt 2",
        "disconnected",
        "reconnecting  in 4.0 s, attempt 3",
    ]


def _text(panel: LivePanel) -> str:
    console = Console(file=io.StringIO(), width=100, color_system=None, force_terminal=False)
    console.print(panel.render())
    return console.file.getvalue()  # type: ignore[attr-defined,no-any-return]


async def test_a_worker_held_already_is_retried_within_a_second_in_exact_time(
    autojump_clock: trio.testing.MockClock,
    largest_delays: None,
    nursery: trio.Nursery,
    local_service: Any,
    agent_config: Any,
) -> None:
    # A server that says it has two workers but runs one process: the agent's
    # second connection lands on the worker it holds, every time. Its delays
    # double from 0.1 s but stop at 1 s (not backoff_max): visitors of a
    # worker the agent has not found yet are waiting.
    import hypercorn.trio

    app = tunnel.TunnelApp(
        tunnel.ServerConfig(address="127.0.0.1:0", tokens=frozenset({"s3cret"}), workers=2)
    )
    hc = tunnel.server.hypercorn_config(app.config)
    urls = await nursery.start(hypercorn.trio.serve, app, hc)
    port = int(urls[0].rsplit(":", 1)[1])
    config = agent_config(port, local_service.port, backoff_max=30)
    started = trio.current_time()
    async with tunnel.open_tunnel(config) as client:
        # open_tunnel gave up waiting for the second connection after
        # connect_timeout.
        assert trio.current_time() - started == config.connect_timeout
        await trio.sleep(0.25)
        # Refused at 0, 0.1, 0.3, 0.7, 1.5, then every second: 2.5 … 9.5.
        assert app._metrics.handshakes_refused.get(421) == 5 + 8
        assert client.server_connections == 1
