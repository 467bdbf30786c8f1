"""Per-user fairness limits of one gateway process: creation rate and open WebSockets. Pure
(the clock is a parameter), no I/O.

They are per process: behind N gateways a user gets N times these limits until the counters
move to a shared, revision-checked KV bucket (ARCHITECTURE §9, the multi-gateway issue).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    """A token bucket per user: `burst` tokens, refilled at `rate_per_minute`."""

    def __init__(
        self, rate_per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate_per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        # user -> (tokens, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, user_id: str) -> float | None:
        """Take one token: None when admitted, else the seconds until one is available."""
        now = self._clock()
        tokens, then = self._buckets.get(user_id, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._rate)
        if tokens >= 1.0:
            self._buckets[user_id] = (tokens - 1.0, now)
            return None
        self._buckets[user_id] = (tokens, now)
        return (1.0 - tokens) / self._rate


class ConnectionLimiter:
    """Counts each user's open connections against `maximum`."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._open: dict[str, int] = {}

    def acquire(self, user_id: str) -> bool:
        count = self._open.get(user_id, 0)
        if count >= self.maximum:
            return False
        self._open[user_id] = count + 1
        return True

    @property
    def total(self) -> int:
        """Open connections of every user (the gateway's WebSocket clients gauge)."""
        return sum(self._open.values())

    def release(self, user_id: str) -> None:
        count = self._open.get(user_id, 0) - 1
        if count > 0:
            self._open[user_id] = count
        else:
            self._open.pop(user_id, None)
