"""What ``tunnel http`` and ``tunnel tcp`` show while they run.

On a terminal, a live panel (rich): state, public URL, local target, the
inspector's address, latency to the server, connections open, requests per
minute, p50/p90 response times and the last requests, redrawn as things happen;
reconnects and warnings stay visible in it. Anywhere else (a pipe, a file, CI)
plain lines: one per state change, in the format scripts and tests read
(``connecting``, ``connected     <url> → <target>``), and one per request with
``--log-requests``.
"""

from __future__ import annotations

import http
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TextIO

import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .client import ClientState
from .client._observe import Exchange, Recorder

__all__ = ["AgentView", "LivePanel", "PlainReport", "show_agent"]

#: Requests listed in the panel.
PANEL_REQUESTS = 10
#: Warnings kept at the panel's foot.
PANEL_MESSAGES = 3
#: The panel's fastest redraw, and its redraw when nothing happens (seconds).
MIN_REDRAW = 0.1
IDLE_REDRAW = 1.0

_STATE_STYLE = {
    ClientState.CONNECTING: ("connecting", "yellow"),
    ClientState.CONNECTED: ("online", "bold green"),
    ClientState.DISCONNECTED: ("reconnecting", "bold yellow"),
    ClientState.CLOSED: ("closed", "bold red"),
}


class AgentView(Protocol):
    """What the display reads from the agent (a :class:`~tunnel.Client`)."""

    @property
    def state(self) -> ClientState:
        """The connection state."""
        ...

    @property
    def url(self) -> str:
        """The public URL."""
        ...

    @property
    def rtt(self) -> float | None:
        """The last keepalive round trip, in seconds."""
        ...

    @property
    def open_streams(self) -> int:
        """Requests and connections in flight."""
        ...

    @property
    def inspector_url(self) -> str | None:
        """The traffic inspector's address, if it runs."""
        ...


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.001 else f"{seconds * 1000:.2f} ms"
    return f"{seconds:.2f} s"


def _status(exchange: Exchange) -> str:
    if exchange.status is None:
        return "…" if not exchange.done else "error"
    return str(exchange.status)


def _reason(status: int | None) -> str:
    if status is None:
        return ""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


class PlainReport:
    """Plain lines for output that is not a terminal.

    Args:
        out: Where to write.
        agent: The agent, for its URL and inspector.
        target: The local service, such as ``http://127.0.0.1:8080``.
        requests: Also write one line per finished request.
    """

    def __init__(
        self, out: TextIO, agent: AgentView, target: str, *, requests: bool = False
    ) -> None:
        self.out = out
        self.agent = agent
        self.target = target
        self.requests = requests
        self._told_inspector = False

    def _line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def state_changed(self, state: ClientState) -> None:
        """Write the line for a state change."""
        if state is not ClientState.CONNECTED:
            self._line(state.value)
            return
        self._line(f"{state.value:<13} {self.agent.url} → {self.target}")
        inspector = self.agent.inspector_url
        if inspector is not None and not self._told_inspector:
            self._told_inspector = True
            self._line(f"{'inspector':<13} {inspector}")

    def exchange_changed(self, exchange: Exchange | None) -> None:
        """A :class:`~tunnel.Recorder` listener: write a line when a request ends."""
        if not self.requests or exchange is None or not exchange.done:
            return
        line = (
            f"{'request':<13} {exchange.method} {exchange.target} → {_status(exchange)} "
            f"in {_ms(exchange.duration)}"
        )
        if exchange.error is not None:
            line += f" ({exchange.error})"
        self._line(line)


class LivePanel:
    """The terminal panel's model and rendering; :meth:`render` draws it.

    Args:
        agent: The agent to show.
        target: The local service, such as ``http://127.0.0.1:8080``.
        recorder: Where the requests and their timings come from, if recorded.
        wall_clock: Seconds since the epoch, for the clock times shown.
    """

    def __init__(
        self,
        agent: AgentView,
        target: str,
        recorder: Recorder | None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.agent = agent
        self.target = target
        self.recorder = recorder
        self.wall_clock = wall_clock
        self.reconnects = 0
        self.messages: deque[tuple[float, str]] = deque(maxlen=PANEL_MESSAGES)
        self._was_connected = False

    def state_changed(self, state: ClientState) -> None:
        """Count reconnects: a connection lost after it had been up."""
        if state is ClientState.CONNECTED:
            if self._was_connected:
                self.reconnects += 1
            self._was_connected = True

    def message(self, text: str) -> None:
        """Show a warning at the panel's foot (the last few are kept)."""
        self.messages.append((self.wall_clock(), text))

    def render(self) -> RenderableType:
        """The whole panel, as it is now."""
        agent = self.agent
        label, style = _STATE_STYLE[agent.state]
        status = Text("● " + label, style=style)
        if self.reconnects:
            times = "once" if self.reconnects == 1 else f"{self.reconnects} times"
            status.append(f"   reconnected {times}", style="yellow")

        facts = Table.grid(padding=(0, 3))
        facts.add_column(style="bold cyan", no_wrap=True)
        facts.add_column()
        facts.add_row("Status", status)
        forwarding = Text(agent.url, style="bold")
        forwarding.append(" → ", style="dim").append(self.target)
        facts.add_row("Forwarding", forwarding)
        if agent.inspector_url is not None:
            facts.add_row("Inspector", agent.inspector_url)
        facts.add_row("Latency", _ms(agent.rtt))
        parts = [f"open {agent.open_streams}"]
        if self.recorder is not None:
            stats = self.recorder.statistics()
            parts += [f"total {stats.total}", f"errors {stats.errors}"]
            facts.add_row("Connections", "   ".join(parts))
            facts.add_row(
                "Requests",
                f"{stats.requests_per_minute}/min   p50 {_ms(stats.p50)}   p90 {_ms(stats.p90)}",
            )
        else:
            facts.add_row("Connections", "   ".join(parts))

        title = Text("tunnel", style="bold")
        title.append("   (Ctrl+C to quit)", style="dim")
        blocks: list[RenderableType] = [title, Text(), facts]
        if self.recorder is not None:
            blocks += [Text(), self._requests()]
        if self.messages:
            blocks.append(Text())
            for at, text in self.messages:
                stamp = time.strftime("%H:%M:%S", time.localtime(at))
                blocks.append(Text(f"{stamp}  {text}", style="yellow"))
        return Group(*blocks)

    def _requests(self) -> RenderableType:
        assert self.recorder is not None
        table = Table(
            title="HTTP requests",
            title_justify="left",
            title_style="bold",
            box=None,
            show_header=False,
            pad_edge=False,
            padding=(0, 2, 0, 0),
        )
        table.add_column(style="dim", no_wrap=True)
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="ellipsis", no_wrap=True, ratio=1)
        table.add_column(no_wrap=True)
        table.add_column(justify="right", style="dim", no_wrap=True)
        recent = self.recorder.recent(PANEL_REQUESTS)
        if not recent:
            table.add_row("", "", Text("no requests yet", style="dim"), "", "")
        for exchange in recent:
            code = exchange.status
            colour = (
                "dim"
                if code is None and not exchange.done
                else "red"
                if code is None or code >= 500
                else "yellow"
                if code >= 400
                else "green"
            )
            outcome = Text(f"{_status(exchange)} {_reason(code)}".rstrip(), style=colour)
            target = Text(exchange.target)
            if exchange.replay_of is not None:
                target = Text("↻ ", style="cyan").append(target)
            table.add_row(
                time.strftime("%H:%M:%S", time.localtime(exchange.started_at)),
                exchange.method,
                target,
                outcome,
                "" if exchange.duration is None else _ms(exchange.duration),
            )
        return table


class _PanelLog(logging.Handler):
    """Routes log records into the panel, where they don't tear its drawing."""

    def __init__(self, panel: LivePanel, wake: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.panel = panel
        self.wake = wake

    def emit(self, record: logging.LogRecord) -> None:
        self.panel.message(record.getMessage())
        self.wake()


@contextmanager
def _logging_into(handler: logging.Handler) -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [handler]
    try:
        yield
    finally:
        root.handlers[:] = saved


async def show_agent(
    agent: AgentView,
    states: trio.MemoryReceiveChannel[ClientState],
    target: str,
    recorder: Recorder | None,
    *,
    out: TextIO | None = None,
    live: bool | None = None,
    log_requests: bool = False,
) -> None:
    """Show the agent until cancelled: a live panel on a terminal, plain lines elsewhere.

    Args:
        agent: The agent.
        states: Its state changes (``ClientConfig.state``).
        target: The local service, as shown.
        recorder: Its requests, if recorded.
        out: Where to write; standard output by default.
        live: Draw the live panel; by default when ``out`` is a terminal
            (and ``TERM`` is not ``dumb``).
        log_requests: In plain lines, write a line per request too.
    """
    out = out or sys.stdout
    if live is None:
        live = out.isatty() and os.environ.get("TERM") != "dumb"
    if not live:
        report = PlainReport(out, agent, target, requests=log_requests)
        if recorder is not None:
            recorder.add_listener(report.exchange_changed)
        try:
            async for state in states:
                report.state_changed(state)
        finally:
            if recorder is not None:
                recorder.remove_listener(report.exchange_changed)
        return

    panel = LivePanel(agent, target, recorder)
    changed = trio.Event()

    def wake(_: object = None) -> None:
        changed.set()

    async def follow_states() -> None:
        async for state in states:
            panel.state_changed(state)
            wake()

    display = Live(
        console=Console(file=out, force_terminal=True),
        get_renderable=panel.render,
        auto_refresh=False,  # a thread otherwise; trio redraws it below
        redirect_stdout=False,
        redirect_stderr=False,
    )
    if recorder is not None:
        recorder.add_listener(wake)
    try:
        with _logging_into(_PanelLog(panel, wake)), display:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow_states)
                while True:
                    display.refresh()
                    await trio.sleep(MIN_REDRAW)
                    with trio.move_on_after(IDLE_REDRAW):
                        await changed.wait()
                    changed = trio.Event()
    finally:
        if recorder is not None:
            recorder.remove_listener(wake)
