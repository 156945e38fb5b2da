"""Dialling other nodes: one dial for many requests, and a backoff while dials fail."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import tunnel
from tunnel._transport.handshake import ClientHandshake
from tunnel.server._peers import BACKOFF_INITIAL, BACKOFF_MAX, PeerError, Peers

SECRET = "the cluster secret, 32 characters"
B = ("b", "10.0.0.2:8000")


def failing_peers(monkeypatch, dials: list[float]) -> Peers:  # type: ignore[no-untyped-def]
    """Peers whose every dial fails at once, recording when each began."""
    peers = Peers(tunnel.ServerConfig(node_id="a", cluster_secret=SECRET))

    async def dial(address: str) -> tuple[ClientHandshake, trio.abc.Stream]:
        dials.append(trio.current_time())
        await trio.sleep(0.01)  # the network's round trip
        raise PeerError("connection refused")

    monkeypatch.setattr(peers, "dial", dial)
    # The top of each backoff's range, so that the times are exact.
    monkeypatch.setattr("tunnel.server._peers.random.uniform", lambda low, high: high)
    return peers


async def test_concurrent_requests_share_one_dial(
    monkeypatch, autojump_clock: trio.testing.MockClock
) -> None:
    dials: list[float] = []
    peers = failing_peers(monkeypatch, dials)
    async with trio.open_nursery() as nursery:
        await nursery.start(peers.serve)
        results: list[object] = []

        async def request() -> None:
            results.append(await peers.session("app", [B], trio.current_time() + 5))

        async with trio.open_nursery() as requests:
            for _ in range(10):
                requests.start_soon(request)
        assert results == [None] * 10
        assert len(dials) == 1
        nursery.cancel_scope.cancel()


async def test_dials_back_off_while_they_fail(
    monkeypatch, autojump_clock: trio.testing.MockClock
) -> None:
    dials: list[float] = []
    peers = failing_peers(monkeypatch, dials)
    async with trio.open_nursery() as nursery:
        await nursery.start(peers.serve)
        start = trio.current_time()
        for _ in range(8):
            assert await peers.session("app", [B], trio.current_time() + 60) is None
        nursery.cancel_scope.cancel()
    # Each dial waits the backoff from the end of the one before: 0.1, 0.2,
    # 0.4 ... seconds, up to BACKOFF_MAX.
    expected, at = [], start
    for failures in range(8):
        if failures:
            at += 0.01 + min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (failures - 1))
        expected.append(at)
    assert dials == pytest.approx(expected, abs=1e-9)
    assert dials[-1] - dials[-2] == pytest.approx(0.01 + BACKOFF_MAX, abs=1e-9)


async def test_a_request_waits_no_longer_than_its_deadline(
    monkeypatch, autojump_clock: trio.testing.MockClock
) -> None:
    dials: list[float] = []
    peers = failing_peers(monkeypatch, dials)
    async with trio.open_nursery() as nursery:
        await nursery.start(peers.serve)
        for _ in range(6):
            await peers.session("app", [B], trio.current_time() + 60)
        # The next dial is BACKOFF_MAX away; this request gives up at its deadline.
        start = trio.current_time()
        assert await peers.session("app", [B], start + 1.0) is None
        assert trio.current_time() == start + 1.0
        nursery.cancel_scope.cancel()


async def test_no_dial_to_this_node_itself(
    monkeypatch, autojump_clock: trio.testing.MockClock
) -> None:
    dials: list[float] = []
    peers = failing_peers(monkeypatch, dials)
    async with trio.open_nursery() as nursery:
        await nursery.start(peers.serve)
        assert await peers.session("app", [("a", "10.0.0.1:8000")], trio.current_time() + 5) is None
        nursery.cancel_scope.cancel()
    assert dials == []
