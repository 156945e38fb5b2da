"""Progress of large transfers: bytes so far, declared totals and rates, on a test clock."""

from __future__ import annotations

import pytest

import tunnel
from tunnel.cli._progress import (
    LARGE_TRANSFER,
    Flow,
    TransferWatch,
    declared_length,
    format_bytes,
)
from tunnel.client._state import ReconnectWait

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def watched() -> tuple[tunnel.Recorder, TransferWatch, Clock]:
    clock = Clock()
    recorder = tunnel.Recorder(clock=clock)
    watch = TransferWatch(recorder, window=3.0)
    watch.attach()
    return recorder, watch, clock


def test_an_upload_shows_bytes_total_and_the_rate_over_the_last_seconds() -> None:
    recorder, watch, clock = watched()
    exchange = recorder.request_started(
        b"POST", b"/upload", [(b"content-length", str(10 * MiB).encode())]
    )
    # Declared large: shown at once, before a byte moved, with no rate yet.
    [shown] = watch.progress()
    assert shown.up == Flow(0, 10 * MiB, None)
    assert shown.down is None
    # 1 MiB in each of the first two seconds, then 4 MiB in the third.
    for seconds, chunk in [(1, 1 * MiB), (1, 1 * MiB), (1, 4 * MiB)]:
        clock.now += seconds
        exchange.request_data(bytes(chunk))
        [shown] = watch.progress()
    assert shown.up == Flow(6 * MiB, 10 * MiB, 2 * MiB)  # 6 MiB over the 3 s window
    assert shown.elapsed == 3
    assert shown.up is not None
    assert shown.up.fraction == 0.6
    # One more second at 4 MiB/s: the window now starts at second 1.
    clock.now += 1
    exchange.request_data(bytes(4 * MiB))
    [shown] = watch.progress()
    assert shown.up == Flow(10 * MiB, 10 * MiB, 3 * MiB)  # (10 - 1) MiB / 3 s
    assert shown.describe() == "POST /upload ↑ 10.0 MiB of 10.0 MiB (100%) at 3.0 MiB/s"


def test_a_download_without_length_shows_once_it_is_large() -> None:
    recorder, watch, clock = watched()
    exchange = recorder.request_started(b"GET", b"/stream", [])
    exchange.response_started(200, [(b"content-type", b"application/octet-stream")])
    clock.now += 1
    exchange.response_data(bytes(LARGE_TRANSFER - 1))
    assert watch.progress() == []  # small so far
    clock.now += 1
    exchange.response_data(bytes(1))
    [shown] = watch.progress()
    assert shown.up is None
    assert shown.down == Flow(LARGE_TRANSFER, None, LARGE_TRANSFER / 2)
    assert shown.describe() == "GET /stream ↓ 1.0 MiB at 512.0 KiB/s"


def test_the_response_total_is_its_content_length() -> None:
    recorder, watch, clock = watched()
    exchange = recorder.request_started(b"GET", b"/big", [(b"content-length", b"0")])
    exchange.response_started(200, [(b"Content-Length", str(4 * MiB).encode())])
    clock.now += 2
    exchange.response_data(bytes(MiB))
    [shown] = watch.progress()
    assert shown.up is None  # an empty request body is no transfer
    assert shown.down == Flow(MiB, 4 * MiB, MiB / 2)
    assert shown.describe() == "GET /big ↓ 1.0 MiB of 4.0 MiB (25%) at 512.0 KiB/s"


def test_ended_exchanges_are_forgotten_and_detach_stops_following() -> None:
    recorder, watch, _ = watched()
    first = recorder.request_started(b"GET", b"/a", [(b"content-length", str(2 * MiB).encode())])
    recorder.request_started(b"GET", b"/b", [])
    assert len(watch) == 2
    first.ended()
    assert len(watch) == 1
    assert watch.progress() == []
    watch.detach()
    recorder.request_started(b"GET", b"/c", [(b"content-length", str(2 * MiB).encode())])
    assert len(watch) == 0


def test_a_transfer_stays_followed_when_the_recorder_forgets_it() -> None:
    clock = Clock()
    recorder = tunnel.Recorder(capacity=1, clock=clock)
    watch = TransferWatch(recorder)
    watch.attach()
    big = recorder.request_started(b"PUT", b"/big", [(b"content-length", str(2 * MiB).encode())])
    recorder.request_started(b"GET", b"/small", [])
    assert recorder.get(big.id) is None
    assert [shown.exchange for shown in watch.progress()] == [big]


@pytest.mark.parametrize(
    ("headers", "length"),
    [
        ([(b"content-length", b" 42 ")], 42),
        ([(b"CONTENT-LENGTH", b"7")], 7),
        ([(b"content-length", b"-1")], None),
        ([(b"content-type", b"text/plain")], None),
    ],
)
def test_declared_length(headers: list[tuple[bytes, bytes]], length: int | None) -> None:
    assert declared_length(headers) == length


def test_format_bytes_and_the_wait() -> None:
    assert [format_bytes(n) for n in (0, 1023, 1536, 5 * MiB, 3 << 30)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 GiB",
    ]
    wait = ReconnectWait(attempt=4, delay=3.2, until=10.0)
    assert wait.remaining(8.0) == 2.0
    assert wait.remaining(11.0) == 0.0
