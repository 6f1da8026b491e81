"""Synthetic data for the optimizer tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dlforge.common.events import Spec
from dlforge.optimizer.preprocess import InputFormat

CLASSES = ["defect", "good"]
SIZE = 32  # small_cnn trained at 32 px (checkpoint extra["input_size"]) to keep the tests fast
SPEC = Spec(positive_class="defect", min_recall=0.9, min_accuracy=0.9, min_fps=1.0, input_size=256)
FMT = InputFormat(1, SIZE, (0.5,), (0.5,))  # small_cnn's input: one channel, mean and std 0.5


def separable(n: int, *, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """uint8 n x size x size x 1 noise images; class 0 ('defect') carries a bright square, class 1 does not."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 110, (n, size, size, 1)).astype(np.uint8)
    y = np.arange(n) % 2
    rng.shuffle(y)
    side = size // 3
    for i in np.flatnonzero(y == 0):
        r, c = rng.integers(2, size - side - 2, 2)
        x[i, r:r + side, c:c + side] = rng.integers(200, 256)
    return x, y.astype(np.int64)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Trained:
    checkpoint: Path
    model: torch.nn.Module


SPLIT_SIZES = {"train": 40, "val": 60, "test": 60}


def store_dataset(objects: Any, trained: Trained, *, dataset_id: str = "ds1", model_id: str = "m1",
                  spec: Any = None) -> Any:
    """A tiny labeled manifest (48x48 PNGs: the worker resizes them) and the checkpoint in ``objects``;
    the ``model.trained`` payload that points at them."""
    import hashlib

    from dlforge.common.events import ModelTrained, PipelineOptions, Spec
    from dlforge.vision.manifest import Item, Manifest, save_manifest

    items = []
    for n, (split, count) in enumerate(SPLIT_SIZES.items()):
        x, y = separable(count, seed=100 + n, size=48)
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            data = png(img)
            key = f"labeler/{dataset_id}/images/{split}-{i}.png"
            objects.put_bytes(key, data, content_type="image/png")
            items.append(Item(item_id=f"{split}-{i}", key=key, name=f"{split}-{i}.png",
                              sha256=hashlib.sha256(data).hexdigest(), width=48, height=48, label=CLASSES[label],
                              label_source="human", split=split))
    manifest_key = f"augmenter/{dataset_id}/manifest.json"
    save_manifest(objects, manifest_key, Manifest(dataset_id=dataset_id, name="tiny", classes=CLASSES, items=items))
    checkpoint_key = f"trainer/{dataset_id}/{model_id}/final.pt"
    objects.put_file(checkpoint_key, trained.checkpoint)
    spec = spec or Spec(positive_class="defect", min_recall=0.9, min_accuracy=0.9, min_fps=1.0, input_size=256)
    return ModelTrained(dataset_id=dataset_id, model_id=model_id, arch="small_cnn", checkpoint_key=checkpoint_key,
                        manifest_key=manifest_key, classes=CLASSES, params={"lr": 0.01}, metrics={"val_accuracy": 1.0},
                        no_of_workers=1, spec=spec, options=PipelineOptions(seed=5))


@dataclass(frozen=True)
class Optimized:
    """A model optimized once by the worker (memory bus) on embedded backends under ``root``, the run view of
    its run written as the runs service writes it: what the bundle's API, CLI and edge tests read."""

    root: Path
    run_id: str
    dataset_id: str
    model_id: str
    report_key: str
    bundle_key: str
    chosen_variant: str

    def settings(self, **extra: Any) -> Any:
        from dlforge.common.settings import load_settings
        from dlforge.optimizer.settings import OptimizerSettings

        return load_settings(OptimizerSettings, bus="memory://", objects=f"file://{self.root}/objects",
                             docs=f"sqlite:///{self.root}/docs.db", work_dir=str(self.root / "work"), **extra)
