"""Every example in README.rst, run for real against servers on 127.0.0.1.

The examples are read from README.rst itself, so an example that stops working (an API
renamed, a flag dropped, an output line changed) fails here. Each ``.. code-block::
python`` runs as its own Python program; each command of a ``::`` block runs as a real
``tunnel`` (or ``hypercorn``) process. What the README shows as output is compared
with what the program printed.

Only these changes are made to an example before it runs (:data:`SUBSTITUTIONS`):

* the public names and ports (``tunnel.example.com``, ``:8000``, port 20000) become
  the test's servers on 127.0.0.1, bound to free ports, and without TLS; other names
  under ``tunnel.example.com`` become names under ``tunnel.localhost``;
* the local services (8080, 22, the gRPC server's 50051) become the test's own, on
  free ports;
* ``/etc/tunnel/`` becomes a temporary directory;
* ``await trio.sleep_forever()``, and in the TCP example ``print(t.url)``, also wait
  for the test to say it is done (with a deadline), so that the test can send real
  requests through the example's tunnel first and the example then ends by itself.

Python examples that are fragments (they continue an earlier one) run inside an
``async def main()`` with ``trio``, ``trio_websocket`` and ``tunnel`` imported.
:func:`test_every_example_is_covered` fails when README.rst gains an example that no
test here runs or explicitly leaves out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio

import tunnel
from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.rst"
#: How long a README program may take to print what the test waits for, or to end.
LIMIT = 20.0

#: (as written in README.rst, what the test runs instead), applied in this order.
SUBSTITUTIONS = [
    ("await trio.sleep_forever()", "await readme_wait()"),
    # The cluster: the nodes' own names, and the Redis the test starts.
    ("https://one.tunnel.example.com", "http://127.0.0.1:{one}"),
    ("https://two.tunnel.example.com", "http://127.0.0.1:{two}"),
    ("10.0.0.1:8000", "127.0.0.1:{server}"),
    ("10.0.0.2:8000", "127.0.0.1:{server}"),
    ("10.0.0.9:6379", "127.0.0.1:{redis}"),
    ("--port 6379", "--port {redis}"),
    ("print(t.url)", "print(t.url); await readme_wait()"),
    ("https://myapp.tunnel.example.com", "http://myapp.tunnel.localhost:{server}"),
    ("https://tunnel.example.com", "http://127.0.0.1:{server}"),
    ("wss://chat.tunnel.example.com", "ws://127.0.0.1:{server}"),
    ("tunnel.example.com:443", "127.0.0.1:{server}"),
    ("tunnel.example.com:8000", "127.0.0.1:{server}"),
    ("tunnel.example.com:20000", "127.0.0.1:{tcp}"),
    ("tunnel.example.com", "tunnel.localhost"),
    ("0.0.0.0:8000", "127.0.0.1:{server}"),
    ("127.0.0.1:8000", "127.0.0.1:{server}"),
    (":8000", "127.0.0.1:{server}"),
    ("20000-20099", "{tcp}-{tcp}"),
    ("8080", "{local}"),
    ("50051", "{grpc}"),
    ("tcp 22 ", "tcp {echo} "),
    ("port=22,", "port={echo},"),
    ("127.0.0.1:22", "127.0.0.1:{echo}"),
    ("/etc/tunnel/", "{etc}/"),
]

#: Each Python example of README.rst, by a line that only it contains.
PYTHON_EXAMPLES = {
    "agent": 'print("public URL:", t.url)',
    "state channel": "trio.open_memory_channel[tunnel.ClientState](16)",
    "server": "async def authenticate(request: tunnel.ConnectRequest)",
    "websocket visitor": "trio_websocket.open_websocket_url(",
    "tcp agent": "tcp=True",
    "embedding": "app = tunnel.TunnelApp(",
    "grpc server": "async def hello(request: bytes",
    "grpc client": 'channel.unary_unary("/demo.Greeter/Hello")',
}

#: Each ``::`` block of README.rst, by a line that only it contains, and which test
#: runs it (or why none does).
LITERAL_EXAMPLES = {
    "nox -s demo": "not run: it is `tunnel demo`, run below, inside a nox session",
    "GET http://demo.localhost:41235/hello": "test_the_demo_prints_what_the_readme_shows",
    "nox -s tests": "not run: it is this test suite",
    "tunnel server --address :8000 --domain": "test_the_command_line_quick_start",
    "--token s3cret --host myapp\n": "test_the_command_line_quick_start",
    "--host myapp --pool": "test_pooled_agents",
    "connected     https://myapp": "test_the_command_line_quick_start",
    "--tcp-ports 20000-20099": "test_the_tcp_tunnel_commands",
    "tunnel tcp 22": "test_the_tcp_tunnel_commands",
    "ssh -p 20000": "not run: needs an SSH login; tests/e2e/test_tcp.py runs ssh through a tunnel",
    "tunnel hash-token s3cret": "test_tokens_file_and_config_files",
    "ssh-ed25519 AAAA": "not run: a file format, the key cut short; see tests/e2e/test_access.py",
    "# server.toml": "test_tokens_file_and_config_files",
    "# agent.toml": "test_tokens_file_and_config_files",
    "tunnel server --config server.toml": "test_tokens_file_and_config_files",
    "curl -H": "test_the_admin_api_commands",
    "event=agent_connected": "not run: sample log lines; tests/server/test_telemetry.py has them",
    "event=request client=": "not run: a sample log line; tests/e2e/test_access.py checks it",
    "hypercorn --worker-class trio": "test_the_embedding_example_under_the_hypercorn_command",
    "--local-protocol h2c": "test_the_grpc_example",
    "--node-id one --node-address": "test_the_cluster_commands",
}


@dataclass(frozen=True)
class Example:
    """A code block of README.rst."""

    kind: str  # "python" or "literal"
    line: int  # where its text starts
    code: str

    def __str__(self) -> str:
        return f"README.rst line {self.line}"


def examples(kind: str) -> list[Example]:
    """The README's ``.. code-block:: python`` blocks, or its other literal blocks, dedented."""
    lines = README.read_text().splitlines()
    found = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if kind == "python":
            opens = stripped == ".. code-block:: python"
        else:
            # `::` paragraphs, and code blocks in any language but Python (console, toml...).
            opens = (stripped.endswith("::") and not stripped.startswith("..")) or (
                stripped.startswith(".. code-block::") and stripped != ".. code-block:: python"
            )
        if not opens:
            continue
        indent = len(line) - len(line.lstrip())
        body: list[str] = []
        for following in lines[index + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        code = textwrap.dedent("\n".join(body)).strip("\n") + "\n"
        found.append(Example(kind, index + 2, code))
    return found


def example(kind: str, marker: str) -> Example:
    """The one example of ``kind`` that contains ``marker``."""
    matching = [e for e in examples(kind) if marker in e.code]
    assert len(matching) == 1, f"{len(matching)} README examples contain {marker!r}"
    return matching[0]


_REPLACED = re.compile("|".join(re.escape(old) for old, _ in SUBSTITUTIONS))


def substitute(text: str, **values: object) -> str:
    """``text`` with :data:`SUBSTITUTIONS` applied, the test's values filled in.

    One pass, earlier entries first at each place: what was put in (a port such
    as 18080) is never replaced again.
    """
    replacements = dict(SUBSTITUTIONS)
    return _REPLACED.sub(lambda match: replacements[match[0]].format_map(values), text)


def test_every_example_is_covered() -> None:
    for kind, markers in (
        ("python", list(PYTHON_EXAMPLES.values())),
        ("literal", list(LITERAL_EXAMPLES)),
    ):
        blocks = examples(kind)
        for block in blocks:
            assert any(marker in block.code for marker in markers), (
                f"{block} is run by no test of tests/e2e/test_readme.py:\n{block.code}"
            )
        for marker in markers:
            # Each marker names one example, so each test runs the one it means.
            assert sum(marker in block.code for block in blocks) == 1, marker
    for test in LITERAL_EXAMPLES.values():
        if not test.startswith("not run: "):
            assert callable(globals().get(test)), f"no test {test}"


# --- running examples ---------------------------------------------------------------------

PRELUDE = '''\
import os
import sys

import trio
import trio_websocket
import tunnel


async def readme_wait():
    """What the test runs for trio.sleep_forever(): returns once the test says so."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    with trio.fail_after({limit}):
        await stdin.receive_some(1)

'''


def program(block: Example, *, fragment: bool = False, epilogue: str = "", **values: Any) -> str:
    """The Python program that runs ``block``, substituted; ``fragment`` wraps it in main()."""
    code = substitute(block.code, **values)
    prelude = PRELUDE.format(limit=LIMIT)
    if not fragment:
        return prelude + code
    body = textwrap.indent(code + textwrap.dedent(epilogue), "    ")
    return prelude + "async def main():\n" + body + "\n\ntrio.run(main)\n"


class Process:
    """A README program or command as a subprocess; reads its output line by line."""

    def __init__(self, process: trio.Process, what: str) -> None:
        self.process = process
        self.what = what
        self.lines: list[str] = []
        self._buffer = b""

    async def line(self, pattern: str = "") -> str:
        """The next line of output that matches ``pattern`` (a regex)."""
        assert self.process.stdout is not None
        with trio.fail_after(LIMIT):
            while True:
                while b"\n" in self._buffer:
                    raw, self._buffer = self._buffer.split(b"\n", 1)
                    line = raw.decode()
                    self.lines.append(line)
                    if re.search(pattern, line):
                        return line
                chunk = await self.process.stdout.receive_some(65536)
                if not chunk:
                    await self.process.wait()
                    raise AssertionError(
                        f"{self.what} ended ({self.process.returncode}) before printing "
                        f"{pattern!r}:\n" + "\n".join(self.lines)
                    )
                self._buffer += chunk

    async def finish(self) -> None:
        """Let a program waiting in readme_wait() go on; it must then end with status 0."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(b"done\n")
        await self.ended()

    async def ended(self) -> None:
        """Wait for the program to end by itself, with status 0."""
        assert self.process.stdout is not None
        with trio.fail_after(LIMIT):
            while chunk := await self.process.stdout.receive_some(65536):
                self._buffer += chunk
            status = await self.process.wait()
        assert status == 0, "\n".join([*self.lines, self._buffer.decode()])


@asynccontextmanager
async def run(argv: list[str], what: str, cwd: Path | None = None) -> AsyncIterator[Process]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(cwd or ""), str(ROOT)]))}
    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        # A group of its own: the program's children (Hypercorn's worker
        # process, say) are ended with it, not left behind.
        start_new_session=True,
    )
    try:
        yield Process(process, what)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with trio.move_on_after(5):
            await process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                await pipe.aclose()


def run_python(code: str, what: str) -> AbstractAsyncContextManager[Process]:
    # -u: each print reaches the test at once.
    return run([sys.executable, "-u", "-c", code], what)


def command(line: str, **values: Any) -> list[str]:
    """A README command line, substituted, as the argv that runs it from this checkout."""
    argv = shlex.split(substitute(line, **values))
    if argv[0] in ("tunnel", "hypercorn"):
        return [sys.executable, "-m", *argv]
    if argv[0] == "redis-server":
        return argv
    raise AssertionError(f"not a tunnel, hypercorn or redis-server command: {line!r}")


async def get(port: int, host: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(LIMIT):
            return await client.get(
                f"http://127.0.0.1:{port}{path}", headers={"host": host}, **kwargs
            )


async def wait_listening(port: int) -> None:
    with trio.fail_after(LIMIT):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
            else:
                await stream.aclose()
                return


# --- the Python examples ------------------------------------------------------------------


async def test_the_agent_example(start_tunnel_server: Any, local_service: Any) -> None:
    server = await start_tunnel_server()
    code = program(
        example("python", PYTHON_EXAMPLES["agent"]), server=server.port, local=local_service.port
    )
    async with run_python(code, "the agent example") as agent:
        line = await agent.line("public URL")
        assert line == f"public URL: http://myapp.tunnel.localhost:{server.port}"
        response = await get(server.port, "myapp.tunnel.localhost", "/through/the/readme")
        assert response.status_code == 200
        assert response.json()["path"] == "/through/the/readme"
        await agent.finish()


async def test_the_state_channel_example(start_tunnel_server: Any, local_service: Any) -> None:
    server = await start_tunnel_server()
    code = program(
        example("python", PYTHON_EXAMPLES["state channel"]),
        fragment=True,
        # What the README says it receives, for one connection opened and closed.
        epilogue="""
        async with tunnel.open_tunnel(config):
            pass
        seen = []
        while True:
            try:
                seen.append(receive.receive_nowait().value)
            except trio.WouldBlock:
                break
        print("states:", *seen)
        """,
        server=server.port,
        local=local_service.port,
    )
    async with run_python(code, "the state channel example") as agent:
        assert await agent.line("states") == "states: connecting connected closed"
        await agent.ended()


async def test_the_server_example(local_service: Any, agent_config: Any) -> None:
    port = free_port()
    code = program(example("python", PYTHON_EXAMPLES["server"]), server=port)
    async with run_python(code, "the server example") as server:
        await wait_listening(port)
        ours = agent_config(port, local_service.port, host="myapp.tunnel.localhost")
        with trio.fail_after(LIMIT):
            async with tunnel.open_tunnel(ours):
                assert re.fullmatch(
                    r"tunnel up: myapp\.tunnel\.localhost from \('127\.0\.0\.1', \d+\)",
                    await server.line("tunnel up"),
                )
                response = await get(port, "myapp.tunnel.localhost", "/served")
                assert response.status_code == 200
                assert response.json()["path"] == "/served"
        # The auth hook refuses hosts outside the domain with its message.
        theirs = agent_config(port, local_service.port, host="other.localhost")
        with trio.fail_after(LIMIT), pytest.raises(tunnel.HostRejectedError) as refused:
            await tunnel.Client(theirs).connect()
        assert "other.localhost is not ours" in str(refused.value)


async def _echo_websocket(scope: Any, receive: Any, send: Any) -> None:
    """A local service that answers each WebSocket text message with ``echo: <it>``."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    assert scope["type"] == "websocket"
    await receive()
    await send({"type": "websocket.accept"})
    while (message := await receive())["type"] == "websocket.receive":
        await send({"type": "websocket.send", "text": f"echo: {message['text']}"})


async def test_the_websocket_visitor_example(
    nursery: trio.Nursery, start_tunnel_server: Any, agent_config: Any
) -> None:
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    (url,) = await nursery.start(hypercorn.trio.serve, _echo_websocket, config)
    server = await start_tunnel_server()
    # The visitor dials 127.0.0.1 (names under .localhost need not resolve), so the
    # agent claims that name.
    agent = agent_config(server.port, int(url.rsplit(":", 1)[1]), host="127.0.0.1")
    code = program(
        example("python", PYTHON_EXAMPLES["websocket visitor"]), fragment=True, server=server.port
    )
    with trio.fail_after(LIMIT):
        async with tunnel.open_tunnel(agent), run_python(code, "the WebSocket example") as visitor:
            assert await visitor.line("echo") == "echo: hello"
            await visitor.ended()


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(4096):
            await stream.send_all(data)


async def test_the_tcp_agent_example(nursery: trio.Nursery, start_tunnel_server: Any) -> None:
    tcp = free_port()
    server = await start_tunnel_server(tcp_ports=range(tcp, tcp + 1))
    (listener,) = await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    echo = listener.socket.getsockname()[1]
    block = example("python", PYTHON_EXAMPLES["tcp agent"])
    shown = re.search(r"# (tcp://\S+)", block.code)
    assert shown is not None
    code = program(block, fragment=True, server=server.port, echo=echo, tcp=tcp)
    async with run_python(code, "the TCP example") as agent:
        assert await agent.line("tcp://") == substitute(shown[1], tcp=tcp)
        with trio.fail_after(LIMIT):
            stream = await trio.open_tcp_stream("127.0.0.1", tcp)
            async with stream:
                await stream.send_all(b"through the readme")
                assert await stream.receive_some(4096) == b"through the readme"
        await agent.finish()


async def test_the_embedding_example_under_the_hypercorn_command(
    tmp_path: Path, local_service: Any, agent_config: Any
) -> None:
    (tmp_path / "mytunnel.py").write_text(example("python", PYTHON_EXAMPLES["embedding"]).code)
    port = free_port()
    (line,) = example("literal", "hypercorn --worker-class trio").code.splitlines()
    async with run(command(line, server=port), "hypercorn", cwd=tmp_path) as server:
        await server.line("Running on")
        with trio.fail_after(LIMIT):
            async with tunnel.open_tunnel(
                agent_config(port, local_service.port, host="emb.localhost")
            ) as t:
                assert t.url == f"http://emb.localhost:{port}"
                tunnelled = await get(port, "emb.localhost", "/x")
                unknown = await get(port, "www.test", "/")
        assert tunnelled.status_code == 200
        assert tunnelled.json()["path"] == "/x"
        assert unknown.status_code == 404
        assert "www.test" in unknown.text


async def test_the_fallback_the_embedding_section_describes(
    nursery: trio.Nursery, local_service: Any, agent_config: Any
) -> None:
    """``TunnelApp(config, fallback=other_app)``: other hosts reach your own app."""

    async def website(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"operator's own site"})

    config = tunnel.ServerConfig(tokens=frozenset({"s3cret"}))
    app = tunnel.TunnelApp(config, fallback=website)
    settings = tunnel.hypercorn_config(config)
    settings.bind = ["127.0.0.1:0"]
    (url,) = await nursery.start(partial(hypercorn.trio.serve, app, settings))  # type: ignore[arg-type]
    port = int(url.rsplit(":", 1)[1])
    with trio.fail_after(LIMIT):
        async with tunnel.open_tunnel(agent_config(port, local_service.port)):
            tunnelled = await get(port, "app.localhost", "/x")
            other = await get(port, "www.test", "/")
    assert tunnelled.json()["path"] == "/x"
    assert other.status_code == 200
    assert other.text == "operator's own site"


# --- the commands -------------------------------------------------------------------------


def commands(block: Example) -> list[str]:
    """The command lines of a ``::`` block (continuations joined), without its output."""
    joined = block.code.replace("\\\n", " ")
    return [
        line
        for line in joined.splitlines()
        if line.split(" ", 1)[0] in ("tunnel", "curl", "redis-server")
    ]


def output(block: Example) -> list[str]:
    """The lines of a ``::`` block that are not commands: what the commands print."""
    return [line for line in block.code.splitlines() if line and line not in commands(block)]


async def test_the_demo_prints_what_the_readme_shows() -> None:
    block = example("literal", "GET http://demo.localhost:41235/hello")
    with trio.fail_after(LIMIT):
        result = await trio.run_process(
            [sys.executable, "-m", "tunnel", "demo", "--once"], capture_stdout=True, check=False
        )
    assert result.returncode == 0
    printed = result.stdout.decode().splitlines()
    shown = block.code.splitlines()
    # The same lines, but for the ports, which the demo picks afresh each time.
    for readme_line, line in zip(shown, printed, strict=False):
        pattern = re.sub(r"\\:\d+|:\d+", r":\\d+", re.escape(readme_line))
        assert re.fullmatch(pattern, line), (readme_line, line)
    assert len(printed) >= len(shown)


async def test_the_command_line_quick_start(local_service: Any) -> None:
    port = free_port()
    values = {"server": port, "local": local_service.port}
    (serve,) = commands(example("literal", "tunnel server --address :8000 --domain"))
    (expose,) = commands(example("literal", "--token s3cret --host myapp\n"))
    printed = output(example("literal", "connected     https://myapp"))
    async with run(command(serve, **values), "tunnel server") as server:
        await server.line("Running on")
        async with run(command(expose, **values), "tunnel http") as agent:
            assert [await agent.line(), await agent.line()] == [
                substitute(line, **values) for line in printed
            ]
            response = await get(port, "myapp.tunnel.localhost", "/quick/start")
            assert response.status_code == 200
            assert response.json()["path"] == "/quick/start"


async def test_the_cluster_commands(tmp_path: Path, local_service: Any) -> None:
    redis, node_one, node_two, expose = commands(example("literal", "--node-id one --node-address"))
    (tmp_path / "cluster-secret").write_text(secrets.token_urlsafe() + "\n")
    ports = {"redis": free_port(), "one": free_port(), "two": free_port()}
    values = {**ports, "local": local_service.port, "etc": tmp_path}
    async with run(command(redis, **values), "redis-server", cwd=tmp_path) as store:
        await store.line("Ready to accept connections")
        async with (
            run(command(node_one, **values, server=ports["one"]), "node one") as one,
            run(command(node_two, **values, server=ports["two"]), "node two") as two,
        ):
            for node in (one, two):
                await node.line("Running on")
            async with run(command(expose, **values), "tunnel http") as agent:
                await agent.line("connected")
                for name in ("one", "two"):
                    response = await get(ports[name], "myapp.tunnel.localhost", f"/via/{name}")
                    assert response.status_code == 200, response.text
                    assert response.json()["path"] == f"/via/{name}"


async def test_the_grpc_example() -> None:
    values = {"server": free_port(), "grpc": free_port()}
    (serve,) = commands(example("literal", "tunnel server --address :8000 --domain"))
    (expose,) = commands(example("literal", "--local-protocol h2c"))
    greeter = program(example("python", PYTHON_EXAMPLES["grpc server"]), **values)
    client = example("python", PYTHON_EXAMPLES["grpc client"])
    (shown,) = re.findall(r"# (b'.*')", client.code)
    async with (
        run(command(serve, **values), "tunnel server") as server,
        run_python(greeter, "the gRPC server example"),
    ):
        await server.line("Running on")
        await wait_listening(values["grpc"])
        async with run(command(expose, **values), "tunnel http") as agent:
            await agent.line("connected")
            async with run_python(program(client, **values), "the gRPC client example") as call:
                assert await call.line() == shown
                await call.ended()


async def test_pooled_agents(start_local_service: Any) -> None:
    services = [await start_local_service("one"), await start_local_service("two")]
    port = free_port()
    (serve,) = commands(example("literal", "tunnel server --address :8000 --domain"))
    (expose,) = commands(example("literal", "--host myapp --pool"))
    async with run(command(serve, server=port), "tunnel server") as server:
        await server.line("Running on")
        async with (
            run(command(expose, server=port, local=services[0].port), "agent one") as one,
            run(command(expose, server=port, local=services[1].port), "agent two") as two,
        ):
            await one.line("connected")
            await two.line("connected")
            # Idle agents take turns: both answer, soon.
            seen = set()
            with trio.fail_after(LIMIT):
                while seen != {"one", "two"}:
                    response = await get(port, "myapp.tunnel.localhost", "/pooled")
                    assert response.status_code == 200
                    seen.add(response.json()["service"])


async def test_the_tcp_tunnel_commands(nursery: trio.Nursery) -> None:
    (listener,) = await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    tcp = free_port()
    values = {"server": free_port(), "echo": listener.socket.getsockname()[1], "tcp": tcp}
    (serve,) = commands(example("literal", "--tcp-ports 20000-20099"))
    block = example("literal", "tunnel tcp 22")
    (expose,) = commands(block)
    async with run(command(serve, **values), "tunnel server") as server:
        await server.line("Running on")
        async with run(command(expose, **values), "tunnel tcp") as agent:
            assert [await agent.line(), await agent.line()] == [
                substitute(line, **values) for line in output(block)
            ]
            with trio.fail_after(LIMIT):
                stream = await trio.open_tcp_stream("127.0.0.1", tcp)
                async with stream:
                    await stream.send_all(b"SSH-2.0-readme")
                    assert await stream.receive_some(4096) == b"SSH-2.0-readme"


async def test_tokens_file_and_config_files(
    tmp_path: Path, local_service: Any, agent_config: Any
) -> None:
    etc = tmp_path / "etc" / "tunnel"
    etc.mkdir(parents=True)
    port = free_port()
    values = {"server": port, "local": local_service.port, "etc": etc, "tcp": free_port()}
    hash_token, serve = commands(example("literal", "tunnel hash-token s3cret"))
    # `>>` as the shell does it: the command's output appended to the file.
    argv, _, target = hash_token.partition(" >> ")
    with trio.fail_after(LIMIT):
        hashed = await trio.run_process(command(argv), capture_stdout=True)
    tokens = trio.Path(substitute(target, **values))
    before = await tokens.read_bytes() if await tokens.exists() else b""
    await tokens.write_bytes(before + hashed.stdout)
    digest = hashlib.sha256(b"s3cret").hexdigest()
    assert (etc / "tokens").read_text() == f"sha256:{digest}\n"
    async with run(command(serve, **values), "tunnel server --tokens-file") as server:
        await server.line("Running on")
        with trio.fail_after(LIMIT):
            async with tunnel.open_tunnel(agent_config(port, local_service.port)):
                pass
            with pytest.raises(tunnel.AuthenticationError):
                async with tunnel.open_tunnel(agent_config(port, local_service.port, token="x")):
                    pass

    for name in ("server.toml", "agent.toml"):
        block = example("literal", f"# {name}")
        (tmp_path / name).write_text(substitute(block.code, **values))
    serve, expose = commands(example("literal", "tunnel server --config server.toml"))
    async with run(command(serve), "tunnel server --config", cwd=tmp_path) as server:
        await server.line("Running on")
        async with run(command(expose), "tunnel http --config", cwd=tmp_path) as agent:
            line = await agent.line("connected")
            assert line.split()[1] == f"http://myapp.tunnel.localhost:{port}"
            refused = await get(port, "myapp.tunnel.localhost", "/")
            admitted = await get(
                port, "myapp.tunnel.localhost", "/", auth=("me", "a long password")
            )
    assert refused.status_code == 401
    assert admitted.status_code == 200


async def test_the_admin_api_commands(
    nursery: trio.Nursery, start_tunnel_server: Any, local_service: Any, agent_config: Any
) -> None:
    server = await start_tunnel_server(admin_token="admin-secret")
    host = "myapp.tunnel.localhost"
    client = tunnel.Client(agent_config(server.port, local_service.port, host=host))
    refusal: list[tunnel.RejectedError] = []
    stopped = trio.Event()

    async def agent(task_status: trio.TaskStatus[None]) -> None:
        try:
            await client.connect(task_status=task_status)
        except tunnel.RejectedError as exc:
            refusal.append(exc)
        finally:
            stopped.set()

    await nursery.start(agent)
    answers = []
    for line in commands(example("literal", "curl -H")):
        with trio.fail_after(LIMIT):
            result = await trio.run_process(
                ["bash", "-c", substitute(line, server=server.port)],
                capture_stdout=True,
                env={**os.environ, "ADMIN": "admin-secret"},
            )
        answers.append(json.loads(result.stdout))
    listing, one, deleted = answers
    assert [t["host"] for t in listing["tunnels"]] == [host]
    assert one["host"] == host
    assert deleted["disconnected"]["host"] == host
    assert deleted["reconnect"] is False
    # DELETE ends the agent's connection; told why, it stops instead of reconnecting.
    with trio.fail_after(LIMIT):
        await stopped.wait()
    assert "abuse" in str(refusal[0])
