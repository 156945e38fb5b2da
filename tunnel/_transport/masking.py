"""WebSocket masking in C, for tunnel's own framing and for wsproto.

A WebSocket client must mask every byte it sends (RFC 6455 section 5.3), so the
agent masks each byte of every response it relays and the server unmasks it
again: both in :mod:`.frames` with :data:`apply_mask`, or on the server
through wsproto where Hypercorn keeps the connection. wsproto does both in pure Python
(``bytes.translate`` over four strided slices): ~5 ms per MiB on the benchmark
machine, more than HTTP/2, the sockets and everything else a download costs.
The ``websockets`` package ships the same operation in C (``apply_mask``),
about 70 times faster; :func:`use_fast_masking` puts it in wsproto's place.

Frames are also built with fewer copies: wsproto copies each payload about
eight times on its way to the socket when masking (``bytearray`` conversions,
four strided slices, concatenations), four times when not, 10-15 % of the
agent's CPU in a download.

The swap is pinned to the wsproto versions whose masker it was checked against
(the masker's interface is private); on any other version, or where
``websockets`` has no compiled extension, wsproto's own masker stays.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from typing import Any, Final

import wsproto.frame_protocol
from wsproto.frame_protocol import FrameProtocol, Opcode

from .._compat import WSPROTO_MASKING

__all__ = ["FastMasker", "use_fast_masking"]

logger = logging.getLogger("tunnel")

_Mask = Callable[[bytes | bytearray | memoryview, bytes | bytearray], bytes]
apply_mask: _Mask | None
try:
    from websockets.speedups import apply_mask
except ImportError:  # a platform without a wheel, built without the extension
    apply_mask = None

#: wsproto versions whose ``XorMaskerSimple`` this replaces, checked by the tests.
_VERIFIED: Final = WSPROTO_MASKING.verified
_applied = False
#: wsproto's own masker, kept for the tests to compare against.
_ORIGINAL: Final = wsproto.frame_protocol.XorMaskerSimple


class FastMasker:
    """wsproto's ``XorMaskerSimple`` (wsproto/frame_protocol.py), with the XOR done in C.

    Like the original it masks a frame's payload piece by piece as it arrives,
    so the key is rotated by each piece's length for the next one.
    """

    __slots__ = ("_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytes:
        """Mask (or unmask: it is the same XOR) ``data``, the next piece of a payload."""
        assert apply_mask is not None
        masked: bytes = apply_mask(data, self._key)
        rotation = len(data) % 4
        if rotation:
            self._key = self._key[rotation:] + self._key[:rotation]
        return masked


_original_serialize_frame = FrameProtocol._serialize_frame


def _serialize_frame(
    self: FrameProtocol, opcode: Opcode, payload: bytes | bytearray = b"", fin: bool = True
) -> bytearray:
    # wsproto 1.2/1.3's FrameProtocol._serialize_frame (wsproto/frame_protocol.py)
    # without extensions (the agent's and the server's case, not a visitor's
    # compressed WebSocket), with the frame built in one copy of the payload
    # (two when masked).
    if self.extensions:
        return _original_serialize_frame(self, opcode, payload, fin)
    first = (0x80 if fin else 0) | opcode
    mask = 0x80 if self.client else 0
    length = len(payload)
    if length <= 125:
        header = struct.pack("!BB", first, mask | length)
    elif opcode.iscontrol():
        raise ValueError("payload too long for control frame")
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", first, mask | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask | 127, length)
    # bytes, not the bytearray wsproto makes: its callers add it to b"" or
    # send it as it is.
    if not self.client:
        return header + payload  # type: ignore[return-value]
    assert apply_mask is not None
    # A fresh key from a strong source for every frame (RFC 6455 section 5.3).
    key = os.urandom(4)
    return header + key + apply_mask(payload, key)  # type: ignore[return-value]


def use_fast_masking() -> bool:
    """Make wsproto mask and unmask in C, once per process; True if it does."""
    global _applied
    if _applied:
        current: Any = wsproto.frame_protocol.XorMaskerSimple
        return current is FastMasker
    _applied = True
    if apply_mask is None or not WSPROTO_MASKING.on:
        # An unverified wsproto is warned of by warn_fixes_off().
        logger.debug("WebSocket masking stays in pure Python")
        return False
    # wsproto looks the class up by name each time it makes a masker (one per
    # frame, sending and receiving), so replacing the name is enough.
    wsproto.frame_protocol.XorMaskerSimple = FastMasker  # type: ignore[misc,assignment]
    FrameProtocol._serialize_frame = _serialize_frame  # type: ignore[method-assign]
    return True
