"""The link's sans-IO core, driven without trio: two cores, bytes passed by hand.

An opener core (the server's end) and an answerer core (the agent's end)
exchange what ``data_to_send()`` gives through ``receive_data()``; time is a
number the test sets. Nothing here waits, so each test reads top to bottom.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h2.errors
import pytest
from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame

from tunnel.link import LinkCore, Role, StreamError, StreamState
from tunnel.link._abuse import MAX_CONTROL_FRAMES_PER_SECOND, Abuse, Rate
from tunnel.link._state import (
    KEEPALIVE_BUSY_PERIODS,
    MAX_FRAME,
    OUTBOUND_HIGH_WATER,
    STREAM_WINDOW,
    Phase,
)

ROOT = Path(__file__).resolve().parents[2]

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":authority", b"app.example.com"),
    (b":path", b"/"),
]


class Clock:
    """The time the cores' abuse counters see."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Waker:
    """Stands in for the shell's trio Event: records that it was set."""

    def __init__(self) -> None:
        self.woken = False

    def set(self) -> None:
        self.woken = True

    async def wait(self) -> None:  # pragma: no cover - the core never waits
        raise AssertionError("the core must not wait")


def make_core(role: Role, clock: Clock, **options: object) -> LinkCore[StreamState]:
    cores: list[LinkCore[StreamState]] = []
    core: LinkCore[StreamState] = LinkCore(
        role,
        new_stream=lambda stream_id: StreamState(cores[0], stream_id),
        clock=clock,
        **options,  # type: ignore[arg-type]
    )
    cores.append(core)
    return core


class Pair:
    """An opener and an answerer core, connected by :meth:`pump`."""

    def __init__(self, *, accepts: bool = True, **answerer_options: object) -> None:
        self.clock = Clock()
        self.opener = make_core(Role.OPENER, self.clock)
        self.answerer = make_core(Role.ANSWERER, self.clock, **answerer_options)
        self.answerer.accepts_streams = accepts
        #: The streams the answerer's peer opened, as a handler would get them.
        self.opened: list[StreamState] = []
        self.opener.start()
        self.answerer.start()
        self.pump()

    def pump(self) -> None:
        """Pass bytes both ways until neither core has anything to send."""
        while True:
            to_answerer = self.opener.data_to_send()
            to_opener = self.answerer.data_to_send()
            if not to_answerer and not to_opener:
                return
            if to_answerer:
                self.opened += self.answerer.receive_data(to_answerer)
            if to_opener:
                self.opener.receive_data(to_opener)


def open_stream(pair: Pair, *, end_stream: bool = False) -> tuple[StreamState, StreamState]:
    """A stream opened by the opener, and the answerer's side of it."""
    ours = pair.opener.open_stream_nowait(REQUEST, end_stream)
    assert ours is not None
    pair.pump()
    theirs = pair.opened.pop()
    assert theirs.id == ours.id
    return ours, theirs


def test_an_opened_stream_is_answered_and_both_sides_forget_it() -> None:
    pair = Pair()
    assert pair.opener.settings_received
    assert pair.answerer.settings_received
    request, handled = open_stream(pair)
    assert handled.headers == REQUEST
    assert not handled.headers_ended
    assert pair.opener.send_data(request, b"hello", 0, True) == 5
    pair.opener.data_ended(request, 5)
    pair.pump()
    assert handled.take_data() == b"hello"
    assert handled.remote_ended
    handled.send_headers([(b":status", b"200")])
    assert pair.answerer.send_data(handled, b"world", 0, True) == 5
    pair.answerer.data_ended(handled, 5)
    pair.pump()
    assert request.headers == [(b":status", b"200")]
    assert request.take_data() == b"world"
    assert request.remote_ended
    assert request.local_ended
    assert request.done
    assert pair.opener.streams == {} == pair.answerer.streams
    assert pair.opener.streams_opened == pair.answerer.streams_opened == 1


def test_a_body_waits_for_the_window_until_its_reader_acknowledges() -> None:
    pair = Pair()
    request, handled = open_stream(pair)
    body = bytes(STREAM_WINDOW + MAX_FRAME)
    offset = 0
    while True:
        reached = pair.opener.send_data(request, body, offset, True)
        high_water = pair.opener.queued > OUTBOUND_HIGH_WATER
        pair.pump()
        if reached == offset:
            break  # the window is used up
        offset = reached
        if not high_water:
            assert reached < len(body)
    assert offset == STREAM_WINDOW
    request._window = waker = Waker()
    # Taking the bytes gives nothing back; acknowledging them does.
    assert len(handled.take_data()) == STREAM_WINDOW
    pair.pump()
    assert not waker.woken
    handled.acknowledge()
    pair.pump()
    assert waker.woken
    assert pair.opener.send_data(request, body, offset, True) == len(body)
    pair.opener.data_ended(request, len(body))
    pair.pump()
    assert len(handled.take_data()) == MAX_FRAME
    assert handled.remote_ended


def test_a_finished_streams_unacknowledged_bytes_go_back() -> None:
    pair = Pair()
    request, handled = open_stream(pair)
    pair.opener.send_data(request, bytes(100_000), 0, True)
    pair.opener.data_ended(request, 100_000)
    pair.pump()
    window = pair.answerer._conn._inbound_flow_control_window_manager
    assert window.current_window_size + window._bytes_processed < window.max_window_size
    handled.cancel()  # its reader never took the bytes
    pair.pump()
    # h2 batches its WINDOW_UPDATEs, so what it holds back counts as given.
    assert window.current_window_size + window._bytes_processed == window.max_window_size


def test_streams_are_refused_while_nobody_takes_them() -> None:
    pair = Pair(accepts=False)
    request = pair.opener.open_stream_nowait(REQUEST, True)
    assert request is not None
    pair.pump()
    assert pair.opened == []
    assert request.reset is not None
    assert request.reset.code == h2.errors.ErrorCodes.REFUSED_STREAM
    assert "refused before any work began" in request.reset.reason


def test_the_peers_limit_on_streams_holds_new_ones_back() -> None:
    pair = Pair(max_concurrent_streams=1)
    pair.opener.capacity_waiter = waker = Waker()
    _request, handled = open_stream(pair)
    assert pair.opener.open_stream_nowait(REQUEST, True) is None
    handled.cancel()
    pair.pump()
    assert waker.woken
    assert pair.opener.open_stream_nowait(REQUEST, True) is not None


def test_the_answerers_drain_stops_new_streams_and_its_goaway_ends_the_rest() -> None:
    pair = Pair()
    request, handled = open_stream(pair)
    pair.answerer.start_drain()
    assert pair.answerer.phase is Phase.DRAINING
    pair.pump()
    # SETTINGS_MAX_CONCURRENT_STREAMS = 0 reached the opener.
    assert not pair.opener.accepting
    with pytest.raises(StreamError, match="stopped taking new requests") as refused:
        pair.opener.open_stream_nowait(REQUEST, True)
    assert refused.value.code == h2.errors.ErrorCodes.REFUSED_STREAM
    pair.answerer.send_goaway()
    assert pair.answerer.phase is Phase.GOAWAY_SENT
    assert not pair.answerer.can_send
    assert handled.reset is not None
    assert "closed before the request finished" in handled.reset.reason
    # What the opener still sends (a PING crossing the GOAWAY) is dropped unread.
    assert pair.opener.send_ping(0.0) is not None
    pair.answerer.receive_data(pair.opener.data_to_send())
    assert pair.answerer.data_to_send().count(bytes([0, 0, 8, 6])) == 0  # no PING ACK
    with pytest.raises(StreamError):
        handled.send_headers([(b":status", b"200")])
    assert request.reset is None


def test_the_peers_goaway_refuses_streams_above_its_last_id_and_finishes_the_rest() -> None:
    pair = Pair()
    first, handled = open_stream(pair)
    second = pair.opener.open_stream_nowait(REQUEST, False)
    assert second is not None
    goaway = bytes(GoAwayFrame(0, last_stream_id=first.id).serialize())
    pair.opener.receive_data(pair.answerer.data_to_send() + goaway)
    assert pair.opener.phase is Phase.GOAWAY_RECEIVED
    assert not pair.opener.accepting
    assert second.reset is not None
    assert second.reset.code == h2.errors.ErrorCodes.REFUSED_STREAM
    assert first.reset is None
    pair.opener.data_to_send()  # the second stream's HEADERS, never sent
    # The first stream finishes as before, and then so does the connection.
    pair.opener.end_stream(first)
    handled.send_headers([(b":status", b"204")], end_stream=True)
    pair.opener.receive_data(pair.answerer.data_to_send())
    pair.answerer.receive_data(pair.opener.data_to_send())
    assert first.headers == [(b":status", b"204")]
    assert pair.opener.final_reason == "the peer went away (GOAWAY) and every stream has finished"


def test_the_peers_goaway_with_no_stream_to_finish_ends_the_connection() -> None:
    pair = Pair()
    with pytest.raises(Exception, match="the peer went away"):
        pair.opener.receive_data(bytes(GoAwayFrame(0, last_stream_id=0).serialize()))


def test_end_fails_every_stream_and_wakes_every_waiter() -> None:
    pair = Pair()
    request, _ = open_stream(pair)
    pair.opener.capacity_waiter = capacity = Waker()
    request._window = window = Waker()
    pair.opener.end("the test is over")
    assert pair.opener.phase is Phase.CLOSED
    assert request.reset is not None
    assert request.reset.reason == "the test is over"
    assert capacity.woken
    assert window.woken
    assert pair.opener.streams == {}


def test_a_ping_answered_measures_the_round_trip() -> None:
    pair = Pair()
    ping = pair.opener.send_ping(10.0)
    assert ping is not None
    ping.waiter = waker = Waker()
    pair.pump()
    assert ping.answered
    assert waker.woken
    assert pair.opener.ping_finished(ping, 10.25)
    assert pair.opener.rtt == 0.25
    assert pair.opener.pings == {}


def test_a_late_ping_gets_more_time_only_while_the_peer_keeps_sending() -> None:
    pair = Pair()
    ping = pair.opener.send_ping(10.0)
    assert ping is not None
    pair.opener.data_to_send()  # the PING is lost
    assert not pair.opener.ping_late(ping)  # nothing arrived since: dead
    for _ in range(KEEPALIVE_BUSY_PERIODS):
        pair.answerer.send_ping(0.0)
        pair.opener.receive_data(pair.answerer.data_to_send())
        assert pair.opener.ping_late(ping)
    pair.answerer.send_ping(0.0)
    pair.opener.receive_data(pair.answerer.data_to_send())
    assert not pair.opener.ping_late(ping)  # busy, but out of extra periods
    assert not pair.opener.ping_finished(ping, 100.0)
    assert pair.opener.rtt is None


def test_a_flood_of_pings_is_abuse_and_a_trickle_is_not() -> None:
    pair = Pair()
    pair.clock.now += 1.0  # past the second of the SETTINGS exchange
    ping = bytes(PingFrame(0, opaque_data=b"12345678").serialize())
    for _ in range(3):
        pair.answerer.receive_data(ping * MAX_CONTROL_FRAMES_PER_SECOND)
        pair.clock.now += 1.0
    with pytest.raises(Abuse, match="PING or SETTINGS"):
        pair.answerer.receive_data(ping * (MAX_CONTROL_FRAMES_PER_SECOND + 1))


def test_a_trusted_peer_may_send_pings_as_it_likes() -> None:
    pair = Pair(trusted_peer_frames=True)
    ping = bytes(PingFrame(0, opaque_data=b"12345678").serialize())
    pair.answerer.receive_data(ping * (MAX_CONTROL_FRAMES_PER_SECOND * 3))


def test_a_flood_of_data_for_finished_streams_is_abuse() -> None:
    pair = Pair()
    _, handled = open_stream(pair)
    handled.cancel()
    pair.pump()
    stray = bytes(DataFrame(handled.id, data=b"x").serialize())
    pair.answerer.receive_data(stray * 100)  # some follow any reset
    with pytest.raises(Abuse, match="DATA for finished streams"):
        pair.answerer.receive_data(stray * 5000)


def test_a_rate_counts_per_second() -> None:
    clock = Clock()
    rate = Rate(2, "tests", clock)
    rate.count()
    rate.count()
    clock.now += 1.0
    rate.count()
    rate.count()
    with pytest.raises(Abuse, match="flooded the connection with tests"):
        rate.count()


def test_the_core_imports_no_trio() -> None:
    # The packages' own __init__ modules re-export the trio shell, so they are
    # stood in for; every module the core needs is imported for real.
    code = f"""
import sys, types
sys.modules["trio"] = None
for name, path in [("tunnel", "tunnel"), ("tunnel.link", "tunnel/link")]:
    package = types.ModuleType(name)
    package.__path__ = [{str(ROOT)!r} + "/" + path]
    sys.modules[name] = package
import tunnel.link._core, tunnel.link._h2compat, tunnel.link._abuse
import tunnel.link._state, tunnel.link._stream, tunnel.link._operations
assert "trio" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}}
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
