"""Rate limits: requests and bandwidth per tunnel and per visitor address.

Requests over the limit are refused (429 with ``Retry-After``); bandwidth over
the limit is paced — transfers slow down, they are never cut.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import trio

from .._config import ServerConfig
from .._protocol.limits import RateLimit, TokenBucket

__all__ = ["Limiter", "Pacer"]

#: Visitor addresses whose buckets are remembered; the least recent go first.
MAX_VISITORS = 100_000


class _Buckets:
    __slots__ = ("bytes", "requests")

    def __init__(self, limit: RateLimit, now: float) -> None:
        rps, bps = limit.requests_per_second, limit.bytes_per_second
        self.requests = None if rps is None else TokenBucket(rps, limit.burst, now)
        # A second's worth of bytes may pass at once; beyond that, pacing.
        self.bytes = None if bps is None else TokenBucket(bps, bps, now)


class Pacer:
    """Slows one request's body transfers to the bandwidth limits that apply."""

    __slots__ = ("_buckets",)

    def __init__(self, buckets: list[TokenBucket]) -> None:
        self._buckets = buckets

    async def pace(self, size: int) -> None:
        """Account for ``size`` bytes; sleep as long as the limits require."""
        now = trio.current_time()
        delay = max(bucket.reserve(size, now) for bucket in self._buckets)
        if delay > 0:
            await trio.sleep(delay)


class Limiter:
    """The server's rate limits (``tunnel_rate_limit``, ``visitor_rate_limit``)."""

    def __init__(self, config: ServerConfig) -> None:
        self._tunnel = config.tunnel_rate_limit
        self._visitor = config.visitor_rate_limit
        #: The request-rate limits a cluster counts in its store: (prefix, limit).
        self.shared: list[tuple[str, RateLimit]] = [
            (prefix, limit)
            for prefix, limit in (("tunnel:", self._tunnel), ("visitor:", self._visitor))
            if limit is not None and limit.requests_per_second is not None
        ]
        self._tunnels: dict[str, _Buckets] = {}
        self._visitors: OrderedDict[str, _Buckets] = OrderedDict()

    @property
    def active(self) -> bool:
        """Whether any limit is configured (else nothing is counted)."""
        return self._tunnel is not None or self._visitor is not None

    def _for(self, tunnel: str, visitor: str | None, now: float) -> list[_Buckets]:
        found = []
        if self._tunnel is not None:
            buckets = self._tunnels.get(tunnel)
            if buckets is None:
                buckets = self._tunnels[tunnel] = _Buckets(self._tunnel, now)
            found.append(buckets)
        if self._visitor is not None and visitor is not None:
            buckets = self._visitors.get(visitor)
            if buckets is None:
                buckets = self._visitors[visitor] = _Buckets(self._visitor, now)
                if len(self._visitors) > MAX_VISITORS:
                    self._visitors.popitem(last=False)
            else:
                self._visitors.move_to_end(visitor)
            found.append(buckets)
        return found

    def admit(
        self, tunnel: str, visitor: str | None, *, requests: bool = True
    ) -> tuple[int, Pacer | None]:
        """Count one request.

        Args:
            tunnel: The tunnel's key.
            visitor: The visitor's address, if known.
            requests: Count the request against the request rates here; False
                when the cluster's store counts them (bandwidth stays here).

        Returns:
            ``(retry_after, pacer)``: seconds to wait before retrying (0 when
            admitted), and the pacer for its body transfers, if any limit
            applies to bandwidth.
        """
        now = trio.current_time()
        found = self._for(tunnel, visitor, now)
        waits = [b.requests.take(1, now) for b in found if requests and b.requests is not None]
        wait = max(waits, default=0.0)
        if wait > 0:
            return max(1, math.ceil(wait)), None
        pacing = [b.bytes for b in found if b.bytes is not None]
        return 0, Pacer(pacing) if pacing else None

    def forget(self, tunnel: str) -> None:
        """Drop a tunnel's buckets once its agent is gone."""
        self._tunnels.pop(tunnel, None)
