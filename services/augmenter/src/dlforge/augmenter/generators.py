"""Sample generators: the plug-in that makes new images of one class from its real images.

A :class:`Generator` receives the real images of one class and returns ``n`` new images with, for
each, the index of the real image it came from and a short recipe saying how. The first
generators are augmentation policies (:class:`PolicyGenerator`: a policy is a list of ops with
magnitudes, chosen for grayscale industrial images) and within-class mixup
(:class:`MixupGenerator`); :class:`MixedGenerator` shares ``n`` between several generators.
A learned generator (a GAN or diffusion model trained per class) slots in behind the same method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage

from dlforge.common.errors import ConfigError


@dataclass(frozen=True)
class Generated:
    """What a generator returns: ``images`` (N x H x W x C uint8), the source index of each, a recipe each."""

    images: np.ndarray
    parents: np.ndarray
    recipes: list[str]

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.parents) == len(self.recipes)):
            raise ValueError("images, parents and recipes must have the same length")

    @staticmethod
    def concat(parts: Sequence[Generated], *, like: np.ndarray) -> Generated:
        if not parts:
            return Generated(np.zeros((0, *like.shape[1:]), dtype=np.uint8), np.zeros(0, dtype=np.int64), [])
        return Generated(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.parents for p in parts]).astype(np.int64),
            [r for p in parts for r in p.recipes],
        )


class Generator(Protocol):
    """Makes new samples of one class."""

    name: str

    def generate(self, images: np.ndarray, n: int, rng: np.random.Generator) -> Generated:
        """``n`` new images from ``images`` (N x H x W x C uint8, all of one class, H == W).

        Returns images of the input's shape and dtype; ``parents[i]`` indexes the input image that
        sample ``i`` came from (the dominant one when it mixes several). Must be deterministic for a
        given ``rng`` state.
        """
        ...


# ------------------------------------------------------------------------------------------------
# Augmentation ops: float32 H x W x C in [0, 255] -> same shape; magnitude in the op's own unit
# ------------------------------------------------------------------------------------------------

OpFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _jitter(magnitude: float, rng: np.random.Generator) -> float:
    """A signed amount with |amount| in [magnitude/2, magnitude]: every application visibly changes the image."""
    return float(rng.uniform(magnitude / 2, magnitude) * rng.choice((-1.0, 1.0)))


def hflip(x: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Mirror left-right (magnitude unused)."""
    return x[:, ::-1]


def vflip(x: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Mirror top-bottom (magnitude unused)."""
    return x[::-1]


def rot90(x: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate by 90, 180 or 270 degrees (only 180 for non-square images; magnitude unused)."""
    k = int(rng.integers(1, 4)) if x.shape[0] == x.shape[1] else 2
    return np.rot90(x, k, axes=(0, 1))


def affine(x: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Small rotation (up to ``magnitude`` degrees), shift and zoom (up to ``magnitude`` %), reflected borders."""
    h, w = x.shape[:2]
    angle = math.radians(_jitter(magnitude, rng))
    scale = 1.0 + rng.uniform(-magnitude, magnitude) / 100
    shift = rng.uniform(-magnitude, magnitude, size=2) / 100 * np.array([h, w])
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    matrix = np.array([[cos, -sin], [sin, cos]])
    center = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = center + shift - matrix @ center
    out = np.empty_like(x)
    for c in range(x.shape[2]):
        out[:, :, c] = ndimage.affine_transform(x[:, :, c], matrix, offset=offset, order=1, mode="reflect")
    return out


def brightness(x: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Add a constant of up to ``magnitude`` x 255."""
    return x + _jitter(magnitude, rng) * 255.0


def contrast(x: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Scale the deviation from the mean by 1 +- up to ``magnitude``."""
    mean = x.mean()
    return mean + (x - mean) * (1.0 + _jitter(magnitude, rng))


def noise(x: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Add gaussian noise of standard deviation ``magnitude`` x 255."""
    return x + rng.normal(0.0, magnitude * 255.0, size=x.shape).astype(np.float32)


def erase(x: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Random erasing: fill a rectangle of ``magnitude``/4 .. ``magnitude`` of the area with the image mean."""
    h, w = x.shape[:2]
    area = rng.uniform(magnitude / 4, magnitude) * h * w
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    eh = max(1, min(h, round(math.sqrt(area * aspect))))
    ew = max(1, min(w, round(math.sqrt(area / aspect))))
    top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
    out = x.copy()
    out[top:top + eh, left:left + ew] = x.mean(axis=(0, 1))
    return out


OPS: dict[str, OpFn] = {
    "hflip": hflip,
    "vflip": vflip,
    "rot90": rot90,
    "affine": affine,
    "brightness": brightness,
    "contrast": contrast,
    "noise": noise,
    "erase": erase,
}


@dataclass(frozen=True)
class Op:
    name: str
    magnitude: float = 0.0

    def __str__(self) -> str:
        return self.name if not self.magnitude else f"{self.name}:{self.magnitude:g}"


Policy = tuple[Op, ...]

# Suited to grayscale industrial images (cells, parts, surfaces): flips and 180-degree turns keep the
# orientation of busbars, edges and scan lines (``rot90`` is there for rotation-invariant textures: add
# it by setting), small affine moves, small photometric changes, sensor noise and occlusion (erasing).
DEFAULT_POLICIES: tuple[str, ...] = (
    "hflip|brightness:0.08",
    "vflip|contrast:0.15",
    "hflip|vflip|noise:0.02",
    "affine:6|brightness:0.06",
    "hflip|contrast:0.1|noise:0.015",
    "affine:4|erase:0.06",
)


def parse_policy(text: str) -> Policy:
    """``"hflip|brightness:0.1"`` -> (Op("hflip"), Op("brightness", 0.1)); unknown ops raise ConfigError."""
    ops: list[Op] = []
    for part in text.split("|"):
        name, _, mag = part.strip().partition(":")
        if name not in OPS:
            raise ConfigError(f"unknown augmentation op {name!r} in policy {text!r}; known: {', '.join(OPS)}")
        try:
            magnitude = float(mag) if mag else 0.0
        except ValueError as exc:
            raise ConfigError(f"bad magnitude {mag!r} in policy {text!r}") from exc
        if magnitude < 0:
            raise ConfigError(f"negative magnitude in policy {text!r}")
        ops.append(Op(name, magnitude))
    if not ops:
        raise ConfigError("an augmentation policy needs at least one op")
    return tuple(ops)


def apply_policy(image: np.ndarray, policy: Policy, rng: np.random.Generator) -> np.ndarray:
    """Apply every op of ``policy`` in order to one uint8 H x W x C image."""
    x = image.astype(np.float32)
    for op in policy:
        x = OPS[op.name](x, op.magnitude, rng)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class PolicyGenerator:
    """Each sample: a random real image of the class, one random policy of the set applied to it."""

    name = "policy"

    def __init__(self, policies: Sequence[Policy | str] = DEFAULT_POLICIES) -> None:
        self.policies = [parse_policy(p) if isinstance(p, str) else p for p in policies]
        if not self.policies:
            raise ConfigError("PolicyGenerator needs at least one policy")

    def generate(self, images: np.ndarray, n: int, rng: np.random.Generator) -> Generated:
        _check_sources(images)
        parents = rng.integers(0, len(images), size=n)
        out, recipes = self.apply_each(images[parents], rng)
        return Generated(out, parents.astype(np.int64), recipes)

    def apply_each(self, images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        """Each image put through one random policy of the set, and the policy each got, as text."""
        chosen = rng.integers(0, len(self.policies), size=len(images))
        out = np.empty_like(images, dtype=np.uint8)
        for i, k in enumerate(chosen):
            out[i] = apply_policy(images[i], self.policies[k], rng)
        return out, ["|".join(str(op) for op in self.policies[k]) for k in chosen]


class MixupGenerator:
    """Within-class mixup: ``lam * a + (1 - lam) * b`` of two real images of the class, ``lam ~ Beta(alpha, alpha)``."""

    name = "mixup"

    def __init__(self, alpha: float = 0.4) -> None:
        if alpha <= 0:
            raise ConfigError("mixup alpha must be > 0")
        self.alpha = alpha

    def generate(self, images: np.ndarray, n: int, rng: np.random.Generator) -> Generated:
        _check_sources(images)
        m = len(images)
        a = rng.integers(0, m, size=n)
        # b != a whenever the class has two images or more
        b = (a + rng.integers(1, m, size=n)) % m if m > 1 else a.copy()
        lam = rng.beta(self.alpha, self.alpha, size=n)
        out = np.empty((n, *images.shape[1:]), dtype=np.uint8)
        for i in range(n):
            mixed = lam[i] * images[a[i]].astype(np.float32) + (1 - lam[i]) * images[b[i]].astype(np.float32)
            out[i] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
        parents = np.where(lam >= 0.5, a, b).astype(np.int64)
        return Generated(out, parents, [f"mixup:{lam[i]:.2f}" for i in range(n)])


class MixedGenerator:
    """Shares ``n`` between generators in proportion to their weights (remainder to the first)."""

    name = "mixed"

    def __init__(self, parts: Sequence[tuple[Generator, float]]) -> None:
        parts = [(g, w) for g, w in parts if w > 0]
        if not parts:
            raise ConfigError("MixedGenerator needs at least one generator with a positive weight")
        self.parts = parts

    def shares(self, n: int) -> list[int]:
        total = sum(w for _, w in self.parts)
        counts = [math.floor(n * w / total) for _, w in self.parts]
        counts[0] += n - sum(counts)
        return counts

    def generate(self, images: np.ndarray, n: int, rng: np.random.Generator) -> Generated:
        out = [g.generate(images, k, rng) for (g, _), k in zip(self.parts, self.shares(n), strict=True) if k > 0]
        return Generated.concat(out, like=images)


class ThenPolicies:
    """Each sample of ``inner`` put through one random policy of ``policies`` (parents carried, recipes joined):
    a learned generator's variation followed by the label-preserving moves of the policies."""

    def __init__(self, inner: Generator, policies: Sequence[Policy | str] = DEFAULT_POLICIES) -> None:
        self.inner = inner
        self.then = PolicyGenerator(policies)
        self.policies = self.then.policies
        self.name = f"{inner.name}+policy"

    @property
    def last_fit(self) -> object:
        """The inner generator's last training record, if it keeps one."""
        return getattr(self.inner, "last_fit", None)

    def generate(self, images: np.ndarray, n: int, rng: np.random.Generator) -> Generated:
        made = self.inner.generate(images, n, rng)
        out, applied = self.then.apply_each(made.images, rng)
        return Generated(out, made.parents, [f"{r}>{a}" for r, a in zip(made.recipes, applied, strict=True)])


def _check_sources(images: np.ndarray) -> None:
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 N x H x W x C images, got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError("cannot generate samples of a class without real images")
