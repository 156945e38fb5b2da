"""Progress of the agent's large transfers, for the terminal panel and the plain report.

Nothing here does I/O or waits. A :class:`TransferWatch` follows the exchanges a
:class:`~tunnel.Recorder` records and, each time it is asked, says how far the large
ones in flight have come and how fast they move. Whoever displays them (the terminal
panel, the plain report) asks as often as it redraws. (The other long operation shown,
the wait before a reconnect, is the agent's own :class:`~tunnel.ReconnectWait`.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..client import Exchange, Recorder

__all__ = [
    "LARGE_TRANSFER",
    "RATE_WINDOW",
    "Flow",
    "TransferProgress",
    "TransferWatch",
    "declared_length",
    "format_bytes",
]

#: A body this large (moved or declared) makes its exchange a transfer to show.
LARGE_TRANSFER = 1 << 20
#: Seconds of samples a transfer's rate is measured over.
RATE_WINDOW = 3.0


@dataclass(frozen=True, slots=True)
class Flow:
    """One direction of a transfer: bytes so far, the total if declared, the rate.

    Attributes:
        done: Body bytes moved so far.
        total: The body's declared length (``Content-Length``), or None.
        rate: Bytes per second over the last :data:`RATE_WINDOW` seconds, or
            None before any time passed.
    """

    done: int
    total: int | None
    rate: float | None

    @property
    def fraction(self) -> float | None:
        """How much of ``total`` has moved, from 0 to 1; None without a total."""
        if self.total is None:
            return None
        if self.total == 0:
            return 1.0
        return min(1.0, self.done / self.total)

    def describe(self) -> str:
        """Such as ``312.0 MiB of 1.0 GiB (30%) at 85.2 MiB/s``."""
        text = format_bytes(self.done)
        if self.total is not None:
            text += f" of {format_bytes(self.total)} ({self.fraction or 0:.0%})"
        if self.rate is not None:
            text += f" at {format_bytes(self.rate)}/s"
        return text


@dataclass(frozen=True, slots=True)
class TransferProgress:
    """A large transfer in flight, as :meth:`TransferWatch.progress` sees it.

    Attributes:
        exchange: The recorded exchange.
        up: The request body (visitor to local service), if it is large.
        down: The response body (local service to visitor), if it is large.
        elapsed: Seconds since the request started.
    """

    exchange: Exchange
    up: Flow | None
    down: Flow | None
    elapsed: float

    def describe(self) -> str:
        """One line, such as ``GET /big ↓ 312.0 MiB of 1.0 GiB (30%) at 85.2 MiB/s``."""
        parts = [self.exchange.method, self.exchange.target]
        if self.up is not None:
            parts.append(f"↑ {self.up.describe()}")
        if self.down is not None:
            parts.append(f"↓ {self.down.describe()}")
        return " ".join(parts)


def format_bytes(size: float) -> str:
    """``1536`` → ``1.5 KiB``; whole bytes below a KiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def declared_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """The ``Content-Length`` of ``headers``, or None if absent or not a number."""
    for name, value in headers:
        if name.lower() == b"content-length":
            text = value.strip()
            return int(text) if text.isdigit() else None
    return None


class _Followed:
    """An exchange in flight, and (time, request bytes, response bytes) samples of it."""

    __slots__ = ("exchange", "samples")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        # The request started with nothing moved: the first rate is the average.
        self.samples: deque[tuple[float, int, int]] = deque([(exchange.started, 0, 0)])


class TransferWatch:
    """Follows the exchanges in flight of a :class:`~tunnel.Recorder`, for progress.

    Register :meth:`exchange_changed` as the recorder's listener (or use
    :meth:`attach`); then each :meth:`progress` call samples the body sizes of
    the exchanges in flight and reports those with a large body. It holds only
    the exchanges in flight, so its memory is bounded by the agent's
    concurrency, whatever the recorder keeps.

    Args:
        recorder: Where the exchanges are recorded; its clock is the watch's.
        large: The body size, moved or declared, from which a transfer shows.
        window: Seconds of samples each rate is measured over.
    """

    def __init__(
        self, recorder: Recorder, *, large: int = LARGE_TRANSFER, window: float = RATE_WINDOW
    ) -> None:
        self.recorder = recorder
        self.large = large
        self.window = window
        self.clock: Callable[[], float] = recorder.clock
        self._followed: dict[int, _Followed] = {}

    def attach(self) -> None:
        """Start following the recorder's exchanges."""
        self.recorder.add_listener(self.exchange_changed)

    def detach(self) -> None:
        """Stop following them."""
        self.recorder.remove_listener(self.exchange_changed)
        self._followed.clear()

    def exchange_changed(self, exchange: Exchange | None) -> None:
        """The recorder's listener: follow exchanges that start, forget those that end."""
        if exchange is None:
            return
        if exchange.done:
            self._followed.pop(exchange.id, None)
        elif exchange.id not in self._followed:
            self._followed[exchange.id] = _Followed(exchange)

    def progress(self) -> list[TransferProgress]:
        """Sample now; the large transfers in flight, oldest first."""
        now = self.clock()
        shown: list[TransferProgress] = []
        for followed in self._followed.values():
            exchange = followed.exchange
            up_done = exchange.request_body.size
            down_done = exchange.response_body.size
            samples = followed.samples
            if samples[-1][0] < now:
                samples.append((now, up_done, down_done))
            # Keep one sample at or beyond the window's start, as the rate's base.
            while len(samples) > 2 and samples[1][0] <= now - self.window:
                samples.popleft()
            base_time, base_up, base_down = samples[0]
            span = now - base_time
            up_rate = (up_done - base_up) / span if span > 0 else None
            down_rate = (down_done - base_down) / span if span > 0 else None
            up_total = declared_length(exchange.request_headers)
            down_total = (
                declared_length(exchange.response_headers) if exchange.status is not None else None
            )
            up = self._flow(up_done, up_total, up_rate)
            down = self._flow(down_done, down_total, down_rate)
            if up is not None or down is not None:
                shown.append(TransferProgress(exchange, up, down, now - exchange.started))
        return shown

    def _flow(self, done: int, total: int | None, rate: float | None) -> Flow | None:
        if max(done, total or 0) < self.large:
            return None
        return Flow(done, total, rate)

    def __len__(self) -> int:
        return len(self._followed)
