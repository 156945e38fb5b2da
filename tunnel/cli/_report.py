"""Plain lines for the agent's output when it is not a terminal (a pipe, a file, CI).

One line per state change, in the format scripts and tests read (``connecting``,
``connected     <url> → <target>``), one when a reconnect wait starts, one every
:data:`PLAIN_PROGRESS_INTERVAL` seconds per long transfer and one when it ends, and one per
request with ``--log-requests``. Nothing is printed more often than that, so a busy tunnel
cannot flood a log.
"""

from __future__ import annotations

from typing import TextIO

from ..client import ClientState, Exchange
from ._progress import LARGE_TRANSFER, TransferWatch, format_bytes
from ._view import AgentView, duration_text, status_text, waiting_text

__all__ = ["PLAIN_LARGE_TRANSFER", "PLAIN_PROGRESS_INTERVAL", "PlainReport"]

#: How often a long transfer in flight gets a line (seconds); a transfer shorter than
#: this gets none until it ends.
PLAIN_PROGRESS_INTERVAL = 10.0
#: A transfer that moved this much gets a line when it ends, even if it was quick.
PLAIN_LARGE_TRANSFER = 64 << 20


def _transferred(exchange: Exchange) -> str:
    """The plain line of a large transfer that ended."""
    parts = [f"{'transferred':<13} {exchange.method} {exchange.target}"]
    moved = 0
    for arrow, body in (("↑", exchange.request_body), ("↓", exchange.response_body)):
        if body.size >= LARGE_TRANSFER:
            parts.append(f"{arrow} {format_bytes(body.size)}")
            moved += body.size
    duration = exchange.duration or 0.0
    parts.append(f"in {duration_text(duration)}")
    if duration > 0:
        parts.append(f"at {format_bytes(moved / duration)}/s")
    line = " ".join(parts)
    if exchange.error is not None:
        line += f" ({exchange.error})"
    return line


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
                self._line(f"{'reconnecting':<13} {waiting_text(wait, wait.delay)}")
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
            f"{'request':<13} {exchange.method} {exchange.target} → {status_text(exchange)} "
            f"in {duration_text(exchange.duration)}"
        )
        if exchange.error is not None:
            line += f" ({exchange.error})"
        self._line(line)
