"""``tunnel server`` and ``tunnel http`` stopped together with SIGTERM, as systemd does.

A process group or a host's shutdown signals both at once, or one a moment
before the other; the agent's drain then meets the server's GOAWAY (or the
server's drain meets the agent's) at any point. Whatever the order, both must
exit 0, print no traceback, and finish the requests in flight.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from functools import partial

import httpx
import trio

from helpers import LocalService, eventually, free_port, serve_local

TUNNEL = [sys.executable, "-m", "tunnel"]
HOST = "sigterm.localhost"
#: Pairs of processes run at once: the rounds are mostly waiting on startup.
PARALLEL = 4
#: Requests in flight, held in the local service, when the signals arrive.
IN_FLIGHT = 3


def _both(server: trio.Process, agent: trio.Process) -> list[float]:
    server.send_signal(signal.SIGTERM)
    agent.send_signal(signal.SIGTERM)
    return []


def _agent_first(server: trio.Process, agent: trio.Process) -> list[float]:
    # A fraction of a millisecond: the agent's SETTINGS and GOAWAY cross the
    # server's drain, which is when h2's closed state machine was hit.
    agent.send_signal(signal.SIGTERM)
    until = time.perf_counter() + 0.0003
    while time.perf_counter() < until:
        pass
    server.send_signal(signal.SIGTERM)
    return []


def _server_first(server: trio.Process, agent: trio.Process) -> list[float]:
    server.send_signal(signal.SIGTERM)
    return [0.05]  # then the agent, once the server's drain has begun


ORDERS = {"both": _both, "agent_first": _agent_first, "server_first": _server_first}
#: 20 rounds: every order, idle and busy, three times each, and two more.
ROUNDS = [
    *((order, busy) for _ in range(3) for order in ORDERS for busy in (False, True)),
    # Two more of the order that raced on main.
    ("agent_first", False),
    ("agent_first", True),
]


class _Output:
    """A process and everything it printed."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self.text = bytearray()

    async def pump(self, stream: trio.abc.ReceiveStream | None) -> None:
        assert stream is not None
        async with stream:
            while chunk := await stream.receive_some(65536):
                self.text += chunk


async def _spawn(nursery: trio.Nursery, name: str, argv: list[str]) -> _Output:
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    output = _Output(name, process)
    nursery.start_soon(output.pump, process.stdout)
    nursery.start_soon(output.pump, process.stderr)
    return output


async def _until_tunnel_works(port: int) -> None:
    async with httpx.AsyncClient(headers={"host": HOST}, trust_env=False) as http:
        while True:
            try:
                response = await http.get(f"http://127.0.0.1:{port}/ready", timeout=2)
            except httpx.TransportError:
                pass
            else:
                if response.status_code == 200:
                    return
            await trio.sleep(0.05)


async def _round(order: str, busy: bool) -> None:
    service = LocalService()
    port = free_port()
    answers: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_local, service)
        server = await _spawn(
            nursery,
            "server",
            [*TUNNEL, "server", "--address", f"127.0.0.1:{port}", "--token", "s3cret"],
        )
        agent = await _spawn(
            nursery,
            "agent",
            [
                *TUNNEL,
                "http",
                str(service.port),
                "--server",
                f"127.0.0.1:{port}",
                "--token",
                "s3cret",
                "--host",
                HOST,
                "--no-inspector",
            ],
        )
        processes = (server, agent)
        try:
            await _until_tunnel_works(port)

            async def hold(http: httpx.AsyncClient) -> None:
                answers.append((await http.get(f"http://127.0.0.1:{port}/hold")).status_code)

            async with (
                httpx.AsyncClient(headers={"host": HOST}, trust_env=False, timeout=20) as http,
                trio.open_nursery() as requests,
            ):
                if busy:
                    for _ in range(IN_FLIGHT):
                        requests.start_soon(hold, http)
                    await eventually(lambda: service.holding >= IN_FLIGHT)
                for delay in ORDERS[order](server.process, agent.process):
                    await trio.sleep(delay)
                    agent.process.send_signal(signal.SIGTERM)
                if busy:
                    # Both are draining now, waiting for these to finish.
                    await trio.sleep(0.2)
                    service.release_hold.set()
            for output in processes:
                await output.process.wait()
        finally:
            # Shielded: when another round failed, this one is being cancelled
            # and must still reap its processes.
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for output in processes:
                    if output.process.returncode is None:
                        output.process.kill()
                    await output.process.wait()
        nursery.cancel_scope.cancel()
    for output in processes:
        text = output.text.decode(errors="replace")
        where = f"{order}, {'busy' if busy else 'idle'}: {output.name}"
        assert "Traceback" not in text, f"{where} printed:\n{text}"
        assert output.process.returncode == 0, (
            f"{where} exited {output.process.returncode}:\n{text}"
        )
    assert answers == ([200] * IN_FLIGHT if busy else [])


async def test_sigterm_to_server_and_agent_in_every_order() -> None:
    with trio.fail_after(100):
        limiter = trio.CapacityLimiter(PARALLEL)

        async def limited(order: str, busy: bool) -> None:
            async with limiter:
                with trio.fail_after(40):
                    await _round(order, busy)

        async with trio.open_nursery() as nursery:
            for order, busy in ROUNDS:
                nursery.start_soon(partial(limited, order, busy))
