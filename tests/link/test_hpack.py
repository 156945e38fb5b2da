"""The link's HPACK codec: blocks any HPACK decoder reads, read back as hpack reads them.

The encoder's blocks go through hpack's own decoder, and hpack's own
encoder's blocks (dynamic table, Huffman coding) through ours; malformed
blocks fail as hpack's decoder fails, which h2 turns into a connection error.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import hpack.table
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from memory_link import transport_pair

from tunnel._protocol.headers import Headers
from tunnel.link import Link, Stream, _hpack
from tunnel.link._hpack import (
    DECODED_BLOCKS,
    ENCODED_BLOCKS,
    ENCODED_FIELDS,
    MAX_CACHED_BLOCKS,
    MAX_CACHED_FIELDS,
    LinkDecoder,
    LinkEncoder,
)

REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"app.example.com"),
    (b":path", b"/api/items?page=2"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0"),
    (b"accept", b"text/html,application/xhtml+xml"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"x-forwarded-for", b"203.0.113.7"),
    (b"x-forwarded-proto", b"https"),
    (b"x-forwarded-host", b"app.example.com"),
]
RESPONSE = [
    (b":status", b"200"),
    (b"content-type", b"application/json"),
    (b"content-length", b"1234"),
    (b"date", b"Thu, 03 Dec 2026 16:00:00 GMT"),
    (b"server", b"hypercorn-h11"),
]

_names = st.one_of(
    st.sampled_from([name for name, _ in _hpack.STATIC_TABLE]),
    st.binary(max_size=20),
    st.sampled_from([b"x-custom", b"x-\xc3\xa9t\xc3\xa9", b"cookie", b"authorization"]),
)
_values = st.one_of(
    st.sampled_from([value for _, value in _hpack.STATIC_TABLE]),
    st.binary(max_size=40),
    st.binary(min_size=120, max_size=400),
)
_header_lists = st.lists(st.tuples(_names, _values), max_size=20)


def _decode_stock(block: bytes) -> list[tuple[bytes, bytes]]:
    decoded = hpack.Decoder(max_header_list_size=1 << 20).decode(block, raw=True)
    return [tuple(header) for header in decoded]  # type: ignore[misc]


def test_the_static_table_is_hpacks() -> None:
    assert hpack.table.HeaderTable.STATIC_TABLE == _hpack.STATIC_TABLE


@settings(max_examples=300, deadline=None)
@given(_header_lists)
def test_blocks_read_by_hpack_and_by_the_link(headers: Headers) -> None:
    encoder = LinkEncoder()
    stock = hpack.Decoder()
    for _ in range(2):  # the second time from the caches
        block = encoder.encode(headers)
        assert [tuple(h) for h in stock.decode(block, raw=True)] == headers
        # Nothing went into the peer's table: each block stands alone.
        assert stock.header_table.dynamic_entries == type(stock.header_table.dynamic_entries)()
        assert list(LinkDecoder().decode(block, raw=True)) == headers
        # No larger than the header list as HTTP/2 counts it, whatever the octets.
        assert len(block) <= sum(32 + len(name) + len(value) for name, value in headers)


@settings(max_examples=200, deadline=None)
@given(st.lists(_header_lists, min_size=1, max_size=6), st.booleans())
def test_hpacks_own_blocks_read_as_hpack_reads_them(lists: list[Headers], huffman: bool) -> None:
    # A peer with h2's stock encoder: dynamic table entries, indexes into
    # it, Huffman coding; one decoder each side, block after block.
    encoder = hpack.Encoder()
    ours, stock = LinkDecoder(), hpack.Decoder()
    for headers in lists * 2:
        block = encoder.encode(headers, huffman=huffman)
        expected = stock.decode(block, raw=True)
        got = ours.decode(block, raw=True)
        assert got == expected == headers
        assert [type(h) for h in got] == [type(h) for h in expected]


def test_the_same_headers_make_the_same_block() -> None:
    encoder, other = LinkEncoder(), LinkEncoder()
    assert encoder.encode(REQUEST) == other.encode(list(REQUEST)) == encoder.encode(REQUEST)
    assert encoder.encode(RESPONSE)[:1] == b"\x88"  # :status 200, static index 8
    # A name from the static table goes by its index, then the raw value.
    assert encoder.encode([(b"content-type", b"text/plain")]) == b"\x0f\x10\x0atext/plain"


def test_sensitive_fields_are_never_indexed() -> None:
    encoder = LinkEncoder()
    decoded = LinkDecoder().decode(
        encoder.encode(
            [
                (b"authorization", b"Bearer abc"),
                (b"cookie", b"a=b"),
                (b"x-token", b"t", True),
                (b"x-plain", b"p"),
            ]
        ),
        raw=True,
    )
    kinds = [type(header) for header in decoded]
    assert kinds == [hpack.NeverIndexedHeaderTuple] * 3 + [hpack.HeaderTuple]


def test_credentials_are_not_kept_in_the_caches() -> None:
    encoder, decoder = LinkEncoder(), LinkDecoder()
    headers = [(b":method", b"GET"), (b"cookie", b"session=secret"), (b"x-plain", b"p")]
    for _ in range(2):
        block = encoder.encode(headers)
        assert decoder.decode(block, raw=True) == headers
    assert (b"x-plain", b"p") in ENCODED_FIELDS
    assert (b"cookie", b"session=secret") not in ENCODED_FIELDS
    assert tuple(headers) not in ENCODED_BLOCKS
    assert block not in DECODED_BLOCKS


def test_never_indexed_tuples_are_not_taken_for_cached_plain_ones() -> None:
    encoder = LinkEncoder()
    plain = [(b":status", b"200"), (b"x-secret", b"s")]
    encoder.encode(plain)
    encoder.encode(plain)  # now cached, field and block
    marked = [(b":status", b"200"), hpack.NeverIndexedHeaderTuple(b"x-secret", b"s")]
    decoded = hpack.Decoder().decode(encoder.encode(marked), raw=True)
    assert decoded == plain
    assert type(list(decoded)[1]) is hpack.NeverIndexedHeaderTuple
    # And text headers are encoded as hpack encodes them, as UTF-8.
    assert _decode_stock(encoder.encode([(":status", "200"), ("x-é", "ü")])) == [
        (b":status", b"200"),
        ("x-é".encode(), "ü".encode()),
    ]


def test_long_names_and_values() -> None:
    headers = [(b"x-" + b"n" * 300, b"v" * 100_000), (b"cookie", bytes(range(256)) * 64)]
    block = LinkEncoder().encode(headers)
    assert _decode_stock(block) == headers
    decoder = LinkDecoder(max_header_list_size=1 << 20)
    assert list(decoder.decode(block, raw=True)) == headers


def test_a_smaller_table_is_announced_in_the_next_block() -> None:
    encoder = LinkEncoder()
    stock = hpack.Decoder()
    encoder.header_table_size = 1 << 16  # more allowed: nothing to announce
    assert _decode_stock(encoder.encode(RESPONSE)) == RESPONSE
    stock.max_allowed_table_size = 0
    encoder.header_table_size = 100
    encoder.header_table_size = 0
    block = encoder.encode(RESPONSE)
    # Only the smallest size since the last block, which sizes that only
    # shrink make the last one too (section 4.2).
    assert block.startswith(b"\x20\x88")
    assert stock.decode(block, raw=True) == RESPONSE
    assert stock.header_table_size == 0
    assert encoder.encode(RESPONSE) == block[1:]  # announced once
    # Our decoder leaves such a block to hpack's, which keeps the table size.
    ours = LinkDecoder()
    ours.max_allowed_table_size = 0
    with pytest.raises(hpack.InvalidTableSizeError):
        ours.decode(encoder.encode(RESPONSE), raw=True)
    encoder.header_table_size = 0  # no change, no announcement
    assert ours.decode(b"\x20" + encoder.encode(RESPONSE), raw=True) == RESPONSE


def test_text_headers_are_decoded_by_hpack() -> None:
    block = LinkEncoder().encode([(b"x-\xc3\xa9", b"1")])
    decoded: list[object] = list(LinkDecoder().decode(block))  # str, despite hpack's types
    assert decoded == [("x-é", "1")]


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b"\x80", id="index 0"),
        pytest.param(b"\xbe", id="index past the static table, empty dynamic one"),
        pytest.param(b"\xff\xff\xff\xff\xff\xff\x01", id="index integer too long"),
        pytest.param(b"\x88\xff", id="truncated index integer"),
        pytest.param(b"\x0f", id="truncated name index"),
        pytest.param(b"\x00\x05abc", id="name length past the end"),
        pytest.param(b"\x0f\x10\x7f", id="truncated value length"),
        pytest.param(b"\x0f\x10\x7f\x80\x80", id="value length integer cut short"),
        pytest.param(b"\x0f\x10\x0aabc", id="value length past the end"),
        pytest.param(b"\x0f\x7f\x01a", id="name index past the tables"),
        pytest.param(b"\x1f\x2f\x01a", id="never indexed, name index 15 + 47 past the tables"),
        pytest.param(b"\x00\x81\xff\x00", id="bad Huffman string"),
        pytest.param(b"\x88\x20", id="table size update after a header"),
    ],
)
def test_malformed_blocks_fail_as_in_hpack(block: bytes) -> None:
    with pytest.raises(hpack.HPACKDecodingError) as stock_error:
        hpack.Decoder().decode(block, raw=True)
    with pytest.raises(hpack.HPACKDecodingError) as error:
        LinkDecoder().decode(block, raw=True)
    assert type(error.value) is type(stock_error.value)
    assert block not in DECODED_BLOCKS


def test_malformed_block_is_a_connection_error_in_h2() -> None:
    # What h2 makes of the decoder's error: a ProtocolError, the connection's end.
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.decoder = LinkDecoder()
    server.initiate_connection()
    client = h2.connection.H2Connection()
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    frame = b"\x00\x00\x03\x01\x05\x00\x00\x00\x01" + b"\x00\x05a"  # HEADERS, stream 1
    with pytest.raises(h2.exceptions.ProtocolError):
        server.receive_data(frame)


def test_the_header_list_limit_holds_fresh_and_cached() -> None:
    headers = [(b"x-big", b"v" * 2000)]
    block = LinkEncoder().encode(headers)
    size = 32 + 5 + 2000
    assert list(LinkDecoder(max_header_list_size=size).decode(block, raw=True)) == headers
    assert block in DECODED_BLOCKS
    for decoder in (LinkDecoder(max_header_list_size=size - 1), hpack.Decoder(size - 1)):
        with pytest.raises(hpack.OversizedHeaderListError):
            decoder.decode(block, raw=True)
    # Static entries count too: 3,000 of 42 bytes each in a 3,000-byte block.
    with pytest.raises(hpack.OversizedHeaderListError):
        LinkDecoder(max_header_list_size=1 << 16).decode(b"\x82" * 3000, raw=True)


def test_caches_stay_bounded() -> None:
    encoder, decoder = LinkEncoder(), LinkDecoder()
    for i in range(3 * MAX_CACHED_FIELDS):
        headers = [(b":status", b"200"), (b"x-request-id", str(i).encode())]
        assert decoder.decode(encoder.encode(headers), raw=True) == headers
        assert len(ENCODED_FIELDS) <= MAX_CACHED_FIELDS
        assert len(ENCODED_BLOCKS) <= MAX_CACHED_BLOCKS
        assert len(DECODED_BLOCKS) <= MAX_CACHED_BLOCKS
    # Blocks too large to keep, in octets or in fields, are decoded all the
    # same, and not kept.
    for headers in ([(b"x-big", b"v" * 10_000)], [(b"accept", b"")] * 1000):
        block = encoder.encode(headers)
        assert decoder.decode(block, raw=True) == headers
        assert block not in DECODED_BLOCKS
        assert tuple(headers) not in ENCODED_BLOCKS


# -- across versions: a link against h2 with its stock HPACK ----------------------------


def _stock_h2(*, client_side: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=client_side, header_encoding=None)
    )
    conn.initiate_connection()
    # A table the stock encoder of the link's end may not use, to be told so.
    conn.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    return conn


def _varied(i: int) -> Headers:
    # Repeats (which stock hpack indexes in its table) and fresh values.
    return [(b"x-repeat", b"same every time"), (b"x-index", str(i).encode()), (b"cookie", b"c=1")]


async def test_new_server_end_with_an_old_agent(autojump_clock: trio.testing.MockClock) -> None:
    a, b = transport_pair()
    link = Link.opener(a, keepalive_interval=15.0, keepalive_timeout=15.0)
    peer = _stock_h2(client_side=False)
    received: list[Headers] = []

    async def serve_peer() -> None:
        await b.send(peer.data_to_send())
        while True:
            for event in peer.receive_data(await b.receive()):
                if isinstance(event, h2.events.RequestReceived):
                    assert event.stream_id is not None
                    assert event.headers is not None
                    received.append(list(event.headers))
                    i = len(received)
                    peer.send_headers(
                        event.stream_id, [*RESPONSE[:1], *_varied(i)], end_stream=True
                    )
            if data := peer.data_to_send():
                await b.send(data)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_peer)
            await nursery.start(link.run)
            assert await link.wait_peer_settings()
            # The link's h2 runs this codec (HPACK_CODEC is on with this h2),
            # with the link's own limit on header lists.
            conn = link._core._conn
            assert isinstance(conn.encoder, LinkEncoder)
            assert isinstance(conn.decoder, LinkDecoder)
            assert conn.decoder.max_header_list_size == 1 << 20
            for i in range(1, 40):
                sent = [*REQUEST, *_varied(i)]
                stream = await link.open_stream(sent, end_stream=True)
                assert await stream.receive_headers() == [*RESPONSE[:1], *_varied(i)]
                assert received[-1] == sent
            nursery.cancel_scope.cancel()


async def test_old_server_end_with_a_new_agent(autojump_clock: trio.testing.MockClock) -> None:
    a, b = transport_pair()

    async def answer(stream: Stream) -> None:
        headers = await stream.receive_headers()
        stream.send_headers(
            [*RESPONSE[:1], *(h for h in headers if not h[0].startswith(b":"))],
            end_stream=True,
        )

    link = Link.answerer(b, on_stream=answer, keepalive_interval=15.0, keepalive_timeout=15.0)
    peer = _stock_h2(client_side=True)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            await a.send(peer.data_to_send())
            for i in range(1, 40):
                sent = [*REQUEST, *_varied(i)]
                stream_id = peer.get_next_available_stream_id()
                peer.send_headers(stream_id, sent, end_stream=True)
                await a.send(peer.data_to_send())
                response: list[tuple[bytes, bytes]] | None = None
                while response is None:
                    for event in peer.receive_data(await a.receive()):
                        if isinstance(event, h2.events.ResponseReceived):
                            response = list(event.headers or [])
                    if data := peer.data_to_send():
                        await a.send(data)
                assert response == [*RESPONSE[:1], *sent[4:]]
            nursery.cancel_scope.cancel()
