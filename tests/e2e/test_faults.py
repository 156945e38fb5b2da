"""Faults injected for real between agent and server, and what visitors and agents see.

The agent reaches the server through :class:`faultproxy.FaultProxy`, which can
black-hole, delay or cut its connection on loopback. Keepalives are short here
(:data:`KEEPALIVE` each way), so a dead peer is declared within
``2 * KEEPALIVE`` seconds; every bound below is that, or "within a second",
plus :data:`SLACK` for a busy machine.
"""

from __future__ import annotations

import collections
import contextlib
import os
from functools import partial
from typing import Any

import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trio_websocket
from faultproxy import FaultProxy

import tunnel
from helpers import STREAM_CHUNK_1, STREAM_CHUNK_2, Outcome, eventually, fetch, wait_until_inside
from tunnel._protocol.handshake import HOST_HEADER, SUBPROTOCOL

CONNECTING = tunnel.ClientState.CONNECTING
CONNECTED = tunnel.ClientState.CONNECTED
DISCONNECTED = tunnel.ClientState.DISCONNECTED
CLOSED = tunnel.ClientState.CLOSED

#: keepalive_interval = keepalive_timeout on both sides, in seconds.
KEEPALIVE = 0.5
#: What a loaded CI machine may add to any timing bound.
SLACK = 0.5
FAST = {"keepalive_interval": KEEPALIVE, "keepalive_timeout": KEEPALIVE}


async def start_proxy(nursery: trio.Nursery, port: int) -> FaultProxy:
    proxy: FaultProxy = await nursery.start(FaultProxy(port).run)
    return proxy


async def next_state(states: trio.MemoryReceiveChannel[tunnel.ClientState]) -> tuple[Any, float]:
    state = await states.receive()
    return state, trio.current_time()


async def test_black_hole_is_detected_and_the_agent_comes_back(
    nursery, start_tunnel_server, local_service, agent_config, visitor
):
    server = await start_tunnel_server(**FAST)
    proxy = await start_proxy(nursery, server.port)
    states_in, states = trio.open_memory_channel[tunnel.ClientState](64)
    config = agent_config(
        proxy.port, local_service.port, state=states_in, connect_timeout=1.0, **FAST
    )
    with trio.fail_after(20):
        async with tunnel.open_tunnel(config) as agent, visitor(server.port) as http:
            assert [(await next_state(states))[0] for _ in range(2)] == [CONNECTING, CONNECTED]
            hang = Outcome()
            nursery.start_soon(fetch, http, "/hang", hang)
            await wait_until_inside(local_service, "/hang")

            proxy.black_hole()
            fault_at = trio.current_time()
            state, lost_at = await next_state(states)
            assert state is DISCONNECTED
            # Both ends declare the other dead within two keepalive intervals.
            assert lost_at - fault_at <= 2 * KEEPALIVE + SLACK
            await hang.done.wait()
            assert hang.response is not None
            assert hang.response.status_code == 502
            assert "keepalive" in hang.response.text
            assert hang.at - fault_at <= 2 * KEEPALIVE + SLACK

            # Attempts during the outage hang in the hole and time out.
            assert (await next_state(states))[0] is CONNECTING
            assert (await next_state(states))[0] is DISCONNECTED
            proxy.pass_through()
            back_at = trio.current_time()
            while (state := (await next_state(states))[0]) is not CONNECTED:
                assert state in (CONNECTING, DISCONNECTED)
            # The attempts the agent gave up on reach the server now too, but
            # none of them takes the host from the connection in use.
            for i in range(5):
                response = await http.get(f"/after/{i}")
                assert response.status_code == 200, response.text
            assert trio.current_time() - back_at <= 1.0 + SLACK
            assert agent.state is CONNECTED
            assert proxy.connections == 1


async def test_cut_connection_answers_in_flight_requests_at_once(
    nursery, start_tunnel_server, local_service, agent_config, visitor
):
    server = await start_tunnel_server()  # default keepalives: a cut needs none
    proxy = await start_proxy(nursery, server.port)
    config = agent_config(proxy.port, local_service.port)
    with trio.fail_after(10):
        async with tunnel.open_tunnel(config), visitor(server.port) as http:
            hang = Outcome()
            nursery.start_soon(fetch, http, "/hang", hang)
            await wait_until_inside(local_service, "/hang")
            proxy.cut()
            cut_at = trio.current_time()
            await hang.done.wait()
            assert hang.response is not None
            assert hang.response.status_code == 502
            assert hang.at - cut_at <= 1.0
            # The agent reconnected on its own, within its backoff (0.2 s).
            response = await http.get("/after-cut")
            assert response.status_code == 200
            assert trio.current_time() - cut_at <= 1.0 + SLACK
    assert proxy.statistics.accepted == 2


class WebSocketEcho:
    """A local service whose WebSockets echo text."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message.get("text") or ""})


async def test_cut_connection_closes_visitor_websocket_with_1011(
    nursery, start_tunnel_server, agent_config
):
    hc = hypercorn.config.Config()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = None
    hc.graceful_timeout = 0.5
    (url,) = await nursery.start(hypercorn.trio.serve, WebSocketEcho(), hc)
    server = await start_tunnel_server()
    proxy = await start_proxy(nursery, server.port)
    agent = agent_config(proxy.port, int(url.rsplit(":", 1)[1]))
    with trio.fail_after(10):
        async with tunnel.open_tunnel(agent), trio.open_nursery() as ws_nursery:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            ws = await trio_websocket.wrap_client_stream(
                ws_nursery, stream, f"app.localhost:{server.port}", "/echo"
            )
            await ws.send_message("before")
            assert await ws.get_message() == "before"
            proxy.cut()
            cut_at = trio.current_time()
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1011
            assert trio.current_time() - cut_at <= 1.0
            # trio-websocket leaves the byte stream open after an abnormal close.
            await stream.aclose()
            ws_nursery.cancel_scope.cancel()


async def test_slow_network_is_not_taken_for_dead(
    nursery, start_tunnel_server, local_service, agent_config, visitor
):
    # 0.2 s each way: every PING takes 0.4 s, inside the 0.5 s timeout.
    server = await start_tunnel_server(**FAST)
    proxy = await start_proxy(nursery, server.port)
    proxy.delay(0.2)
    states_in, states = trio.open_memory_channel[tunnel.ClientState](64)
    config = agent_config(proxy.port, local_service.port, state=states_in, **FAST)
    with trio.fail_after(15):
        async with tunnel.open_tunnel(config) as agent, visitor(server.port) as http:
            start = trio.current_time()
            answered = 0
            # Several keepalive rounds, with requests in between.
            while trio.current_time() - start < 4 * KEEPALIVE:
                response = await http.get(f"/slow/{answered}")
                assert response.status_code == 200
                answered += 1
            assert agent.state is CONNECTED
            assert agent.rtt is not None
            assert agent.rtt >= 0.4
    assert [states.receive_nowait() for _ in range(3)] == [CONNECTING, CONNECTED, CLOSED]
    assert proxy.statistics.accepted == 1
    assert answered >= 2


async def test_grace_period_holds_requests_until_the_agent_is_back(
    nursery, start_tunnel_server, local_service, agent_config, visitor
):
    grace = 1.5
    server = await start_tunnel_server(grace_period=grace)
    proxy = await start_proxy(nursery, server.port)
    config = agent_config(proxy.port, local_service.port)
    with trio.fail_after(15):
        async with tunnel.open_tunnel(config), visitor(server.port) as http:
            # The network goes down: the agent is cut off and cannot get back.
            proxy.refuse()
            proxy.cut()
            await trio.sleep(0.1)
            waiting = Outcome()
            asked_at = trio.current_time()
            nursery.start_soon(fetch, http, "/held", waiting)
            await trio.sleep(0.5)
            assert not waiting.done.is_set()
            proxy.pass_through()
            await waiting.done.wait()
            assert waiting.response is not None
            assert waiting.response.status_code == 200
            assert waiting.response.json()["path"] == "/held"
            assert 0.5 <= waiting.at - asked_at < grace

            # Down again, for longer than the grace period.
            proxy.refuse()
            proxy.cut()
            await trio.sleep(0.1)
            asked_at = trio.current_time()
            response = await http.get("/too-late")
            waited = trio.current_time() - asked_at
            assert response.status_code == 502
            assert "offline" in response.text
            assert f"{grace:g} seconds" in response.text
            assert grace <= waited <= grace + SLACK
            proxy.pass_through()


async def test_newest_connection_takes_over_a_stale_one_at_once(
    nursery, start_tunnel_server, start_local_service, agent_config, visitor
):
    one = await start_local_service("one")
    two = await start_local_service("two")
    server = await start_tunnel_server()  # keepalives of 15 s: stale for a long time
    proxy = await start_proxy(nursery, server.port)
    stale = tunnel.Client(agent_config(proxy.port, one.port))
    with trio.fail_after(10):
        async with trio.open_nursery() as agents:
            await agents.start(stale.connect)
            async with visitor(server.port) as http:
                assert (await http.get("/")).json()["service"] == "one"
                proxy.black_hole()  # the server cannot tell yet
                async with tunnel.open_tunnel(agent_config(server.port, two.port)):
                    connected_at = trio.current_time()
                    # Within a round trip every request goes to the new agent.
                    while (response := await http.get("/new")).status_code != 200:
                        assert response.status_code == 502
                    assert response.json()["service"] == "two"
                    assert trio.current_time() - connected_at <= 1.0
                    for i in range(3):
                        assert (await http.get(f"/n/{i}")).json()["service"] == "two"
            agents.cancel_scope.cancel()
            proxy.pass_through()  # so the stale agent's goodbye needs no timeout
    assert ("GET", "/new") not in one.requests


async def test_a_late_abandoned_handshake_does_not_take_the_host(
    start_tunnel_server, local_service, agent_config, visitor
):
    # After an outage the network may deliver a handshake the agent gave up on
    # (and closed) after the one it uses now. It must not replace the live
    # connection, whose agent would take that for "replaced" and stop.
    server = await start_tunnel_server()
    states_in, states = trio.open_memory_channel[tunnel.ClientState](64)
    config = agent_config(server.port, local_service.port, state=states_in)
    with trio.fail_after(10):
        async with tunnel.open_tunnel(config) as agent, visitor(server.port) as http:
            assert [await states.receive() for _ in range(2)] == [CONNECTING, CONNECTED]
            late = await trio.open_tcp_stream("127.0.0.1", server.port)
            await late.send_all(
                b"GET /_tunnel HTTP/1.1\r\n"
                b"Host: app.localhost\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n"
                + f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n".encode()
                + f"{HOST_HEADER}: app.localhost\r\n".encode()
                + b"Authorization: Bearer s3cret\r\n\r\n"
            )
            await late.send_eof()  # the agent's side of it is long closed
            # The server answers the handshake and then finds the connection
            # dead, or (timing) sees the end first and just closes it.
            answer = await late.receive_some(4096)
            await late.aclose()
            assert answer == b"" or answer.startswith(b"HTTP/1.1 101"), answer
            for i in range(3):
                response = await http.get(f"/still-mine/{i}")
                assert response.status_code == 200
            assert agent.state is CONNECTED
            with pytest.raises(trio.WouldBlock):
                states.receive_nowait()  # never replaced, never reconnected


async def test_leaving_agent_finishes_in_flight_while_its_successor_serves(
    start_tunnel_server, start_local_service, agent_config, visitor
):
    # A rolling restart: the old agent drains, the new one takes the host.
    old_service = await start_local_service("old")
    new_service = await start_local_service("new")
    server = await start_tunnel_server()
    with trio.fail_after(10):
        async with (
            tunnel.open_tunnel(agent_config(server.port, old_service.port)) as old,
            visitor(server.port) as http,
            http.stream("GET", "/stream") as streaming,
        ):
            chunks = streaming.aiter_bytes()
            first = await chunks.__anext__()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(old.aclose)
                async with tunnel.open_tunnel(agent_config(server.port, new_service.port)):
                    response = await http.get("/during-drain")
                    assert response.json()["service"] == "new"
                    assert old.state is CONNECTED  # still finishing its request
                    old_service.release_stream.set()
                    rest = b"".join([chunk async for chunk in chunks])
                    assert first + rest == STREAM_CHUNK_1 + STREAM_CHUNK_2
                    response = await http.get("/after-drain")
                    assert response.json()["service"] == "new"
            assert old.state is CLOSED
    assert ("GET", "/during-drain") not in old_service.requests


async def test_server_shutdown_drains_and_agents_return_to_the_restarted_server(
    nursery, local_service, agent_config, visitor
):
    stop = trio.Event()
    config = tunnel.ServerConfig(
        address="127.0.0.1:0", tokens=frozenset({"s3cret"}), graceful_timeout=5
    )
    stopped = trio.Event()

    async def run_server(cfg: tunnel.ServerConfig, *, task_status: Any) -> None:
        await tunnel.serve(cfg, shutdown_trigger=stop.wait, task_status=task_status)
        stopped.set()

    (url,) = await nursery.start(run_server, config)
    port = int(url.rsplit(":", 1)[1])
    states_in, states = trio.open_memory_channel[tunnel.ClientState](64)
    with trio.fail_after(15):
        async with (
            tunnel.open_tunnel(agent_config(port, local_service.port, state=states_in)),
            visitor(port) as http,
        ):
            assert [(await next_state(states))[0] for _ in range(2)] == [CONNECTING, CONNECTED]
            async with http.stream("GET", "/stream") as streaming:
                chunks = streaming.aiter_bytes()
                first = await chunks.__anext__()
                stop.set()
                await trio.sleep(0.2)
                # No longer listening, but the request in flight goes on, and
                # the agent is not sent away before it has finished.
                with pytest.raises(OSError, match="all attempts to connect"):
                    await trio.open_tcp_stream("127.0.0.1", port)
                assert not stopped.is_set()
                with pytest.raises(trio.WouldBlock):
                    states.receive_nowait()  # the agent is still connected
                local_service.release_stream.set()
                rest = b"".join([chunk async for chunk in chunks])
                finished_at = trio.current_time()
            assert first + rest == STREAM_CHUNK_1 + STREAM_CHUNK_2
            state, left_at = await next_state(states)
            assert state is DISCONNECTED
            await stopped.wait()
            # GOAWAY followed the last stream; nobody waited for the 5 s timeout.
            assert left_at - finished_at <= 1.0
            assert trio.current_time() - finished_at <= 1.0 + SLACK

            restart = tunnel.ServerConfig(address=f"127.0.0.1:{port}", tokens=frozenset({"s3cret"}))
            await nursery.start(tunnel.serve, restart)
            while (state := (await next_state(states))[0]) is not CONNECTED:
                assert state in (CONNECTING, DISCONNECTED)
            response = await http.get("/after-restart")
            assert response.status_code == 200


def _open_fds() -> collections.Counter[str]:
    """What this process's file descriptors point at ("socket", "pipe", a path)."""
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
        kinds[target.split(":", 1)[0]] += 1
    return kinds


def _tasks() -> collections.Counter[str]:
    """The names of every trio task alive, counted."""
    names: collections.Counter[str] = collections.Counter()

    def walk(task: trio.lowlevel.Task) -> None:
        names[task.name] += 1
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return names


def _more_than(now: collections.Counter[str], before: collections.Counter[str]) -> str:
    """What ``now`` has more of than ``before`` (empty when nothing)."""
    return ", ".join(f"{name} +{n}" for name, n in (now - before).items())


async def test_connect_disconnect_cycles_and_requests_leak_nothing(
    nursery, local_service, agent_config, visitor
):
    cycles, requests_per_cycle, concurrency = 20, 40, 8
    app = tunnel.TunnelApp(
        tunnel.ServerConfig(tokens=frozenset({"s3cret"}), grace_period=0.2, **FAST)
    )
    config = tunnel.hypercorn_config(tunnel.ServerConfig(address="127.0.0.1:0"))
    # Hypercorn (trio) holds a keep-alive connection the visitor closed until
    # its idle timer runs out; a short one lets the test see the final count.
    config.keep_alive_timeout = 0.3
    (url,) = await nursery.start(partial(hypercorn.trio.serve, app, config))
    port = int(url.rsplit(":", 1)[1])
    proxy = await start_proxy(nursery, port)

    async def load(http: httpx.AsyncClient, n: int, statuses: list[int]) -> None:
        for i in range(n):
            statuses.append((await http.get(f"/load/{i}")).status_code)

    async def one_cycle(i: int) -> list[int]:
        statuses: list[int] = []
        states_in, states = trio.open_memory_channel[tunnel.ClientState](16)
        config = agent_config(proxy.port, local_service.port, state=states_in, **FAST)
        async with tunnel.open_tunnel(config), visitor(port) as http:
            async with trio.open_nursery() as clients:
                for _ in range(concurrency):
                    clients.start_soon(load, http, requests_per_cycle // concurrency, statuses)
            if i % 3 == 1:
                proxy.cut()  # lost, not left: the agent must reconnect
                while await states.receive() is not DISCONNECTED:
                    pass
                assert (await http.get("/after-cut")).status_code == 200
        return statuses

    def quiet() -> bool:
        return not app.registry.sessions() and not proxy.connections

    with trio.fail_after(60):
        await one_cycle(0)  # warm up: imports, pools, caches
        await eventually(quiet)
        await trio.sleep(0.5)
        fds, tasks = _open_fds(), _tasks()
        answered = 0
        for i in range(cycles):
            statuses = await one_cycle(i)
            assert statuses == [200] * requests_per_cycle
            answered += len(statuses)
        assert answered == cycles * requests_per_cycle
        await eventually(quiet)
        # Every descriptor and task the cycles opened is gone again (fewer is
        # fine: a connection of the warm-up may have still been closing).
        with contextlib.suppress(AssertionError):  # the asserts below say what is left
            await eventually(
                lambda: not (_more_than(_open_fds(), fds) or _more_than(_tasks(), tasks))
            )
        assert not _more_than(_open_fds(), fds), (
            f"descriptors left open: {_more_than(_open_fds(), fds)}"
        )
        assert not _more_than(_tasks(), tasks), f"tasks left running: {_more_than(_tasks(), tasks)}"
        assert app.registry.sessions() == []
        assert app.registry._arrivals == {}


@pytest.mark.parametrize(
    "where",
    [
        "_note_worker",  # while shaking hands, before the link is up
        "_report_started",  # once the link is up and registered
    ],
)
async def test_an_unexpected_error_costs_one_connection_not_the_agent(
    where, monkeypatch, tunnel_server, local_service, open_agent, visitor, caplog
):
    # A bug anywhere in a connection's handling (here: a function of the
    # agent's that raises something nobody expects, once) must be reported
    # with its traceback and repaired like a lost connection.
    original = getattr(tunnel.Client, where)
    raised: list[BaseException] = []

    def faulty(self: tunnel.Client, *args: Any) -> Any:
        if not raised:
            raised.append(KeyError("injected fault"))
            raise raised[0]
        return original(self, *args)

    monkeypatch.setattr(tunnel.Client, where, faulty)
    with trio.fail_after(10):
        async with (
            open_agent(tunnel_server.port, local_service.port) as agent,
            visitor(tunnel_server.port) as http,
        ):
            response = await http.get("/after-the-fault")
            assert response.status_code == 200, response.text
            assert agent.state is CONNECTED
    assert len(raised) == 1
    # Reported once, with its traceback, by the agent; by nothing else.
    reports = [r for r in caplog.records if r.exc_info and r.exc_info[1] is raised[0]]
    assert [r.name for r in reports] == ["tunnel.client"], [r.getMessage() for r in reports]
    assert "reconnecting" in reports[0].getMessage()
