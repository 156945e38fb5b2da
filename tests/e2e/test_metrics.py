"""Prometheus metrics, scraped over real HTTP from ``tunnel.serve`` and parsed with
prometheus-client's own parser, after real requests through real agents."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import tunnel
from helpers import visitor

TOKEN = "s3cret"
ADMIN = "adm1n-s3cret"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def start_server(nursery: trio.Nursery, **overrides: Any) -> tuple[int, str]:
    """A server with metrics on their own port: its port and its metrics URL."""
    settings: dict[str, Any] = {
        "address": "127.0.0.1:0",
        "tokens": frozenset({TOKEN}),
        "metrics_address": "127.0.0.1:0",
    }
    settings.update(overrides)
    urls: list[str] = await nursery.start(partial(tunnel.serve, tunnel.ServerConfig(**settings)))
    assert len(urls) == 2
    assert urls[1].endswith("/metrics")
    return int(urls[0].rsplit(":", 1)[1]), urls[1]


async def scrape(url: str, **kwargs: Any) -> Samples:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        response = await http.get(url, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_counters_move_with_real_requests(nursery, start_local_service, open_agent):
    left = trio.Event()

    async def on_disconnection(info: tunnel.TunnelInfo) -> None:
        left.set()

    port, metrics_url = await start_server(
        nursery, callbacks=tunnel.Callbacks(on_disconnection=on_disconnection)
    )
    service = await start_local_service()
    with trio.fail_after(15):
        before = await scrape(metrics_url)
        assert value(before, "tunnel_agents_connected") == 0
        assert value(before, "tunnel_requests_total", host="_other", status="4xx") == 0
        assert value(before, "tunnel_response_seconds_count") == 0

        async with (
            open_agent(port, service.port) as agent,
            visitor(port) as http,
            visitor(port, "nobody.localhost") as lost,
        ):
            connected = await scrape(metrics_url)
            assert value(connected, "tunnel_agents_connected") == 1
            assert value(connected, "tunnel_agent_connections_total") == 1
            # A new tunnel's series start at zero, so rate() sees its first requests.
            host = agent.host
            assert value(connected, "tunnel_requests_total", host=host, status="2xx") == 0

            for _ in range(3):
                assert (await http.post("/echo", content=b"u" * 5000)).status_code == 200
            assert (await http.get("/status/404")).status_code == 404
            assert (await http.get("/status/503")).status_code == 503
            assert (await lost.get("/")).status_code == 404  # no such tunnel

            after = await scrape(metrics_url)
            assert value(after, "tunnel_requests_total", host=host, status="2xx") == 3
            assert value(after, "tunnel_requests_total", host=host, status="4xx") == 1
            assert value(after, "tunnel_requests_total", host=host, status="5xx") == 1
            assert value(after, "tunnel_requests_total", host=host, status="3xx") == 0
            assert value(after, "tunnel_requests_total", host="_other", status="4xx") == 1
            # The unknown host got no series of its own.
            assert not [key for key in after if ("host", "nobody.localhost") in key[1]]

            # Only requests that reached the tunnel are in the histogram.
            assert value(after, "tunnel_response_seconds_count") == 5
            assert 0 < value(after, "tunnel_response_seconds_sum") < 5  # type: ignore[operator]
            buckets = [
                (float(dict(labels)["le"]), count)
                for (name, labels), count in after.items()
                if name == "tunnel_response_seconds_bucket"
            ]
            counts = [count for _, count in sorted(buckets)]
            assert counts == sorted(counts)  # cumulative
            assert counts[-1] == 5  # le="+Inf"

            to_agent = value(after, "tunnel_bytes_total", host=host, direction="to_agent")
            from_agent = value(after, "tunnel_bytes_total", host=host, direction="from_agent")
            assert to_agent is not None
            assert to_agent > 3 * 5000
            assert from_agent is not None
            assert from_agent > 3 * 5000  # the echoes
            assert value(after, "tunnel_streams_open", host=host) == 0

        # The agent left: its last values are scraped once, then its series end.
        await left.wait()
        last = await scrape(metrics_url)
        assert value(last, "tunnel_agents_connected") == 0
        assert value(last, "tunnel_requests_total", host=host, status="2xx") == 3
        gone = await scrape(metrics_url)
        assert value(gone, "tunnel_requests_total", host=host, status="2xx") is None
        assert value(gone, "tunnel_bytes_total", host=host, direction="to_agent") is None
        assert value(gone, "tunnel_response_seconds_count") == 5  # no host label: kept


async def test_refused_handshakes_by_status(nursery, local_service, agent_config):
    port, metrics_url = await start_server(nursery, reserved_hosts={"mine.localhost": "other"})
    with trio.fail_after(15):
        with pytest.raises(tunnel.AuthenticationError):
            async with tunnel.open_tunnel(agent_config(port, local_service.port, token="bad")):
                pass
        with pytest.raises(tunnel.AuthenticationError):
            async with tunnel.open_tunnel(agent_config(port, local_service.port, token="worse")):
                pass
        with pytest.raises(tunnel.HostRejectedError):
            async with tunnel.open_tunnel(
                agent_config(port, local_service.port, host="mine.localhost")
            ):
                pass
        samples = await scrape(metrics_url)
        assert value(samples, "tunnel_handshakes_refused_total", status="401") == 2
        assert value(samples, "tunnel_handshakes_refused_total", status="403") == 1
        assert value(samples, "tunnel_agent_connections_total") == 0
        assert value(samples, "tunnel_agents_connected") == 0


async def test_metrics_through_the_admin_api(nursery, local_service, open_agent):
    port, _ = await start_server(nursery, admin_token=ADMIN)
    url = f"http://127.0.0.1:{port}/_tunnel/admin/metrics"
    with trio.fail_after(10):
        async with open_agent(port, local_service.port), visitor(port) as http:
            await http.get("/")
            samples = await scrape(url, headers={"authorization": f"Bearer {ADMIN}"})
            assert value(samples, "tunnel_agents_connected") == 1
            assert value(samples, "tunnel_requests_total", host="app.localhost", status="2xx") == 1
            async with httpx.AsyncClient(trust_env=False) as anonymous:
                assert (await anonymous.get(url)).status_code == 401


async def test_the_metrics_listener_serves_only_metrics(nursery):
    _, metrics_url = await start_server(nursery)
    base = metrics_url.removesuffix("/metrics")
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(f"{base}/")).status_code == 404
            refused = await http.post(metrics_url)
            assert (refused.status_code, refused.headers["allow"]) == (405, "GET, HEAD")
            openmetrics = await http.get(
                metrics_url, headers={"accept": "application/openmetrics-text; version=1.0.0"}
            )
            assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
            assert openmetrics.text.endswith("# EOF\n")


async def test_two_servers_in_one_process_count_apart(nursery, local_service, open_agent):
    one_port, one_metrics = await start_server(nursery)
    _, two_metrics = await start_server(nursery)
    with trio.fail_after(10):
        async with open_agent(one_port, local_service.port), visitor(one_port) as http:
            await http.get("/")
            one = await scrape(one_metrics)
            two = await scrape(two_metrics)
    assert value(one, "tunnel_requests_total", host="app.localhost", status="2xx") == 1
    assert value(one, "tunnel_agents_connected") == 1
    assert value(two, "tunnel_agents_connected") == 0
    assert value(two, "tunnel_requests_total", host="app.localhost", status="2xx") is None
    assert tunnel.TunnelApp().metrics_registry is not tunnel.TunnelApp().metrics_registry


async def test_access_log_lines(start_tunnel_server, local_service, open_agent, caplog):
    caplog.set_level(logging.INFO, "tunnel.server")
    server = await start_tunnel_server(access_log=True)
    with trio.fail_after(10):
        async with open_agent(server.port, local_service.port), visitor(server.port) as http:
            await http.get("/fixed?secret=1")
            await http.get("/status/404")
    lines = [r.getMessage() for r in caplog.records if r.name == "tunnel.server.access"]
    fixed = next(line for line in lines if "path=/fixed" in line)
    assert fixed.startswith("event=request client=127.0.0.1 host=app.localhost method=GET")
    assert " status=200 " in fixed
    assert fixed.endswith(" bytes=1234")
    assert "secret" not in fixed  # query strings may carry secrets
    assert any("path=/status/404 status=404" in line for line in lines), lines


async def test_no_access_log_by_default(tunnel_server, local_service, open_agent, caplog):
    caplog.set_level(logging.INFO, "tunnel.server")
    with trio.fail_after(10):
        async with (
            open_agent(tunnel_server.port, local_service.port),
            visitor(tunnel_server.port) as http,
        ):
            await http.get("/")
    assert not [r for r in caplog.records if r.name == "tunnel.server.access"]


async def test_agent_events_are_logged_as_key_value_lines(
    tunnel_server, local_service, open_agent, agent_config, caplog
):
    caplog.set_level(logging.INFO, "tunnel.server")
    with trio.fail_after(10):
        async with open_agent(tunnel_server.port, local_service.port):
            pass
        with pytest.raises(tunnel.AuthenticationError):
            async with tunnel.open_tunnel(
                agent_config(
                    tunnel_server.port, local_service.port, token="bad", host="x.localhost"
                )
            ):
                pass
    lines = [r.getMessage() for r in caplog.records if r.name == "tunnel.server"]
    connected = next(line for line in lines if line.startswith("event=agent_connected"))
    assert connected.startswith("event=agent_connected tunnel=app.localhost peer=127.0.0.1:")
    assert 'identity="token sha256:' in connected
    disconnected = next(line for line in lines if line.startswith("event=agent_disconnected"))
    assert disconnected.startswith("event=agent_disconnected tunnel=app.localhost peer=127.0.0.1:")
    assert " duration=" in disconnected
    assert " reason=" in disconnected
    refused = next(line for line in lines if line.startswith("event=agent_refused"))
    assert refused.startswith("event=agent_refused peer=127.0.0.1:")
    assert "claimed=x.localhost status=401 reason=" in refused
