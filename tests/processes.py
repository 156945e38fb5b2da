"""Tunnel servers and agents as real subprocesses, for ``kill -9`` and SIGSTOP/SIGCONT.

Run as a script, it is one of them, with timings the CLI does not expose::

    python tests/processes.py server PORT [--keepalive S] [--grace S] [--graceful S]
        [--certificate PEM --key PEM]
    python tests/processes.py agent SERVER_PORT LOCAL_PORT HOST [--keepalive S] [--ca-file PEM] ...

The server prints ``listening`` once it accepts connections and stops gracefully
on SIGTERM; the agent prints each state change (``connecting``, ``connected``,
...) on a line of its own. Imported, it gives the tests :class:`Child`, a
handle on such a process that reads those lines.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import trio

__all__ = ["SCRIPT", "TOKEN", "Child", "start_agent", "start_server"]

SCRIPT = str(Path(__file__).resolve())
ROOT = str(Path(__file__).resolve().parents[1])
TOKEN = "s3cret"


class Child:
    """A subprocess that reports on its standard output, one line per event."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait_for_line(self, text: str, limit: float = 10.0) -> float:
        """Read lines until one equals ``text``; return the time it was read."""
        assert self.process.stdout is not None
        with trio.fail_after(limit):
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    self.lines.append(line.decode())
                    if line.decode() == text:
                        return trio.current_time()
                chunk = await self.process.stdout.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"process ended before printing {text!r}: {self.lines}")
                self._buffer += chunk

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def kill(self) -> None:
        """``kill -9``, and reap it."""
        if self.process.returncode is None:
            # A stopped process must be killable too; SIGKILL works either way.
            self.process.kill()
        with trio.move_on_after(5):
            await self.process.wait()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.signal(signal.SIGCONT)
            await self.kill()
            if self.process.stdout is not None:
                await self.process.stdout.aclose()


async def _start(args: list[str]) -> Child:
    env = {**os.environ, "PYTHONPATH": ROOT}
    process = await trio.lowlevel.open_process(
        [sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, env=env
    )
    return Child(process)


async def start_server(port: int, *options: str) -> Child:
    """A server process on ``127.0.0.1:port``, once it listens."""
    child = await _start(["server", str(port), *options])
    try:
        await child.wait_for_line("listening", 20)
    except BaseException:
        await child.aclose()
        raise
    return child


async def start_agent(server_port: int, local_port: int, host: str, *options: str) -> Child:
    """An agent process (not yet connected: wait for its ``connected`` line)."""
    return await _start(["agent", str(server_port), str(local_port), host, *options])


# -- the processes themselves --------------------------------------------------


async def _server(args: argparse.Namespace) -> None:
    import tunnel

    config = tunnel.ServerConfig(
        address=f"127.0.0.1:{args.port}",
        tokens=frozenset({TOKEN}),
        keepalive_interval=args.keepalive,
        keepalive_timeout=args.keepalive,
        grace_period=args.grace,
        graceful_timeout=args.graceful,
        certificate=args.certificate,
        key=args.key,
    )

    async def terminated() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(tunnel.serve, config, shutdown_trigger=terminated))
        print("listening", flush=True)
    print("stopped", flush=True)


async def _agent(args: argparse.Namespace) -> None:
    import tunnel

    send, receive = trio.open_memory_channel[tunnel.ClientState](64)
    config = tunnel.ClientConfig(
        address=f"{'wss://' if args.ca_file else ''}127.0.0.1:{args.server_port}",
        ca_file=args.ca_file,
        token=TOKEN,
        port=args.local_port,
        host=args.host,
        state=send,
        keepalive_interval=args.keepalive,
        keepalive_timeout=args.keepalive,
        connect_timeout=args.connect_timeout,
        backoff_initial=args.backoff,
        backoff_max=args.backoff_max,
        local_protocol=args.local_protocol,
    )
    client = tunnel.Client(config)
    async with trio.open_nursery() as nursery:

        async def report() -> None:
            async for state in receive:
                print(state.value, flush=True)

        nursery.start_soon(report)
        try:
            await client.connect()
        finally:
            print("stopped", flush=True)
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("server")
    server.add_argument("port", type=int)
    server.add_argument("--keepalive", type=float, default=15.0)
    server.add_argument("--grace", type=float, default=5.0)
    server.add_argument("--graceful", type=float, default=10.0)
    server.add_argument("--certificate", help="PEM chain: serve HTTPS and wss")
    server.add_argument("--key")
    agent = commands.add_parser("agent")
    agent.add_argument("server_port", type=int)
    agent.add_argument("local_port", type=int)
    agent.add_argument("host")
    agent.add_argument("--keepalive", type=float, default=15.0)
    agent.add_argument("--connect-timeout", type=float, default=10.0)
    agent.add_argument("--backoff", type=float, default=0.05)
    agent.add_argument("--backoff-max", type=float, default=0.2)
    agent.add_argument("--ca-file", help="dial wss://, trusting this CA")
    agent.add_argument("--local-protocol", default="auto")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_server if args.command == "server" else _agent, args)


if __name__ == "__main__":
    main()
