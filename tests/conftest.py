"""Fixtures shared by the tests: real servers on 127.0.0.1, port 0, in the test's nursery.

* ``local_service`` / ``start_local_service``: the test ASGI app of
  ``tests/helpers.py`` under real Hypercorn.
* ``tunnel_server`` / ``start_tunnel_server``: ``tunnel.serve`` under real
  Hypercorn; the factory takes ``ServerConfig`` keyword arguments and returns a
  :class:`RunningServer` that a test can stop (and restart on the same port).
* ``agent_config`` / ``open_agent``: an agent for a server and a local port,
  with short reconnect delays.
* ``visitor``: an ``httpx.AsyncClient`` that reaches a tunnel server by its
  port with a given ``Host``.
* ``redis_server``: a real ``redis-server`` of the test's own (``tests/redis_server.py``).
"""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from redis_server import RedisServer

import tunnel
from helpers import LocalService, serve_local
from helpers import visitor as _visitor

TOKEN = "s3cret"


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Finalize each test's garbage in its own teardown.

    A socket or generator a test leaks then warns (an error, under
    ``filterwarnings = error``) in that test, not in whichever later test the
    garbage collector happens to run in. The captured log records go first:
    the exceptions they carry keep the leaked objects alive.
    """
    yield
    for when in ("setup", "call"):
        caplog.get_records(when).clear()
    gc.collect()


@dataclass
class RunningServer:
    """A tunnel server started by ``start_tunnel_server``."""

    port: int
    url: str
    config: tunnel.ServerConfig
    scope: trio.CancelScope
    stopped: trio.Event

    async def stop(self) -> None:
        """Cancel the server and wait until it no longer listens (its port is free)."""
        self.scope.cancel()
        await self.stopped.wait()


async def _run_server(
    config: tunnel.ServerConfig, *, task_status: trio.TaskStatus[RunningServer]
) -> None:
    stopped = trio.Event()
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                urls: list[str] = await nursery.start(partial(tunnel.serve, config))
                url = urls[0]
                port = int(url.rsplit(":", 1)[1])
                task_status.started(RunningServer(port, url, config, scope, stopped))
    finally:
        stopped.set()


StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_tunnel_server(nursery: trio.Nursery) -> StartServer:
    """Start a tunnel server: ``await start_tunnel_server(**ServerConfig kwargs)``.

    Defaults: ``address="127.0.0.1:0"``, ``tokens=frozenset({TOKEN})``.
    """

    async def start(**overrides: Any) -> RunningServer:
        settings: dict[str, Any] = {"address": "127.0.0.1:0", "tokens": frozenset({TOKEN})}
        settings.update(overrides)
        server: RunningServer = await nursery.start(_run_server, tunnel.ServerConfig(**settings))
        return server

    return start


@pytest.fixture
async def tunnel_server(start_tunnel_server: StartServer) -> RunningServer:
    """A tunnel server with the default test settings."""
    return await start_tunnel_server()


StartLocal = Callable[..., Awaitable[LocalService]]


@pytest.fixture
async def start_local_service(nursery: trio.Nursery) -> StartLocal:
    """Serve a new :class:`LocalService`: ``await start_local_service(name, port=0)``."""

    async def start(name: str = "local", port: int = 0) -> LocalService:
        service = LocalService(name)
        await nursery.start(partial(serve_local, service, port))
        return service

    return start


@pytest.fixture
async def local_service(start_local_service: StartLocal) -> LocalService:
    """The test ASGI app on a real port (``local_service.port``)."""
    return await start_local_service()


@pytest.fixture
def agent_config() -> Callable[..., tunnel.ClientConfig]:
    """``agent_config(server_port, local_port, **ClientConfig overrides)``.

    Defaults: token ``TOKEN``, host ``app.localhost``, reconnect backoff of
    0.05 s doubling up to 0.2 s.
    """

    def make(server_port: int, local_port: int, **overrides: Any) -> tunnel.ClientConfig:
        settings: dict[str, Any] = {
            "address": f"127.0.0.1:{server_port}",
            "token": TOKEN,
            "port": local_port,
            "host": "app.localhost",
            "backoff_initial": 0.05,
            "backoff_max": 0.2,
        }
        settings.update(overrides)
        return tunnel.ClientConfig(**settings)

    return make


OpenAgent = Callable[..., AbstractAsyncContextManager[tunnel.Client]]


@pytest.fixture
def open_agent(agent_config: Callable[..., tunnel.ClientConfig]) -> OpenAgent:
    """``async with open_agent(server_port, local_port, **overrides) as client:``

    Returns once the agent is connected (``tunnel.open_tunnel``).
    """

    def open_(server_port: int, local_port: int, **overrides: Any) -> Any:
        return tunnel.open_tunnel(agent_config(server_port, local_port, **overrides))

    return open_


@pytest.fixture
def visitor() -> Callable[..., httpx.AsyncClient]:
    """``async with visitor(server_port, host="app.localhost", **httpx kwargs) as http:``"""
    return _visitor


@pytest.fixture
async def redis_server(tmp_path: Any) -> Any:
    """A running ``redis-server`` on a free port; ``.url``, ``.stop()``, ``.start()``."""
    async with RedisServer(str(tmp_path)).running() as server:
        yield server
