"""The agent's reconnect loop: full-jitter exponential backoff, in virtual time.

The agent dials a loopback port where nothing listens; the refusal comes back
at once, so with autojump_clock every delay is exactly the backoff sleep.
"""

from __future__ import annotations

import itertools
import random

import pytest
import trio
import trio.testing

import tunnel
from helpers import free_port

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 3.0
ATTEMPTS = 8


def cap(n: int) -> float:
    """The bound on the delay after the n-th failure in a row (counting from 0)."""
    return min(BACKOFF_MAX, BACKOFF_INITIAL * 2.0**n)


async def connecting_times(attempts: int) -> list[float]:
    """Run an agent against a dead port; the times of its first CONNECTING states."""
    send, receive = trio.open_memory_channel[tunnel.ClientState](100)
    config = tunnel.ClientConfig(
        address=f"127.0.0.1:{free_port()}",
        token="s3cret",
        port=8080,
        state=send,
        backoff_initial=BACKOFF_INITIAL,
        backoff_max=BACKOFF_MAX,
    )
    client = tunnel.Client(config)
    times: list[float] = []
    states: list[tunnel.ClientState] = []
    start = trio.current_time()
    # Virtual time: enough for every delay at its cap, plus a margin.
    with trio.fail_after(BACKOFF_MAX * attempts + 10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.connect)
            async for state in receive:
                states.append(state)
                if state is tunnel.ClientState.CONNECTING:
                    times.append(trio.current_time() - start)
                    if len(times) == attempts:
                        nursery.cancel_scope.cancel()
                        break
    # A failed attempt goes straight back to DISCONNECTED, then waits.
    expected = [tunnel.ClientState.CONNECTING, tunnel.ClientState.DISCONNECTED] * attempts
    assert states == expected[:-1]
    assert client.state is tunnel.ClientState.CLOSED
    return times


async def test_backoff_delays_are_jittered_within_bounds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times = await connecting_times(ATTEMPTS)
    assert times[0] == 0
    delays = [b - a for a, b in itertools.pairwise(times)]
    for n, delay in enumerate(delays):
        assert 0 <= delay <= cap(n), (n, delay)
        assert delay <= BACKOFF_MAX


async def test_backoff_doubles_up_to_the_cap(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Always draw the largest delay allowed, so the schedule is exact.
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    times = await connecting_times(ATTEMPTS)
    # Delays 0.5, 1, 2, then 3 (the cap) from then on.
    assert times == [0, 0.5, 1.5, 3.5, 6.5, 9.5, 12.5, 15.5]


async def test_backoff_draws_from_zero(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        drawn.append((low, high))
        return low

    monkeypatch.setattr(random, "uniform", uniform)
    times = await connecting_times(5)
    assert times == [0, 0, 0, 0, 0]
    assert drawn[:4] == [(0, 0.5), (0, 1.0), (0, 2.0), (0, 3.0)]


async def test_unexpected_errors_back_off_like_lost_connections(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A bug that strikes every attempt (here: opening the connection raises
    # something no one expects) must neither end the agent nor spin: each
    # attempt is reported with its traceback, then waits its backoff.
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    raised: list[BaseException] = []

    async def broken(self: tunnel.Client, *args: object) -> None:
        raised.append(ZeroDivisionError("injected"))
        raise raised[-1]

    monkeypatch.setattr(tunnel.Client, "_open_stream", broken)
    times = await connecting_times(6)
    assert times == [0, 0.5, 1.5, 3.5, 6.5, 9.5]
    reports = [r for r in caplog.records if r.exc_info and r.exc_info[1] in raised]
    assert len(reports) == len(raised) >= 5
