"""A token bucket per key (per API token): ``rate`` requests a second on average, bursts up to ``burst``."""

from __future__ import annotations

import time
from collections import OrderedDict

MAX_KEYS = 100_000


class RateLimiter:
    """In-process token buckets; :meth:`take` answers 0 (go on) or the seconds until a request is allowed."""

    def __init__(self, *, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str, *, rate: float | None = None, burst: int | None = None) -> float:
        """Spend one request of ``key``'s bucket; returns 0.0, or the wait in seconds when it is empty."""
        rate = rate or self.rate
        burst = burst or self.burst
        now = time.monotonic()
        tokens, at = self._buckets.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - at) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > MAX_KEYS:
                self._buckets.popitem(last=False)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / rate
