"""Header lists on each hop: visitor → server → HTTP/2 → agent → local service and back.

Rules that hold on every hop live here: hop-by-hop headers never cross a hop,
repeated headers (several ``Set-Cookie``) stay repeated and in order, names are
lower-case bytes, and the ``X-Forwarded-*`` headers say who the visitor was.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "Headers",
    "declares_trailers",
    "header_value",
    "is_websocket_connect",
    "local_request_headers",
    "response_headers_from_local",
    "strip_hop_by_hop",
    "tunnel_request_headers",
    "websocket_connect_headers",
]

Headers = list[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1, plus the legacy names proxies still meet. HTTP/2 forbids
# them outright (RFC 9113 section 8.2.2), so they must go before h2 sees them.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    }
)
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of ``name`` (lower-case) in ``headers``, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Drop hop-by-hop headers, including those a ``Connection`` header names.

    ``TE: trailers`` is the one hop-by-hop value HTTP/2 allows, and it tells the
    next hop that the client accepts trailers, so it is kept.
    """
    headers = list(headers)
    named = {
        token.strip().lower()
        for key, value in headers
        if key == b"connection"
        for token in value.split(b",")
    }
    return [
        (key, value)
        for key, value in headers
        if (key not in _HOP_BY_HOP and key not in named)
        or (key == b"te" and value.strip().lower() == b"trailers")
    ]


def tunnel_request_headers(
    *,
    method: str,
    scheme: str,
    path: bytes,
    query_string: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    client: str | None,
    trust_forwarded: bool,
) -> Headers:
    """The HTTP/2 request header list the server sends the agent for one visitor request.

    Args:
        method: The visitor's method.
        scheme: ``http`` or ``https``, as the visitor reached the server.
        path: The raw request path, exactly as the visitor sent it.
        query_string: The raw query string, without ``?``.
        headers: The visitor's headers, lower-case names.
        client: The visitor's IP address, if known.
        trust_forwarded: Keep and extend the visitor's ``X-Forwarded-*`` headers
            (behind a trusted proxy) instead of replacing them.
    """
    authority = header_value(headers, b"host") or b""
    target = path + b"?" + query_string if query_string else path
    out: Headers = [
        (b":method", method.encode("ascii")),
        (b":scheme", scheme.encode("ascii")),
        (b":authority", authority),
        (b":path", target or b"/"),
    ]
    prior_for = b""
    # With Transfer-Encoding, Content-Length does not describe the body
    # (RFC 9112 section 6.3); passing it on would make the agent's HTTP/2
    # stack see a body of the wrong length.
    chunked = header_value(headers, b"transfer-encoding") is not None
    for key, value in strip_hop_by_hop(headers):
        if key == b"host" or (chunked and key == b"content-length"):
            continue
        if key in _FORWARDED:
            if not trust_forwarded:
                continue
            if key == b"x-forwarded-for":
                prior_for = prior_for + b", " + value if prior_for else value
                continue
        out.append((key, value))
    peer = client.encode("ascii") if client else b"unknown"
    out.append((b"x-forwarded-for", prior_for + b", " + peer if prior_for else peer))
    if not trust_forwarded or header_value(headers, b"x-forwarded-proto") is None:
        out.append((b"x-forwarded-proto", scheme.encode("ascii")))
    if not trust_forwarded or header_value(headers, b"x-forwarded-host") is None:
        out.append((b"x-forwarded-host", authority))
    return out


def local_request_headers(
    headers: Sequence[tuple[bytes, bytes]], *, has_body: bool
) -> tuple[bytes, bytes, Headers]:
    """Split an HTTP/2 request header list into method, target and HTTP/1.1 headers.

    ``:authority`` becomes ``Host``, as the visitor sent it, so the local service
    sees the public host name. A body without ``Content-Length`` is sent chunked.
    """
    method = target = b""
    authority = b""
    out: Headers = []
    has_length = False
    for key, value in headers:
        if key.startswith(b":"):
            if key == b":method":
                method = value
            elif key == b":path":
                target = value
            elif key == b":authority":
                authority = value
            continue
        if key == b"content-length":
            has_length = True
        out.append((key, value))
    out = strip_hop_by_hop(out)
    out.insert(0, (b"host", authority or b"localhost"))
    if has_body and not has_length:
        out.append((b"transfer-encoding", b"chunked"))
    return method, target or b"/", out


def response_headers_from_local(status: int, headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The HTTP/2 response header list for a local service's HTTP/1.1 response.

    A 204 or 304 never has a body, but may carry the ``Content-Length`` of the
    representation; HTTP/2 peers check that header against the DATA they get,
    so it is dropped there.
    """
    kept = strip_hop_by_hop(headers)
    if status in (204, 304):
        kept = [(key, value) for key, value in kept if key != b"content-length"]
    return [(b":status", str(status).encode("ascii")), *kept]


def declares_trailers(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a response announces trailers with a ``Trailer`` header."""
    return header_value(headers, b"trailer") is not None


# Negotiated per hop: the server terminates the visitor's WebSocket framing
# (and its compression) and the agent makes its own handshake with the local
# service, so these never travel through the tunnel.
_WEBSOCKET_HOP = frozenset(
    {b"sec-websocket-key", b"sec-websocket-accept", b"sec-websocket-extensions"}
)


def websocket_connect_headers(request_headers: Headers) -> Headers:
    """Turn a visitor request's HTTP/2 header list into an extended CONNECT (RFC 8441).

    Args:
        request_headers: What :func:`tunnel_request_headers` built for the
            visitor's WebSocket upgrade request.
    """
    out: Headers = [(b":method", b"CONNECT"), (b":protocol", b"websocket")]
    for key, value in request_headers:
        if key != b":method" and key not in _WEBSOCKET_HOP:
            out.append((key, value))
    if header_value(out, b"sec-websocket-version") is None:
        out.append((b"sec-websocket-version", b"13"))
    return out


def is_websocket_connect(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether an HTTP/2 request is an extended CONNECT for a WebSocket."""
    return (
        header_value(headers, b":method") == b"CONNECT"
        and header_value(headers, b":protocol") == b"websocket"
    )
