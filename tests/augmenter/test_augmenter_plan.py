"""Counting and planning: how many samples each class gets."""

from __future__ import annotations

import pytest

from dlforge.augmenter.handlers import count_train, plan_augmentation
from dlforge.vision.manifest import Item, Manifest


def _plan(counts: dict[str, int], **kw: float) -> dict[str, tuple[int, int, int, int]]:
    args = {"min_per_class": 200, "max_imbalance": 3.0, "max_generated_ratio": 1.0, **kw}
    return {p.label: (p.target, p.needed, p.cap, p.generate)
            for p in plan_augmentation(counts, **args)}  # type: ignore[arg-type]


def test_elpv_like_counts_are_not_scarce_under_the_defaults() -> None:
    # 1352 good vs 616 defect: ratio 2.19 < 3 and both above 200
    plans = plan_augmentation({"good": 1352, "defect": 616}, min_per_class=200, max_imbalance=3.0,
                              max_generated_ratio=1.0)
    assert [p.scarce for p in plans] == [False, False]
    assert [p.target for p in plans] == [451, 451]  # ceil(1352 / 3)
    assert [p.generate for p in plans] == [0, 0]


def test_the_ratio_sets_the_target() -> None:
    # target = ceil(1352 / 1.5) = 902 -> defect needs 286, well under its cap of 616
    assert _plan({"good": 1352, "defect": 616}, max_imbalance=1.5) == {
        "good": (902, 0, 1352, 0), "defect": (902, 286, 616, 286)}


def test_the_cap_limits_generation_to_the_real_count() -> None:
    # balancing fully would need 736 more defects; the cap (1x real) allows 616
    assert _plan({"good": 1352, "defect": 616}, max_imbalance=1.0)["defect"] == (1352, 736, 616, 616)
    assert _plan({"good": 1352, "defect": 616}, max_imbalance=1.0, max_generated_ratio=0.5)["defect"] == (
        1352, 736, 308, 308)


def test_the_minimum_per_class_sets_the_target() -> None:
    got = _plan({"a": 100, "b": 300, "c": 1000}, min_per_class=500, max_imbalance=4.0)
    # target = max(500, ceil(1000 / 4) = 250) = 500
    assert got == {"a": (500, 400, 100, 100), "b": (500, 200, 300, 200), "c": (500, 0, 1000, 0)}
    got = _plan({"a": 100, "b": 300, "c": 1000}, min_per_class=500, max_imbalance=4.0, max_generated_ratio=2.5)
    assert got["a"] == (500, 400, 250, 250)


def test_a_class_without_real_images_gets_nothing() -> None:
    assert _plan({"a": 0, "b": 50}, min_per_class=10)["a"] == (17, 17, 0, 0)


def test_an_exact_ratio_is_not_scarce() -> None:
    assert _plan({"a": 300, "b": 100}, min_per_class=0, max_imbalance=3.0)["b"] == (100, 0, 100, 0)


def test_imbalance_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_imbalance"):
        plan_augmentation({"a": 1}, min_per_class=0, max_imbalance=0.5, max_generated_ratio=1.0)


def test_count_train_counts_real_train_items_of_every_class() -> None:
    def item(n: int, label: str, split: str, source: str = "human") -> Item:
        return Item(item_id=f"i{n}", key=f"k/{n}", name=f"{n}.png", sha256="0", width=8, height=8, label=label,
                    label_source=source, split=split)  # type: ignore[arg-type]

    items = [item(0, "a", "train"), item(1, "a", "train", "auto"), item(2, "a", "val"), item(3, "a", "test"),
             item(4, "b", "train", "generated"), item(5, "b", "val")]
    manifest = Manifest(dataset_id="d", name="d", classes=["a", "b", "c"], items=items)
    assert count_train(manifest) == {"a": 2, "b": 0, "c": 0}
