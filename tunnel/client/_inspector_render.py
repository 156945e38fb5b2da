"""What the inspector page shows of an exchange: plain JSON-able dicts, no I/O.

Every string handed to the page is bounded here: bodies were already cut at
the recorder's cap, a pretty-printed JSON body is cut at :data:`TEXT_LIMIT`,
and a binary body is shown as its size and a hex dump of its first
:data:`HEX_PREVIEW` bytes. The page inserts all of it as text, never as HTML.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import Any

from .._protocol.headers import header_value
from ._observe import Body, Exchange

__all__ = [
    "HEX_PREVIEW",
    "TEXT_LIMIT",
    "exchange_detail",
    "exchange_summary",
    "hexdump",
    "render_body",
]

#: The most characters of a body shown as text.
TEXT_LIMIT = 256 * 1024
#: How many bytes of a binary body the hex dump shows.
HEX_PREVIEW = 512

_TEXT_MARKERS = ("json", "xml", "javascript", "x-www-form-urlencoded", "yaml", "csv", "graphql")


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _headers(headers: Sequence[tuple[bytes, bytes]]) -> list[list[str]]:
    return [[_text(name), _text(value)] for name, value in headers]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def exchange_summary(exchange: Exchange) -> dict[str, Any]:
    """The row of the request list: method, target, status, timing, sizes."""
    if not exchange.done:
        state = "pending"
    elif exchange.error is not None:
        state = "error"
    else:
        state = "done"
    return {
        "id": exchange.id,
        "method": exchange.method,
        "target": exchange.target,
        "status": exchange.status,
        "state": state,
        "error": exchange.error,
        "started_at": exchange.started_at,
        "duration_ms": _ms(exchange.duration),
        "first_byte_ms": _ms(exchange.first_byte),
        "request_size": exchange.request_body.size,
        "response_size": exchange.response_body.size,
        "replay_of": exchange.replay_of,
    }


def exchange_detail(exchange: Exchange) -> dict[str, Any]:
    """Everything the detail view shows: the summary, both heads and both bodies."""
    detail = exchange_summary(exchange)
    detail["request"] = {
        "headers": _headers(exchange.request_headers),
        "body": render_body(exchange.request_body, exchange.request_headers),
    }
    detail["response"] = {
        "headers": _headers(exchange.response_headers),
        "body": render_body(exchange.response_body, exchange.response_headers),
    }
    detail["replayable"] = not exchange.request_body.truncated and exchange.request_whole
    return detail


def render_body(body: Body, headers: Sequence[tuple[bytes, bytes]]) -> dict[str, Any]:
    """A body as the page shows it.

    Returns:
        ``kind`` is ``"empty"``, ``"json"`` (pretty-printed in ``text``),
        ``"text"`` or ``"binary"`` (``hex`` holds a dump of the first bytes);
        ``size`` is the whole body's length, ``kept`` how much was recorded.
    """
    content_type = _text(header_value(headers, b"content-type") or b"").lower()
    encoding = _text(header_value(headers, b"content-encoding") or b"").strip().lower()
    shown: dict[str, Any] = {
        "size": body.size,
        "kept": len(body.data),
        "truncated": body.truncated,
        "content_type": content_type or None,
    }
    data = bytes(body.data)
    if body.size == 0:
        return {**shown, "kind": "empty"}
    if encoding in ("gzip", "deflate", "x-gzip"):
        decoded = _decompress(data, limit=body.cap or TEXT_LIMIT)
        if decoded is None:
            return {**shown, "kind": "binary", "hex": hexdump(data[:HEX_PREVIEW])}
        shown["decoded_from"] = encoding
        data = decoded
    elif encoding not in ("", "identity"):
        return {**shown, "kind": "binary", "hex": hexdump(data[:HEX_PREVIEW])}
    if "json" in content_type or (not content_type and data.lstrip()[:1] in (b"{", b"[")):
        try:
            pretty = json.dumps(json.loads(data), indent=2, ensure_ascii=False)
        except ValueError:
            pass  # cut at the cap, or not JSON after all: show it as text
        else:
            return {**shown, "kind": "json", "text": pretty[:TEXT_LIMIT]}
    text = _as_text(data, content_type)
    if text is not None:
        return {**shown, "kind": "text", "text": text[:TEXT_LIMIT]}
    return {**shown, "kind": "binary", "hex": hexdump(data[:HEX_PREVIEW])}


def _as_text(data: bytes, content_type: str) -> str | None:
    """``data`` decoded, if it is text by its type or by its looks."""
    charset = "utf-8"
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key == "charset" and value:
            charset = value.strip('"')
    texty = content_type.startswith("text/") or any(m in content_type for m in _TEXT_MARKERS)
    try:
        text = data.decode(charset, "replace" if texty else "strict")
    except LookupError:
        text = data.decode("utf-8", "replace")
    except UnicodeDecodeError as exc:
        if exc.start < len(data) - 3:
            return None
        # Only the last character was cut at the cap.
        text = data[: exc.start].decode(charset)
    if not texty and sum(1 for c in text[:4096] if c < " " and c not in "\t\r\n") > 0:
        return None
    return text


def _decompress(data: bytes, *, limit: int) -> bytes | None:
    """The first ``limit`` bytes of gzip/deflate ``data``; None if it is not."""
    for wbits in (47, -15):  # 47: gzip or zlib header; -15: raw deflate
        try:
            return zlib.decompressobj(wbits).decompress(data, limit)
        except zlib.error:
            continue
    return None


def hexdump(data: bytes) -> str:
    """``data`` as ``hexdump -C`` shows it: offset, 16 bytes in hex, then ASCII."""
    lines = []
    for offset in range(0, len(data), 16):
        row = data[offset : offset + 16]
        hex_part = " ".join(f"{b:02x}" for b in row)
        ascii_part = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{offset:08x}  {hex_part:<47}  |{ascii_part}|")
    return "\n".join(lines)
