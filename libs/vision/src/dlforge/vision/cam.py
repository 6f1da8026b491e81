"""Class activation maps (CAM, Zhou et al. 2016) of the dlforge classifiers, and their overlay on an image.

Every :class:`~dlforge.vision.networks.Classifier` ends in global average pooling of its last conv
features followed by one linear layer (dropout is the identity at inference). For such a network the
class score is ``sum_k w_ck * mean(A_k)``, so ``CAM_c = sum_k w_ck * A_k`` is exactly where the score
comes from; Grad-CAM reduces to it up to a constant factor (the gradient of the score with respect
to ``A_k`` is ``w_ck / (H * W)`` everywhere). No autograd is needed.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import nn

from dlforge.common.errors import ConfigError
from dlforge.vision.networks import Classifier, SmallCNN, _EfficientNetFeatures


def feature_maps(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    """The last conv features ``(N, K, h, w)`` that the classifier's pooling averages."""
    backbone = model.backbone
    if isinstance(backbone, SmallCNN):
        out: torch.Tensor = backbone.body(x)
        return out
    if isinstance(backbone, _EfficientNetFeatures):
        net: nn.Module = backbone.net
        out = net.extract_features(x)  # type: ignore[operator]
        return out
    raise ConfigError(f"no class activation map for a {type(backbone).__name__} backbone")


@torch.no_grad()
def class_activation_map(model: Classifier, x: torch.Tensor, class_index: int) -> np.ndarray:
    """``CAM_c`` of one normalized input ``(1, C, S, S)`` at the feature maps' resolution, scaled to [0, 1]
    (0 where the class gets its least evidence, 1 its most; all zeros when the map is flat)."""
    model.eval()
    maps = feature_maps(model, x)[0]  # K x h x w
    weights = model.head.weight[class_index]  # K
    cam = torch.einsum("k,khw->hw", weights, maps).numpy().astype(np.float32)
    span = float(cam.max() - cam.min())
    return (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)


def scaled_within(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` if neither side is over ``max_side``, else a copy scaled down (aspect kept) so its long side
    is ``max_side``: what a map is drawn on, so its memory does not grow with the upload's size."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``cam`` resized (bilinear) to ``size`` = (width, height), values kept in [0, 1]."""
    img = Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def _heat(v: np.ndarray) -> np.ndarray:
    """A blue -> cyan -> yellow -> red colour ramp of values in [0, 1] (float32) as uint8 RGB."""
    v4 = np.float32(4) * v.astype(np.float32, copy=False)
    out = np.empty((*v.shape, 3), dtype=np.uint8)
    for channel, centre in enumerate((3, 2, 1)):
        out[..., channel] = np.clip(np.float32(1.5) - np.abs(v4 - np.float32(centre)), 0, 1) * np.float32(255)
    return out


def overlay_png(image: Image.Image, cam: np.ndarray, *, alpha: float = 0.45) -> bytes:
    """PNG of ``image`` (its own size: give a scaled copy, :func:`scaled_within`) with the heat map of ``cam``
    (already at that size) blended over it; uint8 images blended by PIL, no float copy of the image."""
    base = image.convert("RGB")
    heat = Image.fromarray(_heat(cam), mode="RGB")
    buf = io.BytesIO()
    Image.blend(base, heat, alpha).save(buf, format="PNG")
    return buf.getvalue()
