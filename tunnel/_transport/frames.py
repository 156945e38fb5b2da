"""WebSocket framing for both ends of an agent's connection, sans-IO.

Everything that decides what the peer's bytes mean lives here: bytes in
(:meth:`Frames.receive_data`), events out (:meth:`Frames.next_event`), frames
to send built by :func:`frame`. No I/O and no trio, so the rules are tested
with bytes alone. The server reads the agent's frames with
:class:`ServerFrames` (a client masks every frame), the agent the server's with
:class:`ClientFrames` (a server never does).

Only what the agent's link needs (RFC 6455 without extensions): binary
messages, fragmented or not; PING, PONG and CLOSE. A text message, an
extension bit, a frame masked the wrong way or a malformed close is the
peer's protocol error, raised as :class:`FrameError` with the close code to
answer with. A message over ``max_message`` is refused as soon as its length
is known, before its payload is read.

Why not wsproto: its parser costs more than the HTTP/2 inside each message
(generators, an event object per frame, a bytearray copied on every read).
Here a read that holds one whole frame, the usual case, is unmasked in C in
one copy and costs no other allocation.
"""

from __future__ import annotations

import os
import struct
from typing import Final

from . import masking

__all__ = [
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NO_STATUS",
    "CLOSE_PROTOCOL_ERROR",
    "ClientFrames",
    "Close",
    "FrameError",
    "Frames",
    "MaskKeys",
    "Ping",
    "Pong",
    "ServerFrames",
    "close_frame",
    "frame",
    "pong_frame",
]

CLOSE_NO_STATUS: Final = 1005
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_INVALID_DATA: Final = 1007
CLOSE_MESSAGE_TOO_BIG: Final = 1009

_CONTINUATION: Final = 0x0
_TEXT: Final = 0x1
_BINARY: Final = 0x2
_CLOSE: Final = 0x8
_PING: Final = 0x9
_PONG: Final = 0xA

# Close codes a peer may send (RFC 6455 section 7.4); 1004-1006 and 1015 are
# reserved for reporting, never for the wire.
_SENDABLE_CODES: Final = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011))


def _unmask_python(data: bytes | memoryview, key: bytes) -> bytes:
    # Where ``websockets`` has no compiled extension: one XOR of two big ints.
    size = len(data)
    mask = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "little") ^ int.from_bytes(mask, "little")).to_bytes(
        size, "little"
    )


_unmask: Final = masking.apply_mask or _unmask_python


class FrameError(Exception):
    """The peer broke the WebSocket protocol; answer with a close of ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Ping:
    """A PING; answer with a PONG of the same payload."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class Pong:
    """A PONG (unsolicited or an answer); nothing to do."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class Close:
    """The peer's CLOSE: its code (1005 when it gave none) and reason."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


Event = bytes | Ping | Pong | Close


class Frames:
    """One end's reading of its peer's frames: complete binary messages and controls.

    Args:
        max_message: The largest message accepted, in bytes.
        masked: Whether the peer masks its frames: a client must, a server
            must not (RFC 6455 section 5.1).
    """

    __slots__ = (
        "_buffer",
        "_masked",
        "_max_message",
        "_missing",
        "_parts",
        "_pending",
        "_position",
        "_size",
    )

    def __init__(self, max_message: int, *, masked: bool) -> None:
        self._max_message = max_message
        self._masked = masked
        #: Received bytes not parsed yet, from ``_position`` on.
        self._buffer: bytes = b""
        self._position = 0
        #: Reads gathered for a frame longer than what has arrived, and how
        #: many bytes it still lacks: joined once, when it is complete, not
        #: copied again on every read.
        self._pending: list[bytes] = []
        self._missing = 0
        #: The pieces of a fragmented message so far (None outside one).
        self._parts: list[bytes] | None = None
        self._size = 0

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the connection."""
        if self._missing:
            self._pending.append(data)
            self._missing -= len(data)
            if self._missing > 0:
                return
            self._missing = 0
            self._buffer = b"".join([self._buffer[self._position :], *self._pending])
            self._pending = []
        elif self._position >= len(self._buffer):
            # All parsed: the usual case, and no copy.
            self._buffer = data
        else:
            self._buffer = self._buffer[self._position :] + data
        self._position = 0

    def next_event(self) -> Event | None:
        """The next complete message (as bytes) or control frame; None until more arrives.

        Raises:
            FrameError: The peer broke the protocol; nothing more can be read.
        """
        while True:
            if self._missing:
                return None
            buffer = self._buffer
            position = self._position
            available = len(buffer) - position
            if available < 2:
                return None
            first = buffer[position]
            second = buffer[position + 1]
            length = second & 0x7F
            masked = self._masked
            start = position + (6 if masked else 2)  # two bytes, then any mask
            if length == 126:
                if available < 4:
                    return None
                (length,) = struct.unpack_from("!H", buffer, position + 2)
                start += 2
            elif length == 127:
                if available < 10:
                    return None
                (length,) = struct.unpack_from("!Q", buffer, position + 2)
                start += 8
            opcode = first & 0x0F
            fin = first & 0x80
            if first & 0x70:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "a reserved bit is set (no extension)")
            if bool(second & 0x80) is not masked:
                raise FrameError(
                    CLOSE_PROTOCOL_ERROR,
                    "a client frame without a mask" if masked else "a server frame with a mask",
                )
            if opcode >= _CLOSE:
                if length > 125 or not fin:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "a control frame too long or split")
            elif self._size + length > self._max_message:
                # Refused on the header alone: the payload is never buffered.
                raise FrameError(
                    CLOSE_MESSAGE_TOO_BIG,
                    f"message over {self._max_message} bytes",
                )
            end = start + length
            if end > len(buffer):
                self._missing = end - len(buffer)
                return None
            payload: bytes
            if not length:
                payload = b""
            elif masked:
                payload = _unmask(memoryview(buffer)[start:end], buffer[start - 4 : start])
            else:
                payload = buffer[start:end]
            if end == len(buffer):
                # Nothing left: an idle peer holds no buffer (up to a read's
                # size) until its next message.
                self._buffer = b""
                self._position = 0
            else:
                self._position = end
            if opcode in (_BINARY, _CONTINUATION):
                parts = self._parts
                if opcode == _BINARY:
                    if parts is not None:
                        raise FrameError(CLOSE_PROTOCOL_ERROR, "a new message inside a split one")
                    if fin:
                        return payload
                    self._parts = [payload]
                    self._size = length
                    continue
                if parts is None:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "a continuation outside a message")
                parts.append(payload)
                self._size += length
                if fin:
                    self._parts = None
                    self._size = 0
                    return b"".join(parts)
                continue
            if opcode == _PING:
                return Ping(payload)
            if opcode == _PONG:
                return Pong(payload)
            if opcode == _CLOSE:
                return _parse_close(payload)
            if opcode == _TEXT:
                raise FrameError(CLOSE_UNSUPPORTED_DATA, "a text message; only binary is allowed")
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"an unknown opcode {opcode:#x}")


class ServerFrames(Frames):
    """The server's reading of an agent's frames, which must all be masked.

    Args:
        max_message: The largest message accepted, in bytes.
    """

    __slots__ = ()

    def __init__(self, max_message: int) -> None:
        super().__init__(max_message, masked=True)


class ClientFrames(Frames):
    """The agent's reading of the server's frames, which must not be masked.

    Args:
        max_message: The largest message accepted, in bytes.
    """

    __slots__ = ()

    def __init__(self, max_message: int) -> None:
        super().__init__(max_message, masked=False)


class MaskKeys:
    """Fresh masking keys for a client's frames, from a strong random source.

    RFC 6455 section 5.3 asks for a new unpredictable key per frame. They are
    cut from one larger read of ``os.urandom``, not read one by one: a system
    call per frame the agent sends would cost more than masking the frame.

    Args:
        batch: How many keys each read of the random source provides.
    """

    __slots__ = ("_batch", "_keys", "_position")

    def __init__(self, batch: int = 1024) -> None:
        self._batch = batch
        self._keys = b""
        self._position = 0

    def next(self) -> bytes:
        """A 4-byte key no frame used before."""
        position = self._position
        if position >= len(self._keys):
            self._keys = os.urandom(4 * self._batch)
            position = 0
        self._position = position + 4
        return self._keys[position : position + 4]


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return Close(CLOSE_NO_STATUS, "")
    if len(payload) == 1:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "a close frame of one byte")
    (code,) = struct.unpack_from("!H", payload)
    if code not in _SENDABLE_CODES and not 3000 <= code <= 4999:
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"an invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, "a close reason that is not UTF-8") from None
    return Close(code, reason)


def frame(payload: bytes, opcode: int = _BINARY, key: bytes | None = None) -> bytes:
    """One frame of ``payload``, whole (FIN set).

    Args:
        payload: What the frame carries.
        opcode: The frame's kind; a binary message's by default.
        key: The client's masking key for this frame (from :class:`MaskKeys`);
            None for the server's frames, which are never masked.
    """
    length = len(payload)
    mask = 0 if key is None else 0x80
    if length <= 125:
        header = struct.pack("!BB", 0x80 | opcode, mask | length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", 0x80 | opcode, mask | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, mask | 127, length)
    if key is None:
        return header + payload
    return header + key + (_unmask(payload, key) if length else b"")


def pong_frame(payload: bytes, key: bytes | None = None) -> bytes:
    """The answer to a PING of ``payload`` (masked with ``key``, if given)."""
    return frame(payload, _PONG, key)


def close_frame(code: int, reason: str = "", key: bytes | None = None) -> bytes:
    """A CLOSE with ``code`` and ``reason`` (cut to fit: 123 bytes of UTF-8).

    Masked with ``key``, if given.
    """
    if code == CLOSE_NO_STATUS:
        return frame(b"", _CLOSE, key)
    text = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return frame(struct.pack("!H", code) + text, _CLOSE, key)
