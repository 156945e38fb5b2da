from __future__ import annotations

import importlib.metadata
import os

import pytest
import wsproto.frame_protocol
from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage

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
def test_masked_messages_round_trip_through_wsproto(size: int) -> None:
    masking.use_fast_masking()
    # Connections past the handshake, as trio-websocket and Hypercorn use them.
    client = Connection(ConnectionType.CLIENT)
    server = Connection(ConnectionType.SERVER)
    payload = os.urandom(size)
    wire = client.send(BytesMessage(data=payload))
    assert wire[1] & 0x80, "a client's frames are masked"
    received = b""
    # Fed in odd-sized pieces, as TCP delivers them.
    for start in range(0, len(wire), 7919):
        server.receive_data(wire[start : start + 7919])
        for event in server.events():
            assert isinstance(event, BytesMessage)
            received += event.data
    assert len(received) == size
    assert received == payload, "the payload came out changed"
