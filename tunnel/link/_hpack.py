"""HPACK for the link: header blocks that are pure functions of their headers.

The rule of this module: what it encodes never touches the peer's dynamic
table (RFC 7541 section 2.3.2). Each field is a static-table index when its
name and value are in the static table, and otherwise a literal that is not
indexed, with no Huffman coding. A block is then the same bytes whatever was
sent before it, on whichever connection, so blocks and fields are cached
process-wide, and decoding such a block needs no table either.

Both ends of the link are ours, but either may be an older release whose h2
encodes with a dynamic table and Huffman coding: the decoder reads the
stateless forms itself and hands any other block whole to hpack's decoder.
That one has seen every block that changed the table (those read here change
nothing), so it holds the table the peer's encoder expects.

Everything here is sans-IO and uses none of hpack's underscored names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

import hpack
from hpack import HeaderTuple, NeverIndexedHeaderTuple, OversizedHeaderListError

__all__ = [
    "DECODED_BLOCKS",
    "ENCODED_BLOCKS",
    "ENCODED_FIELDS",
    "STATIC_TABLE",
    "LinkDecoder",
    "LinkEncoder",
    "encode_field",
]

#: RFC 7541 Appendix A: entry ``i`` is at index ``i + 1``.
STATIC_TABLE: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)
_STATIC_LENGTH: Final = len(STATIC_TABLE)

#: Name and value -> index, and name -> its first index.
_STATIC_FIELDS: Final = {entry: index for index, entry in enumerate(STATIC_TABLE, 1)}
_STATIC_NAMES: Final = {
    name: index for index, (name, _) in reversed(list(enumerate(STATIC_TABLE, 1)))
}
#: Index -> the decoded entry, and -> the entry's name; index 0 is never valid.
_INDEXED: Final[tuple[HeaderTuple, ...]] = (
    HeaderTuple(b"", b""),
    *(HeaderTuple(name, value) for name, value in STATIC_TABLE),
)
_INDEXED_SIZES: Final = (0, *(32 + len(name) + len(value) for name, value in STATIC_TABLE))
_NAMES: Final = (b"", *(name for name, _ in STATIC_TABLE))

#: Fields sent as never-indexed literals, so that no intermediary that
#: re-encodes the block (RFC 7541 section 7.1.3) keeps their values in a table
#: where guesses at them could be checked. Ours never index anything, so the
#: flag costs nothing.
_SENSITIVE: Final = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
#: The first four bits of a never-indexed literal.
_NEVER_INDEXED: Final = 0x10

#: Bounds of the process-wide caches. Each is emptied when full rather than
#: trimmed: that is constant work per entry however a peer varies what it
#: sends, and the common lists come back within a request or two.
MAX_CACHED_FIELDS: Final = 1024
MAX_CACHED_BLOCKS: Final = 256
#: Larger fields and blocks are encoded or decoded each time: caching them
#: would let a few odd requests hold megabytes.
MAX_CACHED_FIELD: Final = 512
MAX_CACHED_BLOCK: Final = 4096
#: Nor is a block of more fields kept: a short block of many tiny fields
#: decodes to far more objects than its octets.
MAX_CACHED_BLOCK_FIELDS: Final = 64

#: Header field -> its encoding; headers -> their block; block -> its headers
#: and their size as HTTP/2 counts it (RFC 9113 section 6.5.2).
ENCODED_FIELDS: Final[dict[object, bytes]] = {}
ENCODED_BLOCKS: Final[dict[tuple[Sequence[object], ...], bytes]] = {}
DECODED_BLOCKS: Final[dict[bytes, tuple[tuple[HeaderTuple, ...], int]]] = {}

#: hpack's own default table size, which both ends start from.
_DEFAULT_TABLE_SIZE: Final = 4096


def _integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """``value`` as an HPACK integer (RFC 7541 section 5.1) after ``flags``' bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = [flags | limit]
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _to_bytes(value: object) -> bytes:
    # As hpack's encoder takes them: bytes, or anything else through str.
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def encode_field(name: bytes, value: bytes, never_indexed: bool = False) -> bytes:
    """One header field, encoded without the dynamic table or Huffman coding."""
    index = _STATIC_FIELDS.get((name, value))
    if index is not None:
        # A static entry tells an observer nothing, sensitive or not.
        return bytes((0x80 | index,))
    # Literal without indexing (0000) or never indexed (0001), section 6.2.
    flags = _NEVER_INDEXED if never_indexed or name in _SENSITIVE else 0x00
    name_index = _STATIC_NAMES.get(name)
    if name_index is None:
        head = bytes((flags,)) + _integer(len(name), 7, 0) + name
    else:
        head = _integer(name_index, 4, flags)
    return head + _integer(len(value), 7, 0) + value


def _encode_any(header: Sequence[object]) -> bytes:
    """A field of any form hpack's encoder takes, uncached."""
    if isinstance(header, HeaderTuple):
        never = not header.indexable
    else:
        never = len(header) > 2 and bool(header[2])
    name, value = header[0], header[1]
    if name.__class__ is not bytes or value.__class__ is not bytes:
        name, value = _to_bytes(name), _to_bytes(value)
    return encode_field(name, value, never)


def _encode_block(headers: tuple[Sequence[object], ...]) -> tuple[bytes, bool]:
    """The block for ``headers``, and whether it may be cached under them."""
    parts = []
    cacheable = True
    fields = ENCODED_FIELDS
    for header in headers:
        if header.__class__ is tuple:
            encoded = fields.get(header)
            if encoded is None:
                # A plain tuple's third item, if any, is its sensitivity, so
                # the tuple itself is the key.
                encoded = _encode_any(header)
                if encoded[0] & 0xF0 == _NEVER_INDEXED:
                    # What must never be indexed is not kept here either:
                    # credentials outliving their request in a cache.
                    cacheable = False
                elif len(encoded) <= MAX_CACHED_FIELD:
                    if len(fields) >= MAX_CACHED_FIELDS:
                        fields.clear()
                    fields[header] = encoded
        else:
            # A NeverIndexedHeaderTuple equals the plain tuple of the same
            # name and value, so neither it nor its block can be cached.
            encoded = _encode_any(header)
            cacheable = cacheable and encoded[0] & 0xF0 != _NEVER_INDEXED
        parts.append(encoded)
    return b"".join(parts), cacheable


class LinkEncoder:
    """An HPACK encoder with no dynamic table, for h2's ``H2Connection.encoder``.

    It offers what h2 uses of hpack's ``Encoder``: ``encode()`` and
    ``header_table_size``, which h2 sets to the peer's
    SETTINGS_HEADER_TABLE_SIZE. Any table size up to that is the encoder's
    choice (RFC 7541 section 4.2), and this one needs none, so it only ever
    shrinks the size it announced, as it must when the peer allows less
    than the peer's decoder assumes.
    """

    __slots__ = ("_size", "_size_changed")

    def __init__(self) -> None:
        self._size = _DEFAULT_TABLE_SIZE
        self._size_changed = False

    @property
    def header_table_size(self) -> int:
        """The dynamic table size the peer's decoder was told (or assumes)."""
        return self._size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        if value < self._size:
            self._size = value
            # The next block announces the smallest size since the last one
            # (section 4.2), which is also the last, sizes only shrinking.
            # Only that one: hpack's decoder refuses any announcement larger
            # than what it allows by then.
            self._size_changed = True

    def encode(self, headers: Iterable[Sequence[object]], huffman: bool = True) -> bytes:
        """Encode ``headers`` as hpack's ``Encoder.encode`` takes them.

        ``huffman`` is accepted and ignored: raw octets are cheaper to make
        and to read, and keep a block no larger than its header list as
        HTTP/2 counts it, which Huffman coding of arbitrary octets does not.
        """
        key = tuple(headers)
        try:
            block = ENCODED_BLOCKS.get(key)
        except TypeError:  # an unhashable header, such as a list
            block, _ = _encode_block(key)
        else:
            if block is None or NeverIndexedHeaderTuple in map(type, key):
                block, cacheable = _encode_block(key)
                if (
                    cacheable
                    and len(block) <= MAX_CACHED_BLOCK
                    and len(key) <= MAX_CACHED_BLOCK_FIELDS
                ):
                    if len(ENCODED_BLOCKS) >= MAX_CACHED_BLOCKS:
                        ENCODED_BLOCKS.clear()
                    ENCODED_BLOCKS[key] = block
        if self._size_changed:
            block = _integer(self._size, 5, 0x20) + block
            self._size_changed = False
        return block


def _integer_tail(data: bytes, at: int, value: int) -> tuple[int, int]:
    """Finish an integer past its prefix; (-1, at) when it is not one read here."""
    # At most four more octets: a length or index beyond that is no header
    # block the link takes, and hpack's decoder says what is wrong with it.
    shift = 0
    end = len(data)
    while at < end and shift <= 21:
        octet = data[at]
        at += 1
        value += (octet & 0x7F) << shift
        if octet < 0x80:
            return value, at
        shift += 7
    return -1, at


def _string(data: bytes, at: int) -> tuple[bytes | None, int]:
    """A raw string literal at ``at``; None for Huffman coding or a bad one."""
    if at >= len(data):
        return None, at
    length = data[at]
    if length & 0x80:
        return None, at
    at += 1
    if length == 0x7F:
        length, at = _integer_tail(data, at, length)
        if length < 0:
            return None, at
    end = at + length
    if end > len(data):
        return None, at
    return data[at:end], end


def _walk(data: bytes, limit: int) -> tuple[tuple[HeaderTuple, ...], int, bool] | None:
    """A stateless block's headers, their size, and whether it may be cached.

    None for any other block. A block with never-indexed fields is not to
    be cached: those are credentials, which should not outlive their request.

    Raises:
        OversizedHeaderListError: The headers add up to more than ``limit``
            before anything else is wrong, as hpack's decoder would say.
    """
    # One loop with the short forms inline: this runs for every header
    # block the link receives, and a call per field would double its cost.
    headers: list[HeaderTuple] = []
    size = 0
    at = 0
    end = len(data)
    kept = True
    while at < end:
        first = data[at]
        at += 1
        if first & 0x80:
            # Indexed; 0 is an error, and past the static table the dynamic
            # one (or an error), both hpack's to tell.
            index = first & 0x7F
            if not 0 < index <= _STATIC_LENGTH:
                return None
            header = _INDEXED[index]
            size += _INDEXED_SIZES[index]
        elif first < 0x20:
            # Literal without indexing (0000) or never indexed (0001).
            index = first & 0x0F
            name: bytes | None
            if index == 0x0F:
                # Most names of the static table are past the 4-bit prefix.
                if at == end:
                    return None
                index += data[at]
                at += 1
                if index > _STATIC_LENGTH:  # or a longer integer
                    return None
                name = _NAMES[index]
            elif index:
                name = _NAMES[index]
            else:
                if at == end:
                    return None
                length = data[at]
                if length < 0x7F:
                    at += 1
                    name = data[at : at + length]
                    at += length
                else:
                    name, at = _string(data, at)
                if name is None or at > end:
                    return None
            if at >= end:
                return None
            length = data[at]
            value: bytes | None
            if length < 0x7F:
                at += 1
                value = data[at : at + length]
                at += length
            else:
                value, at = _string(data, at)
            if value is None or at > end:
                return None
            if first & _NEVER_INDEXED:
                kind: type[HeaderTuple] = NeverIndexedHeaderTuple
                kept = False
            else:
                kind = HeaderTuple
            # tuple.__new__ builds the same object as kind(name, value) without
            # a Python call.
            header = tuple.__new__(kind, (name, value))
            size += 32 + len(name) + len(value)
        else:
            # Incremental indexing or a table size update: both change the
            # table, which only hpack's decoder keeps.
            return None
        if size > limit:
            raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
        headers.append(header)
    return tuple(headers), size, kept


class LinkDecoder(hpack.Decoder):
    """hpack's decoder, reading stateless blocks itself and caching them.

    A block that only uses the static table and raw literals without
    indexing is read here, in one pass with no copying but of its strings;
    any other (and any malformed one) goes whole to hpack's own ``decode``,
    which raises its own errors for it. Every limit of hpack's decoder holds
    for both: ``max_header_list_size`` (with the same error) and the table
    size the peer must announce after ``max_allowed_table_size`` shrank.
    """

    def decode(self, data: bytes, raw: bool = False) -> Iterable[HeaderTuple]:
        """Decode one complete header block, as ``hpack.Decoder.decode``."""
        if not raw or self.header_table.maxsize > self.max_allowed_table_size:
            # Text headers, or a table the peer must shrink first: hpack's
            # decoder decides.
            return super().decode(data, raw)
        if data.__class__ is not bytes:
            data = bytes(data)
        found = DECODED_BLOCKS.get(data)
        if found is not None:
            headers, size = found
        else:
            walked = _walk(data, self.max_header_list_size)
            if walked is None:
                return super().decode(data, raw)
            headers, size, kept = walked
            if kept and len(data) <= MAX_CACHED_BLOCK and len(headers) <= MAX_CACHED_BLOCK_FIELDS:
                if len(DECODED_BLOCKS) >= MAX_CACHED_BLOCKS:
                    DECODED_BLOCKS.clear()
                DECODED_BLOCKS[data] = headers, size
        if size > self.max_header_list_size:
            raise OversizedHeaderListError(
                f"A header list larger than {self.max_header_list_size} has been received"
            )
        return list(headers)
