"""Compact h2 settings and HPACK tables: h2's behaviour, in a fraction of the memory."""

from __future__ import annotations

import tracemalloc

import h2.settings
from h2.settings import SettingCodes

from tunnel.link._h2compat import compact_settings


def _exchange(settings: h2.settings.Settings) -> list[tuple[int, int | None, int]]:
    settings[SettingCodes.INITIAL_WINDOW_SIZE] = 8 << 20
    settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 10_000
    # Until acknowledged, the old values are in force.
    before = (settings.initial_window_size, settings.max_concurrent_streams)
    changed = settings.acknowledge()
    return [
        before,  # type: ignore[list-item]
        (settings.initial_window_size, settings.max_concurrent_streams, len(settings)),
        *sorted((int(k), c.original_value, c.new_value) for k, c in changed.items()),
    ]


def test_compact_settings_change_and_acknowledge_as_h2s_own() -> None:
    initial = {SettingCodes.MAX_CONCURRENT_STREAMS: 1000, SettingCodes.ENABLE_PUSH: 0}
    plain = h2.settings.Settings(client=True, initial_values=initial)
    compact = compact_settings(h2.settings.Settings(client=True, initial_values=initial))
    assert _exchange(compact) == _exchange(plain)
    assert dict(compact) == dict(plain)


def test_compact_settings_take_a_fraction_of_the_memory() -> None:
    def size(compacted: bool) -> int:
        tracemalloc.start()
        try:
            kept = [h2.settings.Settings(client=True) for _ in range(100)]
            if compacted:
                kept = [compact_settings(settings) for settings in kept]
            return tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()

    assert size(compacted=True) < size(compacted=False) / 3


def test_compact_header_tables_encode_and_decode_as_hpacks_own() -> None:
    import hpack

    from tunnel.link._h2compat import compact_header_tables

    plain_encoder, plain_decoder = hpack.Encoder(), hpack.Decoder()
    encoder, decoder = hpack.Encoder(), hpack.Decoder()
    compact_header_tables(encoder.header_table, decoder.header_table)
    # Enough distinct headers to fill the 4 KiB tables many times over, so
    # entries are added, found again and evicted.
    for i in range(300):
        headers = [
            (b":path", f"/item/{i % 40}".encode()),
            (b"x-request-id", f"{i:032d}".encode()),
            (b"cookie", b"c" * (i % 90)),
        ]
        block = encoder.encode(headers)
        assert block == plain_encoder.encode(headers)
        assert decoder.decode(block, raw=True) == plain_decoder.decode(block, raw=True) == headers
    assert list(encoder.header_table.dynamic_entries) == list(
        plain_encoder.header_table.dynamic_entries
    )
