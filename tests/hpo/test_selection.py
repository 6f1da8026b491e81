"""The paired comparison behind the tuner's baseline rule: packing per-item results and the exact sign test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from dlforge.hpo.selection import paired, replaces, sign_test, wins_needed


def test_the_sign_test_against_hand_values_and_scipy() -> None:
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == 1 / 32
    assert sign_test(6, 3) == pytest.approx((84 + 36 + 9 + 1) / 512)  # C(9,6..9) / 2^9
    assert sign_test(0, 4) == 1.0
    for wins, losses in [(1, 0), (5, 4), (8, 1), (12, 3), (30, 18), (0, 7)]:
        expected = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue
        assert sign_test(wins, losses) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        sign_test(-1, 2)


def test_paired_counts_only_the_items_the_two_disagree_on() -> None:
    a = np.array([1, 1, 1, 0, 0, 1, 1], dtype=bool)
    b = np.array([1, 0, 0, 1, 0, 1, 0], dtype=bool)
    result = paired(a, b)
    assert (result.wins, result.losses, result.items) == (3, 1, 4)
    assert result.p_value == pytest.approx(5 / 16)  # P(X >= 3), X ~ Bin(4, 1/2)
    with pytest.raises(ValueError, match="not of the same items"):
        paired(a, b[:-1])


def test_a_challenger_replaces_the_reference_only_at_the_level_asked() -> None:
    ref = np.array([True] * 90 + [False] * 10)
    lead = ref.copy()
    lead[90:95] = True  # right on 5 of the reference's misses, wrong on none of its hits: p = 1/32
    assert replaces(lead, ref, 0.05)[0] and not replaces(lead, ref, 0.03)[0]
    assert replaces(lead, ref, 0.05)[1] == paired(lead, ref)
    assert not replaces(ref, ref, 0.99)[0]  # no item where they disagree: p = 1
    assert replaces(ref, ref, 1.0)[0]


def test_the_sign_test_holds_past_a_thousand_pairs() -> None:
    """2 ** n overflows a float from n = 1,024: a large val split must not stop a study."""
    from fractions import Fraction
    from math import comb

    for wins, losses in [(600, 500), (560, 540), (1500, 1400)]:
        n = wins + losses
        exact = Fraction(sum(comb(n, k) for k in range(wins, n + 1)), 2 ** n)
        assert sign_test(wins, losses) == pytest.approx(float(exact), rel=1e-9)
    assert sign_test(400_000, 400_000) == pytest.approx(0.5, abs=1e-3)


def test_the_wins_needed_at_a_level() -> None:
    assert wins_needed(9, 0.05) == 8  # 8 of 9: 10 / 512 = 0.0195; 7 of 9: 46 / 512 = 0.0898
    assert wins_needed(5, 0.05) == 5  # 1 / 32
    assert wins_needed(4, 0.05) is None  # 4 of 4 gives 1 / 16
    assert wins_needed(0, 0.05) is None and wins_needed(0, 1.0) == 0
    for n, alpha in [(9, 0.05), (50, 0.05), (200, 0.1), (1001, 0.01)]:  # against a scan with scipy's test
        first = next(w for w in range(n + 1) if binomtest(w, n, 0.5, alternative="greater").pvalue <= alpha)
        assert wins_needed(n, alpha) == first
