"""What the agent's user reads when a connection fails: words, not Python reprs."""

from __future__ import annotations

import tunnel
from tunnel._transport.handshake import HandshakeFailed, HandshakeRejected


async def test_a_websocket_handshake_gone_wrong_is_told_in_words() -> None:
    client = tunnel.Client(tunnel.ClientConfig(address="127.0.0.1:1", token="t", port=1))
    failed = HandshakeFailed("the answer lacks 'Upgrade: websocket'")
    error = client._translate(failed)
    assert isinstance(error, tunnel.ServerUnreachableError)
    assert str(error) == (
        "the WebSocket handshake with 127.0.0.1:1 failed: the answer lacks 'Upgrade: websocket'"
    )
    refused = client._translate(HandshakeFailed())
    assert str(refused) == (
        "the WebSocket handshake with 127.0.0.1:1 failed: the server did not complete it"
    )


async def test_a_refusal_is_told_with_the_servers_reason() -> None:
    client = tunnel.Client(tunnel.ClientConfig(address="127.0.0.1:1", token="t", port=1))
    busy = client._translate(HandshakeRejected(503, [], b"draining\n"))
    assert isinstance(busy, tunnel.ServerUnreachableError)
    assert str(busy) == "127.0.0.1:1 answered 503: draining"
    silent = client._translate(HandshakeRejected(502, [], b""))
    assert str(silent) == "127.0.0.1:1 answered 502: no reason given"
