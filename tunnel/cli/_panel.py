"""The live panel ``tunnel http`` draws on a terminal (rich).

State, public URL, local target, the inspector's address, latency to the server,
connections open, requests per minute, p50/p90 response times and the last requests;
reconnects and warnings stay visible in it. Long operations show progress: large
transfers in flight with bytes so far, total and rate, and the wait before a reconnect
counting down.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import trio
from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..client import ClientState, Recorder
from ._progress import TransferProgress, TransferWatch
from ._view import AgentView, duration_text, reason_phrase, status_text, waiting_text

__all__ = ["LivePanel"]

#: Requests listed in the panel.
PANEL_REQUESTS = 10
#: Warnings kept at the panel's foot.
PANEL_MESSAGES = 3

_STATE_STYLE = {
    ClientState.CONNECTING: ("connecting", "yellow"),
    ClientState.CONNECTED: ("online", "bold green"),
    ClientState.DISCONNECTED: ("reconnecting", "bold yellow"),
    ClientState.CLOSED: ("closed", "bold red"),
}


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
            status.append(" " + waiting_text(wait, wait.remaining(self.clock())), style=style)
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
        latency = Text(duration_text(agent.rtt))
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
                f"{stats.requests_per_minute}/min   p50 {duration_text(stats.p50)}   "
                f"p90 {duration_text(stats.p90)}",
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
            outcome = Text(f"{status_text(exchange)} {reason_phrase(code)}".rstrip(), style=colour)
            target = Text(exchange.target)
            if exchange.replay_of is not None:
                target = Text("↻ ", style="cyan").append(target)
            table.add_row(
                time.strftime("%H:%M:%S", time.localtime(exchange.started_at)),
                exchange.method,
                target,
                outcome,
                "" if exchange.duration is None else duration_text(exchange.duration),
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
