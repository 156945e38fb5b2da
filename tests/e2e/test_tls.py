"""HTTPS for visitors and ``wss`` for agents, with a private CA from trustme."""

from __future__ import annotations

import dataclasses
import logging
import ssl
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme

import tunnel

TUNNEL = [sys.executable, "-m", "tunnel"]
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


async def test_an_untrusted_certificate_stops_the_agent_at_once(
    tls_server, local_service, agent_config, visitor
):
    # Neither ca_file nor insecure_skip_verify: the system's CAs do not know
    # trustme's. Every retry would fail the same way, so the agent stops with
    # an error that says how to fix it, as for a refused token.
    states_in, states = trio.open_memory_channel[tunnel.ClientState](16)
    config = agent_config(
        tls_server.port,
        local_service.port,
        address=tls_server.address,
        host="doubt.localhost",
        state=states_in,
    )
    with trio.fail_after(5):
        with pytest.raises(tunnel.UntrustedCertificateError) as caught:
            await tunnel.Client(config).connect()
        seen = []
        while True:
            try:
                seen.append(states.receive_nowait())
            except trio.WouldBlock:
                break
        assert seen == [CONNECTING, tunnel.ClientState.CLOSED]
        message = str(caught.value)
        assert f"127.0.0.1:{tls_server.port}" in message
        assert "unable to get local issuer certificate" in message
        assert "ClientConfig.ca_file" in message
        assert "ClientConfig.insecure_skip_verify" in message
        assert "--" not in message, "a library user is told of fields, not flags"
        with pytest.raises(tunnel.UntrustedCertificateError):
            async with tunnel.open_tunnel(dataclasses.replace(config, state=None)):
                raise AssertionError("open_tunnel returned with an untrusted certificate")
        async with visitor(
            tls_server.port, "doubt.localhost", scheme="https", verify=tls_server.trusting
        ) as http:
            assert (await http.get("/")).status_code == 404


async def test_a_certificate_for_another_host_stops_the_agent(
    tmp_path, start_tunnel_server, local_service, agent_config
):
    ca = trustme.CA()
    cert = ca.issue_cert("elsewhere.example")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "s.pem", tmp_path / "s.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    server = await start_tunnel_server(certificate=str(cert_file), key=str(key_file))
    config = agent_config(
        server.port, local_service.port, address=f"wss://127.0.0.1:{server.port}", ca_file=ca_file
    )
    with trio.fail_after(5), pytest.raises(tunnel.UntrustedCertificateError, match=r"127\.0\.0\.1"):
        await tunnel.Client(config).connect()


async def test_a_tls_handshake_cut_short_is_retried(nursery, local_service, agent_config, caplog):
    # A server that accepts and hangs up (restarting, or a proxy in front of
    # it) is not a verdict on its certificate: the agent keeps trying.
    caplog.set_level(logging.WARNING, logger="tunnel.client")
    accepted = 0
    third = trio.Event()

    async def hang_up(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        if accepted == 3:
            third.set()
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    client = tunnel.Client(
        agent_config(port, local_service.port, address=f"wss://127.0.0.1:{port}")
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(client.connect)
            await third.wait()
            inner.cancel_scope.cancel()
    failures = [r.getMessage() for r in caplog.records if r.name == "tunnel.client"]
    assert failures, "each failed attempt is reported"


async def test_the_cli_agent_stops_on_an_untrusted_certificate(tls_server, local_service):
    with trio.fail_after(20):
        result = await trio.run_process(
            [
                *TUNNEL,
                "http",
                str(local_service.port),
                "--server",
                tls_server.address,
                "--token",
                "s3cret",
                "--no-inspector",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2, result
    err = result.stderr.decode()
    assert err.count("\n") == 1, err
    assert "not trusted" in err
    assert "--ca-file" in err
    assert "--insecure-skip-verify" in err
    assert "ClientConfig" not in err, err
