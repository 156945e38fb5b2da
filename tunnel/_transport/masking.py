"""WebSocket masking in C for wsproto, which both ends of the agent's connection use.

A WebSocket client must mask every byte it sends (RFC 6455 section 5.3), so the
agent masks each byte of every response it relays and the server (Hypercorn,
through wsproto) unmasks it again. wsproto does both in pure Python
(``bytes.translate`` over four strided slices): ~5 ms per MiB on the benchmark
machine, more than HTTP/2, the sockets and everything else a download costs.
The ``websockets`` package ships the same operation in C (``apply_mask``),
about 70 times faster; :func:`use_fast_masking` puts it in wsproto's place.

The swap is pinned to the wsproto versions whose masker it was checked against
(the masker's interface is private); on any other version, or where
``websockets`` has no compiled extension, wsproto's own masker stays.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any, Final

import wsproto.frame_protocol

__all__ = ["FastMasker", "use_fast_masking"]

logger = logging.getLogger("tunnel")

_Mask = Callable[[bytes | bytearray | memoryview, bytes | bytearray], bytes]
apply_mask: _Mask | None
try:
    from websockets.speedups import apply_mask
except ImportError:  # a platform without a wheel, built without the extension
    apply_mask = None

#: wsproto versions whose ``XorMaskerSimple`` this replaces, checked by the tests.
_VERIFIED: Final = ("1.2.", "1.3.")
_applied = False
#: wsproto's own masker, kept for the tests to compare against.
_ORIGINAL: Final = wsproto.frame_protocol.XorMaskerSimple


class FastMasker:
    """wsproto's ``XorMaskerSimple``, with the XOR done in C.

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


def use_fast_masking() -> bool:
    """Make wsproto mask and unmask in C, once per process; True if it does."""
    global _applied
    if _applied:
        current: Any = wsproto.frame_protocol.XorMaskerSimple
        return current is FastMasker
    _applied = True
    version = importlib.metadata.version("wsproto")
    if apply_mask is None or not version.startswith(_VERIFIED):
        logger.debug("wsproto %s: WebSocket masking stays in pure Python", version)
        return False
    # wsproto looks the class up by name each time it makes a masker (one per
    # frame, sending and receiving), so replacing the name is enough.
    wsproto.frame_protocol.XorMaskerSimple = FastMasker  # type: ignore[misc,assignment]
    return True
