"""Agents coming, going, being refused and reconnecting, seen from outside:
what ``open_tunnel`` raises, what the state channel says, what visitors get."""

from __future__ import annotations

import pytest
import trio

import tunnel
from helpers import free_port

CONNECTING = tunnel.ClientState.CONNECTING
CONNECTED = tunnel.ClientState.CONNECTED
DISCONNECTED = tunnel.ClientState.DISCONNECTED


async def test_two_agents_on_two_hosts(tunnel_server, start_local_service, open_agent, visitor):
    one = await start_local_service("one")
    two = await start_local_service("two")
    port = tunnel_server.port
    with trio.fail_after(5):
        async with (
            open_agent(port, one.port, host="app.localhost") as agent_one,
            open_agent(port, two.port, host="other.localhost") as agent_two,
            visitor(port, "app.localhost") as http_one,
            visitor(port, "other.localhost") as http_two,
        ):
            assert agent_one.url == f"http://app.localhost:{port}"
            assert agent_two.url == f"http://other.localhost:{port}"
            for i in range(3):
                seen_one = (await http_one.get(f"/one/{i}")).json()
                seen_two = (await http_two.get(f"/two/{i}")).json()
                assert (seen_one["service"], seen_one["path"]) == ("one", f"/one/{i}")
                assert (seen_two["service"], seen_two["path"]) == ("two", f"/two/{i}")
    assert one.requests == [("GET", f"/one/{i}") for i in range(3)]
    assert two.requests == [("GET", f"/two/{i}") for i in range(3)]


async def test_local_service_down_then_up(tunnel_server, start_local_service, open_agent, visitor):
    local_port = free_port()
    states_in, states = trio.open_memory_channel[tunnel.ClientState](16)
    with trio.fail_after(10):
        async with (
            open_agent(tunnel_server.port, local_port, state=states_in) as agent,
            visitor(tunnel_server.port) as http,
        ):
            down = await http.get("/while-down")
            assert down.status_code == 502
            assert f"127.0.0.1:{local_port}" in down.text

            service = await start_local_service("late", port=local_port)
            up = await http.get("/now-up")
            assert up.status_code == 200, up.text
            assert up.json()["path"] == "/now-up"
            assert service.requests == [("GET", "/now-up")]

            # The same connection served both: the agent never went away.
            assert agent.state is CONNECTED
            assert [states.receive_nowait(), states.receive_nowait()] == [CONNECTING, CONNECTED]
            with pytest.raises(trio.WouldBlock):
                states.receive_nowait()


async def test_refusals_are_raised_at_once_and_say_why(
    start_tunnel_server, local_service, open_agent, visitor
):
    server = await start_tunnel_server(tokens=frozenset({"s3cret", "other"}), domain="localhost")

    with trio.fail_after(2), pytest.raises(tunnel.AuthenticationError) as bad_token:
        async with open_agent(server.port, local_service.port, token="wrong"):
            pytest.fail("an agent with a bad token connected")
    assert "token" in str(bad_token.value)
    assert bad_token.value.status == 401

    with trio.fail_after(2), pytest.raises(tunnel.HostRejectedError) as outside:
        async with open_agent(server.port, local_service.port, host="app.example.com"):
            pytest.fail("an agent outside the domain connected")
    assert "app.example.com" in str(outside.value)
    assert "localhost" in outside.value.reason

    with trio.fail_after(5):
        async with (
            open_agent(server.port, local_service.port),
            visitor(server.port) as http,
        ):
            with trio.fail_after(2), pytest.raises(tunnel.HostInUseError) as in_use:
                async with open_agent(server.port, local_service.port, token="other"):
                    pytest.fail("a second token took a host in use")
            assert "app.localhost" in str(in_use.value)
            # The holder of the host is undisturbed.
            response = await http.get("/still-mine")
            assert response.status_code == 200
            assert response.json()["path"] == "/still-mine"


async def test_auth_hook_and_callbacks(start_tunnel_server, local_service, open_agent, visitor):
    requests: list[tunnel.ConnectRequest] = []
    connected: list[tunnel.TunnelInfo] = []
    disconnected: list[tunnel.TunnelInfo] = []
    left = {"app.localhost": trio.Event(), "later.localhost": trio.Event()}

    def auth(request: tunnel.ConnectRequest) -> None:
        requests.append(request)
        if request.host == "blocked.localhost":
            raise PermissionError("blocked.localhost is closed for maintenance")

    async def on_connection(info: tunnel.TunnelInfo) -> None:
        if info.host == "refused.localhost":
            raise RuntimeError("refused.localhost has no plan")
        connected.append(info)

    async def on_disconnection(info: tunnel.TunnelInfo) -> None:
        disconnected.append(info)
        left[info.host].set()

    server = await start_tunnel_server(
        auth=auth,
        callbacks=tunnel.Callbacks(on_connection=on_connection, on_disconnection=on_disconnection),
    )
    with trio.fail_after(10):
        async with (
            open_agent(server.port, local_service.port),
            visitor(server.port) as http,
        ):
            (request,) = requests
            assert isinstance(request, tunnel.ConnectRequest)
            assert request.token == "s3cret"
            assert request.host == "app.localhost"
            assert request.peer is not None
            assert request.peer[0] == "127.0.0.1"
            assert isinstance(request.peer[1], int)
            assert request.header("Authorization") == "Bearer s3cret"
            (info,) = connected
            assert isinstance(info, tunnel.TunnelInfo)
            assert info.host == "app.localhost"
            assert info.request is request
            assert not left["app.localhost"].is_set()

            with pytest.raises(tunnel.HostRejectedError) as blocked:
                async with open_agent(server.port, local_service.port, host="blocked.localhost"):
                    pytest.fail("the auth hook's refusal was ignored")
            assert "blocked.localhost is closed for maintenance" in blocked.value.reason

            with pytest.raises(tunnel.HostRejectedError) as refused:
                async with open_agent(server.port, local_service.port, host="refused.localhost"):
                    pytest.fail("the on_connection refusal was ignored")
            assert "refused.localhost has no plan" in refused.value.reason
            assert [i.host for i in connected] == ["app.localhost"]

            # The server goes on serving: the first agent, and a new one.
            assert (await http.get("/still")).status_code == 200
            async with (
                open_agent(server.port, local_service.port, host="later.localhost"),
                visitor(server.port, "later.localhost") as later,
            ):
                assert (await later.get("/later")).json()["path"] == "/later"
            await left["later.localhost"].wait()
            assert not left["app.localhost"].is_set()
        await left["app.localhost"].wait()
    assert [i.host for i in disconnected] == ["later.localhost", "app.localhost"]
    assert disconnected[1] is info
    assert [r.host for r in requests] == [
        "app.localhost",
        "blocked.localhost",
        "refused.localhost",
        "later.localhost",
    ]


async def test_state_sequence_across_a_server_restart(
    start_tunnel_server, local_service, open_agent, visitor
):
    server = await start_tunnel_server()
    port = server.port
    states_in, states = trio.open_memory_channel[tunnel.ClientState](16)
    with trio.fail_after(10):
        async with open_agent(port, local_service.port, state=states_in) as agent:
            assert await states.receive() is CONNECTING
            assert await states.receive() is CONNECTED
            async with visitor(port) as http:
                assert (await http.get("/before")).status_code == 200

            await server.stop()
            assert await states.receive() is DISCONNECTED
            assert await states.receive() is CONNECTING
            # The agent is trying (and failing) to reach the dead server now.
            server = await start_tunnel_server(address=f"127.0.0.1:{port}")
            retries: list[tunnel.ClientState] = []
            while (state := await states.receive()) is not CONNECTED:
                retries.append(state)
            assert retries == [DISCONNECTED, CONNECTING] * (len(retries) // 2)
            assert agent.state is CONNECTED

            async with visitor(port) as http:
                response = await http.get("/after")
            assert response.status_code == 200, response.text
            assert response.json()["path"] == "/after"


async def test_unread_state_channel_never_stalls(tunnel_server, local_service, open_agent, visitor):
    states_in, states = trio.open_memory_channel[tunnel.ClientState](0)
    with trio.fail_after(5):
        async with (
            states,
            open_agent(tunnel_server.port, local_service.port, state=states_in) as agent,
            visitor(tunnel_server.port) as http,
        ):
            assert agent.state is CONNECTED
            for i in range(20):
                response = await http.get(f"/n/{i}")
                assert response.status_code == 200
                assert response.json()["path"] == f"/n/{i}"
            assert agent.state is CONNECTED


async def test_leaving_open_tunnel_is_prompt(tunnel_server, local_service, open_agent):
    # Leaving the block with nothing in flight has nothing to wait for: the
    # agent says goodbye and the server answers within a round trip.
    with trio.fail_after(5):
        async with open_agent(tunnel_server.port, local_service.port) as agent:
            started = trio.current_time()
        elapsed = trio.current_time() - started
    assert agent.state is tunnel.ClientState.CLOSED
    assert elapsed < 1.0, f"leaving open_tunnel took {elapsed:.2f}s"
