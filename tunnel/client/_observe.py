"""Watching the agent's HTTP exchanges, for the traffic inspector and the terminal panel.

Nothing in this module does I/O or waits: ``relay_local_http()`` reports each event of an
exchange as it happens (request head, request body chunks, response head,
response body chunks, the end), and a :class:`Recorder` keeps what it was told
within fixed bounds: the most recent exchanges only, and each body only up to a
cap. Whoever shows the record (the inspector page, the panel) registers a
listener and is told, synchronously, which exchange changed.

With no observer configured, ``relay_local_http()`` pays one ``if`` per event and nothing
else.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

__all__ = [
    "DEFAULT_BODY_CAP",
    "DEFAULT_CAPACITY",
    "Body",
    "Exchange",
    "ExchangeObserver",
    "Observer",
    "Recorder",
    "RecorderStatistics",
    "agent_observers",
]

#: Bytes of each request and response body a :class:`Recorder` keeps.
DEFAULT_BODY_CAP = 64 * 1024
#: How many recent exchanges a :class:`Recorder` keeps.
DEFAULT_CAPACITY = 200
#: How many recent durations the percentiles are computed over.
DURATION_SAMPLES = 1000
#: The window of :attr:`RecorderStatistics.requests_per_minute`, in seconds.
RATE_WINDOW = 60

RawHeaders = Sequence[tuple[bytes, bytes]]


class ExchangeObserver(Protocol):
    """Told about the events of one HTTP exchange, in this order.

    ``request_data`` may come after ``response_started`` (a local service may
    answer before reading the whole request); ``ended`` always comes last, once.
    """

    def request_data(self, data: bytes) -> None:
        """A chunk of the request body was sent to the local service."""

    def response_started(self, status: int, headers: RawHeaders) -> None:
        """The local service's response head arrived."""

    def response_data(self, data: bytes) -> None:
        """A chunk of the response body was relayed to the visitor."""

    def ended(self, error: str | None = None, *, status: int | None = None) -> None:
        """The exchange is over.

        Args:
            error: What went wrong, or None for a complete exchange.
            status: The status of the error page the agent answered with itself
                (the local service was unreachable or broke the protocol).
        """


class Observer(Protocol):
    """Told about every HTTP request the agent forwards (``ClientConfig.observer``)."""

    def request_started(
        self, method: bytes, target: bytes, headers: RawHeaders
    ) -> ExchangeObserver:
        """A request is about to go to the local service; return its observer.

        Args:
            method: The request method, such as ``b"GET"``.
            target: The request target: path and query.
            headers: The HTTP/1.1 headers sent to the local service.
        """
        ...


class Body:
    """The first ``cap`` bytes of a body, and its full size."""

    __slots__ = ("cap", "data", "size")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.size = 0

    def add(self, chunk: bytes) -> None:
        """Count ``chunk``; keep what fits under the cap."""
        self.size += len(chunk)
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    @property
    def truncated(self) -> bool:
        """Whether bytes beyond the cap were dropped."""
        return self.size > len(self.data)


class Exchange:
    """One recorded request and its response, as a :class:`Recorder` keeps it.

    Attributes:
        id: Increasing from 1 within its recorder.
        method: The request method.
        target: The request target (path and query).
        request_headers: The headers sent to the local service.
        request_body: The request body's first bytes and size.
        status: The response status, None until the response head arrived.
        response_headers: The response headers from the local service.
        response_body: The response body's first bytes and size.
        started_at: When the request started, in seconds since the epoch.
        started: When the request started, on the recorder's clock.
        first_byte: Seconds from the start to the response head, or None.
        duration: Seconds from the start to the end, None while in flight.
        error: What went wrong, None for a complete exchange.
        replay_of: The id of the exchange this one replayed, if it is a replay.
    """

    __slots__ = (
        "_recorder",
        "duration",
        "error",
        "first_byte",
        "id",
        "method",
        "replay_of",
        "request_body",
        "request_headers",
        "response_body",
        "response_headers",
        "started",
        "started_at",
        "status",
        "target",
    )

    def __init__(
        self,
        recorder: Recorder,
        id: int,
        method: bytes,
        target: bytes,
        headers: RawHeaders,
        replay_of: int | None,
    ) -> None:
        self._recorder = recorder
        self.id = id
        self.method = method.decode("ascii", "replace")
        self.target = target.decode("ascii", "replace")
        self.request_headers = list(headers)
        self.request_body = Body(recorder.body_cap)
        self.status: int | None = None
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.response_body = Body(recorder.body_cap)
        self.started_at = time.time()
        self.started = recorder.clock()
        self.first_byte: float | None = None
        self.duration: float | None = None
        self.error: str | None = None
        self.replay_of = replay_of

    def __repr__(self) -> str:
        return f"<Exchange #{self.id} {self.method} {self.target} {self.status}>"

    @property
    def done(self) -> bool:
        """Whether the exchange has ended."""
        return self.duration is not None

    @property
    def request_whole(self) -> bool:
        """Whether the request body recorded so far is all of it (so it can be sent again).

        Decided by what the request announced, not by what has arrived: while
        the body is on its way, what arrived is a shorter request. A chunked
        body announces no length, so it is whole only once the exchange ended
        well.
        """
        fields = dict(self.request_headers)
        length = fields.get(b"content-length")
        if length is not None and length.isdigit():
            return self.request_body.size >= int(length)
        if b"transfer-encoding" in fields:
            return self.done and self.error is None
        return True

    # -- ExchangeObserver ------------------------------------------------------

    def request_data(self, data: bytes) -> None:
        """A request body chunk."""
        self.request_body.add(data)

    def response_started(self, status: int, headers: RawHeaders) -> None:
        """The response head."""
        self.status = status
        self.response_headers = list(headers)
        self.first_byte = self._recorder.clock() - self.started
        self._recorder._changed(self)

    def response_data(self, data: bytes) -> None:
        """A response body chunk."""
        self.response_body.add(data)

    def ended(self, error: str | None = None, *, status: int | None = None) -> None:
        """The end; only the first call counts."""
        if self.duration is not None:
            return
        if status is not None and self.status is None:
            self.status = status
        self.error = error
        self.duration = self._recorder.clock() - self.started
        self._recorder._ended(self)


@dataclass(frozen=True, slots=True)
class RecorderStatistics:
    """Counters of a :class:`Recorder`, as :meth:`Recorder.statistics` reports them.

    Attributes:
        total: Requests started since the recorder was made.
        in_flight: Requests started and not yet ended.
        errors: Requests that ended with an error (not counting error statuses
            the local service chose to answer).
        requests_per_minute: Requests started in the last 60 seconds.
        p50: The median duration of recent requests, in seconds (None before
            any ended).
        p90: The 90th percentile of the same.
    """

    total: int
    in_flight: int
    errors: int
    requests_per_minute: int
    p50: float | None
    p90: float | None


Listener = Callable[["Exchange | None"], None]


class Recorder:
    """Keeps the most recent HTTP exchanges of an agent, within fixed bounds.

    Pass one as ``ClientConfig.observer`` (the traffic inspector makes its own
    when none is given). Memory stays below about ``capacity * 2 * body_cap``
    bytes plus headers, however much traffic passes.

    Args:
        capacity: How many exchanges to keep; the oldest go first.
        body_cap: How many bytes of each request and response body to keep.
        clock: Seconds on a monotonic clock; :func:`trio.current_time` unless
            a test gives its own.

    Example::

        recorder = tunnel.Recorder()
        config = tunnel.ClientConfig(..., observer=recorder)
        ...
        for exchange in recorder.exchanges():
            print(exchange.method, exchange.target, exchange.status)
    """

    def __init__(
        self,
        *,
        capacity: int = DEFAULT_CAPACITY,
        body_cap: int = DEFAULT_BODY_CAP,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"Recorder capacity must be at least 1, got {capacity}")
        if body_cap < 0:
            raise ValueError(f"Recorder body_cap must be 0 or more, got {body_cap}")
        self.capacity = capacity
        self.body_cap = body_cap
        self.clock = clock
        self._exchanges: dict[int, Exchange] = {}
        self._ids = itertools.count(1)
        self._listeners: list[Listener] = []
        self._total = 0
        self._in_flight = 0
        self._errors = 0
        # [second, requests started in it], for the last RATE_WINDOW seconds.
        self._per_second: deque[list[int]] = deque(maxlen=RATE_WINDOW + 1)
        self._durations: deque[float] = deque(maxlen=DURATION_SAMPLES)

    def request_started(
        self,
        method: bytes,
        target: bytes,
        headers: RawHeaders,
        *,
        replay_of: int | None = None,
    ) -> Exchange:
        """Record a new exchange (the :class:`Observer` interface).

        Args:
            method: The request method.
            target: The request target.
            headers: The request headers sent to the local service.
            replay_of: The id of the exchange this request replays.

        Returns:
            The new exchange, which records the rest of its events itself.
        """
        exchange = Exchange(self, next(self._ids), method, target, headers, replay_of)
        self._exchanges[exchange.id] = exchange
        if len(self._exchanges) > self.capacity:
            del self._exchanges[next(iter(self._exchanges))]
        self._total += 1
        self._in_flight += 1
        second = math.floor(exchange.started)
        if self._per_second and self._per_second[-1][0] == second:
            self._per_second[-1][1] += 1
        else:
            self._per_second.append([second, 1])
        self._changed(exchange)
        return exchange

    def exchanges(self) -> list[Exchange]:
        """The exchanges kept, oldest first."""
        return list(self._exchanges.values())

    def recent(self, count: int) -> list[Exchange]:
        """The ``count`` most recent exchanges, newest first."""
        return list(itertools.islice(reversed(self._exchanges.values()), count))

    def get(self, exchange_id: int) -> Exchange | None:
        """The exchange with this id, or None if it was never kept or is gone."""
        return self._exchanges.get(exchange_id)

    def __len__(self) -> int:
        return len(self._exchanges)

    def __iter__(self) -> Iterator[Exchange]:
        return iter(list(self._exchanges.values()))

    def clear(self) -> None:
        """Forget every exchange kept (the counters stay)."""
        self._exchanges.clear()
        self._notify(None)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` whenever the record changes.

        It gets the exchange that started, got its response head or ended, or
        None when the record was cleared. Listeners run synchronously inside
        the request's task, so they must be quick and must not block: set an
        event, or put into a bounded buffer.
        """
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; no error if it was not added."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def statistics(self) -> RecorderStatistics:
        """Counters and response-time percentiles of the traffic seen so far."""
        horizon = math.floor(self.clock()) - RATE_WINDOW
        per_minute = sum(count for second, count in self._per_second if second > horizon)
        ordered = sorted(self._durations)
        return RecorderStatistics(
            total=self._total,
            in_flight=self._in_flight,
            errors=self._errors,
            requests_per_minute=per_minute,
            p50=_percentile(ordered, 0.5),
            p90=_percentile(ordered, 0.9),
        )

    def _changed(self, exchange: Exchange) -> None:
        self._notify(exchange)

    def _ended(self, exchange: Exchange) -> None:
        self._in_flight -= 1
        if exchange.error is not None:
            self._errors += 1
        assert exchange.duration is not None
        self._durations.append(exchange.duration)
        self._notify(exchange)

    def _notify(self, exchange: Exchange | None) -> None:
        for listener in list(self._listeners):
            listener(exchange)


def _percentile(ordered: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of sorted ``ordered``; None when empty."""
    if not ordered:
        return None
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


class _BothExchanges:
    """Two exchange observers told the same events."""

    __slots__ = ("first", "second")

    def __init__(self, first: ExchangeObserver, second: ExchangeObserver) -> None:
        self.first = first
        self.second = second

    def request_data(self, data: bytes) -> None:
        self.first.request_data(data)
        self.second.request_data(data)

    def response_started(self, status: int, headers: RawHeaders) -> None:
        self.first.response_started(status, headers)
        self.second.response_started(status, headers)

    def response_data(self, data: bytes) -> None:
        self.first.response_data(data)
        self.second.response_data(data)

    def ended(self, error: str | None = None, *, status: int | None = None) -> None:
        self.first.ended(error, status=status)
        self.second.ended(error, status=status)


class _Both:
    """Two observers told about the same requests (a user's, and the inspector's)."""

    __slots__ = ("first", "second")

    def __init__(self, first: Observer, second: Observer) -> None:
        self.first = first
        self.second = second

    def request_started(
        self, method: bytes, target: bytes, headers: RawHeaders
    ) -> ExchangeObserver:
        return _BothExchanges(
            self.first.request_started(method, target, headers),
            self.second.request_started(method, target, headers),
        )


def agent_observers(
    observer: Observer | None, *, inspector: bool
) -> tuple[Observer | None, Recorder | None]:
    """The observer ``relay_local_http()`` gets, and the recorder the inspector shows.

    A :class:`Recorder` given as ``observer`` serves both; with the inspector on
    and no recorder given, a new one is told alongside ``observer``.
    """
    if isinstance(observer, Recorder):
        return observer, observer
    if not inspector:
        return observer, None
    recorder = Recorder()
    if observer is None:
        return recorder, recorder
    return _Both(observer, recorder), recorder
