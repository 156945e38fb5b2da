"""The short pages a visitor sees when the tunnel, not the local service, answers.

The agent renders them too (local service down, invalid response), so visitors
see one look whichever side found the problem.
"""

from __future__ import annotations

import html

__all__ = ["PAGE_HEADERS", "error_page"]

#: Headers of every error page, but its content-length.
PAGE_HEADERS = [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store")]

_TITLES = {
    400: "Bad request",
    401: "Sign in to this tunnel",
    403: "Not allowed",
    404: "No tunnel here",
    408: "Request timed out",
    413: "Request too large",
    429: "Too many requests",
    431: "Request headers too large",
    502: "Tunnel unavailable",
    503: "Tunnel busy",
    504: "Tunnel timed out",
}


def error_page(status: int, detail: str) -> bytes:
    """A minimal HTML page: a title and one sentence that says what went wrong."""
    title = _TITLES.get(status, "Tunnel error")
    return (
        "<!doctype html>\n<html><head><meta charset=utf-8>"
        f"<title>{status} {title}</title></head>\n"
        f"<body><h1>{status} {title}</h1>\n<p>{html.escape(detail)}</p></body></html>\n"
    ).encode()
