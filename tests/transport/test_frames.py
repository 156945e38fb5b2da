"""Both ends' own WebSocket framing (tunnel/_transport/frames.py): bytes in, events out.

The peer is a real wsproto connection: a client writes the masked frames the
server reads (:class:`ServerFrames`), a server the unmasked frames the agent
reads (:class:`ClientFrames`); each reads back the frames the other end builds.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from tunnel._transport import frames
from tunnel._transport.frames import (
    ClientFrames,
    Close,
    FrameError,
    Frames,
    MaskKeys,
    ServerFrames,
    close_frame,
    frame,
)

#: Which end reads: the server (the agent's frames, masked) or the agent.
ROLES = pytest.mark.parametrize("agent_reads", [False, True], ids=["server", "agent"])


def _client() -> Connection:
    return Connection(ConnectionType.CLIENT)


def _peer(agent_reads: bool) -> Connection:
    """The wsproto end whose frames the reader reads."""
    return Connection(ConnectionType.SERVER if agent_reads else ConnectionType.CLIENT)


def _reader(agent_reads: bool, max_message: int) -> Frames:
    return ClientFrames(max_message) if agent_reads else ServerFrames(max_message)


def _drain(reader: Frames) -> list[object]:
    out: list[object] = []
    while (event := reader.next_event()) is not None:
        out.append(event)
    return out


def _feed_in_pieces(reader: Frames, wire: bytes, cuts: list[int]) -> list[object]:
    events: list[object] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(wire)]:
        if cut <= start:
            continue
        reader.receive_data(wire[start:cut])
        events.extend(_drain(reader))
        start = cut
    return events


@ROLES
@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.binary(max_size=300), min_size=1, max_size=6),
    fragment=st.booleans(),
    data=st.data(),
)
def test_messages_survive_any_split_and_batching(
    agent_reads: bool, messages: list[bytes], fragment: bool, data: st.DataObject
) -> None:
    # A peer's frames arrive cut anywhere (a read ends mid-header, mid-mask,
    # mid-payload) and several in one read; each message comes out whole, in order.
    client = _peer(agent_reads)
    wire = b""
    for message in messages:
        if fragment and len(message) > 1:
            half = len(message) // 2
            wire += client.send(BytesMessage(data=message[:half], message_finished=False))
            wire += client.send(BytesMessage(data=message[half:], message_finished=True))
        else:
            wire += client.send(BytesMessage(data=message))
    wire += client.send(Ping(b"hi"))
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
    events = _feed_in_pieces(_reader(agent_reads, 1 << 20), wire, cuts)
    assert events[:-1] == messages
    assert isinstance(events[-1], frames.Ping)
    assert events[-1].payload == b"hi"


@ROLES
@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 3 << 20])
def test_long_frames_read_byte_by_byte_and_whole(agent_reads: bool, size: int) -> None:
    payload = os.urandom(size)
    wire = _peer(agent_reads).send(BytesMessage(data=payload))
    reader = _reader(agent_reads, 4 << 20)
    reader.receive_data(wire)
    assert _drain(reader) == [payload]
    if size <= 65536:
        reader = _reader(agent_reads, 4 << 20)
        assert _feed_in_pieces(reader, wire, list(range(len(wire)))) == [payload]


def test_a_long_frame_in_many_reads_is_joined_once() -> None:
    payload = os.urandom(1 << 20)
    wire = _client().send(BytesMessage(data=payload))
    reader = ServerFrames(4 << 20)
    step = 256 << 10
    for start in range(0, len(wire) - step, step):
        reader.receive_data(wire[start : start + step])
        assert reader.next_event() is None
        assert len(reader._buffer) <= step, "reads gathered, not concatenated each time"
    reader.receive_data(wire[(len(wire) - 1) // step * step :])
    assert _drain(reader) == [payload]


@ROLES
def test_an_oversize_message_is_refused_on_its_header(agent_reads: bool) -> None:
    reader = _reader(agent_reads, 1000)
    wire = _peer(agent_reads).send(BytesMessage(data=b"x" * 1001))
    reader.receive_data(wire[: len(wire) - 1001])  # the header (and mask) only
    with pytest.raises(FrameError) as caught:
        reader.next_event()
    assert caught.value.code == 1009


@ROLES
def test_an_oversize_fragmented_message_is_refused(agent_reads: bool) -> None:
    client, reader = _peer(agent_reads), _reader(agent_reads, 1000)
    reader.receive_data(client.send(BytesMessage(data=b"x" * 600, message_finished=False)))
    assert reader.next_event() is None
    reader.receive_data(client.send(BytesMessage(data=b"x" * 600, message_finished=True)))
    with pytest.raises(FrameError) as caught:
        reader.next_event()
    assert caught.value.code == 1009


@ROLES
def test_exactly_the_limit_passes(agent_reads: bool) -> None:
    reader = _reader(agent_reads, 1000)
    reader.receive_data(_peer(agent_reads).send(BytesMessage(data=b"y" * 1000)))
    assert _drain(reader) == [b"y" * 1000]


@ROLES
@pytest.mark.parametrize(
    ("code", "reason"), [(1000, ""), (4001, "replaced by a newer connection"), (1011, "é" * 40)]
)
def test_close_code_and_reason_from_the_peer(agent_reads: bool, code: int, reason: str) -> None:
    reader = _reader(agent_reads, 1000)
    reader.receive_data(_peer(agent_reads).send(CloseConnection(code=code, reason=reason)))
    (event,) = _drain(reader)
    assert isinstance(event, Close)
    assert (event.code, event.reason) == (code, reason)


def test_close_without_a_code() -> None:
    reader = ServerFrames(1000)
    reader.receive_data(b"\x88\x80" + os.urandom(4))
    (event,) = _drain(reader)
    assert isinstance(event, Close)
    assert event.code == 1005


def _masked(first: int, payload: bytes) -> bytes:
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([first, 0x80 | len(payload)]) + key + masked


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (bytes([0x82, 0x01, 0x41]), 1002),  # unmasked
        (_masked(0xC2, b"a"), 1002),  # RSV1 (compression) without the extension
        (_masked(0x81, b"text"), 1003),  # text: only binary is allowed
        (_masked(0x80, b"a"), 1002),  # continuation outside a message
        (_masked(0x83, b"a"), 1002),  # unknown opcode
        (_masked(0x09, b"a"), 1002),  # a split PING
        (_masked(0x88, b"\x03"), 1002),  # close of one byte
        (_masked(0x88, struct.pack("!H", 1006)), 1002),  # reserved close code
        (_masked(0x88, struct.pack("!H", 1000) + b"\xff"), 1007),  # reason not UTF-8
        (_masked(0x02, b"a") + _masked(0x82, b"b"), 1002),  # new message inside a split one
    ],
)
def test_protocol_errors_name_their_close_code(wire: bytes, code: int) -> None:
    reader = ServerFrames(1000)
    reader.receive_data(wire)
    with pytest.raises(FrameError) as caught:
        _drain(reader)
    assert caught.value.code == code


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 1 << 20])
def test_server_frames_read_by_a_wsproto_client(size: int) -> None:
    client = _client()
    payload = os.urandom(size)
    client.receive_data(frame(payload) + frames.pong_frame(b"p") + close_frame(4001, "why" * 60))
    events = list(client.events())
    received = b"".join(e.data for e in events if isinstance(e, BytesMessage))
    assert received == payload
    assert [e.payload for e in events if isinstance(e, Pong)] == [b"p"]
    (closed,) = [e for e in events if isinstance(e, CloseConnection)]
    assert closed.code == 4001
    assert closed.reason == ("why" * 60)[:123], "the reason is cut to fit a control frame"
    assert not [e for e in events if isinstance(e, TextMessage)]


def test_pure_python_unmasking_matches_c() -> None:
    key = os.urandom(4)
    for size in (0, 1, 3, 4, 5, 1000):
        data = os.urandom(size)
        assert frames._unmask_python(data, key) == frames._unmask(data, key)


@ROLES
def test_nothing_is_held_once_a_read_is_parsed(agent_reads: bool) -> None:
    # The server keeps a reader per idle agent: a parsed read must not stay
    # referenced (it may be a 256 KiB buffer) until the next message.
    reader = _reader(agent_reads, 1 << 20)
    reader.receive_data(_peer(agent_reads).send(BytesMessage(data=b"z" * 100_000)))
    assert _drain(reader) == [b"z" * 100_000]
    assert reader._buffer == b""


@ROLES
def test_a_fragmented_message_with_controls_between_its_pieces(agent_reads: bool) -> None:
    # A control frame may come between the fragments of a message (RFC 6455
    # section 5.4): it is told at once, the message when it is whole.
    peer, reader = _peer(agent_reads), _reader(agent_reads, 1000)
    reader.receive_data(
        peer.send(BytesMessage(data=b"one ", message_finished=False))
        + peer.send(Ping(b"p"))
        + peer.send(BytesMessage(data=b"two ", message_finished=False))
        + peer.send(Pong(b"q"))
        + peer.send(BytesMessage(data=b"three", message_finished=True))
    )
    ping, pong, message = _drain(reader)
    assert isinstance(ping, frames.Ping)
    assert ping.payload == b"p"
    assert isinstance(pong, frames.Pong)
    assert pong.payload == b"q"
    assert message == b"one two three"


def _unmasked(first: int, payload: bytes) -> bytes:
    return bytes([first, len(payload)]) + payload


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (bytes([0x82, 0x81]) + os.urandom(4) + b"A", 1002),  # masked by a server
        (_unmasked(0xC2, b"a"), 1002),  # RSV1 (compression) without the extension
        (_unmasked(0x81, b"text"), 1003),  # text: only binary is allowed
        (_unmasked(0x80, b"a"), 1002),  # continuation outside a message
        (_unmasked(0x83, b"a"), 1002),  # unknown data opcode
        (_unmasked(0x8B, b"a"), 1002),  # unknown control opcode
        (_unmasked(0x09, b"a"), 1002),  # a split PING
        (bytes([0x89, 126, 0, 126]) + b"a" * 126, 1002),  # a PING too long
        (_unmasked(0x88, b"\x03"), 1002),  # close of one byte
        (_unmasked(0x88, struct.pack("!H", 1006)), 1002),  # reserved close code
        (_unmasked(0x88, struct.pack("!H", 1000) + b"\xff"), 1007),  # reason not UTF-8
        (_unmasked(0x02, b"a") + _unmasked(0x82, b"b"), 1002),  # new message inside a split one
    ],
)
def test_the_servers_protocol_errors_name_their_close_code(wire: bytes, code: int) -> None:
    reader = ClientFrames(1000)
    reader.receive_data(wire)
    with pytest.raises(FrameError) as caught:
        _drain(reader)
    assert caught.value.code == code


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 1 << 20])
def test_the_agents_masked_frames_read_by_a_wsproto_server(size: int) -> None:
    keys = MaskKeys()
    server = _peer(agent_reads=True)
    payload = os.urandom(size)
    server.receive_data(
        frame(payload, key=keys.next())
        + frames.pong_frame(b"p", keys.next())
        + close_frame(4001, "why" * 60, keys.next())
    )
    events = list(server.events())
    received = b"".join(e.data for e in events if isinstance(e, BytesMessage))
    assert received == payload
    assert [e.payload for e in events if isinstance(e, Pong)] == [b"p"]
    (closed,) = [e for e in events if isinstance(e, CloseConnection)]
    assert (closed.code, closed.reason) == (4001, ("why" * 60)[:123])


def test_every_frame_gets_a_fresh_key_and_the_source_is_read_in_batches() -> None:
    keys = MaskKeys(batch=8)
    drawn = [keys.next() for _ in range(20)]
    assert all(len(key) == 4 for key in drawn)
    assert len(set(drawn)) == len(drawn), "a key is never reused"
    wire = [frame(b"same payload", key=key) for key in drawn[:2]]
    assert wire[0][2:6] == drawn[0]
    assert wire[0] != wire[1], "the same message masked differently each time"
