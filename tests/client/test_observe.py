"""The recorder behind the inspector and the panel: caps, ring buffer, counters, listeners.

Synchronous and on a fake clock: the recorder does no I/O and reads time only
through the clock it is given.
"""

from __future__ import annotations

import pytest

import tunnel
from tunnel.client._observe import Exchange, agent_observers


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def recorder(**kwargs: object) -> tuple[tunnel.Recorder, FakeClock]:
    clock = FakeClock()
    return tunnel.Recorder(clock=clock, **kwargs), clock  # type: ignore[arg-type]


def start(rec: tunnel.Recorder, target: bytes = b"/") -> Exchange:
    return rec.request_started(b"GET", target, [(b"host", b"app.localhost")])


def test_bodies_are_kept_up_to_the_cap_and_counted_in_full() -> None:
    rec, _ = recorder(body_cap=10)
    exchange = start(rec)
    for chunk in (b"0123", b"456789ab", b"cdef"):
        exchange.request_data(chunk)
    exchange.response_started(200, [(b"content-type", b"text/plain")])
    exchange.response_data(b"x" * 25)
    exchange.ended()

    assert bytes(exchange.request_body.data) == b"0123456789"
    assert exchange.request_body.size == 16
    assert exchange.request_body.truncated
    assert exchange.response_body.size == 25
    assert len(exchange.response_body.data) == 10
    assert exchange.response_body.truncated


def test_a_body_exactly_at_the_cap_is_whole() -> None:
    rec, _ = recorder(body_cap=4)
    exchange = start(rec)
    exchange.request_data(b"abcd")
    assert not exchange.request_body.truncated
    assert bytes(exchange.request_body.data) == b"abcd"


def test_the_ring_buffer_keeps_the_newest_and_drops_the_oldest() -> None:
    rec, _ = recorder(capacity=3)
    exchanges = [start(rec, f"/{i}".encode()) for i in range(5)]
    assert [e.target for e in rec.exchanges()] == ["/2", "/3", "/4"]
    assert len(rec) == 3
    assert rec.get(exchanges[0].id) is None
    assert rec.get(exchanges[4].id) is exchanges[4]
    assert [e.target for e in rec.recent(2)] == ["/4", "/3"]
    # An exchange pushed out while in flight still ends cleanly.
    exchanges[0].ended()
    assert rec.statistics().in_flight == 4


def test_timing_comes_from_the_clock() -> None:
    rec, clock = recorder()
    exchange = start(rec)
    clock.now += 0.25
    exchange.response_started(201, [])
    clock.now += 0.5
    exchange.ended()
    assert exchange.first_byte == pytest.approx(0.25)
    assert exchange.duration == pytest.approx(0.75)
    assert exchange.status == 201
    assert exchange.done


def test_only_the_first_end_counts() -> None:
    rec, clock = recorder()
    exchange = start(rec)
    exchange.ended("the local service at 127.0.0.1:1 refused", status=502)
    clock.now += 5
    exchange.ended()
    assert exchange.error == "the local service at 127.0.0.1:1 refused"
    assert exchange.status == 502
    assert exchange.duration == 0
    assert rec.statistics().errors == 1


def test_statistics_count_the_last_minute_and_take_percentiles() -> None:
    rec, clock = recorder()
    for duration_ms in range(1, 11):  # 1 ms .. 10 ms
        exchange = start(rec)
        clock.now += duration_ms / 1000
        exchange.ended()
    pending = start(rec)
    stats = rec.statistics()
    assert stats.total == 11
    assert stats.in_flight == 1
    assert stats.requests_per_minute == 11
    assert stats.p50 == pytest.approx(0.005)
    assert stats.p90 == pytest.approx(0.009)

    clock.now += 61
    pending.ended()
    stats = rec.statistics()
    assert stats.requests_per_minute == 0
    assert stats.in_flight == 0


def test_no_percentiles_before_any_request_ended() -> None:
    rec, _ = recorder()
    start(rec)
    stats = rec.statistics()
    assert stats.p50 is None
    assert stats.p90 is None


def test_listeners_hear_start_response_and_end_but_not_each_chunk() -> None:
    rec, _ = recorder()
    heard: list[tuple[int | None, bool]] = []

    def listener(exchange: Exchange | None) -> None:
        heard.append((None, False) if exchange is None else (exchange.id, exchange.done))

    rec.add_listener(listener)
    exchange = start(rec)
    exchange.request_data(b"a")
    exchange.response_started(200, [])
    exchange.response_data(b"b")
    exchange.ended()
    rec.clear()
    assert heard == [(1, False), (1, False), (1, True), (None, False)]
    assert rec.exchanges() == []

    rec.remove_listener(listener)
    rec.remove_listener(listener)  # twice is fine
    start(rec)
    assert len(heard) == 4


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        tunnel.Recorder(capacity=0)
    with pytest.raises(ValueError, match="body_cap"):
        tunnel.Recorder(body_cap=-1)


class CountingObserver:
    """A user's own observer, as ClientConfig.observer."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def request_started(self, method: bytes, target: bytes, headers: object) -> CountingObserver:
        self.events.append(f"start {method.decode()} {target.decode()}")
        return self

    def request_data(self, data: bytes) -> None:
        self.events.append(f"request {len(data)}")

    def response_started(self, status: int, headers: object) -> None:
        self.events.append(f"response {status}")

    def response_data(self, data: bytes) -> None:
        self.events.append(f"body {len(data)}")

    def ended(self, error: str | None = None, *, status: int | None = None) -> None:
        self.events.append(f"end {error}")


def test_agent_observers_share_a_given_recorder_or_add_one_for_the_inspector() -> None:
    rec = tunnel.Recorder()
    assert agent_observers(rec, inspector=True) == (rec, rec)
    assert agent_observers(None, inspector=False) == (None, None)
    own, made = agent_observers(None, inspector=True)
    assert isinstance(made, tunnel.Recorder)
    assert own is made

    user = CountingObserver()
    assert agent_observers(user, inspector=False) == (user, None)
    both, made = agent_observers(user, inspector=True)
    assert both is not None
    assert made is not None
    made.clock = lambda: 0.0
    exchange = both.request_started(b"PUT", b"/x", [])
    exchange.request_data(b"abc")
    exchange.response_started(204, [])
    exchange.ended()
    assert user.events == ["start PUT /x", "request 3", "response 204", "end None"]
    (recorded,) = made.exchanges()
    assert (recorded.method, recorded.status, recorded.request_body.size) == ("PUT", 204, 3)
