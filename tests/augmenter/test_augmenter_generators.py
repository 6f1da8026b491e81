"""Augmentation ops, policies, within-class mixup, mixing generators."""

from __future__ import annotations

import numpy as np
import pytest

from dlforge.augmenter.generators import (
    DEFAULT_POLICIES,
    OPS,
    Generated,
    MixedGenerator,
    MixupGenerator,
    Op,
    PolicyGenerator,
    ThenPolicies,
    apply_policy,
    parse_policy,
)
from dlforge.common.errors import ConfigError

MAGNITUDE = {"affine": 8.0, "brightness": 0.1, "contrast": 0.2, "noise": 0.03, "erase": 0.1}


def _image(channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.uniform(40, 215, size=(12, 12, channels))
    return np.kron(smooth, np.ones((4, 4, 1))).astype(np.uint8)  # 48 x 48, blocky, not symmetric


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(OPS))
def test_each_op_keeps_shape_and_dtype_and_changes_the_image(name: str, channels: int) -> None:
    image = _image(channels)
    for seed in range(5):
        out = apply_policy(image, (Op(name, MAGNITUDE.get(name, 0.0)),), np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        changed = np.mean(out != image)
        assert changed > 0.02, f"{name} changed only {changed:.3%} of the pixels"


def test_photometric_ops_stay_small_and_geometric_ops_keep_the_histogram() -> None:
    image = _image(1)
    rng = np.random.default_rng(0)
    for name in ("hflip", "vflip", "rot90"):
        out = apply_policy(image, (Op(name),), rng)
        assert np.array_equal(np.sort(out, axis=None), np.sort(image, axis=None))
    bright = apply_policy(image, (Op("brightness", 0.1),), rng).astype(int) - image
    assert 0.05 * 255 - 1 <= abs(bright.mean()) <= 0.1 * 255 + 1
    erased = apply_policy(image, (Op("erase", 0.1),), rng)
    assert 0.025 * 0.9 <= np.mean(erased != image) <= 0.1 * 1.3


def test_policies_parse_and_bad_ones_are_refused() -> None:
    assert parse_policy("hflip|brightness:0.1") == (Op("hflip"), Op("brightness", 0.1))
    for p in DEFAULT_POLICIES:
        parse_policy(p)
    for bad in ("sharpen:1", "noise:x", "noise:-1"):
        with pytest.raises(ConfigError):
            parse_policy(bad)


def test_policy_generator_is_deterministic_and_names_its_parents() -> None:
    sources = np.stack([_image(1, seed) for seed in range(4)])
    gen = PolicyGenerator()
    a = gen.generate(sources, 10, np.random.default_rng(3))
    b = gen.generate(sources, 10, np.random.default_rng(3))
    assert a.images.shape == (10, 48, 48, 1) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and a.recipes == b.recipes
    assert set(a.parents) <= set(range(4))
    assert all(r in DEFAULT_POLICIES for r in a.recipes)
    assert not any(np.array_equal(img, sources[p]) for img, p in zip(a.images, a.parents, strict=True))


def test_mixup_stays_within_the_class() -> None:
    # the class: flat images at 40, 50 and 60; any within-class mix lies in [40, 60] and is flat
    sources = np.stack([np.full((16, 16, 1), v, dtype=np.uint8) for v in (40, 50, 60)])
    made = MixupGenerator(alpha=0.4).generate(sources, 200, np.random.default_rng(0))
    assert made.images.shape == (200, 16, 16, 1) and made.images.dtype == np.uint8
    assert made.images.min() >= 40 and made.images.max() <= 60
    assert all(np.ptp(img) == 0 for img in made.images)
    # the parent is the dominant source: the mix is nearer to it than half the distance to any other
    values = made.images[:, 0, 0, 0].astype(int)
    parent_values = sources[made.parents, 0, 0, 0].astype(int)
    assert np.all(np.abs(values - parent_values) <= 10)
    assert len(set(values)) > 5 and all(r.startswith("mixup:") for r in made.recipes)


def test_mixup_of_a_single_image_returns_it() -> None:
    source = _image(1)[None]
    made = MixupGenerator().generate(source, 3, np.random.default_rng(0))
    assert all(np.array_equal(img, source[0]) for img in made.images)


def test_mixed_generator_shares_the_count() -> None:
    sources = np.stack([_image(1, seed) for seed in range(3)])
    gen = MixedGenerator([(PolicyGenerator(), 0.7), (MixupGenerator(), 0.3)])
    assert gen.shares(10) == [7, 3] and gen.shares(7) == [5, 2] and gen.shares(0) == [0, 0]
    made = gen.generate(sources, 10, np.random.default_rng(0))
    assert len(made.images) == 10
    assert sum(r.startswith("mixup:") for r in made.recipes) == 3
    assert len(gen.generate(sources, 0, np.random.default_rng(0)).images) == 0


class _Inverted:
    """A generator whose samples are its sources' first ``n`` images inverted (parents 0..n-1)."""

    name = "inverted"
    last_fit = "fit-record"

    def generate(self, images: np.ndarray, n: int, rng: np.random.Generator) -> Generated:
        return Generated(255 - images[:n], np.arange(n, dtype=np.int64), [f"inverted:{i}" for i in range(n)])


def test_then_policies_puts_each_inner_sample_through_one_policy() -> None:
    sources = np.stack([_image(1, seed) for seed in range(16)])
    # one policy, a horizontal flip: every sample is its inner sample (not its parent) mirrored
    made = ThenPolicies(_Inverted(), ["hflip"]).generate(sources, 3, np.random.default_rng(0))
    assert np.array_equal(made.images, (255 - sources[:3])[:, :, ::-1])
    assert made.parents.tolist() == [0, 1, 2]
    assert made.recipes == ["inverted:0>hflip", "inverted:1>hflip", "inverted:2>hflip"]
    gen = ThenPolicies(_Inverted(), ["hflip", "vflip"])
    assert gen.name == "inverted+policy" and gen.last_fit == "fit-record"
    made = gen.generate(sources, 16, np.random.default_rng(1))
    for img, src, recipe in zip(made.images, 255 - sources, made.recipes, strict=True):
        assert np.array_equal(img, src[:, ::-1] if recipe.endswith(">hflip") else src[::-1])
    assert {r.split(">")[1] for r in made.recipes} == {"hflip", "vflip"}  # both policies drawn
    again = gen.generate(sources, 16, np.random.default_rng(1))
    assert np.array_equal(again.images, made.images) and again.recipes == made.recipes
    assert len(gen.generate(sources, 0, np.random.default_rng(0)).images) == 0


def test_generation_needs_real_images() -> None:
    with pytest.raises(ValueError, match="without real images"):
        PolicyGenerator().generate(np.zeros((0, 8, 8, 1), dtype=np.uint8), 3, np.random.default_rng(0))
