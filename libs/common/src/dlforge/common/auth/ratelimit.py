"""A token bucket per key (per API token): ``rate`` requests a second on average, bursts up to ``burst``; and the
backoff of sign-in attempts per user name."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

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


class LoginBackoff:
    """Wrong passwords per user name: after ``free`` in a row, each further attempt waits 1 s, 2 s, 4 s ...
    (at most ``longest``) after the last failure; a right password clears the count."""

    def __init__(self, *, free: int = 5, longest: float = 900.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.free = free
        self.longest = longest
        self.clock = clock
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # name -> (failures, not before)

    def wait(self, name: str) -> float:
        """0.0 if ``name`` may try now, else the seconds to wait."""
        _, not_before = self._failures.get(name, (0, 0.0))
        return max(0.0, not_before - self.clock())

    def failed(self, name: str) -> None:
        count = self._failures.get(name, (0, 0.0))[0] + 1
        delay = 0.0 if count < self.free else min(self.longest, 2.0 ** (count - self.free))
        self._failures[name] = (count, self.clock() + delay)
        self._failures.move_to_end(name)
        while len(self._failures) > MAX_KEYS:
            self._failures.popitem(last=False)

    def succeeded(self, name: str) -> None:
        self._failures.pop(name, None)
