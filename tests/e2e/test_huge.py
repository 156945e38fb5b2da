"""Huge bodies: the measurement of ``benchmarks/huge.py`` at 64 MiB, and visitors who leave.

The first test runs the benchmark script as it is, in its own processes, at a
size CI can afford; ``nox -s huge`` runs it at 1 GiB. The others run its local
service in-process, behind a real tunnel, and watch that service's handler
when the visitor walks away in the middle of a body.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import trio

from helpers import stop_politely

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "huge.py"
MiB = 1 << 20
GiB = 1 << 30
HOST = "app.localhost"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("huge", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


huge = _load_script()


async def test_64_mib_each_way_hashes_match_and_memory_stays_flat() -> None:
    # Half the body size as the limit: a server or agent that held a whole
    # 64 MiB body would pass a 64 MiB limit, but not this one.
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, str(SCRIPT), "--size", "64MiB", "--max-growth", "32MiB"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            deliver_cancel=stop_politely,
        )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, f"{out}\n{err}"
    lines = out.splitlines()
    transfers = [line.split() for line in lines if line.startswith(("download ", "upload "))]
    assert [row[0] for row in transfers] == ["download", "upload"]
    assert all(row[3] == "ok" for row in transfers), out
    limited = [line for line in lines if line.startswith(("server ", "agent "))]
    assert len(limited) == 2
    assert all("ok (≤ 32.0 MiB)" in line for line in limited), out
    assert lines[-1] == "ok"


async def _start_service(nursery: trio.Nursery) -> tuple[int, Any]:
    stats = huge.ServiceStats()
    port: int = await nursery.start(huge.serve_local, stats)
    return port, stats


async def _receive_at_least(stream: trio.SocketStream, size: int) -> int:
    received = 0
    while received < size:
        data = await stream.receive_some(256 * 1024)
        assert data, f"the response ended after {received} bytes"
        received += len(data)
    return received


async def _still_served(server_port: int) -> None:
    status, body = await huge.get_small(server_port, HOST)
    assert (status, body) == (200, b"ok\n")


async def test_visitor_leaving_a_download_stops_the_local_handler(
    nursery: trio.Nursery, tunnel_server, open_agent
) -> None:
    local_port, stats = await _start_service(nursery)
    with trio.fail_after(30):
        async with open_agent(tunnel_server.port, local_port):
            visitor = await trio.open_tcp_stream("127.0.0.1", tunnel_server.port)
            await visitor.send_all(
                f"GET /download?bytes={GiB} HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode()
            )
            await _receive_at_least(visitor, 8 * MiB)
            await visitor.aclose()

            with trio.fail_after(2):
                await stats.wait_for_endings(1)
            # The agent closed the local connection under the handler's feet.
            assert stats.endings == ["send failed"]
            assert stats.active == 0
            produced = stats.sent
            # Flow control held the service back: it got only a few windows
            # ahead of the visitor, nowhere near the 1 GiB it was asked for.
            assert 8 * MiB <= produced < 8 * MiB + 32 * MiB, produced
            await trio.sleep(0.5)
            assert stats.sent == produced

            await _still_served(tunnel_server.port)


async def test_visitor_abandoning_an_upload_ends_the_local_request(
    nursery: trio.Nursery, tunnel_server, open_agent
) -> None:
    local_port, stats = await _start_service(nursery)
    with trio.fail_after(30):
        async with open_agent(tunnel_server.port, local_port):
            visitor = await trio.open_tcp_stream("127.0.0.1", tunnel_server.port)
            await visitor.send_all(
                f"POST /upload HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: {GiB}\r\n\r\n".encode()
            )
            sent = 0
            for piece in huge.body_chunks(8 * MiB):
                await visitor.send_all(piece)
                sent += len(piece)
            # Everything sent so far reached the local handler, which still waits
            # for the rest of the gibibyte.
            await stats.wait_for_received(sent)
            assert stats.active == 1
            await visitor.aclose()

            with trio.fail_after(2):
                await stats.wait_for_endings(1)
            assert stats.endings == ["request ended early"]
            assert stats.active == 0
            assert stats.received == sent
            await trio.sleep(0.5)
            assert stats.received == sent

            await _still_served(tunnel_server.port)


def test_the_terminal_progress_line_is_redrawn_a_few_times_a_second() -> None:
    out = io.StringIO()
    now = [10.0]
    progress = huge.TerminalProgress("download", 100 * MiB, out, clock=lambda: now[0])
    for _ in range(40):  # 1 MiB every 50 ms: 2 s in all
        now[0] += 0.05
        progress(progress.last + MiB)
    progress.done()
    frames = out.getvalue().split("\r")[1:]
    # At most one frame per PROGRESS_REDRAW, whatever the number of updates.
    assert len(frames) == 1 + 2 / huge.PROGRESS_REDRAW
    assert frames[0].rstrip() == "download  1.0 MiB / 100.0 MiB    1%  20.0 MiB/s  5 s left"
    assert frames[-1] == "download  40.0 MiB / 100.0 MiB   40%  20.0 MiB/s  3 s left\n"
