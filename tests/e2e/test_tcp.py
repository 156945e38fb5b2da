"""TCP tunnels: a public port per agent, real TCP services, real OpenSSH."""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import shutil
import subprocess
from functools import partial
from pathlib import Path

import pytest
import trio

import tunnel
from helpers import free_port

TOKEN = "s3cret"
OTHER = "other-token"


@pytest.fixture
def tcp_ports() -> range:
    first = free_port()
    # A small range around a port the OS just said was free; any that turn out
    # busy are skipped by the server.
    return range(first, first + 1)


@pytest.fixture
async def server_port(nursery: trio.Nursery, tcp_ports: range) -> int:
    config = tunnel.ServerConfig(
        address="127.0.0.1:0", tokens=frozenset({TOKEN, OTHER}), tcp_ports=tcp_ports
    )
    (url,) = await nursery.start(tunnel.serve, config)
    return int(url.rsplit(":", 1)[1])


async def _digest_server(stream: trio.SocketStream) -> None:
    """Reads until EOF, then answers the sha256 and length of what it read."""
    digest, size = hashlib.sha256(), 0
    async with stream:
        while data := await stream.receive_some(65536):
            digest.update(data)
            size += len(data)
        await stream.send_all(f"{digest.hexdigest()} {size}".encode())


async def _echo_server(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


async def _serve(nursery: trio.Nursery, handler) -> int:  # type: ignore[no-untyped-def]
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def _agent(server_port: int, local_port: int, **kwargs: object) -> tunnel.ClientConfig:
    kwargs.setdefault("token", TOKEN)
    return tunnel.ClientConfig(
        address=f"127.0.0.1:{server_port}",
        port=local_port,
        tcp=True,
        backoff_initial=0.05,
        backoff_max=0.2,
        **kwargs,  # type: ignore[arg-type]
    )


def _public_port(client: tunnel.Client) -> int:
    assert client.url.startswith("tcp://127.0.0.1:")
    return int(client.url.rsplit(":", 1)[1])


async def _read_all(stream: trio.SocketStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(65536):
        out += data
    return bytes(out)


async def test_bytes_and_half_close_go_both_ways(nursery, server_port, tcp_ports) -> None:
    local = await _serve(nursery, _digest_server)
    payload = os.urandom(3 << 20)
    with trio.fail_after(20):
        async with tunnel.open_tunnel(_agent(server_port, local)) as agent:
            port = _public_port(agent)
            assert port in tcp_ports
            async with await trio.open_tcp_stream("127.0.0.1", port) as visitor:
                await visitor.send_all(payload)
                # Our EOF must reach the local service (it answers only then),
                # and its answer must still come back on the half-open socket.
                await visitor.send_eof()
                answer = await _read_all(visitor)
    assert answer == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}".encode()


async def test_a_stream_both_ways_at_once_with_backpressure(nursery, server_port) -> None:
    local = await _serve(nursery, _echo_server)
    payload = os.urandom(16 << 20)
    received = bytearray()
    with trio.fail_after(30):
        async with tunnel.open_tunnel(_agent(server_port, local)) as agent:
            visitor = await trio.open_tcp_stream("127.0.0.1", _public_port(agent))

            async def send() -> None:
                view = memoryview(payload)
                for start in range(0, len(payload), 1 << 20):
                    await visitor.send_all(view[start : start + (1 << 20)])
                await visitor.send_eof()

            async with visitor, trio.open_nursery() as inner:
                inner.start_soon(send)
                received += await _read_all(visitor)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_leaving_frees_the_port_and_a_new_agent_gets_it(nursery, server_port) -> None:
    local = await _serve(nursery, _echo_server)
    with trio.fail_after(20):
        async with tunnel.open_tunnel(_agent(server_port, local)) as agent:
            port = _public_port(agent)
        with pytest.raises(OSError, match="connect"):
            await trio.open_tcp_stream("127.0.0.1", port)
        async with tunnel.open_tunnel(_agent(server_port, local, token=OTHER)) as again:
            assert _public_port(again) == port
            async with await trio.open_tcp_stream("127.0.0.1", port) as visitor:
                await visitor.send_all(b"still here")
                assert await visitor.receive_some(100) == b"still here"


async def test_another_agent_cannot_take_a_port_in_use(nursery, server_port) -> None:
    local = await _serve(nursery, _echo_server)
    with trio.fail_after(20):
        async with tunnel.open_tunnel(_agent(server_port, local)) as first:
            port = _public_port(first)
            with pytest.raises(tunnel.HostInUseError, match=f"port {port} is in use"):
                async with tunnel.open_tunnel(
                    _agent(server_port, local, token=OTHER, remote_port=port)
                ):
                    pass
            # The first tunnel is untouched.
            async with await trio.open_tcp_stream("127.0.0.1", port) as visitor:
                await visitor.send_all(b"ping")
                assert await visitor.receive_some(100) == b"ping"


async def test_same_token_takes_its_port_over(nursery, server_port) -> None:
    local = await _serve(nursery, _echo_server)
    first = tunnel.Client(_agent(server_port, local))
    replaced = trio.Event()
    errors: list[tunnel.HostInUseError] = []

    async def run_first(*, task_status: trio.TaskStatus[str]) -> None:
        try:
            await first.connect(task_status=task_status)
        except tunnel.HostInUseError as exc:
            errors.append(exc)
            replaced.set()

    with trio.fail_after(20):
        await nursery.start(run_first)
        port = _public_port(first)
        # A restarted agent (same token, same port) replaces its stale self,
        # and the one replaced stops instead of fighting back.
        async with tunnel.open_tunnel(_agent(server_port, local, remote_port=port)) as again:
            assert _public_port(again) == port
            await replaced.wait()
            async with await trio.open_tcp_stream("127.0.0.1", port) as visitor:
                await visitor.send_all(b"new")
                assert await visitor.receive_some(100) == b"new"
    assert "took over" in str(errors[0])
    assert first.state is tunnel.ClientState.CLOSED


async def test_a_server_without_tcp_ports_refuses_tcp_agents(nursery) -> None:
    config = tunnel.ServerConfig(address="127.0.0.1:0", tokens=frozenset({TOKEN}))
    (url,) = await nursery.start(tunnel.serve, config)
    with trio.fail_after(10), pytest.raises(tunnel.HostRejectedError, match="no TCP tunnels") as e:
        async with tunnel.open_tunnel(_agent(int(url.rsplit(":", 1)[1]), 22)):
            pass
    # The agent's user reads this, not the server's operator: plain words,
    # neither the operator's field nor flag.
    assert "Config" not in str(e.value)
    assert "range of public ports" in str(e.value)


async def test_local_port_down_closes_the_visitor_and_the_tunnel_stays(
    nursery, server_port
) -> None:
    down = free_port()
    with trio.fail_after(20):
        async with tunnel.open_tunnel(_agent(server_port, down)) as agent:
            async with await trio.open_tcp_stream("127.0.0.1", _public_port(agent)) as visitor:
                assert await _read_all(visitor) == b""
            assert agent.state is tunnel.ClientState.CONNECTED


@pytest.fixture
def sshd(tmp_path: Path) -> tuple[list[str], Path, int]:
    """A throwaway OpenSSH server on 127.0.0.1 and a key that logs in to it."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(binary) or shutil.which("ssh") is None:
        if os.environ.get("CI"):
            pytest.fail("OpenSSH is missing: .ci/run installs openssh-server and openssh-client")
        pytest.skip("OpenSSH (sshd and ssh) is not installed")
    for name in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)],
            check=True,
        )
    authorized = tmp_path / "authorized_keys"
    authorized.write_text((tmp_path / "user_key.pub").read_text())
    authorized.chmod(0o600)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    port = free_port()
    command = [
        binary, "-D", "-e", "-p", str(port), "-h", str(tmp_path / "host_key"),
        "-o", "ListenAddress=127.0.0.1",
        "-o", f"AuthorizedKeysFile={authorized}",
        "-o", "StrictModes=no",
        "-o", "UsePAM=no",
        "-o", "PasswordAuthentication=no",
        "-o", "PermitRootLogin=prohibit-password",
        "-o", "PidFile=none",
    ]  # fmt: skip
    return command, tmp_path / "user_key", port


async def test_real_ssh_through_a_tcp_tunnel(nursery, server_port, sshd) -> None:
    command, key, ssh_port = sshd
    process = await trio.lowlevel.open_process(command, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(30):
            # sshd listens once it accepts a connection.
            while True:
                try:
                    probe = await trio.open_tcp_stream("127.0.0.1", ssh_port)
                except OSError:
                    await trio.sleep(0.05)
                else:
                    await probe.aclose()
                    break
            async with tunnel.open_tunnel(_agent(server_port, ssh_port)) as agent:
                ssh = [
                    "ssh", "-i", str(key), "-p", str(_public_port(agent)), "-T",
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                    f"{getpass.getuser()}@127.0.0.1", "echo ok",
                ]  # fmt: skip
                result = await trio.run_process(
                    ssh,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == b"ok\n"
    finally:
        process.kill()
        await process.wait()


async def test_connections_beyond_the_tunnels_limit_are_closed_at_once(
    nursery, tcp_ports, caplog
) -> None:
    """``max_tcp_connections`` open at once work; the next is closed at once, and
    a slot freed is a slot taken again."""
    config = tunnel.ServerConfig(
        address="127.0.0.1:0",
        tokens=frozenset({TOKEN}),
        tcp_ports=tcp_ports,
        max_tcp_connections=3,
    )
    (url,) = await nursery.start(tunnel.serve, config)
    local = await _serve(nursery, _echo_server)
    with trio.fail_after(20):
        async with tunnel.open_tunnel(_agent(int(url.rsplit(":", 1)[1]), local)) as agent:
            port = _public_port(agent)
            held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
            for visitor in held:
                await visitor.send_all(b"ping")
                assert await visitor.receive_some(100) == b"ping"
            async with await trio.open_tcp_stream("127.0.0.1", port) as refused:
                with trio.fail_after(2):
                    with contextlib.suppress(trio.BrokenResourceError):
                        await refused.send_all(b"ping")
                        assert await _read_all(refused) == b"", "a 4th connection was served"
            await held.pop().aclose()
            with trio.fail_after(2):
                while True:
                    # The freed slot is the server's once it saw the close.
                    async with await trio.open_tcp_stream("127.0.0.1", port) as again:
                        with contextlib.suppress(trio.BrokenResourceError):
                            await again.send_all(b"again")
                            if await again.receive_some(100) == b"again":
                                break
                    await trio.sleep(0.05)
            for visitor in held:
                await visitor.aclose()
    assert "max_tcp_connections" in caplog.text
