"""Fixtures for the augmenter tests: synthetic textures, a cheap feature extractor, labeled data sets."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Mapping

import numpy as np
import pytest
from PIL import Image

from dlforge.common.objects import ObjectStore
from dlforge.vision.manifest import Item, Manifest, save_manifest

MakeTextures = Callable[..., np.ndarray]


def _textures(kind: str, n: int, *, size: int = 48, seed: int = 0) -> np.ndarray:
    """uint8 n x size x size x 1: 'stripes' (horizontal sine stripes) or 'spots' (bright gaussian blobs)."""
    rng = np.random.default_rng([seed, {"stripes": 1, "spots": 2}[kind]])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n, size, size, 1), dtype=np.uint8)
    for i in range(n):
        if kind == "stripes":
            freq = rng.uniform(3, 6)
            img = 128 + 70 * np.sin(2 * np.pi * freq * yy / size + rng.uniform(0, 2 * np.pi))
        else:
            img = np.full((size, size), 70.0, dtype=np.float32)
            for _ in range(int(rng.integers(3, 6))):
                cy, cx = rng.uniform(0, size, 2)
                r = rng.uniform(size / 14, size / 8)
                img += 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += rng.normal(0, 6, (size, size))
        out[i, :, :, 0] = np.clip(img, 0, 255).astype(np.uint8)
    return out


@pytest.fixture
def textures() -> MakeTextures:
    return _textures


class StatsExtractor:
    """A cheap FeatureExtractor for logic tests: spread of the row and column profiles, overall spread."""

    image_size = 48

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32).mean(axis=3)
        rows, cols = x.mean(axis=2), x.mean(axis=1)
        return np.stack([rows.std(axis=1), cols.std(axis=1), x.std(axis=(1, 2))], axis=1) / 10


@pytest.fixture
def stats_extractor() -> StatsExtractor:
    return StatsExtractor()


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0]).save(buf, format="PNG")
    return buf.getvalue()


def _write_dataset(
    objects: ObjectStore,
    dataset_id: str,
    layout: Mapping[str, tuple[str, Mapping[str, int]]],
    *,
    size: int = 48,
    seed: int = 0,
) -> tuple[Manifest, str]:
    """Write textures and a labeled manifest; ``layout``: class -> (texture kind, {split: count})."""
    items: list[Item] = []
    for c, (label, (kind, splits)) in enumerate(layout.items()):
        total = sum(splits.values())
        images = _textures(kind, total, size=size, seed=seed * 100 + c)
        n = 0
        for split, count in splits.items():
            for _ in range(count):
                data = _png(images[n])
                item_id = f"{label}-{n:04d}"
                key = f"labeler/{dataset_id}/images/{item_id}.png"
                objects.put_bytes(key, data, content_type="image/png")
                items.append(Item(item_id=item_id, key=key, name=f"{label}/{item_id}.png",
                                  sha256=hashlib.sha256(data).hexdigest(), width=size, height=size, label=label,
                                  label_source="human", confidence=1.0, split=split))  # type: ignore[arg-type]
                n += 1
    manifest = Manifest(dataset_id=dataset_id, name="textures", classes=list(layout), items=items)
    key = f"labeler/{dataset_id}/labeled.json"
    save_manifest(objects, key, manifest)
    return manifest, key


@pytest.fixture
def write_dataset() -> Callable[..., tuple[Manifest, str]]:
    return _write_dataset
