"""Header lists on each hop: hop-by-hop rules, the HTTP/2 request the server
builds, the HTTP/1.1 request the agent sends, the HTTP/2 response it returns.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tunnel._protocol.headers import (
    local_request_headers,
    response_headers_from_local,
    strip_hop_by_hop,
    tunnel_request_headers,
)

HOP_BY_HOP = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"transfer-encoding",
    b"upgrade",
    b"http2-settings",
]


def request(
    headers: list[tuple[bytes, bytes]],
    *,
    trust_forwarded: bool = False,
    path: bytes = b"/index.html",
    query_string: bytes = b"",
    client: str | None = "10.0.0.1",
) -> list[tuple[bytes, bytes]]:
    return tunnel_request_headers(
        method="GET",
        scheme="https",
        path=path,
        query_string=query_string,
        headers=headers,
        client=client,
        trust_forwarded=trust_forwarded,
    )


# -- strip_hop_by_hop ----------------------------------------------------------


def test_strip_drops_every_hop_by_hop_header() -> None:
    headers = [(name, b"x") for name in HOP_BY_HOP] + [(b"accept", b"*/*")]
    assert strip_hop_by_hop(headers) == [(b"accept", b"*/*")]


def test_strip_drops_headers_named_by_connection() -> None:
    headers = [
        (b"connection", b"Keep-Alive, X-Private ,x-other"),
        (b"x-private", b"secret"),
        (b"x-other", b"1"),
        (b"x-public", b"2"),
    ]
    assert strip_hop_by_hop(headers) == [(b"x-public", b"2")]


def test_strip_reads_every_connection_header() -> None:
    headers = [
        (b"connection", b"x-a"),
        (b"x-a", b"1"),
        (b"connection", b"x-b"),
        (b"x-b", b"2"),
        (b"x-c", b"3"),
    ]
    assert strip_hop_by_hop(headers) == [(b"x-c", b"3")]


def test_strip_keeps_te_trailers_only() -> None:
    assert strip_hop_by_hop([(b"te", b"trailers")]) == [(b"te", b"trailers")]
    assert strip_hop_by_hop([(b"te", b" Trailers ")]) == [(b"te", b" Trailers ")]
    assert strip_hop_by_hop([(b"te", b"gzip")]) == []
    assert strip_hop_by_hop([(b"te", b"trailers, deflate")]) == []


def test_strip_keeps_repeated_headers_in_order() -> None:
    headers = [
        (b"set-cookie", b"a=1"),
        (b"connection", b"close"),
        (b"set-cookie", b"b=2"),
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"c=3"),
    ]
    assert strip_hop_by_hop(headers) == [
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"c=3"),
    ]


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-!#$%&'*+.^_`|~", min_size=1)
_name = st.one_of(st.sampled_from(HOP_BY_HOP), _token.map(str.encode))
_value = st.one_of(
    st.sampled_from([b"trailers", b"close", b"keep-alive, x-a", b"x-a,x-b"]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E)).map(str.encode),
)


@given(st.lists(st.tuples(_name, _value)))
def test_strip_property(headers: list[tuple[bytes, bytes]]) -> None:
    named = {
        token.strip().lower()
        for key, value in headers
        if key == b"connection"
        for token in value.split(b",")
    }

    def is_hop(key: bytes, value: bytes) -> bool:
        if key == b"te" and value.strip().lower() == b"trailers":
            return False
        return key in HOP_BY_HOP or key in named

    out = strip_hop_by_hop(headers)
    assert not any(is_hop(key, value) for key, value in out)
    # What survives is exactly the end-to-end headers, in their original order.
    assert out == [(key, value) for key, value in headers if not is_hop(key, value)]


# -- tunnel_request_headers ----------------------------------------------------


def test_request_pseudo_headers_first_and_in_order() -> None:
    out = request([(b"accept", b"*/*"), (b"host", b"myapp.example.com")])
    assert out[:4] == [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"myapp.example.com"),
        (b":path", b"/index.html"),
    ]
    assert not any(key.startswith(b":") for key, _ in out[4:])


def test_request_joins_query_string() -> None:
    out = request([(b"host", b"h")], path=b"/search", query_string=b"q=a%20b&x=1")
    assert (b":path", b"/search?q=a%20b&x=1") in out
    assert (b":path", b"/search") in request([(b"host", b"h")], path=b"/search")


def test_request_drops_host_and_hop_by_hop() -> None:
    out = request(
        [
            (b"host", b"myapp.example.com"),
            (b"connection", b"keep-alive, x-hop"),
            (b"keep-alive", b"timeout=5"),
            (b"x-hop", b"1"),
            (b"te", b"trailers"),
            (b"cookie", b"a=1"),
        ]
    )
    names = [key for key, _ in out]
    assert b"host" not in names
    assert b"connection" not in names
    assert b"keep-alive" not in names
    assert b"x-hop" not in names
    assert (b"te", b"trailers") in out
    assert (b"cookie", b"a=1") in out


def test_request_adds_forwarded_headers() -> None:
    out = request([(b"host", b"myapp.example.com"), (b"accept", b"*/*")])
    assert out[4:] == [
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"myapp.example.com"),
    ]


def test_request_unknown_client() -> None:
    out = request([(b"host", b"h")], client=None)
    assert (b"x-forwarded-for", b"unknown") in out


def test_request_replaces_visitor_forwarded_headers() -> None:
    visitor = [
        (b"host", b"myapp.example.com"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"gopher"),
        (b"x-forwarded-host", b"forged.example"),
    ]
    out = request(visitor)
    forwarded = [(k, v) for k, v in out if k.startswith(b"x-forwarded-")]
    assert forwarded == [
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"myapp.example.com"),
    ]


def test_request_trusted_forwarded_headers_are_kept_and_appended() -> None:
    visitor = [
        (b"host", b"myapp.example.com"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"public.example"),
    ]
    out = request(visitor, trust_forwarded=True)
    forwarded = [(k, v) for k, v in out if k.startswith(b"x-forwarded-")]
    assert sorted(forwarded) == sorted(
        [
            (b"x-forwarded-for", b"1.2.3.4, 10.0.0.1"),
            (b"x-forwarded-proto", b"http"),
            (b"x-forwarded-host", b"public.example"),
        ]
    )


def test_request_trusted_repeated_forwarded_for_is_joined() -> None:
    visitor = [
        (b"host", b"h"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-for", b"5.6.7.8"),
    ]
    out = request(visitor, trust_forwarded=True)
    assert [v for k, v in out if k == b"x-forwarded-for"] == [b"1.2.3.4, 5.6.7.8, 10.0.0.1"]
    # Nothing to trust: the missing proto and host are filled in.
    assert (b"x-forwarded-proto", b"https") in out
    assert (b"x-forwarded-host", b"h") in out


# -- local_request_headers -----------------------------------------------------


H2_REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":authority", b"myapp.example.com"),
    (b":path", b"/upload?x=1"),
    (b"content-type", b"text/plain"),
]


def test_local_request_host_first_from_authority() -> None:
    method, target, headers = local_request_headers(H2_REQUEST, has_body=False)
    assert method == b"POST"
    assert target == b"/upload?x=1"
    assert headers == [(b"host", b"myapp.example.com"), (b"content-type", b"text/plain")]


def test_local_request_chunked_only_for_body_without_length() -> None:
    _, _, headers = local_request_headers(H2_REQUEST, has_body=True)
    assert headers[-1] == (b"transfer-encoding", b"chunked")

    with_length = [*H2_REQUEST, (b"content-length", b"5")]
    _, _, headers = local_request_headers(with_length, has_body=True)
    assert (b"content-length", b"5") in headers
    assert all(key != b"transfer-encoding" for key, _ in headers)

    _, _, headers = local_request_headers(H2_REQUEST, has_body=False)
    assert all(key != b"transfer-encoding" for key, _ in headers)


def test_local_request_defaults() -> None:
    method, target, headers = local_request_headers([(b":method", b"GET")], has_body=False)
    assert (method, target) == (b"GET", b"/")
    assert headers == [(b"host", b"localhost")]


# -- response_headers_from_local -----------------------------------------------


def test_response_status_first_and_hop_by_hop_dropped() -> None:
    out = response_headers_from_local(
        200,
        [
            (b"content-length", b"2"),
            (b"connection", b"keep-alive"),
            (b"transfer-encoding", b"chunked"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
        ],
    )
    assert out == [
        (b":status", b"200"),
        (b"content-length", b"2"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


def test_response_204_and_304_drop_content_length() -> None:
    for status in (204, 304):
        out = response_headers_from_local(status, [(b"content-length", b"10"), (b"etag", b"x")])
        assert out == [(b":status", str(status).encode()), (b"etag", b"x")]
