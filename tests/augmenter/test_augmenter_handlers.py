"""augment(): per-class generation from the right images, filter verdicts, ids, the training manifest."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dlforge.augmenter.filters import ConfidenceFilter, KeepAllFilter
from dlforge.augmenter.generators import MixedGenerator, MixupGenerator, PolicyGenerator
from dlforge.augmenter.handlers import (
    AugmentConfig,
    augment,
    count_train,
    plan_augmentation,
    training_manifest,
)
from dlforge.common.objects.fs import FsObjectStore
from dlforge.vision.images import decode
from dlforge.vision.manifest import Item, load_arrays

LAYOUT = {
    "stripes": ("stripes", {"train": 40, "val": 10, "test": 5}),
    "spots": ("spots", {"train": 10, "val": 10, "test": 5}),
}


def _setup(tmp_path, write_dataset):  # type: ignore[no-untyped-def]
    objects = FsObjectStore(tmp_path / "o")
    manifest, _ = write_dataset(objects, "ds1", LAYOUT)
    calls: list[tuple[int, int, set[str]]] = []

    def load(items: Sequence[Item], size: int, channels: int) -> np.ndarray:
        calls.append((size, channels, {str(i.label) for i in items}))
        return load_arrays(objects, items, size=size, channels=channels)

    return objects, manifest, load, calls


def test_augment_generates_for_the_scarce_class_from_its_own_images(tmp_path, write_dataset, stats_extractor):  # type: ignore[no-untyped-def]
    _, manifest, load, calls = _setup(tmp_path, write_dataset)
    plans = plan_augmentation(count_train(manifest), min_per_class=30, max_imbalance=2.0, max_generated_ratio=1.0)
    assert [(p.label, p.needed, p.generate) for p in plans] == [("stripes", 0, 0), ("spots", 20, 10)]
    generator = MixedGenerator([(PolicyGenerator(), 0.7), (MixupGenerator(), 0.3)])
    f = ConfidenceFilter(stats_extractor, threshold=0.9)
    outcome = augment(manifest, plans, load=load, generator=generator, sample_filter=f,
                      config=AugmentConfig(seed=7, id_prefix="gtest"))

    assert [c.model_dump() for c in outcome.counts] == [
        {"label": "stripes", "real": 40, "generated": 0, "kept": 0},
        {"label": "spots", "real": 10, "generated": 10, "kept": sum(s.kept for s in outcome.samples)},
    ]
    assert outcome.channels == 1 and outcome.image_size == 48
    assert outcome.filter_fit is not None and outcome.filter_fit.train_count == 50
    assert outcome.filter_fit.val_count == 20
    assert outcome.filter_fit.val_accuracy is not None and outcome.filter_fit.val_accuracy >= 0.9
    # sources of the generator: only spots train images were loaded at the generation size
    assert (48, 1, {"spots"}) in calls and not any(c[0] == 48 and "stripes" in c[2] and len(c[2]) == 1 for c in calls)
    spot_train = {i.item_id for i in manifest.items if i.label == "spots" and i.split == "train"}
    assert {s.parent_id for s in outcome.samples} <= spot_train
    assert [s.sample_id for s in outcome.samples] == [f"gtest-c1-{n:05d}" for n in range(10)]
    assert all(s.key == f"augmenter/ds1/generated/{s.sample_id}.png" for s in outcome.samples)
    for s in outcome.samples:
        assert s.kept == (s.confidence is not None and s.confidence >= 0.9)
        img = decode(s.png)
        assert img.mode == "L" and img.size == (48, 48)
    assert outcome.counts[1].kept >= 7  # spots stay spots under flips, noise and mixup
    assert {"fit_filter", "generate", "judge", "augment"} <= set(outcome.timings)

    again = augment(manifest, plans, load=load, generator=generator, sample_filter=f,
                    config=AugmentConfig(seed=7, id_prefix="gtest"))
    assert [s.sha256 for s in again.samples] == [s.sha256 for s in outcome.samples]
    other = augment(manifest, plans, load=load, generator=generator, sample_filter=f,
                    config=AugmentConfig(seed=8, id_prefix="gtest"))
    assert [s.sha256 for s in other.samples] != [s.sha256 for s in outcome.samples]
    # the same images uploaded again (another data set id): the same samples, seeded by the images
    reuploaded = manifest.model_copy(update={"dataset_id": "ds2"})
    twin = augment(reuploaded, plans, load=load, generator=generator, sample_filter=f,
                   config=AugmentConfig(seed=7, id_prefix="gtest"))
    assert [s.sha256 for s in twin.samples] == [s.sha256 for s in outcome.samples]

    train_manifest = training_manifest(manifest, outcome.samples)
    generated = [i for i in train_manifest.items if i.label_source == "generated"]
    assert train_manifest.items[:len(manifest.items)] == manifest.items
    assert len(generated) == outcome.counts[1].kept
    assert all(i.split == "train" and i.label == "spots" and i.parent_id in spot_train for i in generated)


def test_without_a_scarce_class_nothing_is_generated_or_loaded(tmp_path, write_dataset):  # type: ignore[no-untyped-def]
    _, manifest, load, calls = _setup(tmp_path, write_dataset)
    plans = plan_augmentation(count_train(manifest), min_per_class=5, max_imbalance=4.0, max_generated_ratio=1.0)
    outcome = augment(manifest, plans, load=load, generator=PolicyGenerator(), sample_filter=KeepAllFilter(),
                      config=AugmentConfig(seed=0))
    assert [(c.real, c.generated, c.kept) for c in outcome.counts] == [(40, 0, 0), (10, 0, 0)]
    assert outcome.samples == [] and outcome.filter_fit is None and calls == []
    assert training_manifest(manifest, outcome.samples) == manifest


def test_keep_all_keeps_every_generated_sample(tmp_path, write_dataset):  # type: ignore[no-untyped-def]
    _, manifest, load, _ = _setup(tmp_path, write_dataset)
    plans = plan_augmentation(count_train(manifest), min_per_class=0, max_imbalance=1.0, max_generated_ratio=0.5)
    outcome = augment(manifest, plans, load=load, generator=PolicyGenerator(), sample_filter=KeepAllFilter(),
                      config=AugmentConfig(seed=0, chunk=2))
    assert [(c.generated, c.kept) for c in outcome.counts] == [(0, 0), (5, 5)]
    assert all(s.confidence is None for s in outcome.samples)
    assert len({s.sample_id for s in outcome.samples}) == 5


def test_the_gain_is_measured_on_the_validation_images_people_labeled(tmp_path, write_dataset, stats_extractor):  # type: ignore[no-untyped-def]
    _, manifest, load, _ = _setup(tmp_path, write_dataset)
    val = [i.item_id for i in manifest.items if i.split == "val"]
    auto = set(val[::2])  # every other validation item auto-labeled by the labeler, not by people
    manifest = manifest.model_copy(update={"items": [
        i.model_copy(update={"label_source": "auto"}) if i.item_id in auto else i for i in manifest.items]})
    plans = plan_augmentation(count_train(manifest), min_per_class=30, max_imbalance=2.0, max_generated_ratio=1.0)
    outcome = augment(manifest, plans, load=load, generator=PolicyGenerator(),
                      sample_filter=ConfidenceFilter(stats_extractor, threshold=0.5), config=AugmentConfig(seed=7))
    assert outcome.filter_fit is not None and outcome.filter_fit.val_count == 20  # the filter is scored on all 20
    assert outcome.gain is not None and outcome.gain.val_items == 20 - len(auto) == 10
    assert outcome.gain.kept_samples == outcome.counts[1].kept > 0
    assert sum(c.val_items for c in outcome.gain.per_class) == 10
