"""``tunnel http`` as users see it: plain lines through a pipe, the live panel on a terminal.

Real subprocesses: a tunnel server, and the agent either with its output piped
(what scripts and CI get) or on a pseudo-terminal (what a person gets).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio

from helpers import LocalService, free_port, serve_local

TUNNEL = [sys.executable, "-m", "tunnel"]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


async def _read_until(stream: trio.abc.ReceiveStream, needles: list[bytes], limit: float) -> bytes:
    """Read ``stream`` until every needle was seen (ANSI codes stripped)."""
    seen = b""
    with trio.fail_after(limit):
        while not all(needle in ANSI.sub(b"", seen) for needle in needles):
            try:
                chunk = await stream.receive_some(65536)
            except OSError:  # a pty's master reads EIO once the child is gone
                chunk = b""
            if not chunk:
                raise AssertionError(f"output ended before {needles!r}: {seen!r}")
            seen += chunk
    return ANSI.sub(b"", seen)


@asynccontextmanager
async def _tunnel_server() -> AsyncIterator[int]:
    port = free_port()
    server = await trio.lowlevel.open_process(
        [*TUNNEL, "server", "--address", f"127.0.0.1:{port}", "--token", "s3cret"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert server.stderr is not None
        await _read_until(server.stderr, [b"Running on"], 20)
        yield port
    finally:
        server.kill()
        await server.wait()


async def _get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(10):
            return await client.get(
                f"http://127.0.0.1:{port}{path}", headers={"host": "cli.localhost"}
            )


async def test_piped_output_is_plain_lines_with_the_inspector_and_each_request(
    nursery: trio.Nursery,
) -> None:
    service = LocalService()
    await nursery.start(serve_local, service)
    async with _tunnel_server() as port:
        agent = await trio.lowlevel.open_process(
            [
                *TUNNEL,
                "http",
                str(service.port),
                "--server",
                f"127.0.0.1:{port}",
                "--token",
                "s3cret",
                "--host",
                "cli.localhost",
                "--inspector",
                "127.0.0.1:0",
                "--log-requests",
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert agent.stdout is not None
            printed = await _read_until(agent.stdout, [b"inspector "], 20)
            lines = printed.decode().splitlines()
            assert lines[0] == "connecting"
            assert lines[1] == (
                f"connected     http://cli.localhost:{port} → http://127.0.0.1:{service.port}"
            )
            inspector = lines[2].split()[1]
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+", inspector)

            assert (await _get(port, "/logged?x=1")).status_code == 200
            printed = await _read_until(agent.stdout, [b"/logged"], 10)
            assert re.search(rb"request +GET /logged\?x=1 \xe2\x86\x92 200 in [\d.]+ m?s", printed)
            async with httpx.AsyncClient(trust_env=False) as client:
                listed = (await client.get(f"{inspector}/api/exchanges")).json()
            assert [e["target"] for e in listed["exchanges"]] == ["/logged?x=1"]
        finally:
            agent.kill()
            await agent.wait()


async def test_a_terminal_gets_the_live_panel(nursery: trio.Nursery) -> None:
    service = LocalService()
    await nursery.start(serve_local, service)
    async with _tunnel_server() as port:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
        try:
            agent = await trio.lowlevel.open_process(
                [
                    *TUNNEL,
                    "http",
                    str(service.port),
                    "--server",
                    f"127.0.0.1:{port}",
                    "--token",
                    "s3cret",
                    "--host",
                    "cli.localhost",
                    "--no-inspector",
                ],
                stdout=slave,
                stderr=slave,
                env=env,
            )
        finally:
            os.close(slave)
        screen = trio.lowlevel.FdStream(master)
        try:
            drawn = await _read_until(
                screen,
                [b"online", f"http://cli.localhost:{port}".encode(), b"no requests yet"],
                20,
            )
            assert b"Forwarding" in drawn
            assert f"http://127.0.0.1:{service.port}".encode() in drawn
            assert b"Inspector" not in drawn  # --no-inspector
            assert b"connecting\n" not in drawn  # a panel, not the plain lines

            assert (await _get(port, "/shown-live")).status_code == 200
            drawn = await _read_until(screen, [b"/shown-live", b"200 OK"], 10)
            assert b"total 1" in drawn

            agent.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                assert await agent.wait() == 130
        finally:
            if agent.returncode is None:
                agent.kill()
                await agent.wait()
            await screen.aclose()
