"""Torch-free preprocessing for deployed variants: frame -> normalized float32 NCHW.

It does what training does (``dlforge.vision.images.to_array`` then ``to_tensor``): a PIL bilinear
resize to the network's input size, then ``(x / 255 - mean) / std``. It is kept free of torch so an
ONNX Runtime process (the Predictor, the benchmark child) does not load torch just to resize.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class InputFormat:
    """What a network expects: channels, square side, per-channel mean and std."""

    in_channels: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def resize_frame(img: Image.Image, fmt: InputFormat) -> np.ndarray:
    """A decoded image as uint8 ``S x S x C`` at the network's input size (same ops as training)."""
    mode = "L" if fmt.in_channels == 1 else "RGB"
    arr = np.asarray(img.convert(mode).resize((fmt.input_size, fmt.input_size), Image.Resampling.BILINEAR),
                     dtype=np.uint8)
    return arr[:, :, None] if fmt.in_channels == 1 else arr


def normalize(batch: np.ndarray | Sequence[np.ndarray], fmt: InputFormat) -> np.ndarray:
    """uint8 ``N x S x S x C`` -> normalized float32 ``N x C x S x S``."""
    arr = np.stack(list(batch)) if not isinstance(batch, np.ndarray) else batch
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.shape[-1] != fmt.in_channels:
        raise ValueError(f"images have {arr.shape[-1]} channels, the network expects {fmt.in_channels}")
    x = arr.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    mean = np.asarray(fmt.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(fmt.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def frame_to_input(frame: np.ndarray, fmt: InputFormat) -> np.ndarray:
    """One uint8 ``H x W x C`` camera frame (any size) -> a float32 batch of one for the network."""
    img = Image.fromarray(frame[:, :, 0] if frame.ndim == 3 and frame.shape[2] == 1 else frame)
    return normalize(resize_frame(img, fmt)[None], fmt)
