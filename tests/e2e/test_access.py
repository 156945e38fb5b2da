"""Access control: token files, Ed25519 keys, reserved hosts, per-identity limits."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import subprocess
from pathlib import Path

import pytest
import trio
import trio_websocket

import tunnel
from tunnel._protocol.handshake import (
    HOST_HEADER,
    KEY_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    SUBPROTOCOL,
)
from tunnel.client._keys import AgentKey


def _hash(token: str) -> str:
    return f"sha256:{hashlib.sha256(token.encode()).hexdigest()}"


async def _serve(nursery: trio.Nursery, **kwargs: object) -> int:
    config = tunnel.ServerConfig(address="127.0.0.1:0", **kwargs)  # type: ignore[arg-type]
    (url,) = await nursery.start(tunnel.serve, config)
    return int(url.rsplit(":", 1)[1])


def _agent(port: int, host: str = "app.localhost", **kwargs: object) -> tunnel.ClientConfig:
    return tunnel.ClientConfig(
        address=f"127.0.0.1:{port}",
        port=9,
        host=host,
        backoff_initial=0.05,
        backoff_max=0.2,
        **kwargs,  # type: ignore[arg-type]
    )


def _keypair(path: Path) -> tuple[Path, str]:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
    )
    return path, (path.with_suffix(".pub")).read_text().strip()


async def test_token_file_is_reloaded_without_dropping_agents(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# agents\n{_hash('alpha')}\n")
    port = await _serve(nursery, tokens_file=tokens)
    with trio.fail_after(20):
        async with tunnel.open_tunnel(_agent(port, token="alpha")) as alpha:
            with pytest.raises(tunnel.AuthenticationError, match="not accepted"):
                async with tunnel.open_tunnel(_agent(port, "b.localhost", token="beta")):
                    pass
            # Grant beta and withdraw alpha: alpha's tunnel stays up, new
            # connections follow the file.
            tokens.write_text(f"{_hash('beta')}\n")
            async with tunnel.open_tunnel(_agent(port, "b.localhost", token="beta")):
                pass
            with pytest.raises(tunnel.AuthenticationError):
                async with tunnel.open_tunnel(_agent(port, "c.localhost", token="alpha")):
                    pass
            assert alpha.state is tunnel.ClientState.CONNECTED


async def test_a_bad_token_file_is_refused_at_start_and_kept_on_reload(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("not-a-hash\n")
    with pytest.raises(tunnel.ConfigError, match=r"tokens:1.*64 hex digits"):
        tunnel.TunnelApp(tunnel.ServerConfig(tokens_file=tokens))
    tokens.write_text(f"{_hash('alpha')}\n")
    port = await _serve(nursery, tokens_file=tokens)
    tokens.write_text("garbage written half-way\n")
    with trio.fail_after(10):
        async with tunnel.open_tunnel(_agent(port, token="alpha")):
            pass
    assert any("keeping the previous contents" in r.getMessage() for r in caplog.records)


async def test_public_key_agent_connects_and_unknown_key_is_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    key, public = _keypair(tmp_path / "laptop")
    stranger, _ = _keypair(tmp_path / "stranger")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(public + "\n")
    port = await _serve(nursery, authorized_keys_file=authorized)
    seen: list[tunnel.ConnectRequest] = []

    with trio.fail_after(20):
        async with tunnel.open_tunnel(_agent(port, key_file=key)) as agent:
            assert agent.state is tunnel.ClientState.CONNECTED
        with pytest.raises(tunnel.AuthenticationError, match="not in the server's authorized"):
            async with tunnel.open_tunnel(_agent(port, key_file=stranger)):
                pass
        # Keys only: tokens are not accepted on this server.
        with pytest.raises(tunnel.AuthenticationError, match="token is not accepted"):
            async with tunnel.open_tunnel(_agent(port, token="guess")):
                pass
    del seen


async def _raw_handshake(port: int, headers: list[tuple[bytes, bytes]]) -> int:
    """Open the control WebSocket with ``headers``; the status (101 if accepted)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    status = 0
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, f"127.0.0.1:{port}", "/_tunnel",
                subprotocols=[SUBPROTOCOL], extra_headers=headers,
            )  # fmt: skip
            await ws.aclose()
            status = 101
    except* trio_websocket.ConnectionRejected as group:
        first = group.exceptions[0]
        if isinstance(first, trio_websocket.ConnectionRejected):
            status = first.status_code
    finally:
        await stream.aclose()
    return status


async def test_a_captured_key_handshake_cannot_be_replayed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    key_path, public = _keypair(tmp_path / "laptop")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(public + "\n")
    port = await _serve(nursery, authorized_keys_file=authorized)
    key = AgentKey(key_path)
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            captured = await key.handshake_headers(
                stream, f"127.0.0.1:{port}", "/_tunnel", "app.localhost"
            )
        headers = [(HOST_HEADER.encode(), b"app.localhost"), *captured]
        assert await _raw_handshake(port, headers) == 101
        # The same nonce and signature a second time: refused.
        assert await _raw_handshake(port, headers) == 401
        # A fresh nonce but the signature of another: refused.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            fresh = dict(
                await key.handshake_headers(
                    stream, f"127.0.0.1:{port}", "/_tunnel", "app.localhost"
                )
            )
        forged = dict(captured)
        forged[NONCE_HEADER.encode()] = fresh[NONCE_HEADER.encode()]
        assert (
            await _raw_handshake(port, [(HOST_HEADER.encode(), b"app.localhost"), *forged.items()])
            == 401
        )
        # A signature made for one host does not open another.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            other = await key.handshake_headers(
                stream, f"127.0.0.1:{port}", "/_tunnel", "app.localhost"
            )
        assert (
            await _raw_handshake(port, [(HOST_HEADER.encode(), b"evil.localhost"), *other]) == 401
        )
        # Garbage in every field: a clear 401, not a crash.
        junk = [
            (HOST_HEADER.encode(), b"app.localhost"),
            (KEY_HEADER.encode(), b"ssh-ed25519 !!!"),
            (NONCE_HEADER.encode(), b"x"),
            (SIGNATURE_HEADER.encode(), base64.b64encode(os.urandom(64))),
        ]
        assert await _raw_handshake(port, junk) == 401
        async with tunnel.open_tunnel(_agent(port, key_file=key_path)):
            pass


async def test_reserved_host_is_only_for_its_owner(nursery: trio.Nursery, tmp_path: Path) -> None:
    key, public = _keypair(tmp_path / "owner")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(public + "\n")
    port = await _serve(
        nursery,
        tokens=frozenset({"alice", "bob"}),
        authorized_keys_file=authorized,
        reserved_hosts={
            "shop.localhost": "alice",
            "blog.localhost": _hash("bob"),
            "keyed.localhost": public,
        },
    )
    with trio.fail_after(20):
        with pytest.raises(tunnel.HostRejectedError, match=r"shop\.localhost is reserved"):
            async with tunnel.open_tunnel(_agent(port, "shop.localhost", token="bob")):
                pass
        async with tunnel.open_tunnel(_agent(port, "shop.localhost", token="alice")):
            pass
        async with tunnel.open_tunnel(_agent(port, "blog.localhost", token="bob")):
            pass
        with pytest.raises(tunnel.HostRejectedError, match="reserved"):
            async with tunnel.open_tunnel(_agent(port, "keyed.localhost", token="alice")):
                pass
        async with tunnel.open_tunnel(_agent(port, "keyed.localhost", key_file=key)):
            pass


async def test_tunnels_per_identity_are_limited(nursery: trio.Nursery) -> None:
    port = await _serve(nursery, tokens=frozenset({"alice"}), max_tunnels_per_identity=2)
    with trio.fail_after(20):
        async with (
            tunnel.open_tunnel(_agent(port, "one.localhost", token="alice")),
            tunnel.open_tunnel(_agent(port, "two.localhost", token="alice")),
        ):
            with pytest.raises(tunnel.HostRejectedError, match="2 tunnel"):
                async with tunnel.open_tunnel(_agent(port, "three.localhost", token="alice")):
                    pass
        # Once one is closed, there is room again.
        async with tunnel.open_tunnel(_agent(port, "three.localhost", token="alice")):
            pass


async def test_an_open_server_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tunnel.server")
    tunnel.TunnelApp(tunnel.ServerConfig())
    assert any("ANYONE can open a tunnel" in r.getMessage() for r in caplog.records)
    caplog.clear()
    tunnel.TunnelApp(tunnel.ServerConfig(tokens=frozenset({"x"})))
    assert not caplog.records


def test_hash_token_prints_the_line_for_a_tokens_file() -> None:
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "tunnel", "hash-token", "s3cret"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == _hash("s3cret")
