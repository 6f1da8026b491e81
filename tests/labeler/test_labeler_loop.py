"""The active-learning loop as pure functions, on sklearn's digits (pixels as embeddings)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from dlforge.common.errors import InvalidInput
from dlforge.common.events import PipelineOptions
from dlforge.labeler.classifier import fit_calibrated, fit_scaling
from dlforge.labeler.handlers import (
    assign_splits,
    budget_of,
    check_labels,
    first_batch,
    random_sample,
    run_round,
)
from dlforge.labeler.index import build_index, normalize
from dlforge.labeler.strategies import UncertaintyDiversity, k_center_greedy, representative_seed, uncertainty
from dlforge.vision.manifest import rng_for


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return normalize(x.astype(np.float32)), y.astype(np.int64)


def simulate(x: np.ndarray, y: np.ndarray, options: PipelineOptions, *, given: np.ndarray | None = None,
             measure: str = "margin") -> dict[str, object]:
    """The worker's loop without a bus: answers every batch from ``y``."""
    n = len(y)
    labels = np.full(n, -1)
    if given is not None:
        labels[given] = y[given]
    human = np.zeros(n, dtype=bool)
    representative = labels >= 0
    splits = assign_splits(n, budget=budget_of(n, options), rng=rng_for("digits", options.seed, "splits"))
    batch = first_batch(x, splits=splits, known=labels >= 0, options=options, rng=rng_for("digits", 0, "seed"))
    first = batch
    strategy = UncertaintyDiversity(measure)  # type: ignore[arg-type]
    rounds = 0
    asked_val = np.zeros(n, dtype=bool)
    while True:
        rounds += 1
        assert not human[batch.rows].any(), "an item was asked twice"
        assert (labels[batch.rows] < 0).all(), "an item with a label was asked"
        labels[batch.rows] = y[batch.rows]
        human[batch.rows] = True
        representative[batch.rows] |= np.array([r in ("test", "val", "seed") for r in batch.reasons])
        asked_val[batch.rows] |= np.array([r == "val" for r in batch.reasons])
        result = run_round(x, labels=labels, human=human, representative=representative,
                           calibration=random_sample(labels, splits, asked_val=asked_val), n_classes=10,
                           options=options, strategy=strategy, rng=rng_for("digits", 0, f"r{rounds}"))
        if result.done:
            break
        assert result.next_batch is not None
        batch = result.next_batch
    auto = labels < 0
    return {"rounds": rounds, "human": int(human.sum()), "result": result, "auto": auto, "splits": splits,
            "first": first, "accuracy": float((result.predicted[auto] == y[auto]).mean()),
            "confident_accuracy": float((result.predicted[result.confident] == y[result.confident]).mean())
            if result.confident.any() else None}


def blobs(n: int = 800, *, classes: int = 4, dim: int = 32, spread: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (classes, dim))
    y = rng.integers(0, classes, n)
    x = centers[y] + rng.normal(0, spread, (n, dim))
    return normalize(x.astype(np.float32)), y.astype(np.int64)


def test_loop_stops_when_everything_is_auto_labeled_at_the_target() -> None:
    # 2,000 separable blobs: the 200 random test items are held-out evidence enough for a 2 % bound
    # (zero errors in >= 149 items), so every other item clears the guaranteed threshold
    x, y = blobs(2000)
    options = PipelineOptions(label_budget=0.3, seed_fraction=0.05, batch_fraction=0.03)
    out = simulate(x, y, options)
    n = len(y)
    result = out["result"]
    assert result.stop_reason == "confident"  # type: ignore[attr-defined]
    # far fewer human labels than items, and than the budget
    assert out["human"] <= 0.2 * n  # type: ignore[operator]
    assert out["human"] < budget_of(n, options)  # type: ignore[operator]
    assert result.confident[out["auto"]].all()  # type: ignore[attr-defined,index]
    assert out["accuracy"] >= 0.97  # type: ignore[operator]


def test_loop_reaches_high_accuracy_on_digits_within_the_budget(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    options = PipelineOptions(label_budget=0.3, target_confidence=0.95, seed_fraction=0.05, batch_fraction=0.03)
    out = simulate(x, y, options)
    n = len(y)
    assert out["result"].stop_reason in ("budget", "confident")  # type: ignore[attr-defined]
    assert out["human"] <= budget_of(n, options) < n  # type: ignore[operator]
    # 1,797 digits labeled from at most 539 human answers: the other >= 1,258 are >= 97 % right
    assert (~out["auto"]).sum() == out["human"]  # type: ignore[operator]
    assert out["accuracy"] >= 0.97  # type: ignore[operator]
    assert out["confident_accuracy"] >= 0.97  # type: ignore[operator]
    assert 2 <= out["rounds"] <= 12  # type: ignore[operator]


def test_loop_stops_at_the_label_budget(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    options = PipelineOptions(label_budget=0.15, target_confidence=0.999, seed_fraction=0.05, batch_fraction=0.03)
    out = simulate(x, y, options)
    assert out["result"].stop_reason == "budget"  # type: ignore[attr-defined]
    assert len(y) == 1797 and out["human"] == 269  # floor(0.15 * 1,797)
    assert out["accuracy"] >= 0.93  # type: ignore[operator]


def test_first_batch_is_test_items_plus_representative_seed(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    n = len(y)
    options = PipelineOptions(seed_fraction=0.05)
    given = np.zeros(n, dtype=bool)
    given[::7] = True  # some items come with labels: they are never asked
    splits = assign_splits(n, budget=budget_of(n, options), rng=rng_for("d", 0, "splits"))
    assert abs(splits.count("test") - round(0.1 * n)) <= 1
    assert abs(splits.count("val") - round(0.15 * (n - splits.count("test")))) <= 1
    batch = first_batch(x, splits=splits, known=given, options=options, rng=rng_for("d", 0, "seed"))
    rows_test = [r for r, why in zip(batch.rows, batch.reasons, strict=True) if why == "test"]
    rows_seed = [r for r, why in zip(batch.rows, batch.reasons, strict=True) if why == "seed"]
    rows_val = [r for r, why in zip(batch.rows, batch.reasons, strict=True) if why == "val"]
    assert sorted(rows_test) == sorted(i for i in range(n) if splits[i] == "test" and not given[i])
    # the seed's share: half random val items, half k-means representatives, none asked twice
    assert len(rows_val) == round(0.05 * n) // 2
    assert len(rows_seed) == round(0.05 * n) - len(rows_val)
    assert len(set(batch.rows.tolist())) == len(batch.rows)
    assert all(splits[r] == "val" for r in rows_val)
    assert not given[batch.rows].any()
    assert all(splits[r] != "test" for r in rows_seed)
    # representative: the seed covers (nearly) every digit class
    assert len(set(y[rows_seed])) == 10
    # deterministic
    again = first_batch(x, splits=splits, known=given, options=options, rng=rng_for("d", 0, "seed"))
    assert np.array_equal(again.rows, batch.rows)


def test_first_batch_respects_a_small_budget(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    options = PipelineOptions(label_budget=0.05, seed_fraction=0.08)
    n = len(y)
    splits = assign_splits(n, budget=budget_of(n, options), rng=rng_for("d", 0, "splits"))
    batch = first_batch(x, splits=splits, known=np.zeros(n, dtype=bool), options=options,
                        rng=rng_for("d", 0, "seed"))
    assert n == 1797 and len(batch.rows) == 89  # floor(0.05 * 1,797): the budget, not the larger seed share


def test_calibration_matches_accuracy(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    rng = np.random.default_rng(0)
    train = rng.choice(len(y), 300, replace=False)
    clf = fit_calibrated(x, train, y[train], n_classes=10, seed=0)
    rest = np.setdiff1d(np.arange(len(y)), train)
    p = clf.predict_proba(x[rest])
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y[rest]
    assert clf.calibrated and clf.cv_nll_calibrated <= clf.cv_nll_raw + 1e-9  # type: ignore[operator]
    # expected calibration error over 10 bins stays small
    bins = np.minimum((conf * 10).astype(int), 9)
    ece = sum(abs(conf[bins == b].mean() - correct[bins == b].mean()) * (bins == b).mean()
              for b in range(10) if (bins == b).any())
    assert ece < 0.06
    high = conf >= 0.95
    assert correct[high].mean() >= 0.95 and high.mean() > 0.5


def test_temperature_scaling_fixes_overconfident_logits() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    margin = rng.normal(1.0, 1.0, 2000) * np.where(y == 1, 1, -1)
    # the Bayes log-odds of N(+1, 1) against N(-1, 1) is 2 * margin: 8 * margin is 4x too confident
    logits = np.stack([np.zeros(2000), margin * 8.0], axis=1)
    scaling = fit_scaling(logits, y, bias=False)
    assert 3.5 < scaling.temperature < 4.6


def test_uncertainty_measures_rank_the_same_extremes() -> None:
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.99, 0.01]])
    for measure in ("margin", "least_confidence", "entropy"):
        u = uncertainty(p, measure)  # type: ignore[arg-type]
        assert u[0] == pytest.approx(1.0) and u[0] > u[1] > u[2]


def test_query_strategy_prefers_uncertain_and_diverse(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = digits
    n = len(x)
    probs = np.tile([0.99, 0.01], (n, 1))
    uncertain = np.arange(0, 200)
    probs[uncertain] = [0.5, 0.5]
    chosen = UncertaintyDiversity("margin", pool_factor=3).select(
        probabilities=probs, embeddings=x, candidates=np.arange(n), k=20, rng=np.random.default_rng(0))
    assert len(set(chosen)) == 20 and set(chosen) <= set(uncertain)
    # k-center spread: the chosen are farther apart than 20 random uncertain items
    def min_dist(rows: np.ndarray) -> float:
        d = 2 - 2 * x[rows] @ x[rows].T
        return float(d[~np.eye(len(rows), dtype=bool)].min())
    rand = np.random.default_rng(1).choice(uncertain, 20, replace=False)
    assert min_dist(chosen) > min_dist(rand)


def test_k_center_and_seed_helpers(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    pool = np.arange(100)
    picked = k_center_greedy(x, pool=pool, k=10, centers=np.array([500]))
    assert len(set(picked)) == 10 and set(picked) <= set(pool)
    seed = representative_seed(x, candidates=np.arange(len(y)), k=30, rng=np.random.default_rng(0))
    assert len(set(seed)) == 30


def test_similar_search_returns_the_item_itself_first(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    index = build_index(x)
    sims, rows = index.search(x[:5], 4)
    assert list(rows[:, 0]) == [0, 1, 2, 3, 4]
    assert np.allclose(sims[:, 0], 1.0, atol=1e-5)
    # neighbours are mostly the same digit
    assert (y[rows[:, 1:]] == y[:5, None]).mean() >= 0.9


def test_check_labels() -> None:
    # which items may be labeled is the caller's check (the label inbox); this one checks the strings
    clean, new = check_labels({"a": " cat ", "b": "dog"}, classes=["cat"], allow_new_classes=True)
    assert clean == {"a": "cat", "b": "dog"} and new == ["dog"]
    with pytest.raises(InvalidInput, match="unknown class"):
        check_labels({"a": "dog"}, classes=["cat"], allow_new_classes=False)
    with pytest.raises(InvalidInput, match="not a valid class"):
        check_labels({"a": "  "}, classes=["cat"], allow_new_classes=True)
    with pytest.raises(InvalidInput, match="no labels"):
        check_labels({}, classes=["cat"], allow_new_classes=True)


@pytest.mark.parametrize("label", ["bad\x07bell", "two\nlines", "tab\there", "del\x7f", "c1\x85next", "a/b", "a\\b",
                                   "x" * 101])
def test_submitted_labels_follow_the_ingestion_rule(label: str) -> None:
    # a control character, a slash or 101 characters: refused at submission as at upload, so such a
    # string never becomes a class
    with pytest.raises(InvalidInput, match="not a valid class name"):
        check_labels({"a": label}, classes=["cat"], allow_new_classes=True)
    from dlforge.labeler.ingest import _clean_label

    with pytest.raises(InvalidInput, match="not a valid class name"):
        _clean_label(label, where="labels.csv row 2")


def test_ordinary_class_names_pass_both_checks() -> None:
    from dlforge.labeler.ingest import _clean_label

    for label in ("défaut", "crack (minor)", "t-shirt-top", "x" * 100, "缺陷"):
        assert check_labels({"a": f" {label} "}, classes=[], allow_new_classes=True)[0] == {
            "a": label}
        assert _clean_label(f" {label} ", where="upload") == label
