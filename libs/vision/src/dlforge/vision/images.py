"""Decoding and preprocessing images for a network."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dlforge.common.errors import InvalidInput
from dlforge.vision import observe
from dlforge.vision.networks import NetworkSpec

MAX_PIXELS = 64_000_000
"""The largest image decoded: 64 MP (8000 x 8000). Larger ones are refused from their header, before decoding."""
STATUS_TOO_MANY_PIXELS = 413
# Pillow's own guard stays as a second line: it warns above its limit and refuses only above twice it,
# so decode() checks MAX_PIXELS itself from the header that Image.open reads.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def decode(data: bytes, *, name: str = "image") -> Image.Image:
    """Decode and fully load an image; raises InvalidInput saying why it cannot be read.

    An image over :data:`MAX_PIXELS` is refused (status 413) from the size in its header, before
    its pixels are decoded.
    """
    observe.notify_decoded(data)
    try:
        with warnings.catch_warnings():  # Pillow warns between its limit and twice it; the check below refuses
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        pixels = img.width * img.height
        if pixels > MAX_PIXELS:
            img.close()
            raise InvalidInput(f"{name}: image is {img.width}x{img.height} = {pixels / 1e6:.1f} MP, over the limit "
                               f"of {MAX_PIXELS / 1e6:.0f} MP", status_code=STATUS_TOO_MANY_PIXELS)
        img.load()
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"{name}: image too large, over the limit of {MAX_PIXELS / 1e6:.0f} MP ({exc})",
                           status_code=STATUS_TOO_MANY_PIXELS) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"{name}: not a readable image ({exc})") from exc
    if img.width < 8 or img.height < 8:
        raise InvalidInput(f"{name}: image is {img.width}x{img.height}, smaller than 8x8")
    return img


_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def canonical_pixels(img: Image.Image) -> np.ndarray:
    """The decoded image as stored in the feature store: uint8 H x W (gray modes) or H x W x 3.

    ``to_array(Image.fromarray(canonical_pixels(img)), ...)`` equals ``to_array(img, ...)`` for
    gray and RGB images (conversions between L and RGB are the same either way).
    """
    if img.mode in _GRAY_MODES:
        return np.asarray(img.convert("L"), dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def from_pixels(pixels: np.ndarray, *, size: int, channels: int) -> np.ndarray:
    """:func:`to_array` of canonical pixels (uint8 H x W or H x W x 3)."""
    return to_array(Image.fromarray(pixels), size=size, channels=channels)


def to_array(img: Image.Image, *, size: int, channels: int) -> np.ndarray:
    """Resize to ``size``x``size`` and return uint8 HxWxC (grayscale replicated to 3 if asked)."""
    mode = "L" if channels == 1 else "RGB"
    arr = np.asarray(img.convert(mode).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    if channels == 1:
        arr = arr[:, :, None]
    return arr


def to_tensor(batch: np.ndarray | Sequence[np.ndarray], spec: NetworkSpec) -> torch.Tensor:
    """uint8 N x H x W x C (C 1 or 3) -> normalized float N x C x S x S for ``spec``."""
    arr = np.stack(list(batch)) if not isinstance(batch, np.ndarray) else batch
    if arr.ndim == 3:
        arr = arr[..., None]
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] != spec.in_channels:
        x = x.mean(dim=1, keepdim=True) if spec.in_channels == 1 else x.expand(-1, spec.in_channels, -1, -1)
    if x.shape[-1] != spec.input_size or x.shape[-2] != spec.input_size:
        x = torch.nn.functional.interpolate(x, size=(spec.input_size, spec.input_size), mode="bilinear",
                                            align_corners=False, antialias=True)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x - mean) / std


DIHEDRAL_VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x[:, :, ::-1],
    "vflip": lambda x: x[:, ::-1, :],
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "transpose": lambda x: np.swapaxes(x, 1, 2),
    "antitranspose": lambda x: np.swapaxes(np.rot90(x, 2, axes=(1, 2)), 1, 2),
}
"""The eight symmetries of a square (the dihedral group D4), each mapping a batch N x H x W (x C) to
the batch seen under it; quarter turns are counter-clockwise. One table for every service: a view's
name enters feature-store keys (:class:`dlforge.vision.trunk.TrunkFeatures`), so the labeler and the
trainer must mean the same pixels by it."""


_TENSOR_VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # N x C x H x W: H is dim 2, W dim 3. Flips and transposes only, which every ONNX exporter writes.
    "identity": lambda x: x,
    "hflip": lambda x: torch.flip(x, [3]),
    "vflip": lambda x: torch.flip(x, [2]),
    "rot90": lambda x: torch.flip(x.transpose(2, 3), [2]),
    "rot180": lambda x: torch.flip(x, [2, 3]),
    "rot270": lambda x: torch.flip(x, [2]).transpose(2, 3),
    "transpose": lambda x: x.transpose(2, 3),
    "antitranspose": lambda x: torch.flip(x, [2, 3]).transpose(2, 3),
}
assert set(_TENSOR_VIEWS) == set(DIHEDRAL_VIEWS)


def tensor_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """A batch N x C x S x S under one of :data:`DIHEDRAL_VIEWS` (the same pixels as on N x S x S x C)."""
    try:
        fn = _TENSOR_VIEWS[view]
    except KeyError as exc:
        raise InvalidInput(f"unknown view {view!r}; views: {', '.join(DIHEDRAL_VIEWS)}") from exc
    return fn(x)


class ViewAveraged(torch.nn.Module):
    """A classifier whose class probabilities are averaged over label-preserving views of its input.

    The views (names of :data:`DIHEDRAL_VIEWS`) run as one batch of ``len(views) x N`` images; the
    output is the log of the averaged softmax, so a softmax over it gives the averaged probabilities
    back (it stands where the logits stood, for ONNX export, INT8 and the edge runtime alike).
    """

    def __init__(self, model: torch.nn.Module, views: Sequence[str]) -> None:
        super().__init__()
        if not views:
            raise ValueError("ViewAveraged needs at least one view")
        for v in views:
            if v not in _TENSOR_VIEWS:
                raise InvalidInput(f"unknown view {v!r}; views: {', '.join(DIHEDRAL_VIEWS)}")
        self.model = model
        self.views = tuple(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        logits = self.model(torch.cat([_TENSOR_VIEWS[v](x) for v in self.views]))
        probs = torch.softmax(logits, dim=1).reshape(len(self.views), n, -1).mean(dim=0)
        return torch.log(probs.clamp_min(1e-12))


def dihedral_view(pixels: np.ndarray, view: str) -> np.ndarray:
    """uint8 N x S x S x C images under one of :data:`DIHEDRAL_VIEWS` (a new contiguous array)."""
    try:
        fn = DIHEDRAL_VIEWS[view]
    except KeyError as exc:
        raise InvalidInput(f"unknown view {view!r}; views: {', '.join(DIHEDRAL_VIEWS)}") from exc
    if pixels.ndim != 4 or pixels.shape[1] != pixels.shape[2]:
        raise InvalidInput(f"views need square images as N x S x S x C, got shape {pixels.shape}")
    return np.ascontiguousarray(fn(pixels))
