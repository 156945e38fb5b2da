"""Every fix tunnel makes to a dependency's private code, and whether it is on.

Each fix replaces or reaches into code that its dependency does not promise to
keep, so each is checked against the versions it was verified on (the
``verified`` prefixes below) and stays off on any other: a guess at someone
else's internals is worse than going without. pyproject.toml caps each of
these dependencies at the newest version verified; a fix that is off anyway
(someone installed past the cap) is logged as a WARNING by
:func:`warn_fixes_off`, one line per fix, when a server app or an agent is
created, since some are all that stands between a visitor and a crash.

To verify a new release: run the tests named in each fix's module with it,
add its prefix here, and raise the cap in pyproject.toml.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Final

__all__ = [
    "FIXES",
    "H2_BUFFERS",
    "H2_FRAME_READER",
    "HPACK_CODEC",
    "HYPERCORN_DISCONNECT_NOTICE",
    "HYPERCORN_FIXES",
    "HYPERCORN_GUARD",
    "HYPERCORN_HEAD_WITH_BODY",
    "HYPERCORN_TAKEOVER",
    "HYPERFRAME_REPR",
    "WSPROTO_MASKING",
    "Fix",
    "installed",
    "warn_fixes_off",
]

logger = logging.getLogger("tunnel")


def installed(package: str) -> str:
    """The installed version of ``package``; "" when it cannot be told."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


@dataclass(frozen=True)
class Fix:
    """One change to a dependency's private code."""

    #: What it does, for the warning when it is off.
    what: str
    #: The distribution whose code it changes.
    package: str
    #: Version prefixes it was verified on, such as ``("0.17.", "0.18.")``.
    verified: tuple[str, ...]

    @property
    def on(self) -> bool:
        """Whether the installed version is one this fix was verified on."""
        version = installed(self.package)
        return bool(version) and version.startswith(self.verified)


HYPERCORN_GUARD: Final = Fix(
    "the guard that keeps one HTTP connection's failure (such as a visitor "
    "leaving mid-response) from stopping the server (tunnel/server/hypercorn/_guard.py)",
    "hypercorn",
    ("0.17.", "0.18."),
)
#: The fixes of tunnel/server/hypercorn/_patches/, on or off together.
HYPERCORN_FIXES: Final = Fix(
    "Hypercorn's HTTP/2 fixes (late DATA, PRIORITY floods, requests without "
    ":path), WebSocket close codes and message buffers, and 256 KiB reads "
    "(tunnel/server/hypercorn/_patches/)",
    "hypercorn",
    ("0.17.", "0.18."),
)
HYPERCORN_DISCONNECT_NOTICE: Final = Fix(
    "the visitor-left notice that saves a task per request "
    "(tunnel/server/hypercorn/_patches/disconnect_notice.py)",
    "hypercorn",
    # spawn_app and _handle are the same in 0.17.0 to 0.18.0 but for typing.
    ("0.17.", "0.18."),
)
HYPERCORN_TAKEOVER: Final = Fix(
    "the server's own reading and writing of agents' connections, without Hypercorn's "
    "WebSocket stack (tunnel/server/hypercorn/_takeover.py)",
    "hypercorn",
    # _read_data, WSStream._accept and H11WSConnection as in 0.18.0.
    ("0.18.",),
)
HYPERCORN_HEAD_WITH_BODY: Final = Fix(
    "the HTTP/1.1 response head written with its first body chunk, in one system call "
    "(tunnel/server/hypercorn/_patches/response_head.py)",
    "hypercorn",
    # H11Protocol._send_h11_event and HTTPStream.app_send as in 0.18.0.
    ("0.18.",),
)
H2_BUFFERS: Final = Fix(
    "h2's buffers of bytes in and out without copying DATA payloads (tunnel/link/_h2compat.py)",
    "h2",
    # FrameBuffer's preamble and header-block state, _prepare_for_sending and
    # _data_to_send as in h2 4.1 to 4.4.
    ("4.",),
)
H2_FRAME_READER: Final = Fix(
    "the copy of h2's frame reader without its per-frame trace log (tunnel/link/_h2compat.py)",
    "h2",
    ("4.",),
)
HPACK_CODEC: Final = Fix(
    "the link's HPACK encoder without a dynamic table and its decoder of such blocks "
    "(tunnel/link/_hpack.py)",
    "h2",
    # What h2 4 uses of its connection's encoder (encode() and
    # header_table_size) and decoder (decode(data, raw=True) and its limits).
    ("4.",),
)
HYPERFRAME_REPR: Final = Fix(
    "the short frame repr that saves hexing whole DATA payloads (tunnel/link/_h2compat.py)",
    "hyperframe",
    ("6.",),
)
WSPROTO_MASKING: Final = Fix(
    "WebSocket masking in C (tunnel/_transport/masking.py)",
    "wsproto",
    ("1.2.", "1.3."),
)

FIXES: Final = (
    HYPERCORN_GUARD,
    HYPERCORN_FIXES,
    HYPERCORN_DISCONNECT_NOTICE,
    HYPERCORN_TAKEOVER,
    HYPERCORN_HEAD_WITH_BODY,
    H2_BUFFERS,
    H2_FRAME_READER,
    HPACK_CODEC,
    HYPERFRAME_REPR,
    WSPROTO_MASKING,
)

_warned: set[Fix] = set()


def warn_fixes_off() -> list[Fix]:
    """Log a WARNING for each fix that is off, once per process; returns those off."""
    off = [fix for fix in FIXES if not fix.on]
    for fix in off:
        if fix in _warned:
            continue
        _warned.add(fix)
        verified = ", ".join(prefix.rstrip(".") for prefix in fix.verified)
        logger.warning(
            "%s %s was not verified with tunnel (only %s): off is %s; install a verified %s",
            fix.package,
            installed(fix.package) or "(version unknown)",
            verified,
            fix.what,
            fix.package,
        )
    return off
