"""What the kept samples change on held-out real images (the seed's second classifier), and the samples' grid."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from dlforge.augmenter.filters import ConfidenceFilter, KeepAllFilter
from dlforge.augmenter.handlers import (
    GRID_CAPTION,
    GRID_PER_ROW,
    GRID_THUMB,
    GeneratedSample,
    gain_figures,
    samples_grid,
)


def test_gain_figures_against_hand_counted_predictions() -> None:
    truth = np.array([0, 0, 0, 1, 1, 1, 1, 2])
    real_only = np.array([0, 0, 1, 0, 0, 1, 1, 2])  # 5 of 8 right
    with_kept = np.array([0, 0, 1, 1, 0, 1, 1, 1])  # 5 of 8 right, 2 predictions changed
    gain = gain_figures(truth, real_only, with_kept, ["a", "b", "c"], kept=12, classifier="lr")
    assert (gain.val_items, gain.kept_samples, gain.changed) == (8, 12, 2)
    assert gain.accuracy_real == 5 / 8 and gain.accuracy_with_kept == 5 / 8
    a, b, c = gain.per_class
    assert (a.val_items, a.recall_real, a.recall_with_kept) == (3, 2 / 3, 2 / 3)
    assert (a.precision_real, a.precision_with_kept) == (2 / 4, 2 / 3)  # predicted a: rows 0, 1, 3, 4 / 0, 1, 4
    assert (b.val_items, b.recall_real, b.recall_with_kept) == (4, 2 / 4, 3 / 4)
    assert (b.precision_real, b.precision_with_kept) == (2 / 3, 3 / 5)  # predicted b: 2, 5, 6 / 2, 3, 5, 6, 7
    assert (c.recall_real, c.recall_with_kept, c.precision_real, c.precision_with_kept) == (1.0, 0.0, 1.0, None)
    with pytest.raises(ValueError, match="8 labels, 8 and 7 predictions"):
        gain_figures(truth, real_only, with_kept[:7], ["a", "b", "c"], kept=1, classifier="lr")


class MeanLevel:
    """A one-number feature: an image's mean grey level in [0, 1]."""

    image_size = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).mean(axis=1, keepdims=True).astype(np.float32) / 255.0


def _flat(levels: list[float]) -> np.ndarray:
    return np.stack([np.full((8, 8, 1), round(255 * v), dtype=np.uint8) for v in levels])


def test_the_second_classifier_learns_from_the_kept_samples() -> None:
    """Dark class 0, bright class 1 with only three real train images, far brighter than its validation images:
    trained on the real images alone, the filter puts the boundary between the two train clusters and misses
    every validation image of class 1; samples of class 1 where those images lie move the boundary past them."""
    dark = list(np.linspace(0.0, 0.2, 20))
    train = _flat([*dark, 0.9, 0.95, 1.0])
    labels = np.array([0] * 20 + [1] * 3)
    val = _flat([0.1, 0.15, 0.35, 0.4, 0.45])
    val_labels = np.array([0, 0, 1, 1, 1])
    f = ConfidenceFilter(MeanLevel(), threshold=0.5, cs=(1.0,))
    fit = f.fit(train, labels, num_classes=2, val_images=val, val_labels=val_labels)
    assert fit.val_predicted is not None and list(fit.val_predicted) == [0, 0, 0, 0, 0]
    samples = _flat([0.3, 0.32, 0.35, 0.38, 0.4, 0.42, 0.45, 0.48])
    verdict = f.judge(samples, np.ones(8, dtype=np.int64))
    assert verdict.features is not None and verdict.features.shape == (8, 1)
    second = f.second_classifier(verdict.features, np.ones(8, dtype=np.int64))
    assert second is not None and list(second) == [0, 0, 1, 1, 1]
    # the first model is untouched: the same samples are judged as before
    assert np.array_equal(f.judge(samples, np.ones(8, dtype=np.int64)).confidence, verdict.confidence)
    assert KeepAllFilter().second_classifier(verdict.features, np.ones(8, dtype=np.int64)) is None


def _sample(n: int, label: str, confidence: float, kept: bool, level: int) -> GeneratedSample:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 20), level, dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    return GeneratedSample(sample_id=f"s{n}", key=f"k{n}", label=label, parent_id="p", recipe="flip",
                           confidence=confidence, predicted=label, kept=kept, png=png,
                           sha256=hashlib.sha256(png).hexdigest(), width=20, height=20)


def test_the_grid_shows_kept_and_rejected_rows_spread_over_the_confidence() -> None:
    # 12 kept spots (grey level 10 * n, confidence rising with n) and 2 rejected ones; nothing for "stripes"
    kept = [_sample(n, "spots", 0.9 + n / 200, True, 10 * n) for n in range(12)]
    rejected = [_sample(20, "spots", 0.3, False, 250), _sample(21, "spots", 0.6, False, 200)]
    png = samples_grid([*kept, *rejected], ["stripes", "spots"])
    assert png is not None
    grid = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    cell = GRID_THUMB + 14 + 4
    assert grid.shape == (2 * cell, GRID_CAPTION + GRID_PER_ROW * (GRID_THUMB + 4))

    def thumb(row: int, col: int) -> int:
        return int(grid[row * cell + GRID_THUMB // 2, GRID_CAPTION + col * (GRID_THUMB + 4) + GRID_THUMB // 2])

    # kept row: 8 of 12, most confident first, the first and the last of the range among them
    assert thumb(0, 0) == 110 and thumb(0, GRID_PER_ROW - 1) == 0
    assert [thumb(0, c) for c in range(GRID_PER_ROW)] == sorted((thumb(0, c) for c in range(GRID_PER_ROW)),
                                                                reverse=True)
    # rejected row: both, the more confident (0.6, level 200) first, then white space
    assert (thumb(1, 0), thumb(1, 1), thumb(1, 2)) == (200, 250, 255)
    assert samples_grid([], ["stripes", "spots"]) is None


def test_the_grid_keeps_its_size_with_many_classes_long_names_and_no_confidence() -> None:
    long = "a class name far longer than the caption column could ever show " * 2
    samples = [_sample(n, f"{long}{n}", 0.95, True, 100) for n in range(20)]
    samples.append(GeneratedSample(**{**samples[0].__dict__, "sample_id": "nan", "confidence": None, "kept": False}))
    png = samples_grid(samples, [f"{long}{n}" for n in range(20)], max_classes=16)
    assert png is not None
    grid = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert grid.shape == (2 * 16 * (GRID_THUMB + 18), GRID_CAPTION + GRID_PER_ROW * (GRID_THUMB + 4))
    # the caption column stays left of the thumbnails: nothing drawn over the first one's left edge column
    assert int(grid[GRID_THUMB // 2, GRID_CAPTION + GRID_THUMB // 2]) == 100
    # class 0's rejected row holds the sample without a confidence
    assert int(grid[(GRID_THUMB + 18) + GRID_THUMB // 2, GRID_CAPTION + GRID_THUMB // 2]) == 100
