"""The learned generator (a per-class convolutional VAE) and the generator setting."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dlforge.augmenter.generators import ThenPolicies
from dlforge.augmenter.learned import ConditionalVAEGenerator, DCGANGenerator, VAEFit
from dlforge.augmenter.settings import AugmenterSettings
from dlforge.augmenter.worker import RUNS, SAMPLES, _relevant, build_deps, build_generator, service
from dlforge.common.bus import Delivery
from dlforge.common.errors import ConfigError
from dlforge.common.events import DatasetLabeled, Event, PipelineOptions, Spec, encode
from dlforge.common.runtime import Backends, Outcome, Worker
from dlforge.common.settings import load_settings

torch = pytest.importorskip("torch")


def _squares(n: int, *, size: int = 32, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Dark background (20) with one bright (230) 12 px square at a random position."""
    rng = np.random.default_rng(seed)
    out = np.full((n, size, size, channels), 20, dtype=np.uint8)
    for i in range(n):
        y, x = rng.integers(0, size - 12, size=2)
        out[i, y:y + 12, x:x + 12] = 230
    return out


def _small(**kw: object) -> ConditionalVAEGenerator:
    opts: dict[str, object] = dict(size=32, latent_dim=8, width=8, steps=40, seconds=None, batch_size=16, seed=0)
    opts.update(kw)
    return ConditionalVAEGenerator(**opts)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["prior", "perturb", "interpolate", "residual"])
@pytest.mark.parametrize("channels,side", [(1, 48), (3, 32)])
def test_shape_dtype_and_parents(mode: str, channels: int, side: int) -> None:
    images = _squares(10, size=side, channels=channels)
    made = _small(mode=mode).generate(images, 7, np.random.default_rng(0))
    assert made.images.shape == (7, side, side, channels) and made.images.dtype == np.uint8
    assert made.parents.dtype == np.int64 and len(made.parents) == 7
    assert ((made.parents >= 0) & (made.parents < 10)).all()
    assert all(r.startswith(f"cvae:{mode}") for r in made.recipes)


def test_deterministic_for_a_seed_and_trained_once_per_class() -> None:
    images = _squares(12)
    a = _small(mode="perturb").generate(images, 5, np.random.default_rng(3))
    g = _small(mode="perturb")
    b = g.generate(images, 5, np.random.default_rng(3))
    assert np.array_equal(a.images, b.images) and np.array_equal(a.parents, b.parents)
    model = g._cache[1] if g._cache else None
    g.generate(images, 5, np.random.default_rng(4))  # a second chunk of the same class: no retraining
    assert g._cache is not None and g._cache[1] is model
    other = _small(seed=1, mode="perturb").generate(images, 5, np.random.default_rng(3))
    assert not np.array_equal(a.images, other.images)


def test_time_budget_stops_training_with_a_fake_clock() -> None:
    ticks = itertools.count()
    g = _small(steps=1000, seconds=5.0, clock=lambda: float(next(ticks)))  # one "second" per clock read
    g.generate(_squares(8), 2, np.random.default_rng(0))
    assert g.last_fit is not None and g.last_fit.stopped_by == "time"
    assert 1 <= g.last_fit.steps <= 5
    g2 = _small(steps=7, seconds=1e9)
    g2.generate(_squares(8), 2, np.random.default_rng(0))
    assert g2.last_fit is not None and g2.last_fit.steps == 7 and g2.last_fit.stopped_by == "steps"


def test_samples_look_like_their_class() -> None:
    """Trained on bright squares on a dark background (12 % bright, mean ~45), the samples' mean is
    nearer that class than a uniformly bright class (mean 230), and their brightest pixels stand out
    from their median (a square-like blob, not a flat grey)."""
    images = _squares(24, seed=1)
    g = _small(steps=300, mode="prior", latent_dim=4)
    made = g.generate(images, 16, np.random.default_rng(0)).images.astype(np.float64)
    class_mean, other_mean = images.mean(), 230.0
    assert abs(made.mean() - class_mean) < abs(made.mean() - other_mean)
    per_image = made.reshape(16, -1)
    contrast = np.percentile(per_image, 98, axis=1) - np.median(per_image, axis=1)
    assert np.median(contrast) > 60


def test_bad_options_refused() -> None:
    with pytest.raises(ConfigError):
        ConditionalVAEGenerator(mode="dream")
    with pytest.raises(ConfigError):
        ConditionalVAEGenerator(size=40)
    with pytest.raises(ValueError):
        _small().generate(np.zeros((0, 32, 32, 1), dtype=np.uint8), 2, np.random.default_rng(0))


def test_settings_choose_the_generator_and_refuse_unknown_names() -> None:
    assert load_settings(AugmenterSettings).augmenter_generator == "policy"
    assert build_generator(load_settings(AugmenterSettings)).name == "mixed"
    g = build_generator(load_settings(AugmenterSettings, augmenter_generator="cvae", augmenter_cvae_steps=10))
    assert isinstance(g, ConditionalVAEGenerator) and g.steps == 10 and g.mode == "residual"
    chained = build_generator(load_settings(AugmenterSettings, augmenter_generator="cvae+policy",
                                            augmenter_policies=["hflip"], augmenter_cvae_mode="prior"))
    assert isinstance(chained, ThenPolicies) and chained.name == "cvae+policy"
    assert isinstance(chained.inner, ConditionalVAEGenerator) and chained.inner.mode == "prior"
    assert [str(op) for p in chained.policies for op in p] == ["hflip"]
    with pytest.raises(ConfigError, match="DLFORGE_AUGMENTER_GENERATOR: Input should be 'policy', 'cvae' or "
                                          "'cvae\\+policy'"):
        load_settings(AugmenterSettings, augmenter_generator="gan")
    with pytest.raises(ConfigError, match="DLFORGE_AUGMENTER_CVAE_MODE: Input should be 'prior', 'perturb', "
                                          "'interpolate' or 'residual'"):
        load_settings(AugmenterSettings, augmenter_cvae_mode="dream")


def test_vae_then_policies_records_the_vae_fit_and_flips_its_samples() -> None:
    images = _squares(10, size=32)
    vae = _small(steps=15)
    made = ThenPolicies(vae, ["hflip"]).generate(images, 6, np.random.default_rng(2))
    alone = _small(steps=15).generate(images, 6, np.random.default_rng(2))  # same rng stream up to the policies
    assert np.array_equal(made.images, alone.images[:, :, ::-1]) and np.array_equal(made.parents, alone.parents)
    assert all(r.startswith("cvae:residual:1>hflip") for r in made.recipes)
    chained = ThenPolicies(vae, ["hflip"])
    assert chained.last_fit is vae.last_fit and isinstance(vae.last_fit, VAEFit) and vae.last_fit.steps == 15


def _labeled(**options: Any) -> DatasetLabeled:
    return DatasetLabeled(dataset_id="ds1", labels_key="datasets/ds1/labels.json", classes=["a", "b"], counts=[],
                          human_labels=10, auto_labels=0, rounds=0, spec=Spec(positive_class="b"),
                          options=PipelineOptions(**options))


def test_the_fingerprint_holds_only_the_settings_the_generator_reads() -> None:
    payload = _labeled(seed=3)
    policy = _relevant(payload, load_settings(AugmenterSettings))
    assert policy["generator"] == "policy" and policy["mixup_fraction"] == 0.3 and "policies" in policy
    assert not any(k.startswith("cvae_") for k in policy)
    # a changed VAE setting leaves a policy run's fingerprint (and so its stored augmentation) as it is
    assert _relevant(payload, load_settings(AugmenterSettings, augmenter_cvae_mode="prior",
                                            augmenter_cvae_steps=7)) == policy
    assert _relevant(payload, load_settings(AugmenterSettings, augmenter_mixup_fraction=0.5)) != policy
    vae = _relevant(payload, load_settings(AugmenterSettings, augmenter_generator="cvae"))
    assert vae["cvae_mode"] == "residual" and vae["cvae_steps"] == 1500
    assert "mixup_fraction" not in vae and "policies" not in vae
    chained = _relevant(payload, load_settings(AugmenterSettings, augmenter_generator="cvae+policy"))
    assert "policies" in chained and "cvae_mode" in chained and "mixup_alpha" not in chained
    assert _relevant(payload, load_settings(AugmenterSettings, augmenter_generator="cvae", augmenter_cvae_mode="prior")
                     ) != vae


def test_residual_mode_without_noise_returns_the_parents() -> None:
    """With noise 0 the latent does not move, so the decoded change is zero and each sample is its parent."""
    images = _squares(9, size=48)
    made = _small(mode="residual", noise=0.0).generate(images, 6, np.random.default_rng(2))
    assert np.array_equal(made.images, images[made.parents])


@pytest.mark.parametrize("channels,side", [(1, 48), (3, 32)])
def test_dcgan_shape_parents_determinism_and_budget(channels: int, side: int) -> None:
    images = _squares(10, size=side, channels=channels)

    def gan(**kw: Any) -> DCGANGenerator:
        return DCGANGenerator(**{**dict(size=32, latent_dim=8, width=8, steps=15, seconds=None, batch_size=8), **kw})

    made = gan().generate(images, 5, np.random.default_rng(0))
    assert made.images.shape == (5, side, side, channels) and made.images.dtype == np.uint8
    assert ((made.parents >= 0) & (made.parents < 10)).all() and made.recipes == ["dcgan:prior"] * 5
    again = gan().generate(images, 5, np.random.default_rng(0))
    assert np.array_equal(made.images, again.images) and np.array_equal(made.parents, again.parents)
    ticks = itertools.count()
    g = gan(steps=1000, seconds=3.0, clock=lambda: float(next(ticks)))
    g.generate(images, 1, np.random.default_rng(0))
    assert g.last_fit is not None and g.last_fit.stopped_by == "time" and 1 <= g.last_fit.steps <= 3


@pytest.mark.slow  # the X2 filter runs EfficientNet-Lite0 on every image
@pytest.mark.asyncio
async def test_the_worker_generates_with_the_cvae(tmp_path: Path, write_dataset: Any) -> None:
    settings = load_settings(
        AugmenterSettings, bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db",
        augmenter_filter_image_size=64, retry_attempts=1, augmenter_generator="cvae", augmenter_cvae_steps=20,
    )
    backends = Backends.from_settings(settings)
    await backends.start()
    try:
        layout = {"stripes": ("stripes", {"train": 30, "val": 6}), "spots": ("spots", {"train": 10, "val": 6})}
        manifest, labels_key = write_dataset(backends.objects, "ds1", layout)
        event = Event.new(DatasetLabeled(
            dataset_id="ds1", labels_key=labels_key, classes=list(layout), counts=[], human_labels=52,
            auto_labels=0, rounds=0, spec=Spec(positive_class="spots"),
            options=PipelineOptions(min_per_class=0, max_imbalance=1.0, seed=3),
        ), run_id="run-1")
        delivery = Delivery(topic=event.event_type.value, key=event.run_id, value=encode(event))
        outcome = await Worker(service, backends, deps=await build_deps(settings, backends)).process(delivery)
        assert outcome == Outcome.HANDLED
        record = await backends.docs.get(RUNS, "ds1")
        assert record is not None and record["status"] == "completed"
        assert record["generator"]["name"] == "cvae" and record["generator"]["cvae_fit"]["steps"] == 20
        samples = await backends.docs.find(SAMPLES, {"dataset_id": "ds1"})
        real_spots = {i.item_id for i in manifest.items if i.label == "spots" and i.split == "train"}
        assert len(samples) == 10  # the cap: 1 generated per real train image of the class
        assert all(s["label"] == "spots" and s["parent_id"] in real_spots for s in samples)
        assert all(s["recipe"].startswith("cvae:residual") and (s["width"], s["height"]) == (48, 48) for s in samples)
    finally:
        await backends.stop()
