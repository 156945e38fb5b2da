"""What the inspector page is given to show: bodies by kind, all bounded; the Host guard."""

from __future__ import annotations

import gzip
import json

import pytest

from tunnel.client._inspector import allowed_host
from tunnel.client._inspector_render import (
    HEX_PREVIEW,
    exchange_detail,
    exchange_summary,
    hexdump,
    render_body,
)
from tunnel.client._observe import Body, Recorder


def body(data: bytes, cap: int = 64 * 1024) -> Body:
    kept = Body(cap)
    kept.add(data)
    return kept


def test_json_is_pretty_printed() -> None:
    shown = render_body(
        body(b'{"b":[1,2],"a":"\xc3\xa9"}'), [(b"content-type", b"application/json")]
    )
    assert shown["kind"] == "json"
    assert shown["text"] == '{\n  "b": [\n    1,\n    2\n  ],\n  "a": "é"\n}'
    assert shown["size"] == 20


def test_json_without_a_content_type_is_recognised() -> None:
    assert render_body(body(b"[1, 2]"), [])["kind"] == "json"


def test_json_cut_at_the_cap_is_shown_as_text() -> None:
    shown = render_body(
        body(b'{"a": "' + b"x" * 100 + b'"}', cap=20), [(b"content-type", b"application/json")]
    )
    assert shown["kind"] == "text"
    assert shown["truncated"]
    assert shown["kept"] == 20
    assert shown["text"] == '{"a": "' + "x" * 13


def test_text_uses_its_charset() -> None:
    shown = render_body(
        body("ünïcode".encode("latin-1")), [(b"content-type", b"text/plain; charset=latin-1")]
    )
    assert shown == {
        "kind": "text",
        "text": "ünïcode",
        "size": 7,
        "kept": 7,
        "truncated": False,
        "content_type": "text/plain; charset=latin-1",
    }


def test_a_multibyte_character_cut_at_the_cap_still_shows_as_text() -> None:
    shown = render_body(body("aé".encode(), cap=2), [])
    assert shown["kind"] == "text"
    assert shown["text"] == "a"


def test_binary_gets_its_size_and_a_hex_dump_of_the_first_bytes() -> None:
    data = bytes(range(256)) * 8
    shown = render_body(body(data), [(b"content-type", b"application/octet-stream")])
    assert shown["kind"] == "binary"
    assert shown["size"] == 2048
    lines = shown["hex"].splitlines()
    assert len(lines) == HEX_PREVIEW // 16
    assert lines[0] == (
        "00000000  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f  |................|"
    )
    assert "text" not in shown


def test_hexdump_shows_printable_bytes() -> None:
    assert hexdump(b"Hi!\n") == "00000000  48 69 21 0a" + " " * 36 + "  |Hi!.|"


def test_gzip_bodies_are_decoded_for_display() -> None:
    shown = render_body(
        body(gzip.compress(b'{"zipped": true}')),
        [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")],
    )
    assert shown["kind"] == "json"
    assert shown["decoded_from"] == "gzip"
    assert json.loads(shown["text"]) == {"zipped": True}


def test_other_encodings_are_binary() -> None:
    shown = render_body(body(b"\x1b\x00\x00"), [(b"content-encoding", b"br")])
    assert shown["kind"] == "binary"


def test_no_body() -> None:
    assert render_body(body(b""), [])["kind"] == "empty"


def test_summary_and_detail_of_an_exchange() -> None:
    recorder = Recorder(clock=lambda: 5.0, body_cap=4)
    exchange = recorder.request_started(b"POST", b"/a?b=1", [(b"host", b"x.localhost")])
    exchange.request_data(b"12345")
    summary = exchange_summary(exchange)
    assert summary["state"] == "pending"
    assert summary["status"] is None
    exchange.response_started(404, [(b"content-type", b"text/plain")])
    exchange.response_data(b"nope")
    exchange.ended()
    detail = exchange_detail(exchange)
    assert detail["state"] == "done"
    assert detail["status"] == 404
    assert detail["duration_ms"] == 0
    assert detail["request"]["headers"] == [["host", "x.localhost"]]
    assert detail["request"]["body"]["truncated"]
    assert detail["replayable"] is False  # the body was cut: it cannot be sent again
    assert detail["response"]["body"]["text"] == "nope"
    json.dumps(detail)  # all of it is JSON


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (b"127.0.0.1:4040", True),
        (b"localhost:4040", True),
        (b"app.localhost", True),
        (b"[::1]:4040", True),
        (b"192.168.1.20:4040", True),
        (b"attacker.example:4040", False),
        (b"localhost.attacker.example", False),
        (b"", False),
        (None, False),
    ],
)
def test_only_ip_literals_and_localhost_may_reach_the_inspector(
    host: bytes | None, allowed: bool
) -> None:
    assert allowed_host(host) is allowed
