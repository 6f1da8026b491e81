"""Keep a reference configuration unless a challenger beats it on evidence that resolves the difference.

A study's trials are scored on the same few validation items (the demo: about 110 people's labels), so two
configurations whose accuracies differ by one or two items cannot be told apart: picking the higher value
then follows noise as often as signal. The trials' per-item results make a paired comparison possible:
on the items where exactly one of the two models is right, the challenger wins ``w`` and loses ``l``; if
the two were equally good each such item would be a fair coin, so the one-sided exact sign test
(McNemar's exact test) ``P(X >= w)``, ``X ~ Binomial(w + l, 1/2)``, says how surprising the challenger's
lead is. The tuner replaces its baseline configuration (a hand-picked one that trained well across data
sets) with the best trial only when that p-value is at most the study's ``baseline_alpha``.

A trial's per-item results travel in its completion event as text: ``"<n>:<hex>"``, the ``n`` booleans in
the split's order packed eight to a byte, most significant bit first (:mod:`dlforge.common.packed`, which the
event's schema checks with the same code).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom


def sign_test(wins: int, losses: int) -> float:
    """One-sided exact sign test: ``P(X >= wins)`` for ``X ~ Binomial(wins + losses, 1/2)`` (1 with no pairs).
    The binomial tail from scipy, exact for any number of pairs (no ``2 ** n`` overflow past 1,023)."""
    if wins < 0 or losses < 0:
        raise ValueError("wins and losses are counts")
    n = wins + losses
    if n == 0:
        return 1.0
    return float(min(1.0, binom.sf(wins - 1, n, 0.5)))


def wins_needed(items: int, alpha: float) -> int | None:
    """The fewest wins out of ``items`` disagreements whose sign test gives p <= ``alpha`` (None: no number does).
    The p-value falls as the wins grow, so a bisection finds it in log(items) tests."""
    if sign_test(items, 0) > alpha:
        return None
    lo, hi = 0, items  # p(hi) <= alpha
    while lo < hi:
        mid = (lo + hi) // 2
        if sign_test(mid, items - mid) <= alpha:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class Paired:
    """A challenger against a reference on the same items: the items only the challenger got right
    (``wins``), only the reference got right (``losses``), and the sign test's p-value of the lead."""

    wins: int
    losses: int
    p_value: float

    @property
    def items(self) -> int:
        """The items where the two disagree."""
        return self.wins + self.losses


def paired(challenger: np.ndarray, reference: np.ndarray) -> Paired:
    """The paired comparison of two per-item result vectors of the same items in the same order."""
    a, b = np.asarray(challenger, dtype=bool), np.asarray(reference, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"per-item results of {a.size} and {b.size} items are not of the same items")
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    return Paired(wins, losses, sign_test(wins, losses))


def replaces(challenger: np.ndarray, reference: np.ndarray, alpha: float) -> tuple[bool, Paired]:
    """Whether ``challenger`` replaces ``reference``: its lead on the items where they disagree has a one-sided
    sign-test p-value of at most ``alpha`` (and the comparison it rests on)."""
    test = paired(challenger, reference)
    return test.p_value <= alpha, test
