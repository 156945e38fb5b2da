"""The ``tunnel`` command as real subprocesses (the README's commands: tests/e2e/test_readme.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from helpers import LocalService, eventually, free_port, serve_local

TUNNEL = [sys.executable, "-m", "tunnel"]
AGENT_ARGS = ["--token", "s3cret", "--host", "cli.localhost"]


async def _wait_for_line(stream: trio.abc.ReceiveStream, needle: bytes, limit: float) -> bytes:
    """Read ``stream`` until a line containing ``needle``; return everything read."""
    seen = b""
    with trio.fail_after(limit):
        while needle not in seen:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise AssertionError(f"process ended before printing {needle!r}: {seen!r}")
            seen += chunk
    return seen


AGENT = ["http", "8080", "--server", "x:1", "--token", "t"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["http", "abc", "--server", "x:1", "--token", "t"], "invalid int value: 'abc'"),
        (["http", "8080", "--token", "t"], "give --server, or 'address' in the config file"),
        (["http", "8080", "--server", "ftp://x", "--token", "t"], "unknown scheme 'ftp'"),
        (["http", "70000", "--server", "x:1", "--token", "t"], "PORT 70000: give the local"),
        (["server", "--address", "nowhere"], "--address 'nowhere' has no port"),
        (["server", "--certificate", "missing.pem"], "give both --certificate and --key"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["server", "--workers", "0"], "--workers 0: give a number of processes from 1"),
        (["server", "--max-websocket-buffer", "10"], "--max-websocket-buffer 10 is smaller"),
        (["tcp", "22", "--server", "x:1", "--token", "t", "--pool"], "unrecognized arguments"),
        (
            ["server", "--tcp-ports", "70000-70001"],
            "'70000-70001' is not a range of ports from 1 to 65535",
        ),
        ([*AGENT, "--ca-file", "missing.pem"], "--ca-file: no file at 'missing.pem'"),
        (["http", "8080", "--server", "x:1", "--key", "missing"], "--key: no file at 'missing'"),
        ([*AGENT, "--basic-auth", "nopass"], "--basic-auth must be 'user:password'"),
        ([*AGENT, "--allow-ip", "nonsense"], "--allow-ip: 'nonsense' is not an IP network"),
        ([*AGENT, "--host", "my_app"], "--host 'my_app' is not a valid host name"),
        ([*AGENT, "--inspector", "127.0.0.1"], "--inspector '127.0.0.1' has no port"),
        (["http", "8080", "--server", "x:1"], "give a token with --token (or a key"),
        (["server", "--max-tunnels", "0"], "--max-tunnels must be at least 1"),
        (["server", "--control-path", "x"], "--control-path 'x' must start with '/'"),
        (["server", "--admin-host", "not a host"], "--admin-host 'not a host' is not a valid"),
        (["server", "--tunnel-rps", "0"], "--tunnel-rps: give a positive number of requests"),
    ],
)
async def test_bad_arguments_get_one_line_and_status_2(argv: list[str], message: str) -> None:
    with trio.fail_after(20):
        result = await trio.run_process(
            [*TUNNEL, *argv], capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.count("\n") == 1, err
    assert message in err
    # The user typed flags: the message names flags, never Python objects.
    assert "Config" not in err, err
    assert "range(" not in err, err


async def test_a_setting_without_a_flag_is_named_as_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text("keepalive_interval = -1\n")
    with trio.fail_after(20):
        result = await trio.run_process(
            [*TUNNEL, "server", "--config", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "tunnel: keepalive_interval (in the --config file) must be a positive number of "
        "seconds, got -1\n"
    )


async def test_the_open_server_warning_names_the_flags() -> None:
    port = free_port()
    server = await trio.lowlevel.open_process(
        [*TUNNEL, "server", "--address", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert server.stderr is not None
        printed = await _wait_for_line(server.stderr, b"Running on", 20)
    finally:
        server.kill()
        await server.wait()
    (warning,) = [line for line in printed.decode().splitlines() if "ANYONE" in line]
    assert "give tokens (--token or --tokens-file) or keys (--authorized-keys)" in warning
    assert "Config" not in warning


async def test_server_and_http_commands_make_a_working_tunnel(nursery: trio.Nursery) -> None:
    service = LocalService()
    await nursery.start(serve_local, service)
    port = free_port()
    server = await trio.lowlevel.open_process(
        [*TUNNEL, "server", "--address", f"127.0.0.1:{port}", "--token", "s3cret"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    agent = None
    try:
        assert server.stderr is not None
        await _wait_for_line(server.stderr, b"Running on", 20)
        agent = await trio.lowlevel.open_process(
            [*TUNNEL, "http", str(service.port), "--server", f"127.0.0.1:{port}", *AGENT_ARGS],
            stdout=subprocess.PIPE,
        )
        assert agent.stdout is not None
        printed = await _wait_for_line(agent.stdout, b"connected ", 20)
        assert f"http://cli.localhost:{port} → http://127.0.0.1:{service.port}".encode() in printed
        assert printed.startswith(b"connecting\n")
        async with httpx.AsyncClient() as client:
            with trio.fail_after(10):
                response = await client.get(
                    f"http://127.0.0.1:{port}/via-cli", headers={"host": "cli.localhost"}
                )
        assert response.status_code == 200
        assert response.json()["path"] == "/via-cli"

        # Ctrl-C: a clean exit, no traceback.
        agent.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await agent.wait() == 130
    finally:
        for process in (agent, server):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()


@pytest.mark.parametrize(("stop", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
async def test_server_with_workers_and_pooled_agents_from_the_command_line(
    nursery: trio.Nursery, stop: signal.Signals, status: int
) -> None:
    services = [LocalService("one"), LocalService("two")]
    for service in services:
        await nursery.start(serve_local, service)
    port = free_port()
    # A session of its own, so the signal can go to the whole process group,
    # workers included, as Ctrl-C in a terminal or systemd's stop would send it.
    server = await trio.lowlevel.open_process(
        [
            *TUNNEL,
            "server",
            "--address",
            f"127.0.0.1:{port}",
            "--token",
            "s3cret",
            "--workers",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    agents = []
    try:
        assert server.stderr is not None
        await _wait_for_line(server.stderr, b"Running on", 30)
        for service in services:
            argv = [*TUNNEL, "http", str(service.port), "--server", f"127.0.0.1:{port}"]
            agent = await trio.lowlevel.open_process(
                [*argv, "--pool", *AGENT_ARGS],
                stdout=subprocess.PIPE,
            )
            agents.append(agent)
            assert agent.stdout is not None
            await _wait_for_line(agent.stdout, b"connected ", 30)
        seen: set[str] = set()
        with trio.fail_after(30):
            while seen != {"one", "two"}:
                async with httpx.AsyncClient() as client:
                    response = await client.get(
                        f"http://127.0.0.1:{port}/pooled",
                        headers={"host": "cli.localhost", "connection": "close"},
                    )
                if response.status_code == 200:
                    seen.add(response.json()["service"])
                else:
                    # A worker the agents have not reached yet answers 404.
                    assert response.status_code == 404, response.text
        workers = _children(server.pid)
        assert len(workers) == 2
        os.killpg(server.pid, stop)
        with trio.fail_after(30):
            assert await server.wait() == status
        errors = await server.stderr.receive_some(1 << 20)
        assert b"Traceback" not in errors, errors.decode()
        # The main process reaped its workers before it exited.
        assert not any(_alive(pid) for pid in workers)
    finally:
        for process in (*agents, server):
            if process.returncode is None:
                process.kill()
                await process.wait()


def _children(pid: int) -> list[int]:
    """The worker processes of the server ``pid`` (not the watchdog of its ledger)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid
                and b"tunnel.server.hypercorn._worker" in (entry / "cmdline").read_bytes()
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (exited, not yet reaped by its adopter) does not."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_workers_do_not_outlive_a_killed_main_process() -> None:
    port = free_port()
    server = await trio.lowlevel.open_process(
        [*TUNNEL, "server", "--address", f"127.0.0.1:{port}", "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    workers: list[int] = []
    try:
        assert server.stderr is not None
        await _wait_for_line(server.stderr, b"Running on", 30)
        workers = _children(server.pid)
        assert len(workers) == 2
        server.kill()  # SIGKILL: no chance to stop its workers
        await server.wait()
        await eventually(lambda: not any(_alive(pid) for pid in workers), 20)
        # And the port is free again: nobody serves on it.
        with pytest.raises(OSError, match="all attempts to connect"):
            await trio.open_tcp_stream("127.0.0.1", port)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_config_files_drive_both_commands(nursery: trio.Nursery, tmp_path: Path) -> None:
    service = LocalService()
    await nursery.start(serve_local, service)
    port = free_port()
    (tmp_path / "server.toml").write_text(f'address = "127.0.0.1:{port}"\ntokens = ["s3cret"]\n')
    (tmp_path / "agent.toml").write_text(
        f'address = "127.0.0.1:{port}"\ntoken = "s3cret"\nport = {service.port}\n'
        'host = "file.localhost"\nbasic_auth = "ann:pw"\n'
    )
    server = await trio.lowlevel.open_process(
        [*TUNNEL, "server", "--config", str(tmp_path / "server.toml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    agent = None
    try:
        assert server.stderr is not None
        await _wait_for_line(server.stderr, b"Running on", 20)
        agent = await trio.lowlevel.open_process(
            [*TUNNEL, "http", "--config", str(tmp_path / "agent.toml")], stdout=subprocess.PIPE
        )
        assert agent.stdout is not None
        await _wait_for_line(agent.stdout, b"connected ", 20)
        async with httpx.AsyncClient() as client:
            with trio.fail_after(10):
                url = f"http://127.0.0.1:{port}/from-files"
                refused = await client.get(url, headers={"host": "file.localhost"})
                admitted = await client.get(
                    url, headers={"host": "file.localhost"}, auth=("ann", "pw")
                )
        assert refused.status_code == 401
        assert admitted.status_code == 200
    finally:
        for process in (agent, server):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
