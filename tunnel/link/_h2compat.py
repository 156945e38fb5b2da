"""Every use of h2's, hpack's and hyperframe's private code, in one place.

Each piece reaches into code its library does not promise to keep, so each is
tied to a fix of :mod:`tunnel._compat`, which checks the installed version
against the ones verified and warns loudly when a fix is off:

* :data:`~tunnel._compat.H2_FRAME_READER`: :class:`H2Connection` copies h2 4's
  frame reader (less its per-frame trace log) and its GOAWAY handler (less the
  closing of its state machine), and shares one dispatch table between
  connections. Off, h2's own code runs, and :class:`H2Connection` tells the
  core when h2 closed itself on the peer's GOAWAY.
* :data:`~tunnel._compat.HPACK_CODEC`: :class:`H2Connection` encodes and
  decodes header blocks with :mod:`._hpack` (no dynamic table, no Huffman
  coding, cached) in place of h2's hpack encoder and decoder. Off, hpack's
  own run.
* :data:`~tunnel._compat.HYPERFRAME_REPR`: a frame repr that does not hex a
  whole DATA payload.

The rest (a cap on header blocks, a constant-time count of open streams, a
shorter memory of closed streams, settings and HPACK tables kept in lists) uses
h2 internals that every h2 4 release has; nothing here imports trio.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import hyperframe.frame
from hyperframe.exceptions import InvalidDataError as _InvalidData
from hyperframe.exceptions import InvalidFrameError as _InvalidFrame
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, RstStreamFrame

from .._compat import H2_BUFFERS, H2_FRAME_READER, HPACK_CODEC, HYPERFRAME_REPR
from ._abuse import AbuseCounters
from ._hpack import LinkDecoder, LinkEncoder
from ._state import MAX_HEADER_BLOCK, Phase

if TYPE_CHECKING:
    from h2._typing import Buffer

__all__ = ["OUTBOUND_BUFFER", "H2Connection", "compact_header_tables", "compact_settings"]


class _Core(Protocol):
    """What the connection reads and tells of its core (:class:`~._core.LinkCore`)."""

    phase: Phase
    abuse: AbuseCounters

    @property
    def streams(self) -> Mapping[int, object]: ...

    def peer_goaway_closed_h2(self) -> None: ...


# -- hyperframe ------------------------------------------------------------------


def _raw_data_repr(data: bytes | None) -> str:
    # hyperframe's own (hyperframe/frame.py, _raw_data_repr), but hexing only
    # the 10 bytes it shows: h2 formats every received frame for a trace log
    # whether or not anyone logs, and hexing a whole DATA payload for that
    # cost seconds of CPU per GiB received.
    if not data:
        return "None"
    shown = binascii.hexlify(data[:10]).decode("ascii")
    return "<hex:" + shown + ("..." if len(data) > 10 else "") + ">"


if hasattr(hyperframe.frame, "_raw_data_repr") and HYPERFRAME_REPR.on:
    hyperframe.frame._raw_data_repr = _raw_data_repr


# -- h2's settings and hpack's tables, stored compactly ---------------------------
#
# h2 keeps each setting's current value, and any values sent but not yet
# acknowledged, in a ``collections.deque``, and hpack its table entries too:
# hundreds of bytes each even when it holds one value. The server keeps one
# connection per agent, idle or not, so these deques were a large part of
# what an idle agent costs it (benchmarks/README.rst, idle agents). A list
# holding the same values does the same job at a tenth of the size: h2 only
# appends, reads the first value and pops it, on lists of one or two values.


class _Values(list[int]):
    """The deque methods h2's ``Settings`` uses, on a list."""

    __slots__ = ()

    def popleft(self) -> int:
        return self.pop(0)


def compact_settings(settings: h2.settings.Settings) -> h2.settings.Settings:
    """Store ``settings``' values in lists rather than deques; returns ``settings``."""
    # h2's private storage, of the same shape: setting -> values, current first.
    # A setting h2 adds later (one the peer sends that was not known) gets a
    # deque as before; that is rare and only costs the memory.
    compact: dict[h2.settings.SettingCodes | int, _Values] = {
        key: _Values(values) for key, values in settings._settings.items()
    }
    settings._settings = compact  # type: ignore[assignment]
    return settings


class _Entries(list[tuple[bytes, bytes]]):
    """The deque methods hpack's ``HeaderTable`` uses, on a list."""

    __slots__ = ()

    def appendleft(self, entry: tuple[bytes, bytes]) -> None:
        # An HPACK table holds at most a few dozen entries (4 KiB, 32 bytes of
        # overhead each), so shifting them is as cheap as a deque's append.
        self.insert(0, entry)


def compact_header_tables(*tables: object) -> None:
    """Store hpack ``HeaderTable`` entries in lists rather than deques."""
    for table in tables:
        entries = table.dynamic_entries  # type: ignore[attr-defined]
        table.dynamic_entries = _Entries(entries)  # type: ignore[attr-defined]


# -- h2's connection ----------------------------------------------------------------


#: Whether h2's buffers of bytes in and out are ours (:class:`_FrameBuffer`,
#: :class:`_Outbound`).
_H2_BUFFERS: Final = H2_BUFFERS.on
_EMPTY: Final = memoryview(b"")
_DATA_TYPE: Final = DataFrame.type
_PADDED: Final = 0x08
_END_STREAM: Final = 0x01
_HEADER: Final = struct.Struct("!HBBBL")


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, reading frames out of the bytes as they came.

    h2's own appends every read to one ``bytearray`` and copies each frame out
    of it twice more; with :data:`~tunnel._compat.H2_BUFFERS` on, this one keeps
    the reads as they are and copies a DATA payload once, into the bytes its
    event carries, even when the frame spans several reads. It also caps the
    bytes of one header block.
    """

    __slots__ = ("_pending", "_pending_size", "_position", "_view")

    def __init__(self, server: bool = False) -> None:
        super().__init__(server)
        #: What is not parsed yet: ``_view[_position:]``, then ``_pending``.
        self._view = _EMPTY
        self._position = 0
        #: Made when first needed (most connections never have a frame
        #: spanning reads, and an idle agent's costs the server memory).
        self._pending: list[memoryview | bytearray] | None = None
        self._pending_size = 0

    def add_data(self, data: Buffer) -> None:
        if not _H2_BUFFERS:
            super().add_data(data)
            return
        view = memoryview(data)
        if not view.readonly:
            # A caller's bytearray may change after this returns.
            view = memoryview(view.tobytes())
        if self._preamble_len:
            # h2's check of the client's preface (h2/frame_buffer.py, add_data).
            count = min(self._preamble_len, len(view))
            if self._preamble[:count] != view[:count]:
                raise h2.exceptions.ProtocolError("Invalid HTTP/2 preamble.")
            view = view[count:]
            self._preamble_len -= count
            self._preamble = self._preamble[count:]
        if not view:
            return
        if self._position >= len(self._view) and not self._pending_size:
            self._view = view
            self._position = 0
            return
        pending = self._pending
        if pending is None:
            pending = self._pending = []
        if len(view) >= _PAYLOAD_APART:
            pending.append(view)
        elif pending and type(pending[-1]) is bytearray:
            # Small reads are gathered, so that a peer sending a frame a few
            # bytes at a time cannot make a list entry of each.
            pending[-1] += view
        else:
            pending.append(bytearray(view))
        self._pending_size += len(view)

    def _next_piece(self) -> memoryview | bytearray:
        assert self._pending is not None
        piece = self._pending.pop(0)
        self._pending_size -= len(piece)
        return piece

    def _take(self, count: int, skip: int = 0) -> bytes:
        """The next ``count`` bytes after ``skip`` more, as one copy, consumed."""
        view = self._view
        start = self._position + skip
        end = start + count
        if end <= len(view):
            self._position = end
            return view[start:end].tobytes()
        parts: list[memoryview | bytearray] = [view[start:]]
        missing = end - len(view)
        while missing > 0:
            piece = self._next_piece()
            if len(piece) > missing:
                parts.append(memoryview(piece)[:missing])
                self._view = memoryview(piece)
                self._position = missing
                break
            parts.append(piece)
            missing -= len(piece)
        else:
            self._view = _EMPTY
            self._position = 0
            if self._pending_size:
                self._view = memoryview(self._next_piece())
        return b"".join(parts)

    def __next__(self) -> Frame:
        if not _H2_BUFFERS:
            return super().__next__()
        while True:
            frame = self._next_frame()
            if frame is None:
                raise StopIteration
            frame = self._update_header_buffer(frame)
            if frame is not None:
                return frame

    def _next_frame(self) -> Frame | None:
        available = len(self._view) - self._position + self._pending_size
        if available < 9:
            if not available:
                # Nothing left: let go of the last read's bytes.
                self._view = _EMPTY
                self._position = 0
                self._pending = None
            return None
        view = self._view
        position = self._position
        if position + 9 > len(view):
            # The header itself spans reads (rare): gather it into one view.
            head = bytearray(view[position:])
            while len(head) < 9:
                head += self._next_piece()
            view = self._view = memoryview(bytes(head))
            position = self._position = 0
        header = view[position : position + 9]
        try:
            frame, length = Frame.parse_frame_header(header)
        except (
            hyperframe.exceptions.InvalidDataError,
            hyperframe.exceptions.InvalidFrameError,
        ) as exc:
            raise h2.exceptions.ProtocolError(
                f"Received frame with invalid header: {exc!s}"
            ) from exc
        # Checked before the body arrives: an overlong frame is refused, not gathered.
        self._validate_frame_length(length)
        if available < 9 + length:
            return None
        if frame.type == _DATA_TYPE and not header[4] & _PADDED:
            # A plain DATA frame: its payload, copied once (hyperframe's
            # parse_body less the padding it does not have).
            data = self._take(length, skip=9)
            frame.data = data  # type: ignore[attr-defined]
            frame.body_len = length
            return frame
        if length:
            body = memoryview(self._take(length, skip=9))
        else:
            body = _EMPTY
            self._position = position + 9  # the header was gathered into _view
        try:
            frame.parse_body(body)
        except _InvalidData as exc:
            raise h2.exceptions.ProtocolError("Received frame with non-compliant data") from exc
        except _InvalidFrame as exc:
            raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid") from exc
        return frame

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        result = super()._update_header_buffer(f)
        if self._headers_buffer:
            size = sum(len(getattr(part, "data", b"")) for part in self._headers_buffer)
            if size > MAX_HEADER_BLOCK:
                raise h2.exceptions.ProtocolError(
                    f"a header block of more than {MAX_HEADER_BLOCK} bytes"
                )
        return result


#: A DATA payload at least this long is queued as it is, not copied into h2's
#: buffer; a shorter one costs less to copy than to keep apart.
_PAYLOAD_APART: Final = 4096


class _Outbound:
    """h2's buffer of bytes to send, keeping long DATA payloads as they were given.

    h2 serializes each frame and appends it to a ``bytearray`` that
    ``data_to_send()`` copies out again: a payload sent is copied five times
    before the transport's own copy. Here a long payload stays where it is,
    and :meth:`take` copies everything once, into messages of the size the
    transport takes. h2 itself only appends (``+=``) and asks the length.
    """

    __slots__ = ("_parts", "_size", "_tail")

    def __init__(self) -> None:
        #: Bytes queued, in order: ``_parts``, then ``_tail``. None until a
        #: payload is queued apart (an idle agent's costs the server memory).
        self._parts: list[bytes | bytearray | memoryview] | None = None
        self._tail = bytearray()
        self._size = 0

    def __iadd__(self, data: bytes | bytearray | memoryview) -> _Outbound:
        self._tail += data
        self._size += len(data)
        return self

    def __len__(self) -> int:
        return self._size

    def add_payload(self, header: bytes, payload: bytes | memoryview) -> None:
        """Queue a frame's ``header``, then its ``payload`` by reference."""
        tail = self._tail
        tail += header
        if self._parts is None:
            self._parts = []
        self._parts.append(tail)
        self._parts.append(payload)
        self._tail = bytearray()
        self._size += len(header) + len(payload)

    def take(self, limit: int) -> list[bytes]:
        """Everything queued, emptied, in pieces of at most ``limit`` bytes."""
        parts = self._parts or []
        parts.append(self._tail)
        self._parts = None
        self._tail = bytearray()
        size = self._size
        self._size = 0
        if size <= limit:
            return [b"".join(parts)] if size else []
        messages: list[bytes] = []
        message: list[bytes | bytearray | memoryview] = []
        room = limit
        for part in parts:
            while len(part) > room:
                view = memoryview(part)
                message.append(view[:room])
                messages.append(b"".join(message))
                message = []
                part = view[room:]
                room = limit
            if part:
                message.append(part)
                room -= len(part)
        if message:
            messages.append(b"".join(message))
        return messages


#: The name of h2's private buffer of bytes queued for ``data_to_send()``. The
#: core reads it with ``getattr`` on the hot path (a method here would cost a
#: Python call per received message and per acknowledgement), defaulting to
#: "something queued" should a release rename it.
OUTBOUND_BUFFER: Final = "_data_to_send"

#: Whether the installed h2 is one whose ``_receive_frame`` the copy in
#: :class:`H2Connection` follows.
_H2_RECEIVE_FRAME_VERIFIED: Final = H2_FRAME_READER.on
#: Whether the installed h2 uses its connection's encoder and decoder as
#: :mod:`._hpack`'s expect.
_HPACK_CODEC_VERIFIED: Final = HPACK_CODEC.on


class H2Connection(h2.connection.H2Connection):
    """h2's connection, told by the link core what h2 cannot know.

    h2 counts open streams by walking every stream on each new one, which made
    opening a stream slow with a thousand in flight; the core knows the number.
    """

    #: h2 remembers how each closed stream ended, so that a frame still in
    #: flight for it gets the right answer; by default the last 65,536, which
    #: weighs on every busy long-lived connection. Frames arrive at most a
    #: round trip late, when only a handful of streams have closed since.
    MAX_CLOSED_STREAMS = 4096

    #: Frame class -> h2's handler, shared by every connection (see __init__).
    _dispatch: ClassVar[dict[type[Frame], Callable[..., Any]] | None] = None

    def __init__(self, config: h2.config.H2Configuration, core: _Core) -> None:
        super().__init__(config)
        self._core_streams = core.streams
        self._core = core
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)
        if _H2_BUFFERS:
            self._data_to_send = _Outbound()  # type: ignore[assignment]
        if _HPACK_CODEC_VERIFIED:
            # h2 calls encoder.encode(headers) for each header block it
            # sends and sets encoder.header_table_size from the peer's
            # settings; it calls decoder.decode(block, raw=...) for each it
            # receives and sets the decoder's limits from ours.
            decoder = LinkDecoder(max_header_list_size=self.decoder.max_header_list_size)
            decoder.max_allowed_table_size = self.decoder.max_allowed_table_size
            self.decoder = decoder
            self.encoder = LinkEncoder()  # type: ignore[assignment]
            compact_header_tables(decoder.header_table)
        else:
            compact_header_tables(self.encoder.header_table, self.decoder.header_table)
        if _H2_RECEIVE_FRAME_VERIFIED:
            # h2 builds a table of a dozen bound methods per connection, kept
            # for every idle agent; one table of functions serves all.
            if H2Connection._dispatch is None:
                H2Connection._dispatch = {
                    frame: getattr(H2Connection, handler.__name__)
                    for frame, handler in self._frame_dispatch_table.items()
                }
            del self._frame_dispatch_table

    def messages_to_send(self, limit: int) -> list[bytes]:
        """Take what is queued to send, in pieces of at most ``limit`` bytes."""
        queued: object = self._data_to_send
        if isinstance(queued, _Outbound):
            return queued.take(limit)
        data = self.data_to_send()
        if len(data) <= limit:
            return [data] if data else []
        return [data[start : start + limit] for start in range(0, len(data), limit)]

    def data_to_send(self, amount: int | None = None) -> bytes:
        queued: object = self._data_to_send
        if amount is None and isinstance(queued, _Outbound):
            return b"".join(queued.take(len(queued) or 1))
        if isinstance(queued, _Outbound):
            self._data_to_send = bytearray(b"".join(queued.take(len(queued) or 1)))
        return super().data_to_send(amount)

    def clear_outbound_data_buffer(self) -> None:
        if _H2_BUFFERS:
            self._data_to_send = _Outbound()  # type: ignore[assignment]
        else:
            super().clear_outbound_data_buffer()

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        queued: object = self._data_to_send
        if not isinstance(queued, _Outbound):
            super()._prepare_for_sending(frames)
            return
        for frame in frames:
            if type(frame) is DataFrame and not frame.pad_length:
                # h2 keeps what it was given: bytes, or the link's memoryview
                # slices of them; anything writable is copied as before.
                payload: bytes | memoryview = frame.data
                if len(payload) >= _PAYLOAD_APART and (
                    type(payload) is bytes or (isinstance(payload, memoryview) and payload.readonly)
                ):
                    # hyperframe's DataFrame.serialize, less its copies.
                    length = len(payload)
                    flags = _END_STREAM if "END_STREAM" in frame.flags else 0
                    header = _HEADER.pack(
                        (length >> 8) & 0xFFFF, length & 0xFF, _DATA_TYPE, flags, frame.stream_id
                    )
                    queued.add_payload(header, payload)
                    continue
            queued += frame.serialize()

    def forget_stream(self, stream_id: int) -> None:
        """Drop a closed stream from h2's table, remembering how it closed.

        h2 finds closed streams by walking all of them on every new stream;
        dropping them as they close keeps that walk short.
        """
        h2_stream = self.streams.pop(stream_id, None)
        if h2_stream is not None:
            if h2_stream.closed:
                self._closed_streams[stream_id] = h2_stream.closed_by
            else:
                self.streams[stream_id] = h2_stream

    def clamp_header_table(self, limit: int) -> None:
        """Keep our encoder's HPACK table at ``limit`` bytes at most.

        h2 has just sized the table to what the peer allows. Any size up to
        that is ours to choose (RFC 7541 section 4.2); the peer learns of it
        from the size update the next header block starts with, so the one it
        would have heard of first is dropped.
        """
        encoder = self.encoder
        if isinstance(encoder, LinkEncoder):
            # It keeps no table and only ever shrinks the size it announces.
            encoder.header_table_size = min(encoder.header_table_size, limit)
        elif encoder.header_table_size > limit:
            encoder.header_table_size = limit
            encoder.table_size_changes = [
                size for size in encoder.table_size_changes if size <= limit
            ]

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        core = self._core
        if core.phase >= Phase.GOAWAY_SENT and not isinstance(frame, GoAwayFrame):
            # h2 refuses every frame but GOAWAY once it sent one (python-hyper/h2
            # issue 1181), and its ProtocolError would drop the events of the
            # frames before this one in the same read. What the peer sends now
            # (WINDOW_UPDATEs, PINGs crossing our GOAWAY) is for streams we gave
            # up on: drop it, and keep reading until the peer closes.
            return []
        # DATA for a stream the core does not know makes h2 queue an answer
        # (RST_STREAM) without telling us. Some arrive after any reset; a
        # flood of them is a peer making us queue answers it never reads.
        if isinstance(frame, DataFrame) and frame.stream_id not in self._core_streams:
            core.abuse.stray_frames.count()
        events: list[h2.events.Event]
        if not _H2_RECEIVE_FRAME_VERIFIED:
            events = super()._receive_frame(frame)
            if isinstance(frame, GoAwayFrame) and core.phase < Phase.GOAWAY_SENT:
                core.peer_goaway_closed_h2()
            return events
        # h2 4's own (h2/connection.py, H2Connection._receive_frame), less its
        # first line: a trace log of repr(frame), which formats every received
        # frame whether or not anyone logs, a few percent of the server's CPU.
        try:
            assert H2Connection._dispatch is not None
            frames, events = H2Connection._dispatch[frame.__class__](self, frame)
        except h2.exceptions.StreamClosedError as exc:
            if not self._stream_is_closed_by_reset(exc.stream_id):
                raise
            reset = RstStreamFrame(exc.stream_id)
            reset.error_code = exc.error_code
            self._prepare_for_sending([reset])
            events = exc._events
        except h2.exceptions.StreamIDTooLowError as exc:
            if self._stream_is_closed_by_reset(exc.stream_id):
                reset = RstStreamFrame(exc.stream_id)
                reset.error_code = h2.errors.ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([reset])
                events = []
            elif self._stream_is_closed_by_end(exc.stream_id):
                raise h2.exceptions.StreamClosedError(exc.stream_id) from exc
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events

    def _receive_goaway_frame(
        self, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        # h2 4's own, less two things. It closes its state machine, so the
        # streams the peer promised to finish (up to last_stream_id, RFC 9113
        # section 6.8) could neither receive nor acknowledge another frame; and
        # it drops what we queued and not yet wrote, the end of a response
        # among it. The core refuses new streams from here on by its phase.
        if not _H2_RECEIVE_FRAME_VERIFIED:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        if self._core.phase < Phase.GOAWAY_RECEIVED:
            self._core.phase = Phase.GOAWAY_RECEIVED
        return [], [event]

    def _open_streams(self, remainder: int) -> int:
        # All of one side's streams are opened by the same peer (one side
        # opens them all), so the core's count is the count for that side.
        return len(self._core_streams)
