"""The ImageNet candidate's encodings of the target come from the feature store: one pass per image and size."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from dlforge.common.backends import open_objects
from dlforge.proposer.scoring import Candidate
from dlforge.vision.features import FeatureStore
from dlforge.vision.observe import CountingObserver, observing
from dlforge.vision.staged import imagenet_trunk
from dlforge.vision.trunk import TrunkFeatures

pytest.importorskip("onnxruntime")


def test_imagenet_candidate_reuses_the_labelers_pass_and_matches_its_own_forward(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    images = np.random.default_rng(0).integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)
    contents = [hashlib.sha256(f"t{k}".encode()).hexdigest() for k in range(6)]
    store = FeatureStore(open_objects(f"file://{tmp_path}/objects"))
    trunk = imagenet_trunk()
    with observing(CountingObserver()) as counts:
        TrunkFeatures(store).pooled(contents, size=64, stages=["c40", "head"], load=lambda rows: images[rows])
        model = trunk.model  # the ImageNet weights, as the repository's entry holds them
        stored = Candidate.from_model(model, model_id="imagenet", arch="efficientnet_lite0", source_dataset="imagenet",
                                      weights_key="k", input_size=64, unfreeze_last=1, store=store)
        enc = stored.encode("train", images, contents=contents)
    assert sorted(counts.embeds.values()) == [1] * 6  # the labeler's pass only

    direct = Candidate.from_model(model, model_id="imagenet", arch="efficientnet_lite0", source_dataset="imagenet",
                                  weights_key="k", input_size=64, unfreeze_last=1)
    want = direct.encode("train", images)
    assert tuple(enc.boundary.shape) == tuple(want.boundary.shape) == (6, 320, 2, 2)
    np.testing.assert_allclose(enc.features, want.features, atol=1e-4, rtol=1e-4)
    # activations pass through float16 storage
    np.testing.assert_allclose(enc.boundary.numpy(), want.boundary.numpy(), atol=5e-2, rtol=1e-2)
