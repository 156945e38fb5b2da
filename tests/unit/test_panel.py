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
from tunnel._panel import LivePanel, PlainReport, show_agent

URL = "http://app.localhost:8000"
TARGET = "http://127.0.0.1:8080"
INSPECTOR = "http://127.0.0.1:4040"


@dataclass
class FakeAgent:
    state: ClientState = ClientState.CONNECTING
    url: str = URL
    rtt: float | None = None
    open_streams: int = 0
    inspector_url: str | None = INSPECTOR


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
