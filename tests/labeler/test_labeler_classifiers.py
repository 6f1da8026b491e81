"""The classifier plug-ins: held-out evidence, the semi-supervised MLP, the held-out choice."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from dlforge.common.errors import ConfigError
from dlforge.labeler.classifier import (
    BestHeldout,
    LinearProbe,
    SemiSupervisedMLP,
    heldout_accuracy,
    make_classifier,
    subsample_curve,
)


def _blobs(n_per: int, *, classes: int = 3, dim: int = 16, spread: float = 0.6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 3.0
    y = np.repeat(np.arange(classes), n_per)
    x = centers[y] + rng.normal(size=(len(y), dim)) * spread
    return x.astype(np.float32), y


def test_heldout_accuracy_counts_only_representative_held_out_rows() -> None:
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [np.nan, np.nan], [0.3, 0.7]])
    y = np.array([0, 1, 1, 0, 0])
    rep = np.array([True, True, True, True, False])
    # rows 0, 1, 2 count (row 3 was never held out, row 4 is not representative): 2 of 3 right
    assert heldout_accuracy(proba, y, rep) == {"heldout_accuracy": pytest.approx(2 / 3), "heldout_items": 3}
    assert heldout_accuracy(np.zeros((0, 0)), np.zeros(0), np.zeros(0, dtype=bool))["heldout_accuracy"] is None


def test_mlp_learns_separable_classes_and_keeps_held_out_evidence() -> None:
    x, y = _blobs(120)
    rng = np.random.default_rng(1)
    labeled = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), 10, replace=False) for c in range(3)]))
    fitted = SemiSupervisedMLP(epochs=30, folds=3).fit(x, labeled, y[labeled], n_classes=4, seed=0)
    proba = fitted.predict_proba(x)
    assert proba.shape == (len(x), 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(proba[:, 3] == 0.0)  # a class never labeled gets no probability
    unlabeled = np.setdiff1d(np.arange(len(x)), labeled)
    assert (proba[unlabeled].argmax(axis=1) == y[unlabeled]).mean() >= 0.97
    held = fitted.heldout_proba
    assert held.shape == (len(labeled), 4) and not np.isnan(held).any()  # every labeled row held out once
    assert (held.argmax(axis=1) == y[labeled]).mean() >= 0.9
    assert fitted.calibrated and fitted.summary()["classifier"] == "mlp_ssl"


def test_unlabeled_items_enter_training_only_through_pseudo_labels() -> None:
    x, y = _blobs(60, classes=2)
    labeled = np.array([0, 1, 2, 60, 61, 62])
    # the unlabeled items shuffled among their rows: same set (so the same input scaling), other order
    rest = np.setdiff1d(np.arange(len(x)), labeled)
    moved = x.copy()
    moved[rest] = x[np.random.default_rng(0).permutation(rest)]
    probe = x[:10]

    def fit(features: np.ndarray, ratio: int) -> np.ndarray:
        m = SemiSupervisedMLP(epochs=60, folds=2, unlabeled_ratio=ratio, pseudo_threshold=0.6)
        fitted = m.fit(features, labeled, y[labeled], n_classes=2, seed=0)
        return fitted.model(__import__("torch").from_numpy(probe)).detach().numpy()  # type: ignore[misc]

    # without pseudo-labels the network's training sees only the labeled rows
    np.testing.assert_allclose(fit(x, 0), fit(moved, 0), atol=1e-6)
    # with them, which unlabeled item sits where changes the batches and so what it learns
    assert np.abs(fit(x, 3) - fit(moved, 3)).max() > 1e-3


def test_one_known_class_gives_that_class_everywhere() -> None:
    x, _ = _blobs(10)
    fitted = SemiSupervisedMLP(epochs=2).fit(x, np.array([0, 1, 2]), np.array([1, 1, 1]), n_classes=3)
    assert fitted.model is None
    np.testing.assert_array_equal(fitted.predict_proba(x[:4]), np.tile([0.0, 1.0, 0.0], (4, 1)))


@dataclass
class _Fitted:
    heldout_proba: np.ndarray
    tag: str
    heldout_representative: np.ndarray = field(default_factory=lambda: np.ones(4, dtype=bool))
    model: object | None = "m"
    calibrated: bool = True

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.zeros((len(x), 2))

    def summary(self) -> dict[str, float | int | bool | str | None]:
        return {"classifier": self.tag}


@dataclass
class _Plugin:
    name: str
    proba: np.ndarray

    def fit(self, x_all, labeled, y, *, n_classes, representative=None, seed=0):
        return _Fitted(self.proba, self.name)


def test_best_keeps_the_plugin_right_more_often_on_held_out_items() -> None:
    y = np.array([0, 1, 1, 0])
    right_3_of_4 = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.4, 0.6]])
    right_2_of_4 = np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.4, 0.6]])
    best = BestHeldout([_Plugin("a", right_2_of_4), _Plugin("b", right_3_of_4)])
    fitted = best.fit(np.zeros((4, 2)), np.arange(4), y, n_classes=2)
    summary = fitted.summary()
    assert summary["classifier"] == "b"
    assert summary["heldout_accuracy_a"] == 0.5 and summary["heldout_accuracy_b"] == 0.75


def test_ties_in_accuracy_go_to_the_lower_log_loss() -> None:
    y = np.array([0, 1, 0, 1])
    sure = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])
    unsure = np.array([[0.6, 0.4], [0.4, 0.6], [0.6, 0.4], [0.4, 0.6]])
    fitted = BestHeldout([_Plugin("unsure", unsure), _Plugin("sure", sure)]).fit(
        np.zeros((4, 2)), np.arange(4), y, n_classes=2)
    assert fitted.summary()["classifier"] == "sure"


def test_make_classifier_names_the_variable_for_an_unknown_plugin() -> None:
    assert isinstance(make_classifier("linear"), LinearProbe)
    assert isinstance(make_classifier("mlp_ssl", threads=1), SemiSupervisedMLP)
    with pytest.raises(ConfigError, match="DLFORGE_LABELER_CLASSIFIER"):
        make_classifier("forest")
    with pytest.raises(ValueError):
        SemiSupervisedMLP(pseudo_threshold=1.0)


def test_a_rows_held_out_confidence_does_not_depend_on_its_own_label() -> None:
    from dlforge.labeler.classifier import crossfit_scaled

    rng = np.random.default_rng(5)
    logits = rng.normal(size=(60, 3)) * 2.0
    y = rng.integers(0, 3, size=60)
    mask = np.ones(60, dtype=bool)
    before = crossfit_scaled(logits, y, mask, seed=1)
    np.testing.assert_allclose(before.sum(axis=1), 1.0, atol=1e-9)
    for row in (0, 17, 59):
        flipped = y.copy()
        flipped[row] = (y[row] + 1) % 3
        after = crossfit_scaled(logits, flipped, mask, seed=1)
        np.testing.assert_allclose(after[row], before[row], atol=1e-12)  # its own label never entered
        assert np.abs(after - before).max() > 1e-6  # but it calibrates the other folds' rows


def test_subsample_curve_rises_with_the_share_of_labels_it_trains_on() -> None:
    # labels from a noisy linear rule in 40 dimensions: 40 rows are too few to find it, 320 are not
    rng = np.random.default_rng(4)
    x = rng.normal(size=(600, 40)).astype(np.float32)
    y = (x @ rng.normal(size=40) + 0.5 * rng.normal(size=600) > 0).astype(np.int64)
    curve = subsample_curve(x[:400], y[:400], representative=np.ones(400, dtype=bool), c=1.0)
    shares = [s for s, _, _ in curve]
    assert shares == [0.125, 0.25, 0.375, 0.5, 0.75, 1.0]
    sizes = {s: n for s, _, n in curve}
    assert sizes[1.0] == 320 and sizes[0.5] == 160 and sizes[0.125] == 40  # 4 of 5 folds' rows, then the share
    acc = {s: a for s, a, _ in curve}
    assert acc[1.0] >= 0.85 and acc[0.125] <= acc[1.0] - 0.08


def test_subsample_curve_scores_the_representative_rows_only() -> None:
    x, y = _blobs(60, classes=3, spread=0.3)
    x[y == 2] = x[y == 1][: int((y == 2).sum())]  # classes 1 and 2 share their images: a coin toss between them
    every = subsample_curve(x, y, representative=np.ones(len(y), dtype=bool), c=1.0)
    only_first = subsample_curve(x, y, representative=y == 0, c=1.0)
    assert all(a == 1.0 for _, a, _ in only_first)  # class 0 stands apart
    assert all(a < 0.85 for _, a, _ in every)
    assert subsample_curve(x, y, representative=np.zeros(len(y), dtype=bool), c=1.0) == []
    assert subsample_curve(x, np.zeros(len(y), dtype=np.int64), representative=y == 0, c=1.0) == []


def test_subsample_curve_keeps_the_given_labels_in_every_share() -> None:
    x, y = _blobs(50, classes=2, spread=0.5)
    given = np.zeros(len(y), dtype=bool)
    given[::5] = True  # 20 of the 100 labels came with the upload
    curve = subsample_curve(x, y, representative=np.ones(len(y), dtype=bool), c=1.0, always=given,
                            shares=(0.25, 1.0))
    sizes = {s: n for s, _, n in curve}
    # 5 folds: 80 training rows per fold, about 16 of them given (stratified by class, not by given), all kept;
    # a quarter of the others is about 16: some 32 rows, where a quarter of all would be 20
    assert sizes[1.0] == 80 and 28 <= sizes[0.25] <= 36
    plain = {s: n for s, _, n in subsample_curve(x, y, representative=np.ones(len(y), dtype=bool), c=1.0,
                                                 shares=(0.25, 1.0))}
    assert plain == {0.25: 20, 1.0: 80}
