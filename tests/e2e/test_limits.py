"""Visitor controls and limits: basic auth, IP lists, rate limits, body and header sizes."""

from __future__ import annotations

import contextlib

import pytest
import trio
from hostile import RawVisitor, start_server

import tunnel
from helpers import eventually
from tunnel._protocol.limits import RateLimit


def _headers(response) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {key.lower(): value for key, value in response.json()["headers"]}


async def test_basic_auth_is_checked_by_the_server(
    tunnel_server, local_service, open_agent, visitor
) -> None:
    with trio.fail_after(10):
        async with (
            open_agent(tunnel_server.port, local_service.port, basic_auth="ann:open sesame"),
            visitor(tunnel_server.port) as http,
        ):
            missing = await http.get("/echo")
            wrong = await http.get("/echo", auth=("ann", "guess"))
            right = await http.get("/echo", auth=("ann", "open sesame"))
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith('Basic realm="tunnel"')
    assert wrong.status_code == 401
    assert right.status_code == 200
    # The tunnel's password is the tunnel's: the service never sees it.
    assert "authorization" not in _headers(right)
    assert local_service.requests == [("GET", "/echo")]


async def test_ip_lists_admit_and_refuse_visitors(
    tunnel_server, local_service, open_agent, visitor
) -> None:
    with trio.fail_after(10):
        async with (
            open_agent(
                tunnel_server.port,
                local_service.port,
                host="deny.localhost",
                deny_ips=("127.0.0.1",),
            ),
            open_agent(
                tunnel_server.port,
                local_service.port,
                host="allow.localhost",
                allow_ips=("10.0.0.0/8", "127.0.0.0/8"),
            ),
            open_agent(
                tunnel_server.port,
                local_service.port,
                host="elsewhere.localhost",
                allow_ips=("192.0.2.0/24",),
            ),
        ):
            async with visitor(tunnel_server.port, "deny.localhost") as http:
                denied = await http.get("/echo")
            async with visitor(tunnel_server.port, "allow.localhost") as http:
                allowed = await http.get("/echo")
            async with visitor(tunnel_server.port, "elsewhere.localhost") as http:
                outside = await http.get("/echo")
    assert denied.status_code == 403
    assert "127.0.0.1" in denied.text
    assert allowed.status_code == 200
    assert outside.status_code == 403
    assert local_service.requests == [("GET", "/echo")]


def test_bad_visitor_controls_are_config_errors() -> None:
    with pytest.raises(tunnel.ConfigError, match="not an IP network"):
        tunnel.ClientConfig(address="x:1", token="t", port=1, allow_ips=("10.0.0.300/8",))
    with pytest.raises(tunnel.ConfigError, match="'user:password'"):
        tunnel.ClientConfig(address="x:1", token="t", port=1, basic_auth="no-colon")
    with pytest.raises(tunnel.ConfigError, match="burst"):
        RateLimit(requests_per_second=1, burst=0)


async def test_tunnel_rate_limit_answers_429_with_retry_after(
    start_tunnel_server, local_service, open_agent, visitor
) -> None:
    server = await start_tunnel_server(
        tunnel_rate_limit=RateLimit(requests_per_second=0.5, burst=3)
    )
    with trio.fail_after(10):
        async with (
            open_agent(server.port, local_service.port),
            visitor(server.port) as http,
        ):
            statuses = [(await http.get("/echo")).status_code for _ in range(3)]
            limited = await http.get("/echo")
    assert statuses == [200, 200, 200]
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"
    assert len(local_service.requests) == 3


async def test_visitor_rate_limit_counts_each_address_across_tunnels(
    start_tunnel_server, local_service, open_agent, visitor
) -> None:
    server = await start_tunnel_server(
        visitor_rate_limit=RateLimit(requests_per_second=0.5, burst=2)
    )
    with trio.fail_after(10):
        async with (
            open_agent(server.port, local_service.port, host="a.localhost"),
            open_agent(server.port, local_service.port, host="b.localhost"),
        ):
            async with visitor(server.port, "a.localhost") as http:
                first = (await http.get("/echo")).status_code
            async with visitor(server.port, "b.localhost") as http:
                second = (await http.get("/echo")).status_code
                third = await http.get("/echo")
    assert (first, second) == (200, 200)
    assert third.status_code == 429
    assert "retry-after" in third.headers


async def test_bandwidth_limit_slows_a_transfer_without_cutting_it(
    start_tunnel_server, local_service, open_agent, visitor
) -> None:
    rate = 64 * 1024
    server = await start_tunnel_server(tunnel_rate_limit=RateLimit(bytes_per_second=rate))
    body = b"x" * (3 * rate)
    with trio.fail_after(20):
        async with (
            open_agent(server.port, local_service.port),
            visitor(server.port) as http,
        ):
            started = trio.current_time()
            response = await http.post("/sha", content=body)
            elapsed = trio.current_time() - started
    assert response.status_code == 200
    assert response.json()["length"] == len(body)
    # One second's worth may pass at once; the other two must be paced.
    assert elapsed >= 1.8


async def test_request_body_limit_gives_413(
    start_tunnel_server, local_service, open_agent, visitor
) -> None:
    server = await start_tunnel_server(max_request_body=1000)
    with trio.fail_after(10):
        async with (
            open_agent(server.port, local_service.port),
            visitor(server.port) as http,
        ):
            declared = await http.post("/sha", content=b"x" * 1001)
            # A chunked body, which announces no length, passing the limit
            # before it ends: answered at once. On a bare socket, because the
            # server closes the connection once it has answered, and an HTTP
            # client still writing the body then leaves its iterator unfinished.
            async with RawVisitor.connect(server.port) as raw:
                chunk = b"1f4\r\n" + b"y" * 500 + b"\r\n"
                await raw.send(
                    b"POST /sha HTTP/1.1\r\nHost: app.localhost\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3
                )
                streamed, _, _ = await raw.read_response()
            small = await http.post("/sha", content=b"z" * 1000)
    assert declared.status_code == 413
    assert "1000 bytes" in declared.text
    assert streamed == 413
    assert small.status_code == 200


async def test_huge_request_headers_give_431(
    tunnel_server, local_service, open_agent, visitor
) -> None:
    with trio.fail_after(10):
        async with (
            open_agent(tunnel_server.port, local_service.port),
            visitor(tunnel_server.port) as http,
        ):
            big = {f"x-filler-{i}": "v" * 1000 for i in range(40)}
            response = await http.get("/echo", headers=big)
            normal = await http.get("/echo")
    assert response.status_code == 431
    assert normal.status_code == 200
    assert local_service.requests == [("GET", "/echo")]


async def test_a_tunnels_rate_limit_is_forgotten_when_it_goes(
    nursery: trio.Nursery, local_service, open_agent, visitor
) -> None:
    """The buckets kept per tunnel go with the tunnel: hosts come and go for as
    long as the server runs, and each left its buckets behind for good.
    """
    server = await start_server(
        nursery, tunnel_rate_limit=RateLimit(requests_per_second=100, burst=100)
    )
    hosts = [f"t{i}.localhost" for i in range(20)]
    with trio.fail_after(20):
        for host in hosts:
            async with open_agent(server.port, local_service.port, host=host):
                async with visitor(server.port, host) as http:
                    assert (await http.get("/echo")).status_code == 200
                assert host in server.app.limiter._tunnels
            await eventually(lambda: not server.hosts())
    assert len(server.app.limiter._tunnels) == 0, sorted(server.app.limiter._tunnels)


async def test_a_body_slower_than_the_minimum_rate_gets_408(
    start_tunnel_server, local_service, open_agent
) -> None:
    """A body that keeps coming, a few bytes at a time, still falls behind
    ``min_request_body_rate``; one at a good pace, even with a pause, is served."""
    server = await start_tunnel_server(request_idle_timeout=2.0, min_request_body_rate=1000)
    head = b"POST /echo HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: %d\r\n\r\n"
    with trio.fail_after(20):
        async with open_agent(server.port, local_service.port):
            async with RawVisitor.connect(server.port) as slow:
                await slow.send(head % 100_000)
                started = trio.current_time()
                with contextlib.suppress(trio.BrokenResourceError):
                    while trio.current_time() - started < 5:
                        await slow.send(b"x" * 20)  # 200 bytes a second
                        await trio.sleep(0.1)
                status, _, page = await slow.read_response()
                slow_after = trio.current_time() - started
            async with RawVisitor.connect(server.port) as paced:
                await paced.send(head % 6000)
                for i in range(3):
                    if i:
                        await trio.sleep(0.5)  # 2000 bytes a second
                    await paced.send(b"y" * 1000)
                # A pause of 1.2 s, within request_idle_timeout, that only the
                # pace has earned: 2 s of request_idle_timeout, plus 3 s for
                # 3000 bytes, minus the 1 s already spent waiting (without
                # those 3 s, 1 s would be left).
                await trio.sleep(1.2)
                await paced.send(b"y" * 3000)
                paced_status, _, _ = await paced.read_response()
    assert status == 408
    assert b"slower than 1000 bytes per second" in page
    # At 200 bytes a second the 2 s allowance is spent after 2.5 s.
    assert slow_after < 4.0
    assert paced_status == 200


async def test_headers_must_be_complete_within_the_header_timeout(start_tunnel_server) -> None:
    """A request head sent a byte at a time is cut off at ``header_timeout``."""
    server = await start_tunnel_server(header_timeout=1.0)
    with trio.fail_after(10):
        async with RawVisitor.connect(server.port) as slow:
            started = trio.current_time()
            with contextlib.suppress(trio.BrokenResourceError):
                for byte in b"GET / HTTP/1.1\r\nHost: myapp.localhost\r\nX-Slow: " + b"a" * 100:
                    await slow.send(bytes([byte]))
                    await trio.sleep(0.05)
            await slow.read_until_closed()
            closed_after = trio.current_time() - started
    assert closed_after < 2.0


async def test_a_keep_alive_connection_is_closed_once_idle_for_the_header_timeout_only(
    start_tunnel_server, local_service, open_agent
) -> None:
    """Busy for three header timeouts: kept. Idle after its response: closed after one."""
    server = await start_tunnel_server(header_timeout=0.5)
    with trio.fail_after(20):
        async with (
            open_agent(server.port, local_service.port),
            RawVisitor.connect(server.port) as visitor,
        ):
            await visitor.send(b"GET /hold HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
            await eventually(lambda: local_service.holding == 1)
            await trio.sleep(1.5)
            local_service.release_hold.set()
            status, _, _ = await visitor.read_response()
            assert status == 200
            # A second request on the same connection, then idle.
            await visitor.send(b"GET /again HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
            status, _, _ = await visitor.read_response()
            assert status == 200
            answered = trio.current_time()
            assert await visitor.read_until_closed() == b""
            idle = trio.current_time() - answered
    assert 0.4 <= idle < 1.5, idle
