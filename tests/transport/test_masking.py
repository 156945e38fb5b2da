from __future__ import annotations

import importlib.metadata
import os

import pytest
import wsproto.frame_protocol
from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping

from tunnel._transport import masking

PURE_PYTHON = masking._ORIGINAL


def test_fast_masking_is_in_use_on_the_verified_wsproto() -> None:
    # The swap silently does nothing on an unverified wsproto: this test is the
    # reminder to check a new wsproto's masker and add its version.
    assert importlib.metadata.version("wsproto").startswith(masking._VERIFIED)
    assert masking.use_fast_masking()
    assert wsproto.frame_protocol.XorMaskerSimple is masking.FastMasker
    assert masking.use_fast_masking()  # idempotent


@given(
    key=st.binary(min_size=4, max_size=4),
    pieces=st.lists(st.binary(max_size=50), max_size=8),
)
def test_fast_masker_matches_wsproto_piece_by_piece(key: bytes, pieces: list[bytes]) -> None:
    # A frame's payload is unmasked in pieces as it arrives: the key must carry
    # on from where the previous piece ended, exactly as wsproto's does.
    fast, slow = masking.FastMasker(key), PURE_PYTHON(bytearray(key))
    for piece in pieces:
        assert fast.process(bytearray(piece)) == bytes(slow.process(bytearray(piece)))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 1 << 20])
@pytest.mark.parametrize("sender", [ConnectionType.CLIENT, ConnectionType.SERVER])
def test_messages_round_trip_through_wsproto(size: int, sender: ConnectionType) -> None:
    masking.use_fast_masking()
    # Connections past the handshake, as trio-websocket and Hypercorn use them.
    receiver = ConnectionType.SERVER if sender is ConnectionType.CLIENT else ConnectionType.CLIENT
    sending, receiving = Connection(sender), Connection(receiver)
    payload = os.urandom(size)
    wire = sending.send(BytesMessage(data=payload))
    masked = bool(wire[1] & 0x80)
    assert masked == (sender is ConnectionType.CLIENT), "only a client's frames are masked"
    received = b""
    # Fed in odd-sized pieces, as TCP delivers them.
    for start in range(0, len(wire), 7919):
        receiving.receive_data(wire[start : start + 7919])
        for event in receiving.events():
            assert isinstance(event, BytesMessage)
            received += event.data
    assert len(received) == size
    assert received == payload, "the payload came out changed"


def test_control_frames_round_trip_and_stay_small() -> None:
    masking.use_fast_masking()
    client = Connection(ConnectionType.CLIENT)
    server = Connection(ConnectionType.SERVER)
    server.receive_data(client.send(Ping(payload=b"x" * 125)))
    assert [type(event) for event in server.events()] == [Ping]
    with pytest.raises(ValueError, match="control frame"):
        client.send(Ping(payload=b"x" * 126))
    server.receive_data(client.send(CloseConnection(code=1000, reason="done")))
    (close,) = server.events()
    assert isinstance(close, CloseConnection)
    assert (close.code, close.reason) == (1000, "done")


def test_every_frame_gets_a_fresh_key() -> None:
    masking.use_fast_masking()
    client = Connection(ConnectionType.CLIENT)
    keys = {bytes(client.send(BytesMessage(data=b"same"))[2:6]) for _ in range(50)}
    assert len(keys) > 45
