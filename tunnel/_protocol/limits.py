"""Token buckets: how fast a tunnel or a visitor may send requests and bytes.

Sans-IO: the caller passes the time, so the rules are tested with plain numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RateLimit", "TokenBucket"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RateLimit:
    """How fast one tunnel, or one visitor address, may go.

    Attributes:
        requests_per_second: Sustained request rate; over it visitors get 429
            with ``Retry-After``. ``None``: no request limit.
        burst: Requests allowed at once above the sustained rate.
        bytes_per_second: Body bytes per second each way; faster transfers are
            slowed down, never cut. ``None``: no bandwidth limit.
    """

    requests_per_second: float | None = None
    burst: int = 10
    bytes_per_second: float | None = None

    def __post_init__(self) -> None:
        from .._exceptions import ConfigError

        for name in ("requests_per_second", "bytes_per_second"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"RateLimit.{name} must be positive (or None), got {value!r}")
        if self.burst < 1:
            raise ConfigError(f"RateLimit.burst must be at least 1, got {self.burst!r}")


class TokenBucket:
    """``rate`` tokens a second, at most ``capacity`` saved up."""

    __slots__ = ("_level", "_stamp", "capacity", "rate")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._level = capacity
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
            self._stamp = now

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` if there is enough: 0.0; else the seconds to wait (nothing taken)."""
        self._refill(now)
        if self._level >= amount:
            self._level -= amount
            return 0.0
        return (amount - self._level) / self.rate

    def reserve(self, amount: float, now: float) -> float:
        """Take ``amount`` even on credit; the seconds to wait before using it."""
        self._refill(now)
        self._level -= amount
        return 0.0 if self._level >= 0 else -self._level / self.rate
