"""Exact binomial intervals against closed forms and published values."""

import math

import pytest

from dlforge.common.intervals import clopper_pearson, lower_bound, upper_bound


def test_zero_successes_has_the_closed_form_upper_limit() -> None:
    # k = 0: the upper limit solves (1 - p)^n = alpha, so p = 1 - alpha^(1/n)
    iv = clopper_pearson(0, 10, level=0.95)
    assert iv.low == 0.0
    assert iv.high == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-9)
    assert upper_bound(0, 300, level=0.95) == pytest.approx(1 - 0.05 ** (1 / 300), abs=1e-9)


def test_all_successes_has_the_closed_form_lower_limit() -> None:
    iv = clopper_pearson(20, 20, level=0.95)
    assert iv.high == 1.0
    assert iv.low == pytest.approx(0.025 ** (1 / 20), abs=1e-9)
    assert lower_bound(50, 50, level=0.95) == pytest.approx(0.05 ** (1 / 50), abs=1e-9)


def test_published_values() -> None:
    # 5 of 10: 0.1871 - 0.8129 (Clopper & Pearson's exact limits, e.g. R's binom.test(5, 10))
    iv = clopper_pearson(5, 10)
    assert (round(iv.low, 4), round(iv.high, 4)) == (0.1871, 0.8129)


def _tail_at_least(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize(("k", "n"), [(81, 263), (3, 40), (37, 40)])
def test_limits_solve_the_binomial_tail_equations(k: int, n: int) -> None:
    # the defining equations, summed term by term: P(X >= k | low) = P(X <= k | high) = alpha / 2
    iv = clopper_pearson(k, n, level=0.95)
    assert _tail_at_least(k, n, iv.low) == pytest.approx(0.025, abs=1e-7)
    assert 1 - _tail_at_least(k + 1, n, iv.high) == pytest.approx(0.025, abs=1e-7)
    assert iv.point == pytest.approx(k / n)
    assert 1 - _tail_at_least(k + 1, n, upper_bound(k, n, level=0.9)) == pytest.approx(0.1, abs=1e-7)


def test_one_sided_bound_is_tighter_than_the_two_sided_limit() -> None:
    assert upper_bound(3, 100, level=0.95) < clopper_pearson(3, 100, level=0.95).high
    assert lower_bound(97, 100, level=0.95) > clopper_pearson(97, 100, level=0.95).low


def test_empty_and_bad_inputs() -> None:
    iv = clopper_pearson(0, 0)
    assert (iv.point, iv.low, iv.high) == (None, 0.0, 1.0)
    assert upper_bound(0, 0) == 1.0 and lower_bound(0, 0) == 0.0
    with pytest.raises(ValueError):
        clopper_pearson(5, 3)
    with pytest.raises(ValueError):
        upper_bound(1, 10, level=1.0)
