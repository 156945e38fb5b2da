"""What ``tunnel http`` and ``tunnel tcp`` show while they run, and how often.

On a terminal, the live panel (``_panel.py``), redrawn as things happen; anywhere else,
plain lines (``_report.py``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

import trio
from rich.console import Console
from rich.live import Live

from ..client import ClientState, Recorder
from ._panel import LivePanel
from ._progress import TransferWatch
from ._report import PLAIN_PROGRESS_INTERVAL, PlainReport
from ._view import AgentView

__all__ = ["show_agent"]

#: The panel's fastest redraw, and its redraw when nothing happens (seconds).
MIN_REDRAW = 0.1
IDLE_REDRAW = 1.0
#: The panel's redraw while something counts down or moves (a reconnect wait,
#: a large transfer): often enough to look alive, rarely enough to cost nothing.
BUSY_REDRAW = 0.25


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
