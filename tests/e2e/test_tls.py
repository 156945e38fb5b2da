"""HTTPS for visitors and ``wss`` for agents, with a private CA from trustme."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

import tunnel

CONNECTING = tunnel.ClientState.CONNECTING
CONNECTED = tunnel.ClientState.CONNECTED
DISCONNECTED = tunnel.ClientState.DISCONNECTED


@dataclass
class TLSServer:
    port: int
    ca_file: Path
    #: An SSL context for visitors that trusts the test CA.
    trusting: ssl.SSLContext

    @property
    def address(self) -> str:
        return f"wss://127.0.0.1:{self.port}"


@pytest.fixture
async def tls_server(tmp_path, start_tunnel_server) -> TLSServer:
    """A tunnel server with a certificate from a private CA, and that CA's files."""
    ca = trustme.CA()
    # Agents and visitors dial 127.0.0.1, so the certificate covers the IP too.
    cert = ca.issue_cert("localhost", "app.localhost", "other.localhost", "127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    cert_file = tmp_path / "server.pem"
    key_file = tmp_path / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    server = await start_tunnel_server(certificate=str(cert_file), key=str(key_file))
    assert server.url.startswith("https://")
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    return TLSServer(server.port, ca_file, trusting)


async def test_https_ingress_and_wss_agents(tls_server, local_service, open_agent, visitor):
    port = tls_server.port
    address = tls_server.address
    with trio.fail_after(10):
        async with (
            open_agent(
                port, local_service.port, address=address, ca_file=str(tls_server.ca_file)
            ) as app,
            open_agent(
                port,
                local_service.port,
                address=address,
                host="other.localhost",
                insecure_skip_verify=True,
            ) as other,
            visitor(port, "app.localhost", scheme="https", verify=tls_server.trusting) as http_app,
            visitor(
                port, "other.localhost", scheme="https", verify=tls_server.trusting
            ) as http_other,
        ):
            assert app.url == f"https://app.localhost:{port}"
            assert other.url == f"https://other.localhost:{port}"
            response = await http_app.get("/secure")
            assert response.status_code == 200, response.text
            seen = response.json()
            assert seen["path"] == "/secure"
            assert ["x-forwarded-proto", "https"] in seen["headers"]
            response = await http_other.get("/also-secure")
            assert response.status_code == 200, response.text
            assert response.json()["path"] == "/also-secure"


async def test_agent_refuses_an_untrusted_certificate(
    tls_server, local_service, agent_config, visitor, caplog
):
    # Neither ca_file nor insecure_skip_verify: the system's CAs do not know
    # trustme's, so each attempt must fail at once, say why, and be retried.
    caplog.set_level(logging.WARNING, logger="tunnel.client")
    states_in, states = trio.open_memory_channel[tunnel.ClientState](16)
    doubting = tunnel.Client(
        agent_config(
            tls_server.port,
            local_service.port,
            address=tls_server.address,
            host="doubt.localhost",
            state=states_in,
        )
    )
    seen: list[tunnel.ClientState] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(doubting.connect)
            # Two failed attempts take a few milliseconds each plus at most
            # 0.05 s and 0.1 s of backoff; a second is plenty.
            with trio.move_on_after(1):
                while seen.count(DISCONNECTED) < 2:
                    seen.append(await states.receive())
            assert doubting.state is not CONNECTED
            async with visitor(
                tls_server.port, "doubt.localhost", scheme="https", verify=tls_server.trusting
            ) as http:
                assert (await http.get("/")).status_code == 404
            nursery.cancel_scope.cancel()
    assert CONNECTED not in seen
    assert seen[:4] == [CONNECTING, DISCONNECTED, CONNECTING, DISCONNECTED], (
        f"an agent facing an untrusted certificate went through {seen} in 1 s"
    )
    failures = [r.getMessage() for r in caplog.records if r.name == "tunnel.client"]
    assert any("TLS" in message and "ca_file" in message for message in failures), failures
