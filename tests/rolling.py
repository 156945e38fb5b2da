"""Graceful rolling restarts under GET load: SIGTERM, then a fresh process, one at a time.

What runs, all on loopback and all real processes but the local service:

* ``tunnel server --workers 2``; a worker sent SIGTERM drains and exits, and the
  server's parent starts a fresh one;
* ``tunnel http`` agents: two that pool one host (``pool.localhost``), and one
  alone on its host (``single.localhost``), whose visitors wait out its restart
  in the server's grace period;
* visitors: keep-alive HTTP clients sending GETs to both hosts as fast as the
  answers come, each on a new connection every 50 requests (as many visitors
  would), so that both workers carry load.

The restarts go round: each agent (SIGTERM; once it exited, a fresh one; wait
until it is connected), then each server worker (SIGTERM; wait for its
successor), each step once every connection is back. A GET must never be
lost nor answered 502: a request an agent or a worker refuses while going away
was never processed, and is sent elsewhere.

One allowance, counted apart: a worker going away closes its visitors' idle
keep-alive connections, and a GET sent on one just then gets no answer at all
(the connection closes, or is reset).
HTTP/1.1 lets a client retry an idempotent request in that case (RFC 9112
section 9.3.1), browsers do, and so do these visitors, once.

Used by ``tests/soak.py`` (its rolling phase) and ``tests/e2e/test_rolling.py``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from helpers import LocalService, free_port, serve_local

__all__ = ["Restarts", "rolling_restarts"]

TUNNEL = [sys.executable, "-m", "tunnel"]
TOKEN = "s3cret"
#: A request unanswered after this long is lost (a hang, not a slow answer).
REQUEST_TIMEOUT = 60.0
#: The server's grace period: a lone agent's restart (a fresh interpreter
#: starting on a busy machine) must fit in it.
GRACE = 15.0
#: How long one process may take to start, stop, or connect.
STEP_TIMEOUT = 60.0


class _SlowService(LocalService):
    """Takes from 0 to twice ``service_time`` seconds per request.

    So every drain has requests in flight, of unequal lengths (one of an
    agent's connections drains before another), and some cross the agent's
    refusal of new ones.
    """

    def __init__(self, service_time: float) -> None:
        super().__init__("rolling")
        self.service_time = service_time

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await trio.sleep(random.uniform(0, 2 * self.service_time))
        await super().__call__(scope, receive, send)


@dataclass
class Restarts:
    """What a rolling-restart run did and what its visitors got."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    lost: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    #: GETs sent again after a keep-alive connection closed with no answer.
    client_retries: int = 0
    #: What the 502 pages said, to tell which step of a restart gave them.
    bad_gateway_reasons: Counter[str] = field(default_factory=Counter)
    agent_restarts: int = 0
    worker_restarts: int = 0
    #: What is being restarted now, to tell when errors happened.
    step: str = "warming up"
    #: Processes stopped by SIGTERM that exited non-zero or printed a traceback.
    unclean: list[str] = field(default_factory=list)
    #: Set (and replaced) each time a GET is sent.
    more_sent: trio.Event = field(default_factory=trio.Event, repr=False)

    @property
    def bad_gateway(self) -> int:
        return self.statuses[502]

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    def summary(self) -> str:
        others = {k: n for k, n in sorted(self.statuses.items()) if not 200 <= k < 300}
        return (
            f"rolling restarts: {self.agent_restarts} agent and {self.worker_restarts} "
            f"server worker restarts; {self.sent} GETs, {self.ok} 2xx, "
            f"{self.bad_gateway} 502, {self.lost} lost, "
            f"{self.client_retries} retried by the client on a closed keep-alive connection"
            + (f", other statuses {others}" if others else "")
            + (f", errors {dict(self.errors)}" if self.errors else "")
            + (f", 502s: {dict(self.bad_gateway_reasons)}" if self.bad_gateway else "")
            + (f"; unclean exits: {self.unclean}" if self.unclean else "")
        )


class _Process:
    """A ``tunnel`` process, everything it printed, and a wait for a line of it."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self.output = bytearray()
        self._printed = trio.Event()

    @classmethod
    async def start(cls, nursery: trio.Nursery, name: str, argv: list[str]) -> _Process:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        child = cls(name, process)
        nursery.start_soon(child._pump)
        return child

    async def _pump(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        async with stream:
            while chunk := await stream.receive_some(65536):
                self.output += chunk
                self._printed.set()
                self._printed = trio.Event()

    async def wait_for(self, text: bytes, start: int = 0) -> None:
        with trio.fail_after(STEP_TIMEOUT):
            while text not in self.output[start:]:
                if self.process.returncode is not None:
                    raise AssertionError(f"{self.name} exited: {self.output.decode()}")
                await self._printed.wait()

    async def stop(self, restarts: Restarts) -> None:
        """SIGTERM, and wait for a clean exit (recorded in ``restarts`` if not)."""
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP_TIMEOUT):
            code = await self.process.wait()
        text = self.output.decode(errors="replace")
        if code != 0 or "Traceback" in text:
            restarts.unclean.append(f"{self.name} exited {code}: {text[-2000:]}")

    async def kill(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            if self.process.returncode is None:
                self.process.kill()
            await self.process.wait()


def _children(pid: int) -> set[int]:
    """The worker processes of the server ``pid`` (not its other children, such as
    the watchdog of its ledger)."""
    # Per thread: trio starts processes from worker threads.
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            children.update(int(child) for child in (task / "children").read_text().split())
    workers = set()
    for child in children:
        with contextlib.suppress(FileNotFoundError):
            if b"tunnel.server.hypercorn._worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.add(child)
    return workers


async def _visit(http: httpx.AsyncClient, restarts: Restarts, path: str) -> None:
    restarts.sent += 1
    restarts.more_sent.set()
    restarts.more_sent = trio.Event()
    try:
        with trio.fail_after(REQUEST_TIMEOUT):
            try:
                response = await http.get(path)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                # Closed (or reset) with no answer: the case RFC 9112 lets a
                # client retry a GET in, once.
                restarts.client_retries += 1
                response = await http.get(path)
        restarts.statuses[response.status_code] += 1
        if response.status_code == 502:
            text = response.text
            reason = text[text.find("<p>") + 3 : text.find("</p>")]
            restarts.bad_gateway_reasons[f"{reason} (restarting {restarts.step})"] += 1
    except (httpx.HTTPError, trio.TooSlowError) as exc:
        restarts.lost += 1
        restarts.errors[f"{type(exc).__name__} while restarting {restarts.step}"] += 1


async def rolling_restarts(
    duration: float,
    *,
    rounds: int | None = None,
    visitors: int = 4,
    log: Callable[[str], None] = lambda _: None,
    pool: bool = True,
    worker_restarts: int = 2,
    service_time: float = 0.05,
) -> Restarts:
    """Restart agents and server workers in turn under GET load.

    Goes round until ``duration`` seconds have passed (or ``rounds`` rounds
    are done, whichever first), always finishing the round it is in, and
    always at least one round. Without
    ``pool`` only the lone agent runs; ``worker_restarts`` per round; the
    local service takes ``service_time`` per GET on average.
    """
    restarts = Restarts()
    port = free_port()
    hosts = {"pool.localhost": ["--pool"]} if pool else {}
    hosts["single.localhost"] = []
    config = trio.Path(f"/tmp/tunnel-rolling-{os.getpid()}-{port}.toml")
    await config.write_text(f"grace_period = {GRACE}\n")
    try:
        async with trio.open_nursery() as nursery:
            service = _SlowService(service_time)
            await nursery.start(serve_local, service)
            argv = [*TUNNEL, "server", "--address", f"127.0.0.1:{port}", "--token", TOKEN]
            argv += ["--workers", "2", "--config", str(config)]
            server = await _Process.start(nursery, "server", argv)
            agents: list[tuple[str, list[str], _Process]] = []
            try:
                await server.wait_for(b"Running on")
                for host, options in hosts.items():
                    for n in range(2 if options else 1):
                        agents.append(
                            (
                                host,
                                options,
                                await _start_agent(nursery, port, service.port, host, options, n),
                            )
                        )
                for host in hosts:
                    await _linked(server, host, 0, 4 if hosts[host] else 2)
                running = True

                async def load(host: str, n: int) -> None:
                    i = 0
                    while running:
                        async with httpx.AsyncClient(
                            base_url=f"http://127.0.0.1:{port}",
                            headers={"host": host},
                            timeout=httpx.Timeout(REQUEST_TIMEOUT),
                            trust_env=False,
                        ) as http:
                            for _ in range(50):
                                if not running:
                                    break
                                await _visit(http, restarts, f"/rolling/{n}/{i}")
                                i += 1

                async with trio.open_nursery() as work:
                    for host in hosts:
                        for n in range(visitors):
                            work.start_soon(load, host, n)
                    started = trio.current_time()
                    # Every step is taken under load, whatever the machine's
                    # speed: a few GETs per visitor are sent before the first
                    # and between each two.
                    steady = 2 * visitors * len(hosts)
                    await _sent_more(restarts, steady)
                    done = 0
                    while done == 0 or (
                        trio.current_time() - started < duration and rounds != done
                    ):
                        for index, (host, options, agent) in enumerate(agents):
                            restarts.step = agent.name
                            await agent.stop(restarts)
                            mark = len(server.output)
                            fresh = await _start_agent(
                                nursery, port, service.port, host, options, index
                            )
                            agents[index] = (host, options, fresh)
                            await _linked(server, host, mark)
                            restarts.agent_restarts += 1
                            log(f"{trio.current_time() - started:5.1f} s: {fresh.name} restarted")
                            await _sent_more(restarts, steady)
                        for _ in range(worker_restarts):
                            restarts.step = "a server worker"
                            await _restart_a_worker(server, restarts, hosts)
                            log(f"{trio.current_time() - started:5.1f} s: a worker restarted")
                            await _sent_more(restarts, steady)
                        done += 1
                        log(f"  {restarts.summary()}")
                    running = False
            finally:
                for _, _, agent in agents:
                    await agent.kill()
                await server.kill()
                if os.environ.get("ROLLING_SERVER_LOG"):
                    await trio.Path(os.environ["ROLLING_SERVER_LOG"]).write_bytes(server.output)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await config.unlink()
    return restarts


async def _sent_more(restarts: Restarts, count: int) -> None:
    """Wait until the visitors have sent ``count`` more GETs."""
    target = restarts.sent + count
    with trio.fail_after(STEP_TIMEOUT):
        while restarts.sent < target:
            await restarts.more_sent.wait()


async def _start_agent(
    nursery: trio.Nursery, port: int, local_port: int, host: str, options: list[str], n: int
) -> _Process:
    argv = [*TUNNEL, "http", str(local_port), "--server", f"127.0.0.1:{port}", "--token", TOKEN]
    argv += ["--host", host, "--no-inspector", *options]
    return await _Process.start(nursery, f"agent {n} of {host}", argv)


async def _linked(server: _Process, host: str, mark: int, count: int = 2) -> None:
    """Wait until ``count`` connections for ``host`` came up since ``mark``.

    An agent is connected as soon as one worker has it, but holds a connection
    to each, and visitors reach either; the next restart waits for all.
    """
    needle = f"event=agent_connected tunnel={host} ".encode()
    with trio.fail_after(STEP_TIMEOUT):
        while server.output[mark:].count(needle) < count:
            await server.wait_for(needle, len(server.output))


async def _restart_a_worker(
    server: _Process, restarts: Restarts, hosts: dict[str, list[str]]
) -> None:
    """SIGTERM the oldest worker; wait until its successor serves and agents joined it."""
    workers = _children(server.process.pid)
    oldest = min(workers)
    mark = len(server.output)
    os.kill(oldest, signal.SIGTERM)
    # The parent logs the exit, then its fresh worker logs that it listens.
    await server.wait_for(b"exited with code", mark)
    await server.wait_for(b"Running on", mark)
    # The new worker is up once every agent has connected to it.
    for host, options in hosts.items():
        await _linked(server, host, mark, 2 if options else 1)
    restarts.worker_restarts += 1
