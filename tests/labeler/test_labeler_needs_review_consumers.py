"""A labeled manifest with "needs review" items (no label) passes through every stage that reads it:
each one leaves those items out instead of failing or treating them as labeled."""

from __future__ import annotations

import numpy as np
import pytest

from dlforge.vision.manifest import Item, Manifest


def item(n: int, *, split: str, label: str | None, source: str, confidence: float) -> Item:
    return Item(item_id=f"i{n}", key=f"k/{n}.png", name=f"{n}.png", sha256=f"{n:064x}", width=8, height=8,
                label=label, label_source=source, confidence=confidence, split=split)  # type: ignore[arg-type]


@pytest.fixture
def manifest() -> Manifest:
    items = []
    n = 0
    for split in ("train", "val", "test"):
        for label in ("a", "b"):
            for source in ("human", "auto", "given"):
                for _ in range(3):
                    items.append(item(n, split=split, label=label, source=source,
                                      confidence=1.0 if source != "auto" else 0.99))
                    n += 1
        if split != "test":
            for _ in range(5):
                items.append(item(n, split=split, label=None, source="needs_review", confidence=0.6))
                n += 1
    m = Manifest(dataset_id="d", name="d", classes=["a", "b"], items=items)
    # it survives the JSON round trip every stage reads it through
    return Manifest.model_validate_json(m.model_dump_json())


def review_ids(manifest: Manifest) -> set[str]:
    return {i.item_id for i in manifest.items if i.label_source == "needs_review"}


def test_the_manifest_itself(manifest: Manifest) -> None:
    assert len(review_ids(manifest)) == 10
    assert not review_ids(manifest) & {i.item_id for i in manifest.labeled()}
    assert len(manifest.label_indices(manifest.items)) == len(manifest.items) - 10
    assert not any(i.labeled_by_people for i in manifest.items if i.label_source == "needs_review")


def test_augmenter_counts_only_labeled_train_items(manifest: Manifest) -> None:
    from dlforge.augmenter.handlers import count_train, train_items

    assert not review_ids(manifest) & {i.item_id for i in train_items(manifest)}
    assert count_train(manifest) == {"a": 9, "b": 9}


def test_proposer_samples_only_labeled_items(manifest: Manifest) -> None:
    from dlforge.proposer.handlers import sample_target_items

    train, val = sample_target_items(manifest, train_limit=100, val_limit=100, seed=0)
    assert len(train) == 18 and len(val) == 18
    assert not review_ids(manifest) & {i.item_id for i in train + val}


def test_trainer_caches_and_weighs_only_labeled_items(manifest: Manifest) -> None:
    from dlforge.trainer.cache import cached_items
    from dlforge.trainer.handlers import row_weights

    splits = cached_items(manifest)
    assert {k: len(v) for k, v in splits.items()} == {"train": 18, "val": 18, "test": 18}
    assert not review_ids(manifest) & {i.item_id for v in splits.values() for i in v}
    weights = row_weights(manifest, mode="confidence")
    assert weights is not None and not review_ids(manifest) & set(weights)
    assert np.isclose(sorted(weights.values())[0], 0.99)
