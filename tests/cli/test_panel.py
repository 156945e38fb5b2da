"""The agent's display: plain lines when output is not a terminal, the rich panel when it is."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import trio
import trio.testing
from rich.console import Console

import tunnel
from tunnel import ClientState
from tunnel.cli._panel import LivePanel
from tunnel.cli._progress import TransferWatch
from tunnel.cli._report import PLAIN_PROGRESS_INTERVAL, PlainReport
from tunnel.cli._show import show_agent
from tunnel.client._state import ReconnectWait

MiB = 1 << 20
URL = "http://app.localhost:8000"
TARGET = "http://127.0.0.1:8080"
INSPECTOR = "http://127.0.0.1:4040"


@dataclass
class FakeAgent:
    state: ClientState = ClientState.CONNECTING
    url: str = URL
    rtt: float | None = None
    open_streams: int = 0
    server_connections: int = 1
    inspector_url: str | None = INSPECTOR
    reconnect_wait: ReconnectWait | None = None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def traffic(recorder: tunnel.Recorder, clock: Clock) -> None:
    """Three finished requests (12, 30 and 250 ms) and one in flight."""
    for method, target, status, seconds in [
        ("GET", "/api/users", 200, 0.012),
        ("POST", "/api/orders", 201, 0.030),
        ("GET", "/missing", 404, 0.250),
    ]:
        exchange = recorder.request_started(method.encode(), target.encode(), [])
        clock.now += seconds
        exchange.response_started(status, [])
        exchange.ended()
    recorder.request_started(b"GET", b"/slow", [])


def test_plain_lines_keep_the_format_scripts_read() -> None:
    out = io.StringIO()
    agent = FakeAgent()
    report = PlainReport(out, agent, TARGET)
    for state in (
        ClientState.CONNECTING,
        ClientState.CONNECTED,
        ClientState.DISCONNECTED,
        ClientState.CONNECTING,
        ClientState.CONNECTED,
        ClientState.CLOSED,
    ):
        agent.state = state
        report.state_changed(state)
    assert out.getvalue().splitlines() == [
        "connecting",
        f"connected     {URL} → {TARGET}",
        f"inspector     {INSPECTOR}",  # once, after the first connection
        "disconnected",
        "connecting",
        f"connected     {URL} → {TARGET}",
        "closed",
    ]


def test_plain_lines_per_request_only_when_asked() -> None:
    clock = Clock()
    for requests, expected in [
        (False, []),
        (
            True,
            [
                "request       GET /api/users → 200 in 12 ms",
                "request       POST /api/orders → 201 in 30 ms",
                "request       GET /missing → 404 in 250 ms",
                "request       GET /down → 502 in 1.50 s (the local service is down)",
            ],
        ),
    ]:
        recorder = tunnel.Recorder(clock=clock)
        out = io.StringIO()
        report = PlainReport(out, FakeAgent(inspector_url=None), TARGET, requests=requests)
        recorder.add_listener(report.exchange_changed)
        traffic(recorder, clock)
        failed = recorder.request_started(b"GET", b"/down", [])
        clock.now += 1.5
        failed.ended("the local service is down", status=502)
        assert out.getvalue().splitlines() == expected


async def test_show_agent_without_a_terminal_prints_plain_lines() -> None:
    send, receive = trio.open_memory_channel[ClientState](8)
    out = io.StringIO()
    agent = FakeAgent(inspector_url=None)
    recorder = tunnel.Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: show_agent(agent, receive, TARGET, recorder, out=out, log_requests=True)
        )
        send.send_nowait(ClientState.CONNECTING)
        send.send_nowait(ClientState.CONNECTED)
        await trio.testing.wait_all_tasks_blocked()
        exchange = recorder.request_started(b"GET", b"/x", [])
        exchange.response_started(200, [])
        exchange.ended()
        await send.aclose()
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["connecting", f"connected     {URL} → {TARGET}"]
    assert lines[2].startswith("request       GET /x → 200 in ")
    assert len(lines) == 3
    # The display let go of the recorder when it stopped.
    recorder.request_started(b"GET", b"/y", []).ended()
    assert len(out.getvalue().splitlines()) == 3


def render(panel: LivePanel) -> str:
    console = Console(file=io.StringIO(), width=100, color_system=None, force_terminal=False)
    console.print(panel.render())
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(text, str)
    return text


def test_the_panel_shows_state_traffic_timings_and_the_last_requests() -> None:
    clock = Clock()
    recorder = tunnel.Recorder(clock=clock)
    agent = FakeAgent(state=ClientState.CONNECTED, rtt=0.023, open_streams=1)
    panel = LivePanel(agent, TARGET, recorder, wall_clock=lambda: 0.0)
    panel.state_changed(ClientState.CONNECTED)
    traffic(recorder, clock)
    text = render(panel)
    assert "● online" in text
    assert f"{URL} → {TARGET}" in text
    assert f"Inspector     {INSPECTOR}" in text
    assert "Latency       23 ms" in text
    assert "open 1   total 4   errors 0" in text
    assert "4/min   p50 30 ms   p90 250 ms" in text
    lines = text.splitlines()
    first = lines.index(next(line for line in lines if "/slow" in line))
    assert "GET" in lines[first]
    assert "…" in lines[first]  # still in flight
    assert "404 Not Found" in lines[first + 1]
    assert "/missing" in lines[first + 1]
    assert "250 ms" in lines[first + 1]
    assert "201 Created" in lines[first + 2]
    assert "200 OK" in lines[first + 3]
    assert "reconnected" not in text
    assert "server connections" not in text
    # A server of several workers: the agent holds a connection to each.
    agent.server_connections = 2
    assert "Latency       23 ms   over 2 server connections" in render(panel)


def test_the_panel_makes_reconnects_and_warnings_visible() -> None:
    agent = FakeAgent()
    panel = LivePanel(agent, TARGET, None, wall_clock=lambda: 0.0)
    for state in (
        ClientState.CONNECTED,
        ClientState.DISCONNECTED,
        ClientState.CONNECTING,
        ClientState.CONNECTED,
        ClientState.DISCONNECTED,
    ):
        panel.state_changed(state)
    agent.state = ClientState.DISCONNECTED
    panel.message("agent for app.localhost: lost the connection to the server")
    text = render(panel)
    assert "● reconnecting   reconnected once" in text
    assert "lost the connection to the server" in text
    assert "Latency       -" in text
    assert "HTTP requests" not in text  # nothing recorded: a TCP tunnel


async def test_the_live_panel_redraws_and_takes_over_logging(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.open_memory_channel[ClientState](8)
    out = io.StringIO()
    agent = FakeAgent(state=ClientState.CONNECTED)
    recorder = tunnel.Recorder()
    handlers = logging.getLogger().handlers[:]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: show_agent(agent, receive, TARGET, recorder, out=out, live=True))
        send.send_nowait(ClientState.CONNECTED)
        await trio.sleep(1)
        exchange = recorder.request_started(b"DELETE", b"/api/thing", [])
        exchange.response_started(204, [])
        exchange.ended()
        logging.getLogger("tunnel.client").warning("agent for x: lost the connection")
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    drawn = out.getvalue()
    assert "online" in drawn
    assert "/api/thing" in drawn
    assert "204 No Content" in drawn
    assert "lost the connection" in drawn
    assert logging.getLogger().handlers == handlers


def test_plain_lines_say_how_long_the_reconnect_wait_is() -> None:
    out = io.StringIO()
    agent = FakeAgent(state=ClientState.DISCONNECTED)
    report = PlainReport(out, agent, TARGET)
    report.state_changed(ClientState.DISCONNECTED)  # no wait (closing): no line for it
    agent.reconnect_wait = ReconnectWait(attempt=4, delay=3.25, until=50.0)
    report.state_changed(ClientState.DISCONNECTED)
    report.state_changed(ClientState.CONNECTING)
    assert out.getvalue().splitlines() == [
        "disconnected",
        "disconnected",
        "reconnecting  in 3.2 s, attempt 4",
        "connecting",
    ]


def test_the_panel_counts_the_reconnect_wait_down() -> None:
    clock = Clock()
    agent = FakeAgent(state=ClientState.DISCONNECTED)
    agent.reconnect_wait = ReconnectWait(attempt=3, delay=4.0, until=clock.now + 4.0)
    panel = LivePanel(agent, TARGET, None, wall_clock=lambda: 0.0, clock=clock)
    assert "● reconnecting in 4.0 s, attempt 3" in render(panel)
    assert panel.busy  # redrawn often while it counts down
    clock.now += 1.5
    assert "● reconnecting in 2.5 s, attempt 3" in render(panel)
    clock.now += 10
    assert "● reconnecting in 0.0 s, attempt 3" in render(panel)
    # The attempt itself: no countdown left.
    agent.state = ClientState.CONNECTING
    agent.reconnect_wait = None
    text = render(panel)
    assert "● connecting" in text
    assert "attempt" not in text
    assert not panel.busy


def test_the_panel_shows_large_transfers_with_bytes_total_and_rate() -> None:
    clock = Clock()
    recorder = tunnel.Recorder(clock=clock)
    watch = TransferWatch(recorder)
    watch.attach()
    agent = FakeAgent(state=ClientState.CONNECTED)
    panel = LivePanel(agent, TARGET, recorder, watch=watch, wall_clock=lambda: 0.0, clock=clock)
    small = recorder.request_started(b"GET", b"/small", [])
    download = recorder.request_started(b"GET", b"/video.mp4", [])
    download.response_started(200, [(b"content-length", str(8 * MiB).encode())])
    upload = recorder.request_started(b"PUT", b"/backup.tar", [])  # chunked: no total
    assert "Transfers" in render(panel)
    clock.now += 2
    download.response_data(bytes(3 * MiB))
    upload.request_data(bytes(5 * MiB))
    small.response_started(200, [])
    small.response_data(b"x" * 100)
    text = render(panel)
    lines = [line.rstrip() for line in text.splitlines()]
    start = lines.index("Transfers")
    assert "/video.mp4" in lines[start + 1]
    assert "↓ 3.0 MiB of 8.0 MiB (38%) at 1.5 MiB/s" in lines[start + 1]
    assert "━" in lines[start + 1]  # a bar, as the total is known
    assert "/backup.tar" in lines[start + 2]
    assert "↑ 5.0 MiB at 2.5 MiB/s" in lines[start + 2]
    assert "━" not in lines[start + 2]
    assert "/small" not in "".join(lines[start : start + 3])
    assert panel.busy
    download.ended()
    upload.ended()
    assert "Transfers" not in render(panel)
    assert not panel.busy


def test_plain_lines_for_long_and_large_transfers_only() -> None:
    clock = Clock()
    recorder = tunnel.Recorder(clock=clock)
    watch = TransferWatch(recorder)
    watch.attach()
    out = io.StringIO()
    report = PlainReport(out, FakeAgent(), TARGET, watch=watch)
    recorder.add_listener(report.exchange_changed)
    slow = recorder.request_started(b"GET", b"/slow.iso", [])
    slow.response_started(200, [(b"content-length", str(40 * MiB).encode())])
    quick = recorder.request_started(b"GET", b"/quick", [])
    clock.now += 5
    slow.response_data(bytes(10 * MiB))
    report.tick()  # 5 s in: not a long transfer yet
    quick.response_started(200, [])
    quick.response_data(bytes(2 * MiB))
    quick.ended()  # 2 MiB in 5 s: neither long nor large, no line
    assert out.getvalue() == ""
    clock.now += PLAIN_PROGRESS_INTERVAL - 5
    slow.response_data(bytes(10 * MiB))
    report.tick()
    clock.now += 10
    slow.response_data(bytes(20 * MiB))
    slow.ended()
    big = recorder.request_started(b"POST", b"/fast", [])
    clock.now += 0.5
    big.request_data(bytes(64 * MiB))  # quick, but large: a line when it ends
    big.ended()
    assert out.getvalue().splitlines() == [
        "transfer      GET /slow.iso ↓ 20.0 MiB of 40.0 MiB (50%) at 2.0 MiB/s",
        "transferred   GET /slow.iso ↓ 40.0 MiB in 20.00 s at 2.0 MiB/s",
        "transferred   POST /fast ↑ 64.0 MiB in 500 ms at 128.0 MiB/s",
    ]


async def test_plain_progress_lines_come_every_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Stamped(io.StringIO):
        """Output that notes the virtual time of each line written."""

        def __init__(self) -> None:
            super().__init__()
            self.lines: list[tuple[float, str]] = []

        def write(self, text: str) -> int:
            if text.strip():
                self.lines.append((trio.current_time() - start, text.strip()))
            return len(text)

    send, receive = trio.open_memory_channel[ClientState](8)
    out = Stamped()
    recorder = tunnel.Recorder()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: show_agent(FakeAgent(), receive, TARGET, recorder, out=out))
        await trio.testing.wait_all_tasks_blocked()  # listening, in no virtual time
        exchange = recorder.request_started(b"GET", b"/big", [])
        exchange.response_started(200, [])
        for _ in range(25):
            # Half a second off the report's ticks, so the order of wake-ups never matters.
            await trio.sleep(0.5)
            exchange.response_data(bytes(MiB))
            await trio.sleep(0.5)
        exchange.ended()
        await send.aclose()
    assert out.lines == [
        (10, "transfer      GET /big ↓ 10.0 MiB at 1.0 MiB/s"),
        (20, "transfer      GET /big ↓ 20.0 MiB at 1.0 MiB/s"),
        (25, "transferred   GET /big ↓ 25.0 MiB in 25.00 s at 1.0 MiB/s"),
    ]
