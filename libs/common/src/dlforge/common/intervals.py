"""Exact binomial intervals: the arithmetic behind every reported rate with its uncertainty.

Clopper-Pearson intervals invert the binomial test, so they hold their coverage for every true rate
and every sample size (they are conservative, never too narrow): a spec check or an auto-label
guarantee built on them does not overstate what ``k`` successes out of ``n`` show.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from scipy.stats import beta


class Interval(BaseModel):
    """A rate ``k / n`` with its two-sided exact interval at ``level`` (point None for n = 0); a
    pydantic model, so reports and event payloads carry it as it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int
    n: int
    level: float
    point: float | None
    low: float
    high: float


def _check(k: int, n: int, level: float) -> None:
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def clopper_pearson(k: int, n: int, *, level: float = 0.95) -> Interval:
    """Two-sided exact interval for a binomial rate: ``P(low <= p <= high) >= level``."""
    _check(k, n, level)
    if n == 0:
        return Interval(k=0, n=0, level=level, point=None, low=0.0, high=1.0)
    a = (1.0 - level) / 2.0
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return Interval(k=k, n=n, level=level, point=k / n, low=low, high=high)


def upper_bound(k: int, n: int, *, level: float = 0.95) -> float:
    """One-sided exact upper bound on a binomial rate: ``P(p <= bound) >= level`` (1.0 for n = 0)."""
    _check(k, n, level)
    if n == 0 or k == n:
        return 1.0
    return float(beta.ppf(level, k + 1, n - k))


def lower_bound(k: int, n: int, *, level: float = 0.95) -> float:
    """One-sided exact lower bound on a binomial rate: ``P(p >= bound) >= level`` (0.0 for n = 0)."""
    _check(k, n, level)
    if n == 0 or k == 0:
        return 0.0
    return float(beta.ppf(1.0 - level, k, n - k + 1))
