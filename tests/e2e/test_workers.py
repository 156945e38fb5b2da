"""A server of several worker processes: one agent connection per worker.

``tunnel.serve`` with ``workers=2`` starts two real worker processes on one
port; visitors are spread over them by the kernel. Every visitor here opens a
new connection (``Connection: close``), so it may land on either worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import hypercorn.trio
import pytest
import trio

import tunnel
from helpers import eventually
from tunnel._protocol.handshake import HAVE_WORKERS_HEADER, SUBPROTOCOL
from tunnel.server._worker_id import worker_id

TOKEN = "s3cret"


def worker_pids() -> list[int]:
    """The worker processes this test process started, by their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"tunnel.server.hypercorn._worker" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


async def fresh_visits(port: int, count: int, host: str = "app.localhost") -> Counter[int]:
    """``count`` requests, each on a new connection; their status codes."""
    statuses: Counter[int] = Counter()
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}",
        headers={"host": host, "connection": "close"},
        trust_env=False,
        timeout=10,
    ) as http:
        for i in range(count):
            statuses[(await http.get(f"/visit/{i}")).status_code] += 1
    return statuses


async def wait_connections(client: tunnel.Client, count: int) -> None:
    await eventually(lambda: client.server_connections == count, limit=30)


@pytest.fixture
async def workers_server(nursery):
    config = tunnel.ServerConfig(
        address="127.0.0.1:0", tokens=frozenset({TOKEN}), workers=2, graceful_timeout=2
    )
    urls = await nursery.start(tunnel.serve, config)
    return int(urls[0].rsplit(":", 1)[1])


async def test_agent_connects_to_every_worker_and_each_serves(
    workers_server, local_service, agent_config
):
    with trio.fail_after(40):
        assert len(worker_pids()) == 2
        async with tunnel.open_tunnel(agent_config(workers_server, local_service.port)) as agent:
            await wait_connections(agent, 2)
            statuses = await fresh_visits(workers_server, 30)
            assert statuses == {200: 30}
            assert agent.state is tunnel.ClientState.CONNECTED


async def test_a_worker_killed_leaves_the_tunnel_up_and_comes_back(
    workers_server, local_service, agent_config
):
    with trio.fail_after(60):
        async with tunnel.open_tunnel(agent_config(workers_server, local_service.port)) as agent:
            await wait_connections(agent, 2)
            first, second = worker_pids()
            os.kill(first, signal.SIGKILL)
            # The agent sees one connection go; the survivor serves everyone
            # (the listening socket is shared, so no visitor lands on the dead one).
            await wait_connections(agent, 1)
            assert agent.state is tunnel.ClientState.CONNECTED
            assert await fresh_visits(workers_server, 20) == {200: 20}
            # The server restarts the worker; the agent finds and joins it.
            await wait_connections(agent, 2)
            pids = worker_pids()
            assert second in pids
            assert first not in pids
            assert len(pids) == 2
            assert await fresh_visits(workers_server, 20) == {200: 20}


async def test_graceful_shutdown_stops_every_worker(local_service, agent_config, nursery):
    stop = trio.Event()
    done = trio.Event()
    config = tunnel.ServerConfig(
        address="127.0.0.1:0", tokens=frozenset({TOKEN}), workers=2, graceful_timeout=2
    )

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        await tunnel.serve(config, shutdown_trigger=stop.wait, task_status=task_status)
        done.set()

    with trio.fail_after(40):
        urls = await nursery.start(run)
        port = int(urls[0].rsplit(":", 1)[1])
        async with tunnel.open_tunnel(agent_config(port, local_service.port)) as agent:
            await wait_connections(agent, 2)
            stop.set()
            await done.wait()
            assert worker_pids() == []
            await wait_connections(agent, 0)


def test_workers_refuse_settings_they_cannot_copy():
    config = tunnel.ServerConfig(address="127.0.0.1:0", workers=2, auth=lambda request: None)
    with pytest.raises(tunnel.ConfigError, match="cannot be copied"):
        trio.run(tunnel.serve, config)


@pytest.mark.parametrize("workers", [0, 65, "2", True])
def test_workers_must_be_a_sensible_count(workers):
    with pytest.raises(tunnel.ConfigError, match="workers"):
        tunnel.ServerConfig(workers=workers)


async def test_worker_the_agent_holds_already_refuses_before_anything_else(tunnel_server):
    # Single process here, so this test process's worker id is the server's.
    # The token is wrong too: the duplicate check comes first and costs nothing.
    request = (
        "GET /_tunnel HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{tunnel_server.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
        f"{HAVE_WORKERS_HEADER}: other,{worker_id()}\r\n"
        "Authorization: Bearer wrong-token\r\n\r\n"
    )
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", tunnel_server.port)
        async with stream:
            await stream.send_all(request.encode())
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = await stream.receive_some()
                assert chunk, answer
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 421 "), answer


async def test_agent_of_a_server_claiming_more_workers_than_it_has_still_works(
    local_service, open_agent, visitor, nursery
):
    # An embedding that says workers=2 but runs one process: the agent's
    # second connection lands on that one worker every time and is refused;
    # the tunnel works on one connection, and the retries back off.
    app = tunnel.TunnelApp(
        tunnel.ServerConfig(address="127.0.0.1:0", tokens=frozenset({TOKEN}), workers=2)
    )
    hc = tunnel.server.hypercorn_config(app.config)
    urls = await nursery.start(hypercorn.trio.serve, app, hc)
    port = int(urls[0].rsplit(":", 1)[1])
    with trio.fail_after(10):
        # open_tunnel waits connect_timeout for the connection that never
        # comes, then goes on with the one it has.
        started = trio.current_time()
        async with (
            open_agent(port, local_service.port, connect_timeout=1) as agent,
            visitor(port) as http,
        ):
            assert 1 <= trio.current_time() - started < 5
            assert (await http.get("/one-worker")).status_code == 200
            assert agent.server_connections == 1
            refused = app._metrics.handshakes_refused.get(421, 0)
            # Delays drawn up to 0.05 s doubling, capped at the test agent's
            # 0.2 s backoff_max: about ten a second, not a busy loop.
            assert 1 <= refused <= 40, refused
            assert (await http.get("/still")).status_code == 200


async def test_a_fresh_worker_lets_visitors_wait_for_the_agents_to_find_it(
    local_service, open_agent, nursery
):
    # As a worker that has just (re)started sees it: a host no agent has
    # claimed here yet may well be served by the other workers.
    app = tunnel.TunnelApp(
        tunnel.ServerConfig(
            address="127.0.0.1:0", tokens=frozenset({TOKEN}), workers=2, grace_period=2
        )
    )
    hc = tunnel.server.hypercorn_config(app.config)
    urls = await nursery.start(hypercorn.trio.serve, app, hc)
    port = int(urls[0].rsplit(":", 1)[1])
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers={"host": "app.localhost"}, trust_env=False
    ) as http:
        with trio.fail_after(10):
            async with trio.open_nursery() as visits:
                answers: list[httpx.Response] = []

                async def visit() -> None:
                    answers.append(await http.get("/early"))

                visits.start_soon(visit)
                await trio.sleep(0.3)
                assert answers == []  # waiting, not 404
                # Its second connection never comes; open_tunnel goes on after
                # connect_timeout.
                async with open_agent(port, local_service.port, connect_timeout=1):
                    await eventually(lambda: bool(answers))
            assert answers[0].status_code == 200
            assert answers[0].json()["path"] == "/early"
            # Once the window has passed, an unknown host is a 404 at once.
            await trio.sleep(2)
            started = trio.current_time()
            missing = await http.get("/", headers={"host": "nobody.localhost"})
            assert missing.status_code == 404
            assert trio.current_time() - started < 1


async def test_another_token_cannot_take_the_host_from_a_restarted_worker(
    local_service, agent_config, nursery
):
    # The restarted worker knows no agent yet; the other worker's ledger entry
    # still says whose the host is.
    config = tunnel.ServerConfig(
        address="127.0.0.1:0", tokens=frozenset({TOKEN, "mallory"}), workers=2
    )
    urls = await nursery.start(tunnel.serve, config)
    port = int(urls[0].rsplit(":", 1)[1])
    with trio.fail_after(60):
        async with tunnel.open_tunnel(agent_config(port, local_service.port)) as alice:
            await wait_connections(alice, 2)
            os.kill(worker_pids()[0], signal.SIGKILL)
            await wait_connections(alice, 1)
            attempts = 0
            while alice.server_connections < 2:
                with pytest.raises(tunnel.HostInUseError):
                    async with tunnel.open_tunnel(
                        agent_config(port, local_service.port, token="mallory")
                    ):
                        pytest.fail("another token took the host")
                attempts += 1
            assert attempts >= 1
            assert alice.state is tunnel.ClientState.CONNECTED
            assert await fresh_visits(port, 10) == {200: 10}


async def test_http2_visitors_cannot_stop_a_worker(workers_server):
    """The late-DATA visitor of test_hypercorn_guard.py against each worker process:
    a worker it stopped would be restarted (so visitors would hardly notice), but
    every tunnel on it would have dropped. Both workers must be the ones started.
    """
    from test_hypercorn_guard import send_data_after_the_answer

    with trio.fail_after(40):
        await eventually(lambda: len(worker_pids()) == 2, limit=30)
        before = worker_pids()
        # New connections are spread over the workers by the kernel: enough
        # of them reach both.
        for _ in range(12):
            assert await send_data_after_the_answer(workers_server) == 404
        await trio.sleep(0.5)  # A worker's exit takes a moment to show.
        assert worker_pids() == before
        assert await fresh_visits(workers_server, 4, "nobody.localhost") == {404: 4}


async def test_the_workers_ledger_is_removed_even_when_the_server_is_killed(tmp_path):
    # The workers share a directory of host claims; a server stopped by
    # SIGKILL, which runs no cleanup of its own, must not leave it behind.
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tunnel", "server", "--address", "127.0.0.1:0", "--workers", "2"],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers go with it, by their group, at the end
    )
    try:
        with trio.fail_after(30):
            await eventually(lambda: any(tmp_path.glob("tunnel-hosts-*")), limit=25)
            (ledger,) = tmp_path.glob("tunnel-hosts-*")
            os.kill(process.pid, signal.SIGKILL)
            await eventually(lambda: not ledger.exists(), limit=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
