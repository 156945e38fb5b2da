"""The admin API, over real HTTP against ``tunnel.serve`` with real agents:
listing tunnels, disconnecting one, its errors, and the Host it answers on."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

import tunnel
from helpers import free_port

ADMIN = "adm1n-s3cret"
PREFIX = "/_tunnel/admin"


@asynccontextmanager
async def admin_client(
    port: int, token: str | None = ADMIN, host: str | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    if host is not None:
        headers["host"] = host
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}{PREFIX}",
        headers=headers,
        trust_env=False,
        timeout=10,
    ) as client:
        yield client


@pytest.fixture
async def admin_server(start_tunnel_server: Any) -> Any:
    return await start_tunnel_server(admin_token=ADMIN)


async def test_list_tunnels_with_their_statistics(
    admin_server, start_local_service, open_agent, visitor
):
    one = await start_local_service("one")
    two = await start_local_service("two")
    port = admin_server.port
    with trio.fail_after(10):
        async with (
            open_agent(port, one.port, host="app.localhost"),
            open_agent(port, two.port, host="other.localhost"),
            visitor(port, "app.localhost") as http,
            admin_client(port) as admin,
        ):
            for _ in range(3):
                assert (await http.post("/echo", content=b"x" * 1000)).status_code == 200

            listing = await admin.get("/tunnels")
            assert listing.status_code == 200
            assert listing.headers["content-type"] == "application/json"
            tunnels = listing.json()["tunnels"]
            assert [t["host"] for t in tunnels] == ["app.localhost", "other.localhost"]
            app, other = tunnels
            assert (app["requests_served"], other["requests_served"]) == (3, 0)
            assert app["streams_in_flight"] == 0
            # Three 1000-byte bodies went to the agent; three echoes came back.
            assert app["bytes_sent"] > 3000
            assert app["bytes_received"] > 3000
            assert app["peer"][0] == "127.0.0.1"
            assert app["uptime"] >= 0
            assert isinstance(app["connected_since"], float)

            single = await admin.get("/tunnels/other.localhost")
            assert single.status_code == 200
            assert single.json()["host"] == "other.localhost"
            assert single.json()["requests_served"] == 0


async def test_errors_are_clear_json(admin_server, local_service, open_agent):
    port = admin_server.port
    with trio.fail_after(10):
        async with open_agent(port, local_service.port):
            async with admin_client(port, token=None) as anonymous:
                missing = await anonymous.get("/tunnels")
                assert missing.status_code == 401
                assert missing.json()["error"] == "unauthorized"
                assert "Authorization: Bearer" in missing.json()["message"]
                assert missing.headers["www-authenticate"].startswith("Bearer")
                # Unauthenticated callers learn nothing, not even which routes exist.
                assert (await anonymous.get("/nonsense")).status_code == 401
                assert (await anonymous.delete("/tunnels/app.localhost")).status_code == 401
            async with admin_client(port, token="wrong") as wrong:
                bad = await wrong.get("/tunnels")
                assert bad.status_code == 401
                assert bad.json() == {
                    "error": "unauthorized",
                    "message": "the admin token is not valid",
                }

            async with admin_client(port) as admin:
                unknown = await admin.get("/tunnels/nope.localhost")
                assert unknown.status_code == 404
                assert unknown.json()["error"] == "not_found"
                assert "nope.localhost" in unknown.json()["message"]
                assert (await admin.delete("/tunnels/nope.localhost")).status_code == 404

                wrong_method = await admin.post("/tunnels")
                assert wrong_method.status_code == 405
                assert wrong_method.headers["allow"] == "GET"
                assert wrong_method.json()["error"] == "method_not_allowed"
                put = await admin.put("/tunnels/app.localhost")
                assert (put.status_code, put.headers["allow"]) == (405, "GET, DELETE")

                route = await admin.get("/nonsense")
                assert route.status_code == 404
                assert f"{PREFIX}/tunnels" in route.json()["message"]

                # None of that touched the tunnel.
                assert (await admin.get("/tunnels")).json()["tunnels"][0]["host"] == "app.localhost"


async def test_disconnect_stops_the_agent(
    admin_server, local_service, agent_config, nursery, caplog
):
    caplog.set_level(logging.INFO, "tunnel.server")
    port = admin_server.port
    client = tunnel.Client(agent_config(port, local_service.port))
    stopped = trio.Event()
    errors: list[tunnel.RejectedError] = []

    async def run_agent(*, task_status: trio.TaskStatus[str]) -> None:
        try:
            await client.connect(task_status=task_status)
        except tunnel.RejectedError as exc:
            errors.append(exc)
        stopped.set()

    with trio.fail_after(10):
        await nursery.start(run_agent)
        async with admin_client(port) as admin:
            answer = await admin.delete("/tunnels/app.localhost", params={"reason": "abuse report"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["disconnected"]["host"] == "app.localhost"
            assert answer.json()["reconnect"] is False
            # Answered once the tunnel is gone, not merely told to go.
            assert (await admin.get("/tunnels")).json() == {"tunnels": []}
            await stopped.wait()
            # The agent stopped for good: it does not reconnect and fight back.
            assert client.state is tunnel.ClientState.CLOSED
            assert (await admin.get("/tunnels")).json() == {"tunnels": []}
    (error,) = errors
    assert "operator disconnected" in str(error)
    assert "abuse report" in str(error)
    lines = [r.getMessage() for r in caplog.records if r.name == "tunnel.server"]
    assert any(
        line.startswith("event=admin_disconnect tunnel=app.localhost by=127.0.0.1:")
        and 'reason="abuse report" reconnect=false' in line
        for line in lines
    ), lines
    assert any(
        line.startswith("event=agent_disconnected tunnel=app.localhost")
        and "disconnected by the server's operator: abuse report" in line
        for line in lines
    ), lines


async def test_disconnect_with_reconnect_resets_the_connection(
    admin_server, local_service, open_agent, visitor
):
    port = admin_server.port
    states_in, states = trio.open_memory_channel[tunnel.ClientState](16)
    with trio.fail_after(10):
        async with (
            open_agent(port, local_service.port, state=states_in) as agent,
            admin_client(port) as admin,
            visitor(port) as http,
        ):
            assert await states.receive() is tunnel.ClientState.CONNECTING
            assert await states.receive() is tunnel.ClientState.CONNECTED
            before = (await admin.get("/tunnels/app.localhost")).json()

            answer = await admin.delete("/tunnels/app.localhost", params={"reconnect": "true"})
            assert answer.status_code == 200
            assert answer.json()["reconnect"] is True

            # The agent was told the server restarts, and comes back on its own.
            assert await states.receive() is tunnel.ClientState.DISCONNECTED
            assert await states.receive() is tunnel.ClientState.CONNECTING
            assert await states.receive() is tunnel.ClientState.CONNECTED
            assert agent.state is tunnel.ClientState.CONNECTED
            assert (await http.get("/back")).status_code == 200
            after = (await admin.get("/tunnels/app.localhost")).json()
            assert after["peer"] != before["peer"]  # a new connection
            assert after["requests_served"] == 1


async def test_disconnect_a_tcp_tunnel_by_its_port(start_tunnel_server, agent_config, nursery):
    first = free_port()
    server = await start_tunnel_server(admin_token=ADMIN, tcp_ports=range(first, first + 1))
    local = free_port()  # nothing listens: the tunnel is only listed and closed
    client = tunnel.Client(agent_config(server.port, local, tcp=True))
    stopped = trio.Event()

    async def run_agent(*, task_status: trio.TaskStatus[str]) -> None:
        with pytest.raises(tunnel.RejectedError, match="operator disconnected"):
            await client.connect(task_status=task_status)
        stopped.set()

    with trio.fail_after(10):
        url = await nursery.start(run_agent)
        key = f"tcp:{url.rsplit(':', 1)[1]}"
        async with admin_client(server.port) as admin:
            assert [t["host"] for t in (await admin.get("/tunnels")).json()["tunnels"]] == [key]
            assert (await admin.delete(f"/tunnels/{key}")).status_code == 200
            await stopped.wait()
            assert (await admin.get("/tunnels")).json() == {"tunnels": []}
            # The public port is free again.
            with pytest.raises(OSError, match="failed"):
                await trio.open_tcp_stream("127.0.0.1", first)


async def test_admin_api_answers_only_on_the_admin_host(
    start_tunnel_server, local_service, open_agent, visitor
):
    server = await start_tunnel_server(admin_token=ADMIN)
    port = server.port
    with trio.fail_after(10):
        # An agent may even claim a loopback name: the admin API still comes
        # first there, so the admin token never reaches any agent.
        async with (
            open_agent(port, local_service.port, host="localhost"),
            open_agent(port, local_service.port, host="app.localhost"),
        ):
            async with admin_client(port, host=f"localhost:{port}") as admin:
                listing = await admin.get("/tunnels")
                assert listing.status_code == 200
                assert len(listing.json()["tunnels"]) == 2
            async with visitor(port, "localhost") as http:
                assert (await http.get("/elsewhere")).json()["path"] == "/elsewhere"
            assert ("GET", f"{PREFIX}/tunnels") not in local_service.requests

            # Under a tunnel's host the same path is the tunnel's own.
            async with visitor(port, "app.localhost") as http:
                echoed = await http.get(f"{PREFIX}/tunnels")
                assert echoed.status_code == 200
                assert echoed.json()["path"] == f"{PREFIX}/tunnels"


async def test_a_configured_admin_host_replaces_loopback(start_tunnel_server):
    server = await start_tunnel_server(admin_token=ADMIN, admin_host="Admin.Example.NET")
    with trio.fail_after(10):
        async with admin_client(server.port, host="admin.example.net") as admin:
            assert (await admin.get("/tunnels")).json() == {"tunnels": []}
        async with admin_client(server.port) as loopback:
            # 127.0.0.1 is routed like any host now: no tunnel serves it.
            answer = await loopback.get("/tunnels")
            assert answer.status_code == 404
            assert "No tunnel is serving 127.0.0.1" in answer.text


async def test_no_admin_token_no_admin_api(tunnel_server):
    with trio.fail_after(10):
        async with admin_client(tunnel_server.port) as admin:
            answer = await admin.get("/tunnels")
            assert answer.status_code == 404
            assert answer.headers["content-type"].startswith("text/html")


async def test_server_command_flags(local_service: Any) -> None:
    port, metrics_port = free_port(), free_port()
    server = await trio.lowlevel.open_process(
        [
            *(sys.executable, "-m", "tunnel", "server"),
            *("--address", f"127.0.0.1:{port}", "--token", "s3cret"),
            *("--admin-token", ADMIN, "--metrics-address", f"127.0.0.1:{metrics_port}"),
            "--access-log",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        assert server.stderr is not None
        seen = b""
        with trio.fail_after(20):
            while seen.count(b"Running on") < 2:
                chunk = await server.stderr.receive_some(4096)
                assert chunk, seen
                seen += chunk
        assert b"event=admin_api path=/_tunnel/admin hosts=127.0.0.1,::1,localhost" in seen
        config = tunnel.ClientConfig(
            address=f"127.0.0.1:{port}",
            token="s3cret",
            port=local_service.port,
            host="cli.localhost",
        )
        with trio.fail_after(15):
            async with (
                tunnel.open_tunnel(config),
                admin_client(port) as admin,
                httpx.AsyncClient(trust_env=False) as http,
            ):
                listing = (await admin.get("/tunnels")).json()["tunnels"]
                assert [t["host"] for t in listing] == ["cli.localhost"]
                visit = await http.get(
                    f"http://127.0.0.1:{port}/hello", headers={"host": "cli.localhost"}
                )
                assert visit.status_code == 200
                metrics = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
                assert (
                    'tunnel_requests_total{host="cli.localhost",status="2xx"} 1.0' in metrics.text
                )
            while b"event=request" not in seen:
                chunk = await server.stderr.receive_some(4096)
                assert chunk, seen
                seen += chunk
        assert b"event=agent_connected tunnel=cli.localhost" in seen
        assert b"host=cli.localhost method=GET path=/hello status=200" in seen
    finally:
        server.kill()
        await server.wait()


async def raw_request(port: int, head: str) -> tuple[int, bytes]:
    """Send ``head`` (a request without a body) as it is; the status and body of the answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = head + "Connection: close\n\n"
        await stream.send_all(request.replace("\n", "\r\n").encode())
        answer = b""
        while chunk := await stream.receive_some():
            answer += chunk
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), body


async def test_absolute_form_targets_cannot_slip_past_the_path_checks(
    start_tunnel_server, local_service, open_agent
):
    """``GET http://localhost/_tunnel/admin/tunnels`` with a tunnel's Host used to skip the
    admin API's path check (it looks for a path that starts with the prefix) and
    reach that tunnel's agent verbatim, admin token and all.
    """
    server = await start_tunnel_server(admin_token=ADMIN)
    port = server.port
    auth = f"Authorization: Bearer {ADMIN}"
    with trio.fail_after(10):
        async with open_agent(port, local_service.port, host="app.localhost"):
            # The target names another host than Host: refused, with a page saying so.
            status, page = await raw_request(
                port,
                f"GET http://localhost{PREFIX}/tunnels HTTP/1.1\nHost: app.localhost\n{auth}\n",
            )
            assert status == 400
            assert b"target names localhost but its Host header app.localhost" in page
            # Naming the admin host both times is the admin API, as the path alone is.
            status, listing = await raw_request(
                port,
                f"GET http://localhost:{port}{PREFIX}/tunnels HTTP/1.1\nHost: localhost\n{auth}\n",
            )
            assert status == 200
            assert b'"app.localhost"' in listing
            # A tunnel's own absolute-form target reaches its agent in origin-form.
            status, echo = await raw_request(
                port, "GET HTTP://App.localhost/x/y?q=1 HTTP/1.1\nHost: app.localhost\n"
            )
            assert status == 200
            assert json.loads(echo)["path"] == "/x/y"
            assert json.loads(echo)["query"] == "q=1"
            # Anything else that is not a path is refused too.
            status, _ = await raw_request(
                port, "GET app.localhost:80 HTTP/1.1\nHost: app.localhost\n"
            )
            assert status == 400
    assert local_service.requests == [("GET", "/x/y")]
