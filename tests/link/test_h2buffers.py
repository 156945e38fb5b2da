"""h2's buffers in and out of the link: the same frames as h2's own, with fewer copies.

The link's frame buffer must read exactly the frames h2's own reads, however the
bytes are split; the queue of bytes to send must send exactly what h2 would, in
messages no longer than the transport takes.
"""

from __future__ import annotations

import itertools

import h2.config
import h2.connection
import h2.exceptions
import h2.frame_buffer
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel._compat import H2_BUFFERS
from tunnel.link._h2compat import _FrameBuffer, _Outbound

pytestmark = pytest.mark.skipif(not H2_BUFFERS.on, reason="the fix is off for this h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frames() -> list[Frame]:
    settings_frame = SettingsFrame(0, settings={SettingsFrame.MAX_FRAME_SIZE: 1 << 20})
    ack = SettingsFrame(0, flags=["ACK"])
    headers = HeadersFrame(1, data=b"\x82\x86\x84", flags=[])
    continuation = ContinuationFrame(1, data=b"\x41\x03abc", flags=["END_HEADERS"])
    plain = DataFrame(1, data=bytes(range(256)) * 300)
    padded = DataFrame(1, data=b"padded", flags=["PADDED"])
    padded.pad_length = 7
    empty_end = DataFrame(1, data=b"", flags=["END_STREAM"])
    ping = PingFrame(0, opaque_data=b"12345678")
    return [settings_frame, ack, headers, continuation, plain, padded, ping, empty_end]


WIRE = b"".join(frame.serialize() for frame in _frames())


def _read(buffer: h2.frame_buffer.FrameBuffer, pieces: list[bytes]) -> list[str]:
    """Feed ``pieces`` one by one; the frames read, described."""
    buffer.max_frame_size = 1 << 20
    read: list[str] = []
    for piece in pieces:
        buffer.add_data(piece)
        for frame in buffer:
            data = getattr(frame, "data", b"")
            read.append(f"{frame!r} {bytes(data)!r} {type(data).__name__}")
    return read


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


EXPECTED = _read(h2.frame_buffer.FrameBuffer(), [WIRE])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(WIRE)), max_size=12))
def test_frames_read_the_same_as_h2s_however_the_bytes_are_split(cuts: list[int]) -> None:
    assert _read(_FrameBuffer(), _split(WIRE, cuts)) == EXPECTED


def test_frames_read_the_same_byte_by_byte_and_with_the_preface() -> None:
    pieces = [WIRE[i : i + 1] for i in range(len(WIRE))]
    assert _read(_FrameBuffer(), pieces) == EXPECTED
    wire = PREFACE + WIRE
    assert _read(_FrameBuffer(server=True), _split(wire, [3, 30, 40, 500])) == EXPECTED


def test_a_wrong_preface_is_a_protocol_error() -> None:
    with pytest.raises(h2.exceptions.ProtocolError, match="preamble"):
        _FrameBuffer(server=True).add_data(b"GET / HTTP/1.1\r\n")


def test_an_overlong_frame_is_refused_from_its_header_alone() -> None:
    buffer = _FrameBuffer()
    buffer.max_frame_size = 16384
    header = DataFrame(1, data=b"x" * 20000).serialize()[:9]
    buffer.add_data(header)
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        next(buffer)


def test_a_writable_buffer_is_copied_when_added() -> None:
    wire = bytearray(DataFrame(1, data=b"a" * 10000).serialize())
    buffer = _FrameBuffer()
    buffer.max_frame_size = 1 << 20
    buffer.add_data(wire)
    wire[10:20] = b"b" * 10  # the caller's array changes after add_data
    (frame,) = list(buffer)
    assert frame.data == b"a" * 10000


def test_nothing_of_a_read_is_kept_once_every_frame_in_it_is_read() -> None:
    buffer = _FrameBuffer()
    buffer.max_frame_size = 1 << 20
    buffer.add_data(WIRE)
    assert len(list(buffer)) == len(EXPECTED)
    assert len(buffer._view) == 0
    assert not buffer._pending


def _h2_pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    ours = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    theirs = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    for conn in (ours, theirs):
        conn.initiate_connection()
        conn.update_settings({SettingsFrame.MAX_FRAME_SIZE: 1 << 20})
        conn.max_outbound_frame_size = 1 << 20
    return ours, theirs


@pytest.mark.parametrize("limit", [1 << 20, 10000, 4097, 100])
def test_the_queue_sends_what_h2_would_in_messages_no_longer_than_the_limit(limit: int) -> None:
    frames = [
        DataFrame(1, data=b"s" * 10),
        DataFrame(3, data=b"L" * 300000, flags=["END_STREAM"]),
        PingFrame(0, opaque_data=b"abcdefgh"),
        DataFrame(5, data=memoryview(b"v" * 70000)[5:60005]),
        DataFrame(7, data=b"t" * 5000),
    ]
    expected = b"".join(frame.serialize() for frame in frames)
    queue = _Outbound()
    queue += b"head"
    for frame in frames:
        if isinstance(frame, DataFrame) and len(frame.data) >= 4096:
            queue.add_payload(frame.serialize()[:9], frame.data)
        else:
            queue += frame.serialize()
    assert len(queue) == len(expected) + 4
    messages = queue.take(limit)
    assert b"".join(messages) == b"head" + expected
    assert all(0 < len(message) <= limit for message in messages)
    assert len(queue) == 0
    assert queue.take(limit) == []


def test_the_connection_queues_long_payloads_by_reference_and_copies_writable_ones() -> None:
    from tunnel.link._h2compat import H2Connection

    class Core:
        phase = 0
        abuse = None

        def __init__(self) -> None:
            self.streams: dict[int, object] = {}

        def peer_goaway_closed_h2(self) -> None:
            raise AssertionError

    conn = H2Connection(h2.config.H2Configuration(client_side=True), Core())  # type: ignore[arg-type]
    conn.initiate_connection()
    conn.data_to_send()
    conn.send_headers(
        1, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")]
    )
    payload = b"p" * 8000
    writable = bytearray(b"w" * 8000)
    conn.send_data(1, payload)
    conn.send_data(1, writable, end_stream=True)
    writable[:] = b"X" * 8000  # after it was queued
    queued = conn._data_to_send
    assert isinstance(queued, _Outbound)
    assert any(part is payload for part in queued._parts)
    (message,) = conn.messages_to_send(1 << 20)
    assert message.count(b"p" * 8000) == 1
    assert message.count(b"w" * 8000) == 1
    assert b"X" not in message


def test_a_frame_sent_a_few_bytes_at_a_time_is_gathered_not_listed() -> None:
    wire = DataFrame(1, data=b"d" * 100000).serialize()
    buffer = _FrameBuffer()
    buffer.max_frame_size = 1 << 20
    frames = []
    for start in range(0, len(wire), 3):
        buffer.add_data(wire[start : start + 3])
        assert buffer._pending is None or len(buffer._pending) <= 1
        frames += list(buffer)
    assert [frame.data for frame in frames] == [b"d" * 100000]
