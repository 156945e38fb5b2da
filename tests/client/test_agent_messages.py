"""What the agent's user reads when a connection fails: words, not Python reprs."""

from __future__ import annotations

import trio_websocket

import tunnel


async def test_a_websocket_handshake_cut_short_is_told_in_words() -> None:
    client = tunnel.Client(tunnel.ClientConfig(address="127.0.0.1:1", token="t", port=1))
    closed = trio_websocket.ConnectionClosed(trio_websocket.CloseReason(1006, None))
    error = client._translate(closed)
    assert isinstance(error, tunnel.ServerUnreachableError)
    assert str(error) == (
        "the WebSocket handshake with 127.0.0.1:1 failed: the connection closed "
        "(1006 ABNORMAL_CLOSURE)"
    )
    refused = client._translate(trio_websocket.HandshakeError())
    assert str(refused) == (
        "the WebSocket handshake with 127.0.0.1:1 failed: the server did not complete it"
    )
