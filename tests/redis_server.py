"""A real ``redis-server`` for the cluster tests: on a free port, in a temporary directory.

Debian's ``redis-server`` package provides it (``.ci/run`` installs it when
missing). Nothing is saved to disk, so a restarted server starts empty, as a
Redis that lost its data would.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator

import trio

__all__ = ["RedisServer"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class RedisServer:
    """One ``redis-server`` process, stopped and started again on the same port."""

    def __init__(
        self, directory: str, password: str | None = None, tls: tuple[str, str, str] | None = None
    ) -> None:
        """A server to start in ``directory``; ``tls``: (CA, certificate, key) PEM paths."""
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError(
                "the cluster tests need redis-server: apt-get install -y redis-server"
            )
        self.executable = executable
        self.directory = directory
        self.password = password
        self.tls = tls
        self.port = _free_port()
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        """The URL to give ``ServerConfig.store``."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls is not None:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[0]}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start it (again) and wait until it answers PING."""
        assert self.process is None
        if self.tls is None:
            ports = ["--port", str(self.port)]
        else:
            ca, certificate, key = self.tls
            ports = [
                "--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
                "--tls-ca-cert-file", ca, "--tls-cert-file", certificate, "--tls-key-file", key,
            ]  # fmt: skip
        arguments = [
            self.executable,
            *ports,
            "--bind", "127.0.0.1",
            "--dir", self.directory,
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip
        if self.password:
            arguments += ["--requirepass", self.password]
        self.process = await trio.lowlevel.open_process(
            arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with trio.fail_after(10):
            while not await self._answers():
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}")
                await trio.sleep(0.02)

    async def _answers(self) -> bool:
        stream: trio.abc.Stream
        try:
            if self.tls is None:
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            else:
                context = ssl.create_default_context(cafile=self.tls[0])
                stream = await trio.open_ssl_over_tcp_stream(
                    "127.0.0.1", self.port, ssl_context=context
                )
        except (OSError, trio.BrokenResourceError):
            return False
        async with stream:
            auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
            await stream.send_all(auth + b"PING\r\n")
            reply = b""
            with trio.move_on_after(1):
                while b"PONG" not in reply and b"-" not in reply:
                    chunk = await stream.receive_some()
                    if not chunk:
                        break
                    reply += chunk
            return b"PONG" in reply

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RedisServer]:
        """Start it; stop it on the way out."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop it at once (SIGKILL: as a crash or a lost machine would)."""
        if self.process is not None:
            self.process.kill()
            with trio.CancelScope(shield=True):
                await self.process.wait()
            self.process = None
