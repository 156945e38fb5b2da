"""``tunnel http`` as users see it: plain lines through a pipe, the live panel on a terminal.

Real subprocesses: a tunnel server, and the agent either with its output piped
(what scripts and CI get) or on a pseudo-terminal (what a person gets).
"""

from __future__ import annotations

import fcntl
import importlib.util
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
from pathlib import Path
from types import ModuleType

import httpx
import trio

from helpers import LocalService, free_port, serve_local

TUNNEL = [sys.executable, "-m", "tunnel"]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
MiB = 1 << 20
HUGE = Path(__file__).resolve().parents[2] / "benchmarks" / "huge.py"


def _load_huge() -> ModuleType:
    """benchmarks/huge.py, for its local service that streams large bodies."""
    spec = importlib.util.spec_from_file_location("huge", HUGE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


huge = _load_huge()


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
async def _tunnel_server(port: int | None = None) -> AsyncIterator[int]:
    port = port or free_port()
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


def _agent_argv(server_port: int, local_port: int, *options: str) -> list[str]:
    return [
        *TUNNEL,
        "http",
        str(local_port),
        "--server",
        f"127.0.0.1:{server_port}",
        "--token",
        "s3cret",
        "--host",
        "cli.localhost",
        "--no-inspector",
        *options,
    ]


async def test_piped_output_says_how_long_each_reconnect_wait_is(nursery: trio.Nursery) -> None:
    service = LocalService()
    await nursery.start(serve_local, service)
    async with _tunnel_server() as port:
        agent = await trio.lowlevel.open_process(
            _agent_argv(port, service.port), stdout=subprocess.PIPE
        )
        try:
            assert agent.stdout is not None
            await _read_until(agent.stdout, [b"connected "], 20)
        except BaseException:
            agent.kill()
            await agent.wait()
            raise
    # The server is gone: every attempt fails, and each wait gets one line.
    try:
        printed = await _read_until(agent.stdout, [b"attempt 3\n"], 20)
        lines = printed.decode().splitlines()
        waits = [line for line in lines if line.startswith("reconnecting")]
        for attempt, line in enumerate(waits, start=1):
            match = re.fullmatch(r"reconnecting  in (\d+\.\d) s, attempt (\d+)", line)
            assert match, line
            assert int(match[2]) == attempt
            # Default backoff: 0.5 s doubling, drawn from zero to the cap.
            assert float(match[1]) <= 0.5 * 2 ** (attempt - 1) + 0.05
        assert lines[lines.index(waits[0]) - 1] == "disconnected"
    finally:
        agent.kill()
        await agent.wait()


async def _download_slowly(port: int, size: int, seen: trio.Event) -> int:
    """GET ``size`` bytes through the tunnel; pause after 8 MiB until ``seen``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET /download?bytes={size} HTTP/1.1\r\nhost: cli.localhost\r\n\r\n".encode()
        )
        received = 0
        paused = False
        while received < size:  # counts the head too: a few bytes short is fine
            chunk = await stream.receive_some(256 * 1024)
            assert chunk, f"the download ended after {received} bytes"
            received += len(chunk)
            if received >= 8 * MiB and not paused:
                paused = True
                await seen.wait()
        return received


async def test_a_terminal_shows_a_large_transfer_in_flight(nursery: trio.Nursery) -> None:
    local_port = await nursery.start(huge.serve_local, huge.ServiceStats())
    size = 64 * MiB
    async with _tunnel_server() as port:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "40"}
        try:
            agent = await trio.lowlevel.open_process(
                _agent_argv(port, local_port), stdout=slave, stderr=slave, env=env
            )
        finally:
            os.close(slave)
        screen = trio.lowlevel.FdStream(master)
        try:
            await _read_until(screen, [b"online"], 20)
            seen = trio.Event()
            async with trio.open_nursery() as visit:
                visit.start_soon(_download_slowly, port, size, seen)
                # Flow control holds the transfer part-way while the visitor pauses.
                drawn = await _read_until(screen, [b"Transfers", b"of 64.0 MiB ("], 20)
                seen.set()
            row = next(line for line in drawn.splitlines() if b"of 64.0 MiB (" in line)
            assert f"/download?bytes={size}".encode() in row
            assert re.search(rb"\xe2\x86\x93 [\d.]+ MiB of 64\.0 MiB \(\d+%\)", row), row
        finally:
            agent.kill()
            await agent.wait()
            await screen.aclose()


async def test_piped_output_reports_a_large_transfer_when_it_ends(nursery: trio.Nursery) -> None:
    local_port = await nursery.start(huge.serve_local, huge.ServiceStats())
    size = 64 * MiB
    async with _tunnel_server() as port:
        agent = await trio.lowlevel.open_process(
            _agent_argv(port, local_port), stdout=subprocess.PIPE
        )
        try:
            assert agent.stdout is not None
            await _read_until(agent.stdout, [b"connected "], 20)
            with trio.fail_after(30):
                transfer = await huge.download(port, "cli.localhost", size)
            assert transfer.size == size
            printed = await _read_until(agent.stdout, [b"transferred "], 10)
            line = printed.decode().splitlines()[-1]
            assert re.fullmatch(
                rf"transferred   GET /download\?bytes={size}&seed=0 ↓ 64\.0 MiB "
                r"in [\d.]+ m?s at [\d.]+ [KMG]iB/s",
                line,
            ), line
        finally:
            agent.kill()
            await agent.wait()


async def test_a_terminal_counts_the_reconnect_wait_down(nursery: trio.Nursery) -> None:
    service = LocalService()
    await nursery.start(serve_local, service)
    master, slave = pty.openpty()
    screen = trio.lowlevel.FdStream(master)
    agent = None
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
        async with _tunnel_server() as port:
            agent = await trio.lowlevel.open_process(
                _agent_argv(port, service.port), stdout=slave, stderr=slave, env=env
            )
            os.close(slave)
            slave = -1
            await _read_until(screen, [b"online"], 20)
        # The server is gone; the waits grow (0.5 s doubling) until one is drawn.
        drawn = await _read_until(screen, [b"reconnecting in ", b", attempt "], 20)
        assert re.search(rb"reconnecting in \d+\.\d s, attempt \d+", drawn), drawn[-2000:]
    finally:
        if slave != -1:
            os.close(slave)
        if agent is not None:
            agent.kill()
            await agent.wait()
        await screen.aclose()
