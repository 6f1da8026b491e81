"""The X2 confidence filter: keeps confident samples of the intended class, rejects the wrong class."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from dlforge.augmenter.filters import ConfidenceFilter, FrozenNetworkFeatures, KeepAllFilter
from dlforge.augmenter.generators import PolicyGenerator
from dlforge.common.errors import ConfigError


def _digits(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits 0 and 1, upscaled to ``size`` px, uint8 N x size x size x 1."""
    data = load_digits(n_class=2)
    images = np.stack([
        np.asarray(Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR))
        for img in data.images
    ])[..., None]
    return images, data.target.astype(np.int64)


@pytest.mark.slow
def test_x2_filter_on_frozen_features_keeps_confident_digits_and_rejects_the_wrong_class() -> None:
    images, labels = _digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    train, val = order[:120], order[120:200]
    f = ConfidenceFilter(FrozenNetworkFeatures(image_size=64), threshold=0.9)
    fit = f.fit(images[train], labels[train], num_classes=2, val_images=images[val], val_labels=labels[val])
    assert fit.train_count == 120 and fit.val_count == 80
    assert fit.val_accuracy is not None and fit.val_accuracy >= 0.97
    assert fit.details["image_size"] == 64 and fit.details["C"] in f.cs

    zeros = images[train][labels[train] == 0]
    made = PolicyGenerator(["hflip|brightness:0.05", "affine:5", "noise:0.02"]).generate(zeros, 30, rng)
    verdict = f.judge(made.images, np.zeros(30, dtype=np.int64))
    assert verdict.keep.mean() >= 0.8, verdict.confidence

    held_out = order[200:]
    ones = images[held_out][labels[held_out] == 1][:10]
    wrong = f.judge(ones, np.zeros(len(ones), dtype=np.int64))  # "ones" sold as zeros
    assert not wrong.keep.any() and np.all(wrong.confidence < 0.5) and np.all(wrong.predicted == 1)
    right = f.judge(ones, np.ones(len(ones), dtype=np.int64))
    assert right.keep.all()


def test_the_threshold_decides_with_the_classifier_probability(stats_extractor, textures) -> None:  # type: ignore[no-untyped-def]
    stripes, spots = textures("stripes", 30), textures("spots", 30)
    images = np.concatenate([stripes, spots])
    labels = np.array([0] * 30 + [1] * 30)
    strict = ConfidenceFilter(stats_extractor, threshold=1.0)
    loose = ConfidenceFilter(stats_extractor, threshold=0.5)
    for f in (strict, loose):
        fit = f.fit(images, labels, num_classes=2, val_images=images[:0], val_labels=labels[:0])
        assert fit.val_accuracy is None and fit.val_count == 0
    probe = np.concatenate([textures("stripes", 5, seed=9), textures("spots", 5, seed=9)])
    intended = np.array([0] * 5 + [1] * 5)
    loose_verdict = loose.judge(probe, intended)
    assert loose_verdict.keep.all()
    assert not strict.judge(probe, intended).keep.any()  # probabilities never reach exactly 1.0
    # a class absent from the real data gets probability 0
    absent = loose.judge(probe[:2], np.array([2, 2]))
    assert not absent.keep.any() and np.all(absent.confidence == 0.0)


def test_filter_configuration_is_checked(stats_extractor) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        ConfidenceFilter(stats_extractor, threshold=0.0)
    with pytest.raises(ConfigError):
        FrozenNetworkFeatures("small_cnn")
    f = ConfidenceFilter(stats_extractor)
    one_class = np.zeros((4, 48, 48, 1), dtype=np.uint8)
    with pytest.raises(ValueError, match="two classes"):
        f.fit(one_class, np.zeros(4, dtype=np.int64), num_classes=1, val_images=one_class, val_labels=np.zeros(4))


def test_keep_all_keeps_everything() -> None:
    images = np.zeros((3, 8, 8, 1), dtype=np.uint8)
    verdict = KeepAllFilter().judge(images, np.array([1, 0, 1]))
    assert verdict.keep.all() and list(verdict.predicted) == [1, 0, 1]
