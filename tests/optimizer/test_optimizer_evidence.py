"""Intervals, per-class figures, the operating curve and the three-way verdict on hand-worked numbers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from dlforge.common.events import Spec
from dlforge.common.intervals import Interval, clopper_pearson
from dlforge.optimizer.evaluation import choose_threshold, decide
from dlforge.optimizer.evidence import (
    accuracy_at_recall,
    operating_curve,
    spec_verdict,
    split_figures,
)

SPEC = Spec(positive_class="defect", min_recall=0.9, min_accuracy=0.9, min_fps=1.0, input_size=256)


def _iv(k: int, n: int) -> Interval:
    return clopper_pearson(k, n)


# ------------------------------------------------------------------------------------------------
# the verdict
# ------------------------------------------------------------------------------------------------


def test_95_of_100_against_0_9_is_met_on_the_point_estimate_only() -> None:
    # Clopper-Pearson 95 % for 95/100: [0.8872, 0.9836] (tables, e.g. Newcombe 1998); 0.887 < 0.9
    acc = _iv(95, 100)
    assert acc.low == pytest.approx(0.8872, abs=5e-4) and acc.high == pytest.approx(0.9836, abs=5e-4)
    recall = _iv(60, 60)  # 60/60: lower bound 0.025 ** (1/60) = 0.9404 (closed form for k = n)
    assert recall.low == pytest.approx(0.025 ** (1 / 60))
    v = spec_verdict(SPEC, accuracy=acc, recall={"defect": recall}, fps=10.0)
    assert v.verdict == "met_point_estimate"
    assert v.point_estimate_ok and not v.lower_bounds_ok
    assert v.test_items == 100 and v.test_positives == 60
    assert len(v.reasons) == 1 and "accuracy 0.9500 >= 0.9" in v.reasons[0] and "0.8872" in v.reasons[0]


def test_lower_bounds_above_the_targets_meet_the_spec_with_confidence() -> None:
    # 100/100: lower bound 0.025 ** (1/100) = 0.9638 > 0.9 for both figures
    v = spec_verdict(SPEC, accuracy=_iv(100, 100), recall={"defect": _iv(100, 100)}, fps=2.0)
    assert v.verdict == "met" and v.reasons == []


def test_a_point_estimate_below_a_target_is_not_met() -> None:
    v = spec_verdict(SPEC, accuracy=_iv(100, 100), recall={"defect": _iv(17, 20)}, fps=2.0)  # recall 0.85
    assert v.verdict == "not_met" and "recall of 'defect' 0.8500 < 0.9" in v.reasons[0]


def test_speed_decides_too_and_unmeasurable_recall_fails() -> None:
    slow = spec_verdict(SPEC, accuracy=_iv(100, 100), recall={"defect": _iv(100, 100)}, fps=0.5)
    assert slow.verdict == "not_met" and not slow.fps_ok
    # point estimates clear the targets but speed does not: still not met
    slow_point = spec_verdict(SPEC, accuracy=_iv(95, 100), recall={"defect": _iv(100, 100)}, fps=0.5)
    assert slow_point.verdict == "not_met"
    none = spec_verdict(SPEC, accuracy=_iv(100, 100), recall={"defect": _iv(0, 0)}, fps=2.0)
    assert none.verdict == "not_met" and "cannot be measured" in none.reasons[0]


def test_without_people_labeled_test_items_the_spec_is_never_met() -> None:
    v = spec_verdict(SPEC, accuracy=_iv(100, 100), recall={"defect": _iv(100, 100)}, fps=2.0,
                     evidence_from_people=False)
    assert v.verdict == "not_met" and "auto-labels" in v.reasons[-1]


def test_the_threshold_evidence_travels_with_the_verdict() -> None:
    choice = choose_threshold(np.linspace(0.99, 0.01, 20), min_recall=0.9)  # 18 of 20 kept
    assert choice.val_detected == 18 and choice.val_positives == 20
    # one-sided 95 % exact lower bound of 18/20: P(X >= 18 | p) = 0.05 at p = bound
    bound = choice.val_recall_lower_bound
    assert bound is not None and binom.sf(17, 20, bound) == pytest.approx(0.05, abs=1e-9)
    v = spec_verdict(SPEC, accuracy=_iv(100, 100), recall={"defect": _iv(100, 100)}, fps=2.0,
                     threshold_positives=choice.val_positives, threshold_recall_lower_bound=bound)
    assert v.threshold_positives == 20 and v.threshold_recall_lower_bound == bound
    assert "rests on 20 validation positives" in v.notes[0]


# ------------------------------------------------------------------------------------------------
# per-class figures
# ------------------------------------------------------------------------------------------------


def test_split_figures_count_per_class_and_bound_each_rate() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
    f = split_figures(labels, pred, ["defect", "good"], positive=0)
    assert f.items == 10 and f.positives == 4 and f.positive_class == "defect"
    assert f.confusion == [[3, 1], [2, 4]]
    assert (f.accuracy.k, f.accuracy.n) == (7, 10)
    d, g = f.per_class["defect"], f.per_class["good"]
    assert (d.recall.k, d.recall.n, d.precision.k, d.precision.n) == (3, 4, 3, 5)
    assert (g.recall.k, g.recall.n, g.precision.k, g.precision.n) == (4, 6, 4, 5)
    assert f.positive_recall == d.recall
    # each interval is the exact one: at its ends the binomial tails are 2.5 %
    assert binom.sf(2, 4, d.recall.low) == pytest.approx(0.025, abs=1e-9)
    assert binom.cdf(3, 4, d.recall.high) == pytest.approx(0.025, abs=1e-9)
    # a class never predicted has an unmeasurable precision, not a made-up one
    none = split_figures(np.array([0, 1]), np.array([1, 1]), ["defect", "good"], positive=None)
    assert none.per_class["defect"].precision.point is None and none.positive_recall is None


# ------------------------------------------------------------------------------------------------
# the operating curve
# ------------------------------------------------------------------------------------------------


def _binary(p_defect: list[float]) -> np.ndarray:
    p = np.array(p_defect)
    return np.stack([p, 1 - p], axis=1)


def test_operating_curve_on_a_hand_worked_score_list() -> None:
    # item: a     b    c    d    e    f        (class 0 = defect, positive)
    labels = np.array([0, 1, 0, 0, 1, 1])
    probs = _binary([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])
    curve = operating_curve(labels, probs, positive=0, classes=["defect", "good"])
    assert curve.items == 6 and curve.positives == 3
    got = [(p.threshold, p.detected, p.correct) for p in curve.points]
    # t=0.9: {a} defect -> 1 detected; below, b e f are good and right -> 4 correct
    # t=0.8: {a,b}: b wrong -> 3; t=0.7: {a,b,c} -> 2 + e,f = 4; t=0.4: 3 + e,f = 5; t=0.3: 4; t=0.1: 3
    assert got == [(0.9, 1, 4), (0.8, 1, 3), (0.7, 2, 4), (0.4, 3, 5), (0.3, 3, 4), (0.1, 3, 3)]
    assert [p.recall for p in curve.points] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1, 1, 1])
    at = accuracy_at_recall(curve, 0.95)
    assert at is not None and at.threshold == 0.4 and at.accuracy == pytest.approx(5 / 6) and at.recall == 1.0
    assert (at.accuracy_interval.k, at.accuracy_interval.n) == (5, 6)
    assert "TEST recall" in at.rule
    at_two_thirds = accuracy_at_recall(curve, 0.6)
    assert at_two_thirds is not None and at_two_thirds.threshold == 0.7
    assert at_two_thirds.accuracy == pytest.approx(4 / 6)


def test_operating_curve_groups_tied_scores() -> None:
    labels = np.array([0, 1, 0, 1])
    curve = operating_curve(labels, _binary([0.6, 0.6, 0.6, 0.2]), positive=0, classes=["defect", "good"])
    # a threshold cannot split a tie: 0.6 takes all three items at once
    assert [(p.threshold, p.detected, p.correct) for p in curve.points] == [(0.6, 2, 3), (0.2, 2, 2)]


def test_operating_curve_matches_the_decision_rule_with_three_classes() -> None:
    """A second implementation: decide() at every threshold, on random three-class probabilities."""
    rng = np.random.default_rng(4)
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=200)
    labels = rng.integers(0, 3, 200)
    curve = operating_curve(labels, probs, positive=1, classes=["a", "defect", "c"])
    assert len(curve.points) == 200  # distinct scores
    for p in curve.points[::17]:
        pred = decide(probs, positive=1, threshold=p.threshold)
        assert p.correct == int((pred == labels).sum())
        assert p.recall == pytest.approx(float((pred[labels == 1] == 1).mean()))
    recalls = [p.recall for p in curve.points]
    assert recalls == sorted(recalls)  # falling thresholds never lose recall


def test_accuracy_at_recall_without_positives_and_thinning() -> None:
    curve = operating_curve(np.array([1, 1]), _binary([0.3, 0.2]), positive=0, classes=["defect", "good"])
    assert accuracy_at_recall(curve, 0.9) is None
    rng = np.random.default_rng(0)
    big = operating_curve(rng.integers(0, 2, 1000), _binary(list(rng.random(1000))), positive=0,
                          classes=["defect", "good"])
    keep = big.points[123].threshold
    small = big.thin(50, keep=[keep])
    assert small.thinned and len(small.points) <= 51 and keep in [p.threshold for p in small.points]
    assert small.points[0] == big.points[0] and small.points[-1] == big.points[-1]
    assert big.thin(5000) is big
