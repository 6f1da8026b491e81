"""Normalization, weighting, the min_fps gate and the explanation: pure numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dlforge.common.errors import InvalidInput
from dlforge.common.events import Spec
from dlforge.proposer.handlers import active_scorers, check_weights, normalize, rank, sample_target_items, totals
from dlforge.proposer.scoring import Direction, SubScore, default_scorers, sub_score_specs
from dlforge.proposer.settings import DEFAULT_WEIGHTS
from dlforge.vision.manifest import Item, Manifest

SPECS = {
    "logme": SubScore("logme", Direction.HIGHER, ""),
    "loss_auc": SubScore("loss_auc", Direction.LOWER, ""),
    "fps_b1": SubScore("fps_b1", Direction.HIGHER_LOG, ""),
    "probe_bacc": SubScore("probe_bacc", Direction.HIGHER, ""),
    "fps_spec_b1": SubScore("fps_spec_b1", Direction.HIGHER_LOG, "", weighted=False),
}
RAW = {
    "A": {"logme": 1.0, "loss_auc": 0.2, "fps_b1": 100.0, "probe_bacc": 0.8, "fps_spec_b1": 40.0},
    "B": {"logme": 0.0, "loss_auc": 0.6, "fps_b1": 10.0, "probe_bacc": 0.8, "fps_spec_b1": 9.0},
    "C": {"logme": 0.5, "loss_auc": 0.4, "fps_b1": 1000.0, "probe_bacc": 0.8, "fps_spec_b1": 500.0},
}


def measured(raw: dict[str, dict[str, float]] = RAW) -> list[dict[str, object]]:
    return [{"model_id": k, "arch": "small_cnn", "source_dataset": "s", "weights_key": f"w/{k}", "raw": v,
             "seconds": {"logme": 0.1}} for k, v in raw.items()]


def test_min_max_normalization_per_direction() -> None:
    weighted = {k: v for k, v in SPECS.items() if v.weighted}
    norm, ties = normalize(RAW, weighted)
    assert norm["A"]["logme"] == 1.0 and norm["B"]["logme"] == 0.0 and norm["C"]["logme"] == pytest.approx(0.5)
    # lower is better: 0.2 -> 1, 0.6 -> 0, 0.4 -> 0.5
    assert (norm["A"]["loss_auc"], norm["B"]["loss_auc"], norm["C"]["loss_auc"]) == pytest.approx((1.0, 0.0, 0.5))
    # log scale: 10, 100, 1000 fps -> 0, 0.5, 1
    assert (norm["B"]["fps_b1"], norm["A"]["fps_b1"], norm["C"]["fps_b1"]) == pytest.approx((0.0, 0.5, 1.0))
    # the same value everywhere: a tie, left out everywhere
    assert ties == ["probe_bacc"]
    assert all("probe_bacc" not in n for n in norm.values())


def test_min_range_keeps_small_differences_small() -> None:
    specs = {"bacc": SubScore("bacc", Direction.HIGHER, "", min_range=0.1),
             "auc": SubScore("auc", Direction.LOWER, "", min_range=0.1),
             "fps": SubScore("fps", Direction.HIGHER_LOG, "", min_range=math.log(4))}
    close = {"A": {"bacc": 0.75, "auc": 0.30, "fps": 20.0}, "B": {"bacc": 0.73, "auc": 0.32, "fps": 10.0}}
    norm, ties = normalize(close, specs)
    assert not ties
    assert norm["A"]["bacc"] == pytest.approx(0.2) and norm["B"]["bacc"] == 0.0  # 0.02 of a decisive 0.1
    assert norm["A"]["auc"] == pytest.approx(0.2) and norm["B"]["auc"] == 0.0
    assert norm["A"]["fps"] == pytest.approx(0.5) and norm["B"]["fps"] == 0.0  # 2x of a decisive 4x
    far = {"A": {"bacc": 0.95}, "B": {"bacc": 0.70}, "C": {"bacc": 0.80}}
    norm, _ = normalize(far, specs)
    assert (norm["A"]["bacc"], norm["B"]["bacc"], norm["C"]["bacc"]) == pytest.approx((1.0, 0.0, 0.4))


def test_weighted_totals_are_weighted_means() -> None:
    norm, _ = normalize(RAW, {k: v for k, v in SPECS.items() if v.weighted})
    out = totals(norm, {"logme": 2.0, "loss_auc": 1.0, "fps_b1": 1.0, "probe_bacc": 5.0})
    assert out["A"][0] == pytest.approx((2 * 1 + 1 * 1 + 1 * 0.5) / 4)  # 0.875
    assert out["B"][0] == pytest.approx(0.0)
    assert out["C"][0] == pytest.approx((2 * 0.5 + 1 * 0.5 + 1 * 1.0) / 4)  # 0.625
    assert sum(out["A"][1].values()) == pytest.approx(out["A"][0])
    assert out["A"][1]["logme"] == pytest.approx(0.5)


def test_a_missing_sub_score_neither_helps_nor_hurts() -> None:
    raw = {"A": {"logme": 1.0, "domain_sim": 0.0}, "B": {"logme": 0.0, "domain_sim": 1.0}, "C": {"logme": 1.0}}
    specs = {"logme": SubScore("logme", Direction.HIGHER, ""),
             "domain_sim": SubScore("domain_sim", Direction.HIGHER, "")}
    norm, _ = normalize(raw, specs)
    out = totals(norm, {"logme": 1.0, "domain_sim": 1.0})
    assert out["A"][0] == pytest.approx(0.5)  # (1 + 0) / 2
    assert out["B"][0] == pytest.approx(0.5)  # (0 + 1) / 2
    assert out["C"][0] == pytest.approx(1.0)  # logme alone


def test_rank_orders_by_total_and_explains() -> None:
    r = rank(measured(), SPECS, {"logme": 2.0, "loss_auc": 1.0, "fps_b1": 1.0, "probe_bacc": 1.0}, Spec())
    assert [c.model_id for c in r.candidates] == ["A", "C", "B"]
    assert r.chosen_model_id == "A"
    assert r.candidates[0].total == pytest.approx(0.875)
    assert "A (small_cnn" in r.explanation and "ahead of C (0.625)" in r.explanation
    assert "logme (+0.250)" in r.explanation and "fps_b1 (-0.125)" in r.explanation
    assert "probe_bacc" in r.explanation  # reported as a tie
    score = r.candidates[0].candidate_score()
    assert score.scores["logme"] == 1.0 and score.scores["logme_norm"] == 1.0
    assert score.scores["fps_spec_b1"] == 40.0 and "fps_spec_b1_norm" not in score.scores
    assert score.scores["gate_passed"] == 1.0 and score.total == pytest.approx(0.875)


def test_equal_totals_rank_by_model_id_whatever_the_input_order() -> None:
    # A and B tie on the only weighted sub-score (C is 10x slower); the list order must not pick the winner
    raw = {"B": {"fps_b1": 100.0, "logme": 0.0}, "A": {"fps_b1": 100.0, "logme": 1.0},
           "C": {"fps_b1": 10.0, "logme": 0.5}}
    for order in (["B", "A", "C"], ["A", "C", "B"], ["C", "B", "A"]):
        r = rank(measured({k: raw[k] for k in order}), SPECS, {"fps_b1": 1.0}, Spec())
        assert [c.model_id for c in r.candidates] == ["A", "B", "C"] and r.chosen_model_id == "A"
        assert [c.total for c in r.candidates] == [1.0, 1.0, 0.0] and r.ties == []


def test_min_fps_gate_ranks_slow_candidates_last() -> None:
    weights = {"logme": 2.0, "loss_auc": 1.0, "fps_b1": 1.0}
    r = rank(measured(), SPECS, weights, Spec(min_fps=50.0, input_size=256))
    assert [c.model_id for c in r.candidates] == ["C", "A", "B"]  # A (40 fps) and B fail the gate
    assert [c.gate_passed for c in r.candidates] == [True, False, False]
    assert r.candidates[1].total == pytest.approx(0.875)  # the total is kept, only the order changes
    assert "failed the min_fps 50 gate" in r.explanation
    # a 2x expected speed-up of the deployed model lets A (40 -> 80 fps) through
    r2 = rank(measured(), SPECS, weights, Spec(min_fps=50.0), gate_speedup=2.0)
    assert r2.chosen_model_id == "A"
    # nobody passes: the best total is proposed and the explanation says so
    r3 = rank(measured(), SPECS, weights, Spec(min_fps=10_000.0))
    assert r3.chosen_model_id == "A" and "no candidate reaches min_fps" in r3.explanation


def test_weights_are_checked() -> None:
    with pytest.raises(InvalidInput, match="unknown sub-score weight"):
        check_weights({"accuracy": 1.0}, SPECS)
    with pytest.raises(InvalidInput, match="unknown sub-score weight"):
        check_weights({"fps_spec_b1": 1.0}, SPECS)  # reported, never weighted
    with pytest.raises(InvalidInput, match=">= 0"):
        check_weights({"logme": -1.0}, SPECS)
    with pytest.raises(InvalidInput, match=">= 0"):
        check_weights({"logme": math.nan}, SPECS)
    with pytest.raises(InvalidInput, match="at least one"):
        check_weights({"logme": 0.0}, SPECS)


def test_default_weights_cover_the_default_scorers() -> None:
    specs = sub_score_specs(default_scorers())
    assert set(DEFAULT_WEIGHTS) == {n for n, s in specs.items() if s.weighted}
    assert sum(DEFAULT_WEIGHTS.values()) == pytest.approx(1.0)


def test_a_proposal_runs_the_weighted_scorers_and_always_the_speed_measurement() -> None:
    scorers = default_scorers()
    names = [s.name for s in active_scorers(scorers, DEFAULT_WEIGHTS)]
    # speed weighs 0 (and a spec may ask no min_fps), yet it is measured (the report shows it); NCTI weighs 0: not run
    assert "speed" in names and "ncti" not in names
    assert names == [s.name for s in scorers if s.name != "ncti"]
    names = [s.name for s in active_scorers(scorers, {"ncti": 1.0})]
    assert names == ["speed", "ncti"] or names == ["ncti", "speed"]


def manifest_of(splits: dict[str, list[str]]) -> Manifest:
    items = []
    for split, labels in splits.items():
        for i, label in enumerate(labels):
            items.append(Item(item_id=f"{split}{i}", key=f"k/{split}{i}", name=f"{split}{i}.png", sha256="0" * 64,
                              width=8, height=8, label=label, label_source="human", split=split))  # type: ignore[arg-type]
    return Manifest(dataset_id="d", name="d", classes=["a", "b"], items=items)


def test_target_sample_is_stratified_and_bounded() -> None:
    m = manifest_of({"train": ["a"] * 300 + ["b"] * 100, "val": ["a"] * 60 + ["b"] * 20, "test": ["a"] * 10})
    train, val = sample_target_items(m, train_limit=100, val_limit=40, seed=0)
    assert len(train) == 100 and len(val) == 40
    assert sum(i.label == "b" for i in train) == 25 and sum(i.label == "b" for i in val) == 10
    assert {i.split for i in train} == {"train"} and {i.split for i in val} == {"val"}
    again, _ = sample_target_items(m, train_limit=100, val_limit=40, seed=0)
    assert [i.item_id for i in again] == [i.item_id for i in train]


def test_target_sample_without_val_holds_out_train_items() -> None:
    m = manifest_of({"train": ["a", "b"] * 20})
    train, val = sample_target_items(m, train_limit=400, val_limit=200, seed=0)
    assert len(val) == 10 and len(train) == 30
    assert not {i.item_id for i in train} & {i.item_id for i in val}
    assert np.unique([i.label for i in val]).tolist() == ["a", "b"]


def test_target_sample_needs_two_classes() -> None:
    with pytest.raises(InvalidInput, match="at least two classes"):
        sample_target_items(manifest_of({"train": ["a"] * 10}), train_limit=10, val_limit=10)
