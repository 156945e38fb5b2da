"""What ``tunnel http`` and ``tunnel tcp`` show while they run.

On a terminal, a live panel (rich): state, public URL, local target, the
inspector's address, latency to the server, connections open, requests per
minute, p50/p90 response times and the last requests, redrawn as things happen;
reconnects and warnings stay visible in it. Long operations show progress: large
transfers in flight with bytes so far, total and rate, and the wait before a
reconnect counting down.

Anywhere else (a pipe, a file, CI) plain lines: one per state change, in the
format scripts and tests read (``connecting``, ``connected     <url> → <target>``),
one when a reconnect wait starts, one every :data:`PLAIN_PROGRESS_INTERVAL`
seconds per long transfer and one when it ends, and one per request with
``--log-requests``. Nothing is printed more often than that, so a busy tunnel
cannot flood a log.
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
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .client import ClientState
from .client._observe import Exchange, Recorder
from .client._progress import (
    LARGE_TRANSFER,
    ReconnectWait,
    TransferProgress,
    TransferWatch,
    format_bytes,
)

__all__ = ["AgentView", "LivePanel", "PlainReport", "show_agent"]

#: Requests listed in the panel.
PANEL_REQUESTS = 10
#: Warnings kept at the panel's foot.
PANEL_MESSAGES = 3
#: The panel's fastest redraw, and its redraw when nothing happens (seconds).
MIN_REDRAW = 0.1
IDLE_REDRAW = 1.0
#: The panel's redraw while something counts down or moves (a reconnect wait,
#: a large transfer): often enough to look alive, rarely enough to cost nothing.
BUSY_REDRAW = 0.25
#: Plain lines: how often a long transfer in flight gets a line (seconds); a
#: transfer shorter than this gets none until it ends.
PLAIN_PROGRESS_INTERVAL = 10.0
#: Plain lines: a transfer that moved this much gets a line when it ends, even
#: if it was quick.
PLAIN_LARGE_TRANSFER = 64 << 20

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
    def server_connections(self) -> int:
        """Connections to the server up now (one per server worker process)."""
        ...

    @property
    def inspector_url(self) -> str | None:
        """The traffic inspector's address, if it runs."""
        ...

    @property
    def reconnect_wait(self) -> ReconnectWait | None:
        """The wait before the next connection attempt, while there is one."""
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


def _waiting(wait: ReconnectWait, left: float) -> str:
    return f"in {left:.1f} s, attempt {wait.attempt}"


def _transferred(exchange: Exchange) -> str:
    """The plain line of a large transfer that ended."""
    parts = [f"{'transferred':<13} {exchange.method} {exchange.target}"]
    moved = 0
    for arrow, body in (("↑", exchange.request_body), ("↓", exchange.response_body)):
        if body.size >= LARGE_TRANSFER:
            parts.append(f"{arrow} {format_bytes(body.size)}")
            moved += body.size
    duration = exchange.duration or 0.0
    parts.append(f"in {_ms(duration)}")
    if duration > 0:
        parts.append(f"at {format_bytes(moved / duration)}/s")
    line = " ".join(parts)
    if exchange.error is not None:
        line += f" ({exchange.error})"
    return line


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
        watch: The large transfers in flight, for :meth:`tick`'s lines.
    """

    def __init__(
        self,
        out: TextIO,
        agent: AgentView,
        target: str,
        *,
        requests: bool = False,
        watch: TransferWatch | None = None,
    ) -> None:
        self.out = out
        self.agent = agent
        self.target = target
        self.requests = requests
        self.watch = watch
        self._told_inspector = False
        # Exchanges that got a progress line, so that their end gets one too.
        self._reported: set[int] = set()

    def _line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def state_changed(self, state: ClientState) -> None:
        """Write the line for a state change, and for the reconnect wait that follows."""
        if state is not ClientState.CONNECTED:
            self._line(state.value)
            wait = self.agent.reconnect_wait
            if state is ClientState.DISCONNECTED and wait is not None:
                # The wait's whole length: the countdown is the panel's.
                self._line(f"{'reconnecting':<13} {_waiting(wait, wait.delay)}")
            return
        self._line(f"{state.value:<13} {self.agent.url} → {self.target}")
        inspector = self.agent.inspector_url
        if inspector is not None and not self._told_inspector:
            self._told_inspector = True
            self._line(f"{'inspector':<13} {inspector}")

    def tick(self) -> None:
        """Write a line for each transfer in flight for :data:`PLAIN_PROGRESS_INTERVAL`."""
        if self.watch is None:
            return
        for transfer in self.watch.progress():
            if transfer.elapsed >= PLAIN_PROGRESS_INTERVAL:
                self._reported.add(transfer.exchange.id)
                self._line(f"{'transfer':<13} {transfer.describe()}")

    def exchange_changed(self, exchange: Exchange | None) -> None:
        """A :class:`~tunnel.Recorder` listener: write lines when a request ends.

        One for a long or large transfer; one for every request if asked.
        """
        if exchange is None or not exchange.done:
            return
        reported = exchange.id in self._reported
        self._reported.discard(exchange.id)
        largest = max(exchange.request_body.size, exchange.response_body.size)
        if reported or largest >= PLAIN_LARGE_TRANSFER:
            self._line(_transferred(exchange))
        if not self.requests:
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
        watch: The large transfers in flight, to show their progress.
        wall_clock: Seconds since the epoch, for the clock times shown.
        clock: trio's clock (:func:`trio.current_time`), for the reconnect
            countdown.
    """

    def __init__(
        self,
        agent: AgentView,
        target: str,
        recorder: Recorder | None,
        *,
        watch: TransferWatch | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.agent = agent
        self.target = target
        self.recorder = recorder
        self.watch = watch
        self.wall_clock = wall_clock
        self.clock = clock
        self.busy = False
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
        wait = agent.reconnect_wait
        if agent.state is ClientState.DISCONNECTED and wait is not None:
            status.append(" " + _waiting(wait, wait.remaining(self.clock())), style=style)
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
        latency = Text(_ms(agent.rtt))
        if agent.server_connections > 1:
            # A server of several worker processes: one connection to each.
            latency.append(f"   over {agent.server_connections} server connections", style="dim")
        facts.add_row("Latency", latency)
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
        transfers = self.watch.progress() if self.watch is not None else []
        # Redraw faster while something moves or counts down (see show_agent).
        self.busy = bool(transfers) or wait is not None
        if transfers:
            blocks += [Text(), _transfers(transfers)]
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
        table = _section("HTTP requests")
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


def _section(title: str) -> Table:
    """A titled, borderless table of the panel: one of its sections."""
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=None,
        show_header=False,
        pad_edge=False,
        padding=(0, 2, 0, 0),
    )


def _transfers(transfers: list[TransferProgress]) -> RenderableType:
    table = _section("Transfers")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="ellipsis", no_wrap=True, ratio=1)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True, width=20)
    for transfer in transfers:
        first = True
        for arrow, flow in (("↑", transfer.up), ("↓", transfer.down)):
            if flow is None:
                continue
            fraction = flow.fraction
            bar: RenderableType = (
                Text("") if fraction is None else ProgressBar(total=1.0, completed=fraction)
            )
            table.add_row(
                transfer.exchange.method if first else "",
                transfer.exchange.target if first else "",
                f"{arrow} {flow.describe()}",
                bar,
            )
            first = False
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
    watch = TransferWatch(recorder) if recorder is not None else None
    if watch is not None:
        watch.attach()
    try:
        if live:
            await _show_live(agent, states, target, recorder, watch, out)
        else:
            await _show_plain(agent, states, target, recorder, watch, out, log_requests)
    finally:
        if watch is not None:
            watch.detach()


async def _show_plain(
    agent: AgentView,
    states: trio.MemoryReceiveChannel[ClientState],
    target: str,
    recorder: Recorder | None,
    watch: TransferWatch | None,
    out: TextIO,
    log_requests: bool,
) -> None:
    report = PlainReport(out, agent, target, requests=log_requests, watch=watch)
    if recorder is not None:
        recorder.add_listener(report.exchange_changed)

    async def tick() -> None:
        while True:
            await trio.sleep(PLAIN_PROGRESS_INTERVAL)
            report.tick()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            async for state in states:
                report.state_changed(state)
            nursery.cancel_scope.cancel()
    finally:
        if recorder is not None:
            recorder.remove_listener(report.exchange_changed)


async def _show_live(
    agent: AgentView,
    states: trio.MemoryReceiveChannel[ClientState],
    target: str,
    recorder: Recorder | None,
    watch: TransferWatch | None,
    out: TextIO,
) -> None:
    panel = LivePanel(agent, target, recorder, watch=watch)
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
                    with trio.move_on_after(BUSY_REDRAW if panel.busy else IDLE_REDRAW):
                        await changed.wait()
                    changed = trio.Event()
    finally:
        if recorder is not None:
            recorder.remove_listener(wake)
