"""Selective auto-labeling: the guaranteed threshold, per-class evidence, and what the round decides.

Expected values come from closed forms (the Clopper-Pearson bound with zero errors is
``1 - (1 - level) ** (1 / n)``; the synthetic scores' conditional error rate is known exactly), from
scipy's binomial CDF (the test the bound inverts) or are worked by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.stats import binom

from dlforge.common.events import DatasetLabeled, DatasetUploaded, PipelineOptions, decode
from dlforge.labeler.guarantee import (
    choose_threshold,
    choose_threshold_expected,
    class_warnings,
    min_items_for,
    per_class_evidence,
    threshold_grid,
)
from dlforge.labeler.handlers import HeldoutEvidence, RoundResult, decide_auto_labels, random_sample, run_round
from dlforge.labeler.index import normalize
from dlforge.labeler.strategies import UncertaintyDiversity

GOLDEN = Path(__file__).parents[1] / "common" / "assets" / "events"


def zero_error_bound(n: int, level: float = 0.95) -> float:
    return 1.0 - (1.0 - level) ** (1.0 / n)


# ------------------------------------------------------------------------------------------------
# the threshold
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "expected"), [(0.02, 149), (0.01, 299), (0.05, 59), (0.1, 29)])
def test_fewest_items_that_can_show_the_target(target: float, expected: int) -> None:
    # n >= log(0.05) / log(1 - target), worked out: 148.3 -> 149, 298.1 -> 299, 58.4 -> 59, 28.4 -> 29
    assert min_items_for(target) == expected
    assert zero_error_bound(expected) <= target < zero_error_bound(expected - 1)


def test_grid_is_fixed_decreasing_and_dense_near_one() -> None:
    grid = threshold_grid()
    assert np.all(np.diff(grid) < 0) and grid[0] == 1.0 and grid[-1] == 0.0
    assert np.array_equal(grid, threshold_grid())
    assert (grid > 0.999).sum() >= 30  # 1 - 10**-3.1 ... 1 - 10**-7


def test_fixed_sequence_stops_at_the_first_failing_threshold() -> None:
    # hand-worked: 200 items at 0.95 all right; 100 at 0.85 with 5 wrong; 700 at 0.75 all right
    conf = np.concatenate([np.full(200, 0.95), np.full(100, 0.85), np.full(700, 0.75)])
    correct = np.ones(1000, dtype=bool)
    correct[200:205] = False
    grid = np.array([0.99, 0.9, 0.8, 0.7])
    # 0.99: no item at or above it (fewer than 149): not testable, skipped
    # 0.9: 0 errors in 200 -> bound 1 - 0.05 ** (1 / 200) = 0.0149 <= 0.02: passes
    # 0.8: 5 errors in 300: P(Bin(300, 0.02) <= 5) = 0.45 > 0.05: fails, the walk stops
    # 0.7: 5 errors in 1,000 would pass on its own (P(Bin(1000, 0.02) <= 5) < 0.05) but is never tested
    assert binom.cdf(5, 300, 0.02) > 0.05 and binom.cdf(5, 1000, 0.02) < 0.05
    sel = choose_threshold(conf, correct, target=0.02, grid=grid)
    assert sel.threshold == 0.9
    assert (sel.selected, sel.errors, sel.calibration_items, sel.tested) == (200, 0, 1000, 2)
    assert sel.error_bound == pytest.approx(zero_error_bound(200), rel=1e-9)
    assert sel.calibration_coverage == pytest.approx(0.2)
    # without the failing band the walk goes on to 0.7
    keep = np.r_[0:200, 300:1000]
    low = choose_threshold(conf[keep], correct[keep], target=0.02, grid=grid)
    assert low.threshold == 0.7 and low.selected == 900 and low.errors == 0


def test_bound_matches_the_binomial_test_it_inverts() -> None:
    # each tested threshold passes iff P(Bin(n, target) <= k) <= 0.05 (scipy's CDF, not the beta quantile)
    rng = np.random.default_rng(3)
    conf = rng.uniform(0, 1, 3000)
    correct = rng.uniform(0, 1, 3000) > (1 - conf) ** 2 / 2
    grid = np.round(np.arange(0.99, 0.0, -0.01), 2)
    sel = choose_threshold(conf, correct, target=0.02, grid=grid)
    walked = None
    for t in grid:
        mask = conf >= t
        n, k = int(mask.sum()), int((~correct[mask]).sum())
        if n < 149:
            continue
        if binom.cdf(k, n, 0.02) > 0.05:
            break
        walked = float(t)
    assert walked is not None and sel.threshold == pytest.approx(walked)


def test_no_threshold_without_enough_evidence() -> None:
    conf = np.full(148, 0.999)
    sel = choose_threshold(conf, np.ones(148, dtype=bool), target=0.02)
    assert sel.threshold is None and sel.error_bound is None and sel.tested == 0
    ok = choose_threshold(np.full(149, 0.999), np.ones(149, dtype=bool), target=0.02)
    assert ok.threshold is not None and ok.error_bound == pytest.approx(zero_error_bound(149))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target": 0.0}, "target error must be in"),
    ({"target": 0.02, "level": 1.0}, "level must be in"),
    ({"target": 0.02, "grid": np.array([0.5, 0.9])}, "strictly decreasing"),
])
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_threshold(np.array([0.9]), np.array([True]), **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        choose_threshold(np.array([np.nan]), np.array([True]), target=0.02)


def synthetic(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Confidence ~ U(0, 1), P(wrong | c) = (1 - c)**2 / 2: among items with c >= t the error rate is
    exactly (1 - t)**2 / 6, so a target error e is met for t >= 1 - sqrt(6 e), at coverage sqrt(6 e)
    (5 %: t >= 0.452, coverage 54.8 %; 2 %: t >= 0.654, coverage 34.6 %)."""
    conf = rng.uniform(0.0, 1.0, n)
    wrong = rng.uniform(0.0, 1.0, n) < (1.0 - conf) ** 2 / 2
    return conf, ~wrong


def true_risk(t: float) -> float:
    return (1.0 - t) ** 2 / 6.0


@pytest.mark.parametrize(("target", "ideal"), [(0.05, 0.548), (0.02, 0.346)])
def test_the_guarantee_holds_over_many_calibration_draws(target: float, ideal: float) -> None:
    rng = np.random.default_rng(2026)
    draws = 300
    risk_over = realized_over = naive_over = 0
    coverage = []
    for _ in range(draws):
        conf, correct = synthetic(rng, 1000)
        sel = choose_threshold(conf, correct, target=target)
        if sel.threshold is None:  # nothing auto-labeled: no error, no coverage
            coverage.append(0.0)
        else:
            risk_over += true_risk(sel.threshold) > target
            coverage.append(1.0 - sel.threshold)  # the share of U(0, 1) confidences at or above it
            pool_conf, pool_correct = synthetic(rng, 5000)
            chosen = pool_conf >= sel.threshold
            realized_over += (~pool_correct[chosen]).mean() > target
        # the naive rule (lowest threshold whose empirical error is <= target) for contrast
        order = np.argsort(-conf)
        err = np.cumsum(~correct[order]) / np.arange(1, len(conf) + 1)
        naive_t = conf[order][np.flatnonzero(err <= target).max()]
        naive_over += true_risk(naive_t) > target
    # at most 5 % of draws may miss; 8 % leaves room for the Monte-Carlo error of 300 draws (sd 1.3 %)
    assert risk_over / draws <= 0.08
    assert realized_over / draws <= 0.08
    # the check has power: without the bound the target is missed in most draws
    assert naive_over / draws >= 0.3
    # the guarantee is not bought with nothing auto-labeled (exact bounds on 1,000 items cost coverage,
    # most at 2 %, where a single early error among the ~150 most confident items stops the walk)
    assert ideal / 4 <= float(np.mean(coverage)) <= ideal


def test_conformal_selection_worked_by_hand() -> None:
    # 9 calibration items, wrong at confidences 0.8 and 0.4; the p-value of a pool item is
    # (1 + wrong calibration items at or above its confidence) / 10: 0.1, 0.1, 0.1, 0.2 (the tie with
    # 0.8 counts against it), 0.2. Benjamini-Hochberg at 0.19 over 5 items: p_(5) = 0.2 > 0.19,
    # p_(4) = 0.2 > 0.152, p_(3) = 0.1 <= 0.114: the three most confident, threshold 0.82.
    conf = np.array([0.99, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    correct = np.array([True, True, True, False, True, True, True, False, True])
    pool = np.array([0.95, 0.9, 0.82, 0.8, 0.5])
    sel = choose_threshold_expected(conf, correct, pool, target=0.19)
    assert sel.method == "expected" and sel.threshold == 0.82
    assert (sel.selected, sel.errors, sel.calibration_items, sel.tested) == (3, 0, 9, 5)
    assert sel.estimate == pytest.approx(0.1 * 5 / 3)
    assert sel.error_bound == pytest.approx(zero_error_bound(3))  # evidence, far above the target
    # at 0.2 every p-value passes: all five, down to 0.5 (one wrong calibration item at or above it)
    every = choose_threshold_expected(conf, correct, pool, target=0.2)
    assert every.threshold == 0.5 and (every.selected, every.errors) == (7, 1)
    assert every.estimate == pytest.approx(0.2)
    # at 0.05 not even the most confident item passes (0.1 > 0.05 * 5 / 5)
    assert choose_threshold_expected(conf, correct, pool, target=0.05).threshold is None
    assert choose_threshold_expected(conf, correct, pool[:0], target=0.05).threshold is None
    # an item without a confidence is never selected but is one of the m hypotheses: m = 6 makes
    # p_(5) = 0.2 > 0.2 * 5 / 6 and p_(4) = 0.2 > 0.133; p_(3) = 0.1 <= 0.1: back to the three
    with_nan = choose_threshold_expected(conf, correct, np.append(pool, np.nan), target=0.2)
    assert with_nan.threshold == 0.82 and with_nan.tested == 6


@pytest.mark.parametrize(("target", "ideal"), [(0.05, 0.548), (0.02, 0.346)])
def test_conformal_selection_keeps_the_expected_error_and_labels_where_the_bound_cannot(
        target: float, ideal: float) -> None:
    """250 calibration items, 2,000 to label, 400 draws of the synthetic scores (their error among
    confidences >= t is (1 - t)^2 / 6). The share of wrong labels among those auto-labeled must average at
    most the target (the theorem); the 95 % bound, on the same items, certifies nothing at 2 %."""
    rng = np.random.default_rng(7)
    draws = 400
    share_wrong, coverage, bound_none = [], [], 0
    for _ in range(draws):
        conf, correct = synthetic(rng, 250)
        pool_conf, pool_correct = synthetic(rng, 2000)
        sel = choose_threshold_expected(conf, correct, pool_conf, target=target)
        bound_none += choose_threshold(conf, correct, target=target).threshold is None
        if sel.threshold is None:
            share_wrong.append(0.0)
            coverage.append(0.0)
            continue
        assert sel.estimate is not None and sel.estimate <= target + 1e-12
        chosen = pool_conf >= sel.threshold
        share_wrong.append(float((~pool_correct[chosen]).mean()))
        coverage.append(float(chosen.mean()))
    mean, sd = float(np.mean(share_wrong)), float(np.std(share_wrong))
    assert mean <= target + 3 * sd / np.sqrt(draws)
    # and not by labeling nothing: close to the coverage that knows the true error curve
    assert ideal / 2 <= float(np.mean(coverage)) <= ideal
    if target == 0.02:
        # the bound needs 149 or more calibration items above its threshold (min_items_for(0.02)), the top
        # 60 % of these scores, whose error is (1 - 0.4)^2 / 6 = 6 %
        assert bound_none == draws


# ------------------------------------------------------------------------------------------------
# per class
# ------------------------------------------------------------------------------------------------


def test_per_class_evidence_names_the_weak_class() -> None:
    # selected calibration items: class a 50 predicted (all right), class b 40 predicted (30 right);
    # class c never predicted among them but 7 pool items are auto-labeled c
    pred = np.array([0] * 50 + [1] * 40 + [2] * 5)
    correct = np.array([True] * 50 + [True] * 30 + [False] * 10 + [True] * 5)
    selected = np.array([True] * 90 + [False] * 5)
    pool_pred = np.array([0] * 20 + [1] * 10 + [2] * 7 + [1] * 3)
    auto = np.array([True] * 37 + [False] * 3)
    ev = per_class_evidence(classes=["a", "b", "c"], calibration_predicted=pred, calibration_correct=correct,
                            calibration_selected=selected, pool_predicted=pool_pred, pool_auto=auto,
                            pool_review=~auto, target=0.02)
    a, b, c = ev
    assert (a.calibration_items, a.correct, a.accuracy, a.below_target) == (50, 50, 1.0, False)
    assert a.accuracy_lower == pytest.approx(1 - zero_error_bound(50), abs=1e-4)
    assert (b.calibration_items, b.correct, b.accuracy, b.below_target) == (40, 30, 0.75, True)
    assert (b.auto_labeled, b.needs_review) == (10, 3)
    assert (c.calibration_items, c.accuracy, c.auto_labeled, c.below_target) == (0, None, 7, True)
    warnings = class_warnings(ev, target=0.02)
    assert len(warnings) == 2
    assert "'b'" in warnings[0] and "75.0%" in warnings[0] and "30/40" in warnings[0]
    assert "'c'" in warnings[1] and "without any held-out evidence" in warnings[1]


def _result(n_pool: int, evidence: HeldoutEvidence, *, predicted: np.ndarray, confidence: np.ndarray,
            target: float = 0.02) -> RoundResult:
    sel = choose_threshold(evidence.confidence, evidence.correct, target=target)
    confident = confidence >= sel.threshold if sel.threshold is not None else np.zeros(n_pool, dtype=bool)
    return RoundResult(probabilities=np.zeros((n_pool, 2)), predicted=predicted, confidence=confidence,
                       confident=confident, next_batch=None, stop_reason="budget", classifier={}, human_labels=0,
                       auto_confident=int(confident.sum()), selective=sel, threshold=sel.threshold, evidence=evidence)


def test_a_class_below_target_is_named_although_the_overall_bound_holds() -> None:
    # 1,000 held-out items at confidence 0.99: class 0 predicted 900 times (all right), class 1
    # predicted 100 times with 4 wrong. Overall 4 / 1,000: P(Bin(1000, 0.02) <= 4) < 0.05, the
    # bound holds; class 1 is 96 % right, under the 98 % the target asks: it is named. Another 200
    # items at 0.6, half wrong, stop the walk there: the threshold is the grid point above, 0.601.
    assert binom.cdf(4, 1000, 0.02) < 0.05
    pred = np.array([0] * 900 + [1] * 100 + [0] * 200)
    correct = np.ones(1200, dtype=bool)
    correct[900:904] = False
    correct[1000:1100] = False
    evidence = HeldoutEvidence(confidence=np.r_[np.full(1000, 0.99), np.full(200, 0.6)], predicted=pred,
                               correct=correct)
    pool_pred = np.array([0] * 80 + [1] * 20)
    pool_conf = np.array([0.995] * 60 + [0.5] * 20 + [0.995] * 20)
    result = _result(100, evidence, predicted=pool_pred, confidence=pool_conf)
    decision = decide_auto_labels(result, known=np.zeros(100, dtype=bool), classes=["ok", "weak"],
                                  options=PipelineOptions())
    s = decision.summary
    assert s["auto_label_threshold"] == pytest.approx(0.601)
    assert s["auto_label_coverage"] == 0.8 and s["needs_review"] == 20
    assert s["bound_items"] == 1000 and s["bound_errors"] == 4
    assert s["auto_label_error_bound"] <= 0.02 and s["guaranteed_error_bound"] == s["auto_label_error_bound"]
    # with auto_label_all the same threshold's figures stay, beside the bound of labeling everything
    everything = decide_auto_labels(result, known=np.zeros(100, dtype=bool), classes=["ok", "weak"],
                                    options=PipelineOptions(auto_label_all=True)).summary
    assert everything["guaranteed_error_bound"] == s["auto_label_error_bound"]
    assert everything["guaranteed_coverage"] == 0.8 and everything["auto_label_coverage"] == 1.0
    assert (everything["bound_items"], everything["bound_errors"]) == (1200, 104)
    assert s["weak_classes"] == ["weak"]
    assert len(decision.warnings) == 1 and "'weak'" in decision.warnings[0]
    per = {e["label"]: e for e in s["per_class"]}  # type: ignore[attr-defined]
    assert per["weak"]["accuracy"] == 0.96 and per["weak"]["auto_labeled"] == 20
    assert per["ok"]["auto_labeled"] == 60 and per["ok"]["needs_review"] == 20
    assert decision.review[60:80].all() and not decision.review[:60].any()


def test_auto_label_all_labels_everything_and_bounds_it_on_all_held_out_items() -> None:
    # held-out: 300 items, 30 wrong (10 %): no threshold of the grid passes where the wrong ones sit
    conf = np.concatenate([np.full(270, 0.97), np.full(30, 0.97)])
    correct = np.array([True] * 270 + [False] * 30)
    evidence = HeldoutEvidence(confidence=conf, predicted=np.zeros(300, dtype=np.int64), correct=correct)
    pool_conf = np.full(50, 0.9)
    known = np.zeros(50, dtype=bool)
    known[:5] = True
    result = _result(50, evidence, predicted=np.zeros(50, dtype=np.int64), confidence=pool_conf)
    assert result.threshold is None
    selective = decide_auto_labels(result, known=known, classes=["x"], options=PipelineOptions())
    assert selective.summary["needs_review"] == 45 and not selective.auto.any()
    assert selective.summary["auto_label_coverage"] == 0.0 and selective.summary["auto_label_error_bound"] is None
    everything = decide_auto_labels(result, known=known, classes=["x"], options=PipelineOptions(auto_label_all=True))
    assert everything.auto.sum() == 45 and not everything.auto[:5].any() and not everything.review.any()
    s = everything.summary
    assert s["auto_label_coverage"] == 1.0 and s["needs_review"] == 0 and s["guaranteed_coverage"] == 0.0
    assert s["guaranteed_error_bound"] is None
    assert (s["bound_items"], s["bound_errors"]) == (300, 30)
    # 30 / 300: the exact bound is where P(Bin(300, p) <= 30) = 0.05
    assert binom.cdf(30, 300, s["auto_label_error_bound"]) == pytest.approx(0.05, abs=1e-4)
    assert s["weak_classes"] == ["x"]  # 90 % < 98 %


# ------------------------------------------------------------------------------------------------
# in the loop: the threshold rests on representative items only
# ------------------------------------------------------------------------------------------------


def test_round_thresholds_on_representative_items_and_leaves_the_rest_for_review() -> None:
    # 3 classes: 0 apart from the others, 1 and 2 overlapping; labels for a random 20 % (the random
    # sample) and for 100 of the overlapping items picked as an active learner would (not random)
    rng = np.random.default_rng(0)
    n, dim = 2000, 16
    y = rng.choice(3, n, p=[0.6, 0.2, 0.2])
    centers = np.zeros((3, dim))
    centers[0, 0], centers[1, 1], centers[2, 1] = 6.0, 1.0, -1.0
    x = normalize((centers[y] + rng.normal(0, 1, (n, dim))).astype(np.float32))
    labels = np.full(n, -1)
    rep = np.zeros(n, dtype=bool)
    rep[rng.choice(n, 400, replace=False)] = True
    hard = np.flatnonzero((y > 0) & ~rep)[:100]
    labels[rep] = y[rep]
    labels[hard] = y[hard]
    human = labels >= 0
    options = PipelineOptions(label_budget=0.25, max_auto_label_error=0.05)
    result = run_round(x, labels=labels, human=human, representative=rep, calibration=rep, n_classes=3,
                       options=options,
                       strategy=UncertaintyDiversity("margin"), rng=np.random.default_rng(1))
    assert result.done and result.stop_reason == "budget"
    assert result.selective is not None and result.selective.calibration_items == 400
    assert result.threshold is not None
    decision = decide_auto_labels(result, known=human, classes=["a", "b", "c"], options=options)
    auto, review = decision.auto, decision.review
    assert auto.any() and review.any() and not (auto & review).any() and not (auto & human).any()
    assert (auto | review | human).all()
    # what was auto-labeled meets the target; what was left for review would not have
    assert (result.predicted[auto] != y[auto]).mean() <= 0.05
    assert (result.predicted[review] != y[review]).mean() > 0.1
    assert decision.summary["auto_label_coverage"] == round(auto.sum() / (~human).sum(), 4)
    assert decision.summary["needs_review"] == int(review.sum())


def test_a_round_with_the_expected_guarantee_labels_what_the_bound_leaves_for_review() -> None:
    # two well separated classes; 150 random people's labels calibrate: too few for a 1 % bound
    # (min_items_for(0.01) = 299), enough for conformal selection
    rng = np.random.default_rng(3)
    n, dim = 3000, 8
    y = rng.choice(2, n)
    x = normalize((np.where(y[:, None] == 0, 2.5, -2.5) * np.eye(dim)[0] + rng.normal(0, 1, (n, dim)))
                  .astype(np.float32))
    labels = np.full(n, -1)
    rep = np.zeros(n, dtype=bool)
    rep[rng.choice(n, 150, replace=False)] = True
    labels[rep] = y[rep]
    human = labels >= 0
    options = PipelineOptions(label_budget=0.05, max_auto_label_error=0.01)
    args = dict(labels=labels, human=human, representative=rep, calibration=rep, n_classes=2, options=options,
                strategy=UncertaintyDiversity("margin"), rng=np.random.default_rng(1))
    bound = run_round(x, **args)  # type: ignore[arg-type]
    assert bound.selective is not None and bound.selective.method == "bound" and bound.threshold is None
    result = run_round(x, guarantee="expected", **args)  # type: ignore[arg-type]
    assert result.selective is not None and result.threshold is not None
    decision = decide_auto_labels(result, known=human, classes=["a", "b"], options=options)
    s = decision.summary
    assert s["auto_label_guarantee"] == "expected"
    assert s["expected_error_estimate"] is not None and s["expected_error_estimate"] <= 0.01  # type: ignore[operator]
    auto = decision.auto
    # conformal selection labels a share of at least 1 / (0.01 * 151) = 66 % of the pool, or nothing
    assert auto.sum() >= (~human).sum() / (0.01 * 151)
    assert (result.predicted[auto] != y[auto]).mean() <= 0.01
    # the estimate is of the set the rule chose: gone when a floor cuts higher, or when every item is labeled
    floored = PipelineOptions(label_budget=0.05, max_auto_label_error=0.01, target_confidence=0.99999)
    higher = run_round(x, guarantee="expected", **{**args, "options": floored})  # type: ignore[arg-type]
    assert higher.threshold == 0.99999 and higher.selective is not None and higher.selective.threshold < 0.99999
    s = decide_auto_labels(higher, known=human, classes=["a", "b"], options=floored).summary
    assert s["auto_label_guarantee"] == "expected" and s["expected_error_estimate"] is None
    every = PipelineOptions(label_budget=0.05, max_auto_label_error=0.01, auto_label_all=True)
    s = decide_auto_labels(result, known=human, classes=["a", "b"], options=every).summary
    assert s["auto_label_coverage"] == 1.0 and s["expected_error_estimate"] is None


# ------------------------------------------------------------------------------------------------
# the run options
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("max_auto_label_error", 0.0), ("max_auto_label_error", 0.6), ("max_auto_label_error", "often"),
    ("auto_label_all", "sometimes"), ("target_confidence", 1.5),
])
def test_options_refuse_out_of_range_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        PipelineOptions.model_validate({field: value})


def test_options_defaults_and_old_events() -> None:
    o = PipelineOptions()
    assert (o.max_auto_label_error, o.auto_label_all, o.target_confidence) == (0.02, False, None)
    assert PipelineOptions(max_auto_label_error=0.5).max_auto_label_error == 0.5
    # events written before selective labeling: that labeler labeled every item
    old = decode((GOLDEN / "dataset.uploaded.v1.json").read_bytes())
    assert isinstance(old.payload, DatasetUploaded) and old.payload.options.auto_label_all is True
    labeled = decode((GOLDEN / "dataset.labeled.v1.json").read_bytes())
    assert isinstance(labeled.payload, DatasetLabeled) and labeled.payload.needs_review == 0
    stored = json.loads((GOLDEN / "dataset.labeled.v2.json").read_bytes())
    new = decode(json.dumps(stored).encode())
    assert isinstance(new.payload, DatasetLabeled)
    assert new.payload.human_labels + new.payload.auto_labels + new.payload.needs_review == 2624


def test_the_random_sample_is_the_labeled_test_split() -> None:
    # rows 0-3 test (3 labeled), 4-5 val (seed-labeled: not random), 6-7 train
    labels = np.array([0, 1, -1, 1, 0, 1, -1, 0])
    splits = ["test", "test", "test", "test", "val", "val", "train", "train"]
    assert random_sample(labels, splits).tolist() == [True, True, False, True, False, False, False, False]


@pytest.mark.slow
def test_the_loop_keeps_its_guarantee_over_runs() -> None:
    # 20 runs of the whole loop on a 5-class Gaussian mixture that a linear model labels ~80 % right:
    # the realized error of what was auto-labeled may exceed the 5 % target in about 1 run of 20
    # (P(>= 4 of 20) = 1.6 % at the nominal 5 %). Calibrating on the k-means seed as well, as an
    # earlier version did, exceeded it in 5 of 20.
    from test_labeler_loop import simulate

    misses, covered = 0, []
    for seed in range(20):
        rng = np.random.default_rng(1000 + seed)
        centers = rng.normal(0, 1, (5, 24))
        y = rng.integers(0, 5, 4000)
        x = normalize((centers[y] + rng.normal(0, 5 / np.sqrt(24) * 2, (4000, 24))).astype(np.float32))
        options = PipelineOptions(label_budget=0.2, seed_fraction=0.08, batch_fraction=0.05,
                                  max_auto_label_error=0.05, seed=seed)
        out = simulate(x, y, options)
        result, pool = out["result"], out["auto"]
        auto = decide_auto_labels(result, known=~pool, classes=list("abcde"), options=options).auto  # type: ignore[operator]
        if auto.any():
            misses += (result.predicted[auto] != y[auto]).mean() > 0.05  # type: ignore[attr-defined]
            covered.append(auto.sum() / pool.sum())  # type: ignore[union-attr]
    assert misses <= 3, f"{misses} of 20 runs exceeded the target"
    assert len(covered) >= 10 and np.mean(covered) > 0.2
