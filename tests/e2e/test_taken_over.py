"""Agents' connections read and written by the server itself, not Hypercorn's WebSocket.

After the handshake the server takes an agent's socket from Hypercorn
(``tunnel/server/hypercorn/_takeover.py``) and frames its messages itself
(``tunnel/_transport/stream.py``). Every test checks that the connection was
really taken (``transport=direct`` in the server's log), then what a user would
notice: requests served, close codes and reasons both ways, an oversize message
refused, a cut connection recovered from, a graceful shutdown that drains.
The agents at the byte level are wsproto clients on real sockets.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
from typing import Any

import httpx
import pytest
import trio
import trustme
from faultproxy import FaultProxy
from h2.config import H2Configuration
from h2.connection import H2Connection
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    Request,
)
from wsproto.extensions import PerMessageDeflate

import tunnel
from helpers import eventually
from tunnel._protocol.handshake import HOST_HEADER, REPLACED_CLOSE_CODE, SUBPROTOCOL

TOKEN = "s3cret"


def _transports(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ``transport=`` of every ``agent_connected`` line so far."""
    found = []
    for record in caplog.records:
        message = record.getMessage()
        if message.startswith("event=agent_connected"):
            found.append(message.split("transport=", 1)[1].split()[0])
    return found


@pytest.fixture(autouse=True)
def _log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunnel.server")


class RawAgent:
    """An agent's WebSocket at the byte level: a wsproto client on a TCP socket."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws

    @classmethod
    async def connect(
        cls, port: int, host: str = "raw.localhost", extensions: list[Any] | None = None
    ) -> RawAgent:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(
            ws.send(
                Request(
                    host=f"127.0.0.1:{port}",
                    target="/_tunnel",
                    subprotocols=[SUBPROTOCOL],
                    extensions=extensions or [],
                    extra_headers=[
                        (b"authorization", f"Bearer {TOKEN}".encode()),
                        (HOST_HEADER.encode(), host.encode()),
                    ],
                )
            )
        )
        agent = cls(stream, ws)
        event = await agent.next_event()
        assert isinstance(event, AcceptConnection), event
        assert not isinstance(event, RejectConnection)
        return agent

    async def start_http2(self) -> None:
        """Send what an agent's HTTP/2 side sends first (its SETTINGS): proof it is alive."""
        h2 = H2Connection(H2Configuration(client_side=False))
        h2.initiate_connection()
        await self.stream.send_all(self.ws.send(BytesMessage(data=h2.data_to_send())))

    async def next_event(self) -> Any:
        while True:
            for event in self.ws.events():
                return event
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)

    async def wait_close(self) -> CloseConnection:
        while True:
            event = await self.next_event()
            if isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await self.stream.send_all(self.ws.send(event.response()))
                return event


async def test_close_code_and_reason_from_the_server(start_tunnel_server, caplog):
    # A second connection for the host replaces the first: the first is told
    # so with the close code the agent acts on, and why.
    server = await start_tunnel_server()
    with trio.fail_after(10):
        first = await RawAgent.connect(server.port)
        second = await RawAgent.connect(server.port)
        await second.start_http2()
        closed = await first.wait_close()
        assert closed.code == REPLACED_CLOSE_CODE
        assert closed.reason == "replaced by a newer connection for raw.localhost"
        # The server's TCP close follows its close frame.
        assert await first.stream.receive_some(100) == b""
        await first.stream.aclose()
        await second.stream.aclose()
    assert _transports(caplog) == ["direct", "direct"]


async def test_close_code_and_reason_from_the_agent(start_tunnel_server, caplog):
    server = await start_tunnel_server()
    with trio.fail_after(10):
        agent = await RawAgent.connect(server.port)
        await agent.stream.send_all(agent.ws.send(CloseConnection(code=4321, reason="bye now")))
        # The server answers with the same code (the closing handshake).
        answer = await agent.wait_close()
        assert answer.code == 4321
        await eventually(lambda: "agent_disconnected" in caplog.text)
        await agent.stream.aclose()
    assert 'reason="the agent disconnected (4321 bye now)"' in caplog.text
    assert _transports(caplog) == ["direct"]


async def test_a_handshake_offering_compression_stays_with_hypercorn(start_tunnel_server, caplog):
    # The server's own framing has no permessage-deflate; Hypercorn's has. Such
    # an agent keeps the ASGI path, and its close still arrives with its code.
    server = await start_tunnel_server()
    with trio.fail_after(10):
        agent = await RawAgent.connect(server.port, extensions=[PerMessageDeflate()])
        await agent.stream.send_all(agent.ws.send(CloseConnection(code=4321, reason="bye now")))
        assert (await agent.wait_close()).code == 4321
        await eventually(lambda: "agent_disconnected" in caplog.text)
        await agent.stream.aclose()
    assert 'reason="the agent disconnected (4321 bye now)"' in caplog.text
    assert _transports(caplog) == ["asgi"]


async def test_an_oversize_message_is_refused_before_it_is_read(start_tunnel_server, caplog):
    server = await start_tunnel_server(max_websocket_message=1 << 20)
    with trio.fail_after(10):
        agent = await RawAgent.connect(server.port)
        # The header of a 64 MiB message and a little of its payload: refused
        # on the header alone, with no wait for the rest.
        wire = agent.ws.send(BytesMessage(data=b"\0" * (64 << 20)))
        await agent.stream.send_all(wire[: 1 << 16])
        closed = await agent.wait_close()
        assert closed.code == 1009
        await eventually(lambda: "agent_disconnected" in caplog.text)
        await agent.stream.aclose()
    assert "message over" in caplog.text
    assert _transports(caplog) == ["direct"]


class SplittingProxy:
    """Forwards an agent's bytes to the server in pieces of 1 to 7 bytes, one at a time."""

    def __init__(self, target: int, seed: int) -> None:
        self.target = target
        self.random = random.Random(seed)
        self.pieces = 0
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[SplittingProxy]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)

    async def _handle(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._split, client, server)
            nursery.start_soon(self._copy, server, client)

    async def _split(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        with trio.move_on_after(30):  # a test's ceiling
            while data := await source.receive_some(65536):
                while data:
                    size = self.random.randint(1, 7)
                    await sink.send_all(data[:size])
                    data = data[size:]
                    self.pieces += 1
                    # Long enough for the server to read each piece on its own.
                    await trio.sleep(0.0005)

    async def _copy(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        with trio.move_on_after(30):
            while data := await source.receive_some(65536):
                await sink.send_all(data)


async def test_frames_cut_anywhere_on_the_way(
    nursery, start_tunnel_server, local_service, open_agent, visitor, caplog
):
    # Every frame the agent sends reaches the server in pieces of a few bytes:
    # cut inside the header, the mask and the payload, many reads per frame.
    server = await start_tunnel_server()
    proxy = await nursery.start(SplittingProxy(server.port, seed=14).run)
    with trio.fail_after(30):
        async with (
            open_agent(proxy.port, local_service.port),
            visitor(server.port) as http,
        ):
            for i in range(3):
                response = await http.get(f"/cut/{i}")
                assert response.status_code == 200
                assert response.json()["path"] == f"/cut/{i}"
            body = bytes(range(256)) * 40
            response = await http.post("/echo", content=body)
            assert response.status_code == 200
    assert proxy.pieces > 1000
    assert _transports(caplog) == ["direct"]


async def test_a_connection_cut_mid_frame_ends_only_itself(
    nursery, start_tunnel_server, local_service, open_agent, visitor, caplog
):
    # The agent's connection is reset while a large upload's frames cross it.
    # The server ends that connection alone; the agent comes back and serves.
    server = await start_tunnel_server()
    proxy = await nursery.start(FaultProxy(server.port).run)
    with trio.fail_after(20):
        async with (
            open_agent(proxy.port, local_service.port),
            open_agent(server.port, local_service.port, host="other.localhost"),
            visitor(server.port) as http,
            visitor(server.port, "other.localhost") as other,
        ):
            assert (await http.get("/before")).status_code == 200

            outcome: list[object] = []

            async def exchange() -> None:
                # Echoed back: 32 MiB of frames from the agent, read by the server.
                try:
                    response = await http.post("/echo", content=b"u" * (32 << 20))
                except httpx.HTTPError as exc:
                    outcome.append(exc)
                else:
                    outcome.append(response.status_code)

            async with trio.open_nursery() as exchanging:
                exchanging.start_soon(exchange)
                await eventually(lambda: proxy.statistics.bytes_up >= (2 << 20))
                proxy.cut()
            # Cut mid-transfer: the visitor did not get the whole answer.
            assert outcome != [200]
            # The other agent never noticed.
            assert (await other.get("/meanwhile")).status_code == 200
            # This one reconnects through the proxy and serves again.
            await eventually(lambda: proxy.connections == 1)
            response = await http.get("/after")
            assert response.status_code == 200
            assert response.json()["path"] == "/after"
    assert "agent_disconnected" in caplog.text
    assert _transports(caplog).count("direct") >= 3


async def test_graceful_shutdown_drains_through_the_taken_connection(
    nursery, local_service, agent_config, visitor, caplog
):
    stop = trio.Event()
    stopped = trio.Event()

    async def run_server(config: tunnel.ServerConfig, *, task_status: Any) -> None:
        await tunnel.serve(config, shutdown_trigger=stop.wait, task_status=task_status)
        stopped.set()

    config = tunnel.ServerConfig(
        address="127.0.0.1:0", tokens=frozenset({TOKEN}), graceful_timeout=5
    )
    (url,) = await nursery.start(run_server, config)
    port = int(url.rsplit(":", 1)[1])
    with trio.fail_after(15):
        async with (
            tunnel.open_tunnel(agent_config(port, local_service.port)) as agent,
            visitor(port) as http,
        ):
            async with http.stream("GET", "/stream") as streaming:
                chunks = streaming.aiter_bytes()
                first = await chunks.__anext__()
                stop.set()
                await trio.sleep(0.2)
                # The request in flight still flows over the taken connection,
                # and Hypercorn's shutdown waits for that connection.
                assert not stopped.is_set()
                local_service.release_stream.set()
                rest = b"".join([chunk async for chunk in chunks])
                done = trio.current_time()
            assert first
            assert rest
            await stopped.wait()
            # GOAWAY right after the last stream, not the 5 s timeout.
            assert trio.current_time() - done < 2
            assert agent.state is not tunnel.ClientState.CONNECTED
    assert 'reason="the connection was drained and closed"' in caplog.text
    assert _transports(caplog) == ["direct"]


async def test_wss_agents_are_taken_over_too(
    tmp_path, start_tunnel_server, local_service, open_agent, visitor, caplog
):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "app.localhost")
    cert_file, key_file, ca_file = tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    server = await start_tunnel_server(certificate=str(cert_file), key=str(key_file))
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    with trio.fail_after(15):
        async with (
            open_agent(
                server.port,
                local_service.port,
                address=f"wss://127.0.0.1:{server.port}",
                ca_file=str(ca_file),
            ),
            visitor(server.port, scheme="https", verify=trusting) as http,
        ):
            for size in (0, 100, 3 << 20):
                response = await http.post("/sha", content=b"t" * size)
                assert response.status_code == 200
    assert _transports(caplog) == ["direct"]
