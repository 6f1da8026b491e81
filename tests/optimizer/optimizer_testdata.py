"""Synthetic data for the optimizer tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ["defect", "good"]
SIZE = 32  # small_cnn trained at 32 px (checkpoint extra["input_size"]) to keep the tests fast


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
