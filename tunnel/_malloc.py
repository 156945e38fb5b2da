"""Freed large buffers kept for reuse, not handed back to the kernel at once.

Every MiB relayed passes through buffers of 64 KiB to 1 MiB: socket reads, and
the h11, h2 and WebSocket frames built from them. glibc serves buffers above
its mmap threshold (128 KiB at first, raised as such buffers are freed) from
fresh mappings, and returns the top of its heap to the kernel whenever more
than twice that is free, so many buffers come back zero-filled, one page fault
per 4 KiB (benchmarks/README.rst, "glibc keeps freed large buffers", has what
that costs).

A process-wide setting, so only the ``tunnel`` command makes it; a program that
embeds the server or the agent may call :func:`keep_freed_buffers` itself.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Final

__all__ = ["keep_freed_buffers", "keeping_freed_buffers"]

_kept = False

_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
#: Buffers up to this size come from the heap, not from mappings of their own.
MMAP_THRESHOLD: Final = 8 << 20
#: Free memory kept at the top of the heap: what RSS may stay above the live
#: data after a burst of transfers.
TRIM_THRESHOLD: Final = 32 << 20


def keep_freed_buffers() -> bool:
    """Tune glibc's allocator as above; False where there is no glibc ``mallopt``."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl's is a stub that returns 0.
    global _kept
    _kept = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _kept


def keeping_freed_buffers() -> bool:
    """Whether :func:`keep_freed_buffers` tuned this process (server workers follow it)."""
    return _kept
