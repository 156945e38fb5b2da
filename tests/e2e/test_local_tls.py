"""A local service that speaks HTTPS: ``local_tls``, ``local_ca_file``, skipping the check.

The local service is a real Hypercorn serving TLS with a certificate from a
throwaway CA; the agent reaches it over HTTP/1.1 with TLS, or HTTP/2 with ALPN,
and a visitor on plain HTTP gets its answers through the tunnel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trustme

from helpers import LocalService


class _SeenService(LocalService):
    """The test app, also noting the scheme and HTTP version of each request it got."""

    def __init__(self) -> None:
        super().__init__("https")
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.seen.append((scope["scheme"], scope["http_version"]))
        await super().__call__(scope, receive, send)


async def _serve_https(
    service: LocalService,
    cert_file: Path,
    key_file: Path,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.certfile = str(cert_file)
    config.keyfile = str(key_file)
    config.accesslog = None
    config.graceful_timeout = 0.5
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(hypercorn.trio.serve, service, config)  # type: ignore[arg-type]
        await service.lifespan_started.wait()
        service.port = int(urls[0].rsplit(":", 1)[1])
        task_status.started(service.port)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def https_service(nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA) -> _SeenService:
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "local-cert.pem", tmp_path / "local-key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(cert_file), append=True)
    service = _SeenService()
    await nursery.start(_serve_https, service, cert_file, key_file)
    return service


@pytest.fixture
def ca_file(tmp_path: Path, ca: trustme.CA) -> str:
    path = tmp_path / "local-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def _visit(port: int, path: str, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        return await http.post(
            f"http://127.0.0.1:{port}{path}", content=body, headers={"host": "app.localhost"}
        )


@pytest.mark.parametrize(
    ("settings", "version"),
    [
        pytest.param({"local_tls": True, "ca": True}, "1.1", id="http1-tls-trusted-ca"),
        pytest.param({"local_tls": True, "skip": True}, "1.1", id="http1-tls-skip-verify"),
        pytest.param({"local_protocol": "h2", "ca": True}, "2", id="h2-alpn-trusted-ca"),
        pytest.param({"local_protocol": "h2", "skip": True}, "2", id="h2-alpn-skip-verify"),
    ],
)
async def test_a_local_https_service_answers_through_the_tunnel(
    start_tunnel_server, open_agent, https_service, ca_file, settings, version
) -> None:
    settings = dict(settings)
    if settings.pop("ca", False):
        settings["local_ca_file"] = ca_file
    if settings.pop("skip", False):
        settings["local_insecure_skip_verify"] = True
    server = await start_tunnel_server()
    with trio.fail_after(20):
        async with open_agent(server.port, https_service.port, **settings):
            for size in (0, 41, 100_000):
                body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
                response = await _visit(server.port, "/echo", body)
                assert response.status_code == 200, response.text
                echo = json.loads(response.content)
                assert echo["service"] == "https"
                assert echo["body"].encode("latin-1") == body
    assert len(https_service.seen) == 3
    assert set(https_service.seen) == {("https", version)}


@pytest.mark.parametrize("local_protocol", ["http1", "h2"])
async def test_an_untrusted_local_certificate_is_a_502_that_says_so(
    start_tunnel_server, open_agent, https_service, local_protocol
) -> None:
    # No CA file and no skip: the throwaway CA is not in the system's store.
    server = await start_tunnel_server()
    settings: dict[str, Any] = {"local_protocol": local_protocol}
    if local_protocol == "http1":
        settings["local_tls"] = True
    with trio.fail_after(20):
        async with open_agent(server.port, https_service.port, **settings):
            response = await _visit(server.port, "/echo", b"hello")
    assert response.status_code == 502
    # The page names the problem and both ways to fix it.
    assert "certificate of the local service" in response.text, response.text
    assert "local_ca_file" in response.text
    assert "local_insecure_skip_verify" in response.text
    assert https_service.seen == []
