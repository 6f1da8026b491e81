"""The learning-curve estimate on synthetic rounds drawn from a known power law."""

from __future__ import annotations

import numpy as np
import pytest

from dlforge.common.learning_curve import fit_power_law, labels_to_reach, round_points


def _rounds(a: float, b: float, c: float, ns: list[int], noise: float = 0.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"round": i, "human_labels": n, "classifier": {"cv_accuracy": a - b * n ** (-c) + noise * rng.normal()}}
            for i, n in enumerate(ns)]


NS = [60, 100, 140, 180, 220, 260, 300, 340]


def test_the_fit_recovers_a_known_curve_and_the_labels_it_needs() -> None:
    # a = 0.95, b = 2, c = 0.5: acc(n) = 0.9 at n = (2 / 0.05) ** 2 = 1600
    est = labels_to_reach(_rounds(0.95, 2.0, 0.5, NS), target=0.9)
    assert est["status"] == "estimated"
    assert est["a"] == pytest.approx(0.95, abs=1e-3) and est["c"] == pytest.approx(0.5, abs=0.01)
    assert est["b"] == pytest.approx(2.0, rel=0.02)
    assert est["labels_needed"] == pytest.approx(1600, rel=0.03)
    assert est["current_labels"] == 340 and est["more_labels"] == est["labels_needed"] - 340
    assert "estimate" in est["note"]


def test_the_fit_tolerates_noise_of_a_few_tenths_of_a_point() -> None:
    # a = 0.97, b = 0.8, c = 0.4: acc(n) = 0.9 at n = (0.8 / 0.07) ** 2.5 = 441.5
    _, _, _, rmse = fit_power_law(round_points(_rounds(0.97, 0.8, 0.4, NS, noise=0.002, seed=3)))
    assert rmse < 0.004
    needed = labels_to_reach(_rounds(0.97, 0.8, 0.4, NS, noise=0.002, seed=3), target=0.9)["labels_needed"]
    assert needed == pytest.approx(441.5, rel=0.25)


def test_a_ceiling_below_the_spec_is_said_so() -> None:
    est = labels_to_reach(_rounds(0.86, 1.5, 0.6, NS), target=0.9)
    assert est["status"] == "ceiling_below_spec" and est["labels_needed"] is None
    assert est["a"] == pytest.approx(0.86, abs=2e-3) and "ceiling" in est["note"]


def test_too_few_rounds_are_not_fitted() -> None:
    rounds = _rounds(0.95, 2.0, 0.5, [50, 100, 150])
    rounds.append({"round": 9, "human_labels": 200, "classifier": {}})  # no cv accuracy: not a point
    rounds.append({"round": 10, "human_labels": None})
    est = labels_to_reach(rounds, target=0.9)
    assert est["status"] == "too_few_rounds" and est["a"] is None and "too few rounds" in est["note"]
    assert len(est["points"]) == 3
    assert labels_to_reach(rounds, target=0.0)["status"] == "no_accuracy_target"
    with pytest.raises(ValueError, match="at least 4"):
        fit_power_law([(10, 0.5), (20, 0.6)])


def test_round_points_keep_the_last_figure_per_label_count() -> None:
    rounds = [{"human_labels": 10, "classifier": {"cv_accuracy": 0.5}},
              {"human_labels": 10, "classifier": {"cv_accuracy": 0.6}},
              {"human_labels": 5, "classifier": {"cv_accuracy": float("nan")}}]
    assert round_points(rounds) == [(10, 0.6)]


def test_falling_or_flat_rounds_give_no_estimate() -> None:
    # the per-round accuracy of a real small run: active learning asked for harder items each round
    rounds = [{"human_labels": n, "classifier": {"cv_accuracy": acc}}
              for n, acc in [(54, 0.870), (69, 0.797), (84, 0.750), (90, 0.733)]]
    est = labels_to_reach(rounds, target=0.9)
    assert est["status"] == "no_rising_trend" and est["labels_needed"] is None
    assert est["rise"] <= est["rmse"] and "no estimate" in est["note"]
    # a curve that rises clearly is not caught by this rule
    assert labels_to_reach(_rounds(0.95, 2.0, 0.5, NS), target=0.9)["rise"] > 0.05


def test_round_points_prefer_the_representative_held_out_accuracy() -> None:
    rounds = [
        {"human_labels": 100, "classifier": {"cv_accuracy": 0.90, "heldout_accuracy": 0.80}},
        {"human_labels": 200, "classifier": {"cv_accuracy": 0.70, "heldout_accuracy": 0.85}},
        {"human_labels": 300, "classifier": {"cv_accuracy": 0.75}},  # an older round: no held-out figure
    ]
    assert round_points(rounds) == [(100, 0.80), (200, 0.85), (300, 0.75)]


def _shares(a: float, b: float, c: float, ns: list[int]) -> list[dict]:
    return [{"human_labels": n, "heldout_accuracy": a - b * n ** (-c)} for n in ns]


def test_with_too_few_rounds_the_last_rounds_shares_make_the_curve() -> None:
    rounds = _rounds(0.95, 2.0, 0.5, [210, 420])  # two rounds: nothing to fit on their own
    shares = _shares(0.95, 2.0, 0.5, [52, 105, 158, 210, 315, 420])
    est = labels_to_reach(rounds, target=0.9, current_labels=420, subsamples=shares)
    # acc(n) = 0.9 at n = (2 / 0.05) ** 2 = 1600, as for the rounds
    assert est["status"] == "estimated" and est["source"] == "subsamples"
    assert est["labels_needed"] == pytest.approx(1600, rel=0.03) and est["more_labels"] == est["labels_needed"] - 420
    assert [p[0] for p in est["points"]] == [52, 105, 158, 210, 315, 420]
    assert "nested random shares of people's labels of the last round" in est["note"]
    assert est["beyond_items"] is None and "even with every item labeled" not in est["note"]
    small = labels_to_reach(rounds, target=0.9, current_labels=420, subsamples=shares, items=1000)
    assert small["beyond_items"] is True and "more than the data set's 1000 items" in small["note"]
    assert labels_to_reach(rounds, target=0.9, subsamples=shares, items=5000)["beyond_items"] is False
    # enough rounds: the rounds make the curve, the shares are not used
    many = labels_to_reach(_rounds(0.95, 2.0, 0.5, NS), target=0.9, subsamples=_shares(0.8, 1.0, 0.5, NS))
    assert many["source"] == "rounds" and many["labels_needed"] == pytest.approx(1600, rel=0.03)
    # too few shares as well: still too few
    few = labels_to_reach(rounds, target=0.9, subsamples=shares[:3])
    assert few["status"] == "too_few_rounds" and few["source"] == "rounds"
    # flat shares: no rising trend, said of the shares
    flat = labels_to_reach(rounds, target=0.9, subsamples=[{"human_labels": n, "heldout_accuracy": acc}
                                                           for n, acc in ((50, 0.8), (100, 0.79), (200, 0.81),
                                                                          (400, 0.795))])
    assert flat["status"] == "no_rising_trend" and "observed subsamples" in flat["note"]
    assert "active learning" not in flat["note"]
