"""Selective auto-labeling with a guarantee: which confidence is high enough to label without people.

The user sets the largest auto-label error they accept, ``target`` (``max_auto_label_error``). The
threshold is chosen on *held-out* predictions of a *random sample* of people-labeled items (the
labeler uses its random test split and the random val sample it asks first; not the uncertainty-sampled
batches, which are the hard cases,
nor the k-means seed, whose items nearest the centroids are easier than the rest, nor the model's
own auto-labels), by Learn-then-Test with fixed-sequence testing (Angelopoulos et al., 2021):

- a fixed grid of thresholds, decided before any data is seen (:func:`threshold_grid`), is walked
  from high to low;
- at each threshold ``t`` the null hypothesis "the error rate among items with confidence >= t
  exceeds the target" is rejected when the exact one-sided binomial (Clopper-Pearson) upper bound
  on that error rate, at ``level``, from the ``k`` errors among the ``n`` calibration items at or
  above ``t``, is at most the target (the same as the binomial test's p-value <= 1 - level);
- the walk stops at the first threshold that fails, and the lowest threshold that passed is kept.

Because the hypotheses are tested in an order fixed in advance and the walk stops at the first
failure, the many thresholds do not inflate the error: with probability >= ``level`` over the
calibration sample, the error rate among the items auto-labeled at the chosen threshold is at most
the target (for items drawn like the calibration items). Thresholds at which even zero errors could
not pass (fewer than :func:`min_items_for` calibration items at or above them: only the top of the
grid, as the count grows as the threshold falls) are skipped rather than counted as failures; the
skip depends on the confidences alone, not on which predictions were right.

A weaker guarantee, for when the random sample is too small for the bound (a 1 % target needs at
least 299 calibration items at or above the threshold, all of them right): with ``guarantee="expected"``
(:func:`choose_threshold_expected`) the threshold is chosen by conformal selection (Jin & Candes,
"Selection by prediction with conformal p-values", JMLR 2023): each unlabeled item gets the conformal
p-value of "its predicted class is wrong" from the calibration items that were wrong, and the
Benjamini-Hochberg procedure at ``target`` selects the items to auto-label. When the calibration items'
and the unlabeled items' confidences are exchangeable, the *expected* share of wrong labels among the
selected is at most the target (over calibration sample and items alike); a given run may exceed it.
In the labeler they are so only approximately, as for the bound: the calibration items are scored out of
fold and the unlabeled ones by the model fitted on every label, and active learning has taken hard items
out of the unlabeled pool. Measured in the loop: ``benchmarks/labeler.py --guarantee expected`` (README).
It can auto-label where the bound cannot, but all or nothing: with ``n`` calibration items
and ``W`` of them wrong above the threshold, it auto-labels a share of at least ``(1 + W) / (target (n + 1))``
of the items or none (40 % at a 1 % target, 250 items and no error above the threshold).

Nothing here assumes the confidences are calibrated: a badly calibrated model gets a higher
threshold and less coverage, not a broken guarantee. The guarantee covers the error rate over the
whole auto-labeled set; per predicted class the evidence is reported (:func:`per_class_evidence`)
and a class whose expected accuracy falls below ``1 - target`` is named, not averaged away.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from dlforge.common.intervals import upper_bound

DEFAULT_LEVEL = 0.95
Guarantee = Literal["bound", "expected"]
"""What the threshold guarantees: ``bound``, the error at most the target with probability 0.95
(:func:`choose_threshold`); ``expected``, its expectation at most the target (:func:`choose_threshold_expected`)."""


def threshold_grid() -> np.ndarray:
    """The candidate thresholds, high to low, fixed in advance: steps of 0.001 on [0, 1] and finer
    steps towards 1 (1 - 10**-3.1 ... 1 - 10**-7), where a strong classifier's confidences gather."""
    linear = np.linspace(0.0, 1.0, 1001)
    near_one = 1.0 - 10.0 ** -np.arange(3.1, 7.05, 0.1)
    return np.unique(np.round(np.concatenate([linear, near_one]), 12))[::-1]


def min_items_for(target: float, *, level: float = DEFAULT_LEVEL) -> int:
    """The fewest calibration items that can show an error rate <= ``target`` at all (zero errors):
    the smallest n with ``1 - (1 - level) ** (1 / n) <= target``."""
    _check(target, level)
    n = math.ceil(math.log(1.0 - level) / math.log(1.0 - target) - 1e-9)
    while n > 1 and upper_bound(0, n - 1, level=level) <= target:
        n -= 1
    while upper_bound(0, n, level=level) > target:
        n += 1
    return n


def _check(target: float, level: float) -> None:
    if not 0.0 < target < 1.0:
        raise ValueError(f"target error must be in (0, 1), got {target}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


@dataclass(frozen=True)
class SelectiveThreshold:
    """The chosen threshold and the evidence it rests on.

    ``threshold`` is None when no threshold passed: nothing may be auto-labeled under the guarantee.
    ``selected`` / ``errors`` are the calibration items at or above the threshold and the wrong ones
    among them; ``error_bound`` the exact one-sided upper bound on their error rate at ``level``.
    """

    threshold: float | None
    target: float
    level: float
    calibration_items: int
    selected: int
    errors: int
    error_bound: float | None
    tested: int  # hypotheses tested: thresholds ("bound") or pool items ("expected")
    method: Guarantee = "bound"  # "bound": error <= target with probability level; "expected": E[error] <= target
    estimate: float | None = None  # "expected": the conformal estimate of the error share (<= target)

    @property
    def calibration_coverage(self) -> float:
        """Share of the calibration items at or above the threshold."""
        return self.selected / self.calibration_items if self.calibration_items else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "calibration_coverage": self.calibration_coverage}


def _calibration(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The calibration items' confidences and correctness as 1-d arrays of one length, without NaN."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if conf.shape != ok.shape or conf.ndim != 1:
        raise ValueError(f"confidence and correct must be 1-d of one length, got {conf.shape} and {ok.shape}")
    if np.isnan(conf).any():
        raise ValueError("confidence holds NaN: pass only items with a held-out prediction")
    return conf, ok


def choose_threshold(
    confidence: np.ndarray,
    correct: np.ndarray,
    *,
    target: float,
    level: float = DEFAULT_LEVEL,
    grid: np.ndarray | None = None,
) -> SelectiveThreshold:
    """The lowest threshold of the fixed sequence whose error bound holds, and every test before it.

    ``confidence`` and ``correct`` describe the calibration items: the held-out confidence of the
    predicted class and whether that prediction matched the person's label. ``grid`` (high to low)
    replaces :func:`threshold_grid`; it must not depend on these data.
    """
    _check(target, level)
    conf, ok = _calibration(confidence, correct)
    thresholds = threshold_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    if len(thresholds) > 1 and np.any(np.diff(thresholds) >= 0):
        raise ValueError("the threshold grid must be strictly decreasing (tested from high to low)")
    n_cal = len(conf)
    order = np.argsort(-conf, kind="stable")
    desc = conf[order]
    cum_errors = np.concatenate([[0], np.cumsum(~ok[order])])
    # items at or above each threshold: desc is decreasing, so count those >= t
    at_or_above = np.searchsorted(-desc, -thresholds, side="right")
    n_min = min_items_for(target, level=level)
    chosen: tuple[float, int, int, float] | None = None
    tested = 0
    bounds: dict[tuple[int, int], float] = {}
    for t, n in zip(thresholds, at_or_above, strict=True):
        n = int(n)
        if n < n_min:  # even zero errors could not pass here: not a test (only the top of the grid)
            continue
        k = int(cum_errors[n])
        if (k, n) not in bounds:
            bounds[(k, n)] = upper_bound(k, n, level=level)
        tested += 1
        if bounds[(k, n)] > target:
            break
        chosen = (float(t), n, k, bounds[(k, n)])
    if chosen is None:
        return SelectiveThreshold(threshold=None, target=target, level=level, calibration_items=n_cal, selected=0,
                                  errors=0, error_bound=None, tested=tested)
    t, n, k, b = chosen
    return SelectiveThreshold(threshold=t, target=target, level=level, calibration_items=n_cal, selected=n,
                              errors=k, error_bound=b, tested=tested)


def choose_threshold_expected(
    confidence: np.ndarray,
    correct: np.ndarray,
    pool_confidence: np.ndarray,
    *,
    target: float,
    level: float = DEFAULT_LEVEL,
) -> SelectiveThreshold:
    """The threshold conformal selection chooses for the items of ``pool_confidence`` (see the module
    docstring): the expected share of wrong labels among the pool items at or above it is at most ``target``.

    ``confidence`` and ``correct`` describe the calibration items as for :func:`choose_threshold`; an item
    of the pool without a confidence (NaN) is never selected but counts among the ``m`` items. Item
    ``j``'s p-value is ``(1 + #{wrong calibration items with confidence >= c_j}) / (n + 1)``, counting ties
    against it; Benjamini-Hochberg keeps the largest ``k`` with ``p_(k) <= target k / m``. The p-values fall
    as the confidence rises, so the selected items are those at or above a threshold. ``error_bound`` is
    the exact one-sided bound at ``level`` on the error of the calibration items at or above the threshold
    (evidence only: the threshold was chosen on these items, and it is usually above the target);
    ``estimate`` the procedure's estimate ``(1 + W) / (n + 1) * m / k`` of the error share, at most the target;
    ``tested`` the pool items (one hypothesis each).
    """
    _check(target, level)
    conf, ok = _calibration(confidence, correct)
    pool = np.asarray(pool_confidence, dtype=np.float64)
    if pool.ndim != 1:
        raise ValueError(f"pool_confidence must be 1-d, got shape {pool.shape}")
    n, m = len(conf), len(pool)
    none = SelectiveThreshold(threshold=None, target=target, level=level, calibration_items=n, selected=0, errors=0,
                              error_bound=None, tested=m, method="expected")
    if n == 0 or m == 0:
        return none
    wrong = np.sort(conf[~ok])
    wrong_at_or_above = len(wrong) - np.searchsorted(wrong, pool, side="left")
    p = np.where(np.isnan(pool), np.inf, (1.0 + wrong_at_or_above) / (n + 1.0))
    ranked = np.sort(p)
    passing = np.flatnonzero(ranked <= target * np.arange(1, m + 1) / m)
    if passing.size == 0:
        return none
    k = int(passing[-1]) + 1
    selected = p <= target * k / m
    threshold = float(pool[selected].min())
    n_sel, n_err, bound = error_bound_at(conf, ok, threshold=threshold, level=level)
    w = int((wrong >= threshold).sum())
    estimate = (1.0 + w) / (n + 1.0) * m / int(selected.sum())
    return SelectiveThreshold(threshold=threshold, target=target, level=level, calibration_items=n, selected=n_sel,
                              errors=n_err, error_bound=bound, tested=m, method="expected", estimate=estimate)


def error_bound_at(confidence: np.ndarray, correct: np.ndarray, *, threshold: float,
                   level: float = DEFAULT_LEVEL) -> tuple[int, int, float]:
    """(items, errors, exact upper bound on the error rate) of the calibration items at or above
    ``threshold``: the evidence for one fixed threshold (e.g. 0.0 when every item is auto-labeled)."""
    conf = np.asarray(confidence, dtype=np.float64)
    sel = conf >= threshold
    n = int(sel.sum())
    k = int((~np.asarray(correct, dtype=bool)[sel]).sum())
    return n, k, upper_bound(k, n, level=level)


@dataclass(frozen=True)
class ClassEvidence:
    """Expected auto-label accuracy of one predicted class, from the held-out calibration items."""

    label: str
    calibration_items: int
    correct: int
    accuracy: float | None
    accuracy_lower: float
    auto_labeled: int
    needs_review: int
    below_target: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def per_class_evidence(
    *,
    classes: Sequence[str],
    calibration_predicted: np.ndarray,
    calibration_correct: np.ndarray,
    calibration_selected: np.ndarray,
    pool_predicted: np.ndarray,
    pool_auto: np.ndarray,
    pool_review: np.ndarray,
    target: float,
    level: float = DEFAULT_LEVEL,
) -> list[ClassEvidence]:
    """Per predicted class: the share of selected calibration items predicted as it that people
    labeled the same (with its exact one-sided lower bound at ``level``), how many pool items were
    auto-labeled as it and how many predicted as it were left for review. ``below_target``: the
    expected accuracy is under ``1 - target``, or the class was auto-labeled with no evidence."""
    _check(target, level)
    pred = np.asarray(calibration_predicted, dtype=np.int64)
    ok = np.asarray(calibration_correct, dtype=bool)
    sel = np.asarray(calibration_selected, dtype=bool)
    pool_pred = np.asarray(pool_predicted, dtype=np.int64)
    auto = np.asarray(pool_auto, dtype=bool)
    review = np.asarray(pool_review, dtype=bool)
    out: list[ClassEvidence] = []
    for c, label in enumerate(classes):
        mine = sel & (pred == c)
        n = int(mine.sum())
        right = int(ok[mine].sum())
        acc = right / n if n else None
        n_auto = int((auto & (pool_pred == c)).sum())
        lower = 1.0 - upper_bound(n - right, n, level=level)
        below = (acc is not None and acc < 1.0 - target) or (acc is None and n_auto > 0)
        out.append(ClassEvidence(label=label, calibration_items=n, correct=right,
                                 accuracy=round(acc, 4) if acc is not None else None,
                                 accuracy_lower=round(lower, 4), auto_labeled=n_auto,
                                 needs_review=int((review & (pool_pred == c)).sum()), below_target=below))
    return out


def class_warnings(evidence: Sequence[ClassEvidence], *, target: float) -> list[str]:
    """One message per class whose auto-labels are expected to fall below ``1 - target``."""
    out = []
    for e in evidence:
        if not e.below_target:
            continue
        if e.accuracy is None:
            out.append(f"class {e.label!r}: {e.auto_labeled} item(s) auto-labeled without any held-out evidence "
                       f"for this class (no people-labeled calibration item predicted as it)")
        else:
            out.append(f"class {e.label!r}: expected auto-label accuracy {e.accuracy:.1%} "
                       f"({e.correct}/{e.calibration_items} held-out items) is below the target "
                       f"{1.0 - target:.1%}; {e.auto_labeled} item(s) auto-labeled as {e.label!r}")
    return out
