"""The link's shared vocabulary: who opens streams, the phases of a connection, limits.

Everything here is plain data; the modules of the link that decide
(:mod:`._core`) and those that wait (:mod:`._trio`) both use it.
"""

from __future__ import annotations

import enum
from typing import Final

import h2.errors

__all__ = [
    "CONNECTION_WINDOW",
    "KEEPALIVE_BUSY_PERIODS",
    "MAX_FRAME",
    "MAX_HEADER_BLOCK",
    "MAX_HEADER_TABLE",
    "MAX_MESSAGE",
    "MIN_USEFUL_WINDOW_UPDATE",
    "OUTBOUND_HIGH_WATER",
    "POLICY_VIOLATION_CLOSE",
    "PROTOCOL_ERROR_CLOSE",
    "RECEIVE_SLICE",
    "STREAM_WINDOW",
    "Phase",
    "Role",
    "StreamError",
]

#: Largest WebSocket message sent; Hypercorn accepts 16 MiB by default.
MAX_MESSAGE: Final = 1 << 20
#: Producers wait while more than this is queued for the writer.
OUTBOUND_HIGH_WATER: Final = 4 << 20
#: What the peer may send on all streams together before we acknowledge.
CONNECTION_WINDOW: Final = 16 << 20
#: What the peer may send on one stream. The connection window above bounds
#: what all streams hold together, so this only decides how much of it one
#: transfer may use; a small one held single downloads well below what the
#: connection carries (benchmarks/README.rst, "Stream window").
STREAM_WINDOW: Final = 8 << 20
MAX_FRAME: Final = 1 << 20
#: Received messages are fed to h2 this much at a time.
RECEIVE_SLICE: Final = 256 << 10
#: The most header-block bytes (HEADERS plus CONTINUATION) taken for one
#: request or response; h2 alone would buffer 64 frames of MAX_FRAME each.
MAX_HEADER_BLOCK: Final = 256 << 10
#: h2 never opens a window by less (it waits for 1 KiB acknowledged); an
#: update of a few bytes only makes us wake every waiting stream to send them.
MIN_USEFUL_WINDOW_UPDATE: Final = 1024
#: The HPACK table our encoder keeps for the peer, whatever larger size it
#: announces (SETTINGS_HEADER_TABLE_SIZE): HTTP/2's default. A larger table
#: saves a few bytes per request and costs memory per connection; a peer
#: announcing a gigabyte would make us keep every header we ever sent.
MAX_HEADER_TABLE: Final = 4096
#: Extra keepalive timeouts a PING's answer may take while the peer keeps
#: sending: 4 more of 15 s by default, so a minute and a quarter in all.
KEEPALIVE_BUSY_PERIODS: Final = 4

#: WebSocket close codes (RFC 6455) for a peer that broke the rules.
PROTOCOL_ERROR_CLOSE: Final = 1002
POLICY_VIOLATION_CLOSE: Final = 1008


class Role(enum.Enum):
    """What one end of a link does with streams."""

    #: Opens streams and sends requests on them: the HTTP/2 client. The
    #: server's end of an agent's link, and the agent's link to a local
    #: HTTP/2 service.
    OPENER = "opener"
    #: Answers the streams the peer opens: the HTTP/2 server. The agent's end
    #: of its link to the server.
    ANSWERER = "answerer"


class Phase(enum.IntEnum):
    """Where a connection is in its life; it only ever moves forward."""

    #: Streams open and flow both ways.
    OPEN = 0
    #: We take no new streams (the answerer told the peer so with
    #: SETTINGS_MAX_CONCURRENT_STREAMS = 0); open ones finish.
    DRAINING = 1
    #: The peer's GOAWAY arrived: no new streams. Ours up to its last stream
    #: ID finish, and h2 still sends for them (see ``H2Connection``).
    GOAWAY_RECEIVED = 2
    #: We sent GOAWAY: h2 sends nothing more but another GOAWAY, and what the
    #: peer still sends is dropped unread.
    GOAWAY_SENT = 3
    #: The connection has ended; ``closed_reason`` says why.
    CLOSED = 4


class StreamError(Exception):
    """The stream was reset by the peer, or the whole connection ended."""

    def __init__(self, reason: str, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
