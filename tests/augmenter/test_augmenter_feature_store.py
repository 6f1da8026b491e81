"""The X2 filter's frozen features come from the feature store when another stage computed them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from dlforge.augmenter.filters import FrozenNetworkFeatures
from dlforge.common.backends import open_objects
from dlforge.vision.features import FeatureStore
from dlforge.vision.observe import CountingObserver, observing
from dlforge.vision.trunk import TrunkFeatures

pytest.importorskip("onnxruntime")


def test_real_images_embedded_by_the_labeler_are_not_embedded_again(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (4, 40, 40, 1), dtype=np.uint8)
    contents = [hashlib.sha256(f"real{k}".encode()).hexdigest() for k in range(4)]
    store = FeatureStore(open_objects(f"file://{tmp_path}/objects"))
    # the labeler's pass: RGB at 64 px (gray replicated), multi-stage pooled features
    labeler = TrunkFeatures(store, runtime="onnxruntime")
    from dlforge.vision.images import from_pixels

    rgb64 = np.stack([from_pixels(g[:, :, 0], size=64, channels=3) for g in gray])
    with observing(CountingObserver()) as counts:
        labeler.pooled(contents[:3], size=64, stages=["c40", "head"], load=lambda rows: rgb64[rows])
        extractor = FrozenNetworkFeatures(image_size=64, store=store)
        stored = extractor.of_contents(gray, contents)
    # three images embedded by the labeler, the fourth by the filter: each once
    assert sorted(counts.embeds.values()) == [1, 1, 1, 1]
    direct = FrozenNetworkFeatures(image_size=64)(gray)  # no store: computed from the arrays
    assert stored.shape == direct.shape == (4, 1280)
    np.testing.assert_allclose(stored, direct, atol=1e-4, rtol=1e-4)
