"""h2's settings, stored compactly: a small list per setting instead of a deque.

h2 keeps each setting's current value, and any values sent but not yet
acknowledged, in a ``collections.deque``: some 600 bytes each even when it holds
one value. A connection has two ``Settings`` (ours and the peer's) of five to
eight settings each, about 9 KiB per connection, and the server keeps one
connection per agent: an eighth of what an idle agent costs it (measured with
``benchmarks/bench.py``'s idle-agents phase: 61.6 → 54.1 KiB per agent). A list
holding the same values does the same job at a tenth of the size: h2 only
appends, reads the first value and pops it, on lists of one or two values.
"""

from __future__ import annotations

import h2.settings

__all__ = ["compact_header_tables", "compact_settings"]


class _Values(list[int]):
    """The deque methods h2's ``Settings`` uses, on a list."""

    __slots__ = ()

    def popleft(self) -> int:
        return self.pop(0)


def compact_settings(settings: h2.settings.Settings) -> h2.settings.Settings:
    """Store ``settings``' values in lists rather than deques; returns ``settings``."""
    # h2's private storage, of the same shape: setting -> values, current first.
    # A setting h2 adds later (one the peer sends that was not known) gets a
    # deque as before; that is rare and only costs the memory.
    compact: dict[h2.settings.SettingCodes | int, _Values] = {
        key: _Values(values) for key, values in settings._settings.items()
    }
    settings._settings = compact  # type: ignore[assignment]
    return settings


class _Entries(list[tuple[bytes, bytes]]):
    """The deque methods hpack's ``HeaderTable`` uses, on a list."""

    __slots__ = ()

    def appendleft(self, entry: tuple[bytes, bytes]) -> None:
        # An HPACK table holds at most a few dozen entries (4 KiB, 32 bytes of
        # overhead each), so shifting them is as cheap as a deque's append.
        self.insert(0, entry)


def compact_header_tables(*tables: object) -> None:
    """Store hpack ``HeaderTable`` entries in lists rather than deques (600 bytes each)."""
    for table in tables:
        entries = table.dynamic_entries  # type: ignore[attr-defined]
        table.dynamic_entries = _Entries(entries)  # type: ignore[attr-defined]
