"""Agents and servers as real processes: ``kill -9``, SIGSTOP/SIGCONT and SIGTERM.

A killed process's sockets are closed by the kernel; a stopped one's stay open
and silent, which only keepalives can tell from a quiet but healthy peer. The
processes are ``tests/processes.py`` (and the ``tunnel`` command for SIGTERM).
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import trio
from processes import TOKEN, Child, start_agent, start_server

import tunnel
from helpers import STREAM_CHUNK_1, STREAM_CHUNK_2, Outcome, fetch, free_port, wait_until_inside

CONNECTING = tunnel.ClientState.CONNECTING
CONNECTED = tunnel.ClientState.CONNECTED
DISCONNECTED = tunnel.ClientState.DISCONNECTED

KEEPALIVE = 0.5
SLACK = 0.5
FAST = {"keepalive_interval": KEEPALIVE, "keepalive_timeout": KEEPALIVE}
TUNNEL_SERVER = [sys.executable, "-m", "tunnel", "server"]


async def test_agent_killed_with_a_request_in_flight(
    nursery, start_tunnel_server, local_service, visitor
):
    server = await start_tunnel_server()
    agent: Child | None = None
    try:
        with trio.fail_after(30):
            agent = await start_agent(server.port, local_service.port, "app.localhost")
            await agent.wait_for_line("connected", 20)
            async with visitor(server.port) as http:
                hang = Outcome()
                nursery.start_soon(fetch, http, "/hang", hang)
                await wait_until_inside(local_service, "/hang")
                await agent.kill()
                killed_at = trio.current_time()
                await hang.done.wait()
                assert hang.response is not None
                assert hang.response.status_code == 502
                assert hang.at - killed_at <= 1.0

                # Its replacement (same token, same host) serves at once.
                await agent.aclose()
                agent = await start_agent(server.port, local_service.port, "app.localhost")
                await agent.wait_for_line("connected", 20)
                response = await http.get("/after-restart")
                assert response.status_code == 200
                assert response.json()["path"] == "/after-restart"
    finally:
        if agent is not None:
            await agent.aclose()


async def test_agent_stopped_and_continued(nursery, start_tunnel_server, local_service, visitor):
    server = await start_tunnel_server(grace_period=5.0, **FAST)
    agent = await start_agent(server.port, local_service.port, "app.localhost")
    try:
        with trio.fail_after(30):
            await agent.wait_for_line("connected", 20)
            async with visitor(server.port) as http:
                hang = Outcome()
                nursery.start_soon(fetch, http, "/hang", hang)
                await wait_until_inside(local_service, "/hang")
                agent.signal(signal.SIGSTOP)
                stopped_at = trio.current_time()
                # The server takes the silent agent for dead within two
                # keepalive intervals and answers what was in flight.
                await hang.done.wait()
                assert hang.response is not None
                assert hang.response.status_code == 502
                assert hang.at - stopped_at <= 2 * KEEPALIVE + SLACK
                # A visitor arriving now waits for the agent to come back...
                held = Outcome()
                nursery.start_soon(fetch, http, "/held", held)
                await trio.sleep(2.0 - (trio.current_time() - stopped_at))
                assert not held.done.is_set()
                agent.signal(signal.SIGCONT)
                continued_at = trio.current_time()
                # ...and is served by it once it has reconnected.
                await held.done.wait()
                assert held.response is not None
                assert held.response.status_code == 200
                assert held.response.json()["path"] == "/held"
                assert held.at - continued_at <= 1.0 + SLACK
                await agent.wait_for_line("connected")
                assert agent.lines[-4:] == ["connected", "disconnected", "connecting", "connected"]
    finally:
        await agent.aclose()


async def test_server_killed_and_restarted_on_the_same_port(local_service, agent_config, visitor):
    port = free_port()
    server = await start_server(port)
    states_in, states = trio.open_memory_channel[tunnel.ClientState](256)
    try:
        with trio.fail_after(30):
            config = agent_config(port, local_service.port, state=states_in)
            async with tunnel.open_tunnel(config), visitor(port) as http:
                assert (await http.get("/before")).status_code == 200
                assert [await states.receive() for _ in range(2)] == [CONNECTING, CONNECTED]
                await server.kill()
                killed_at = trio.current_time()
                assert await states.receive() is DISCONNECTED
                assert trio.current_time() - killed_at <= 1.0
                await server.aclose()

                server = await start_server(port)
                listening_at = trio.current_time()
                while (state := await states.receive()) is not CONNECTED:
                    assert state in (CONNECTING, DISCONNECTED)
                # Within the agent's largest backoff delay (0.2 s) of it listening.
                assert trio.current_time() - listening_at <= 0.2 + SLACK
                response = await http.get("/after")
                assert response.status_code == 200
                assert response.json()["path"] == "/after"
    finally:
        await server.aclose()


async def test_server_stopped_and_continued(local_service, agent_config, visitor):
    # While the server is stopped the kernel still accepts the agent's
    # connection attempts; they time out and are abandoned, and reach the
    # server when it continues. None of them may take the host from (or stop)
    # the agent's live connection.
    port = free_port()
    server = await start_server(port, "--keepalive", str(KEEPALIVE))
    states_in, states = trio.open_memory_channel[tunnel.ClientState](256)
    try:
        with trio.fail_after(30):
            config = agent_config(
                port, local_service.port, state=states_in, connect_timeout=0.5, **FAST
            )
            async with tunnel.open_tunnel(config) as agent, visitor(port) as http:
                assert [await states.receive() for _ in range(2)] == [CONNECTING, CONNECTED]
                server.signal(signal.SIGSTOP)
                stopped_at = trio.current_time()
                assert await states.receive() is DISCONNECTED
                assert trio.current_time() - stopped_at <= 2 * KEEPALIVE + SLACK
                await trio.sleep(2.0 - (trio.current_time() - stopped_at))
                server.signal(signal.SIGCONT)
                continued_at = trio.current_time()
                while (state := await states.receive()) is not CONNECTED:
                    assert state in (CONNECTING, DISCONNECTED)
                assert trio.current_time() - continued_at <= 0.5 + 0.2 + SLACK
                for i in range(3):
                    response = await http.get(f"/after/{i}")
                    assert response.status_code == 200
                # Longer than a keepalive round: still the same, live connection.
                await trio.sleep(3 * KEEPALIVE)
                assert agent.state is CONNECTED
                assert (await http.get("/still")).status_code == 200
                with pytest.raises(trio.WouldBlock):
                    states.receive_nowait()  # the connection never changed again
    finally:
        await server.aclose()


async def test_sigterm_drains_the_tunnel_command(nursery, local_service, agent_config, visitor):
    port = free_port()
    process = await trio.lowlevel.open_process(
        [*TUNNEL_SERVER, "--address", f"127.0.0.1:{port}", "--token", TOKEN],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = Child(process)
    states_in, states = trio.open_memory_channel[tunnel.ClientState](256)
    try:
        with trio.fail_after(30):
            assert process.stderr is not None
            seen = b""
            while b"Running on" not in seen:
                seen += await process.stderr.receive_some(4096)
            config = agent_config(port, local_service.port, state=states_in)
            async with (
                tunnel.open_tunnel(config),
                visitor(port) as http,
                http.stream("GET", "/stream") as streaming,
            ):
                chunks = streaming.aiter_bytes()
                first = await chunks.__anext__()
                server.signal(signal.SIGTERM)
                await trio.sleep(0.3)
                assert process.returncode is None  # waiting for the request
                local_service.release_stream.set()
                rest = b"".join([chunk async for chunk in chunks])
                finished_at = trio.current_time()
                assert first + rest == STREAM_CHUNK_1 + STREAM_CHUNK_2
                assert await process.wait() == 0
                assert trio.current_time() - finished_at <= 1.0 + SLACK
                states_seen = [states.receive_nowait() for _ in range(3)]
                assert states_seen == [CONNECTING, CONNECTED, DISCONNECTED]
    finally:
        await server.aclose()
        if process.stderr is not None:
            await process.stderr.aclose()
