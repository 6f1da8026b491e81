"""Synthetic data for the proposer tests: source data sets, a target manifest of images, settings."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dlforge.common.objects import ObjectStore
from dlforge.common.settings import load_settings
from dlforge.proposer.settings import ProposerSettings
from dlforge.proposer.sources import SourceData
from dlforge.vision.manifest import Item, Manifest, Split, save_manifest

torch.set_num_threads(2)


def bars(n: int, *, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: a horizontal bright bar, class 1: a vertical one, at random positions, on noise."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
    y = np.arange(n) % 2
    for i in range(n):
        p = int(rng.integers(4, size - 8))
        if y[i] == 0:
            x[i, p:p + 4, 2:-2] = 230
        else:
            x[i, 2:-2, p:p + 4] = 230
    return x, y.astype(np.int64)


def blobs(n: int, *, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: a dark image with one bright square; class 1: a bright image with a dark square."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = np.where(y[:, None, None] == 0, 40, 200).astype(np.int16) + rng.integers(-20, 20, size=(n, size, size))
    for i in range(n):
        r, c = (int(v) for v in rng.integers(2, size - 10, 2))
        x[i, r:r + 8, c:c + 8] = 230 if y[i] == 0 else 20
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def synthetic_source(name: str, maker: Callable[..., tuple[np.ndarray, np.ndarray]], n: int = 96) -> SourceData:
    x, y = maker(n, seed=1)
    tx, ty = maker(n // 2, seed=2)
    return SourceData(name=name, classes=["a", "b"], train_x=x, train_y=y, test_x=tx, test_y=ty,
                      description=f"synthetic {name}")


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_target(
    objects: ObjectStore, *, n: int = 40, dataset_id: str = "synth", seed: int = 5
) -> tuple[str, Manifest]:
    """A two-class training manifest of ``n`` 96x96 grayscale images (train/val/test splits) in ``objects``."""
    x, y = bars(n, seed=seed, size=96)
    classes = ["defect", "good"]
    items = []
    for i in range(n):
        data = png(x[i])
        key = f"test/{dataset_id}/img{i:03d}.png"
        objects.put_bytes(key, data, content_type="image/png")
        split: Split = "test" if i % 10 == 9 else ("val" if i % 10 in (3, 6) else "train")
        items.append(Item(item_id=f"i{i:03d}", key=key, name=f"img{i:03d}.png", sha256=hashlib.sha256(data).hexdigest(),
                          width=96, height=96, label=classes[int(y[i])], label_source="human", confidence=1.0,
                          split=split))
    manifest = Manifest(dataset_id=dataset_id, name=dataset_id, classes=classes, items=items)
    key = f"test/{dataset_id}/manifest.json"
    save_manifest(objects, key, manifest)
    return key, manifest


def proposer_test_settings(tmp: Path, **overrides: object) -> ProposerSettings:
    values: dict[str, object] = {
        "bus": "memory://", "objects": f"file://{tmp}/o", "docs": f"sqlite:///{tmp}/d.db", "work_dir": str(tmp / "w"),
        "proposer_finetune_steps": 20, "proposer_speed_seconds": 0.1, "proposer_build_on_start": False,
        "proposer_train_sample": 64, "proposer_val_sample": 32,
    }
    values.update(overrides)
    return load_settings(ProposerSettings, **values)
