"""gRPC's rules for an HTTP proxy: what marks a call, how its status travels.

A gRPC call is an HTTP/2 request whose ``Content-Type`` starts with
``application/grpc``. Its outcome is the ``grpc-status`` (and ``grpc-message``)
in the response's trailers, or in the headers of a trailers-only response
(HEADERS with END_STREAM). A proxy that cannot deliver the call's end says so
in the same words, so the client sees a gRPC status rather than a broken stream
(https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable
from enum import IntEnum

import h2.errors

from .headers import Headers, header_value

__all__ = [
    "GrpcStatus",
    "is_grpc",
    "split_trailers_only",
    "status_for_reset",
    "status_trailers",
]


class GrpcStatus(IntEnum):
    """The gRPC status codes a proxy itself reports."""

    CANCELLED = 1
    INTERNAL = 13
    UNAVAILABLE = 14
    RESOURCE_EXHAUSTED = 8
    PERMISSION_DENIED = 7


def is_grpc(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request or response is gRPC, by its ``Content-Type``.

    ``application/grpc``, ``application/grpc+proto``, ... but not gRPC-Web
    (``application/grpc-web...``), which carries its trailers in the body for
    browsers that cannot read HTTP trailers.
    """
    content_type = header_value(headers, b"content-type")
    if content_type is None:
        return False
    return content_type == b"application/grpc" or content_type.startswith(
        (b"application/grpc+", b"application/grpc;")
    )


#: Response headers that belong to the HTTP response itself, not to the call's
#: trailing metadata, when a trailers-only answer is split in two.
_LEADING = frozenset({b"content-type"})


def split_trailers_only(headers: Iterable[tuple[bytes, bytes]]) -> tuple[Headers, Headers]:
    """Split a trailers-only response's headers into headers and trailers.

    ASGI servers cannot send HEADERS with END_STREAM and a status other than the
    response's own, so a trailers-only answer travels as headers (the
    ``Content-Type``) then trailers (``grpc-status``, ``grpc-message`` and the
    trailing metadata): what gRPC clients read as the very same outcome.
    """
    leading: Headers = []
    trailing: Headers = []
    for key, value in headers:
        (leading if key in _LEADING else trailing).append((key, value))
    return leading, trailing


def status_for_reset(code: int, *, connection_lost: bool) -> GrpcStatus:
    """The status a gRPC client derives from ``RST_STREAM(code)``.

    gRPC's own table (PROTOCOL-HTTP2.md, "Errors"); a lost agent connection is
    UNAVAILABLE, as the client would call a dropped connection.
    """
    if connection_lost or code == h2.errors.ErrorCodes.REFUSED_STREAM:
        return GrpcStatus.UNAVAILABLE
    if code == h2.errors.ErrorCodes.CANCEL:
        return GrpcStatus.CANCELLED
    if code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM:
        return GrpcStatus.RESOURCE_EXHAUSTED
    if code == h2.errors.ErrorCodes.INADEQUATE_SECURITY:
        return GrpcStatus.PERMISSION_DENIED
    return GrpcStatus.INTERNAL


def status_trailers(status: int, message: str) -> Headers:
    """``grpc-status`` and a percent-encoded ``grpc-message``."""
    encoded = urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
    return [(b"grpc-status", str(status).encode("ascii")), (b"grpc-message", encoded.encode())]
