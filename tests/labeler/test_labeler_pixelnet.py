"""The ``cnn_ssl`` classifier plug-in on small synthetic images with known answers."""

from __future__ import annotations

import hashlib
import io
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from labeler_testkit import labeler_settings_for, stub_deps
from PIL import Image

from dlforge.common.events import PipelineOptions
from dlforge.common.objects.fs import FsObjectStore
from dlforge.common.runtime import Backends
from dlforge.labeler import handlers
from dlforge.labeler.classifier import make_classifier
from dlforge.labeler.pixelnet import Blend, Both, PixelSSL, _pixel_stats, choose_views, flex_thresholds, generated
from dlforge.labeler.strategies import make_strategy
from dlforge.labeler.worker import classifier_pixels
from dlforge.vision.manifest import Item, Manifest, load_pixels


def bars(n: int, rng: np.random.Generator, *, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: a bright horizontal bar in the top half; class 1: one in the bottom half (noise around).

    Flipping left-right keeps the class; flipping top-bottom swaps it."""
    y = rng.integers(0, 2, n)
    x = rng.normal(40, 12, (n, size, size)).clip(0, 255)
    for i in range(n):
        row = int(rng.integers(1, size // 2 - 2)) + (size // 2 + 1 if y[i] else 0)
        x[i, row:row + 2, 2:size - 2] = 220
    return x.astype(np.uint8)[..., None], y


def small(**kw: object) -> PixelSSL:
    options: dict[str, object] = {"width": 8, "steps": 150, "probe_steps": 120, "batch": 16, "unlabeled_ratio": 2}
    options.update(kw)
    return PixelSSL(**options)  # type: ignore[arg-type]


def test_learns_the_pixels_and_rejects_the_view_that_swaps_classes() -> None:
    x, y = bars(300, np.random.default_rng(0))
    labeled = np.arange(60)
    fitted = small().fit(x, labeled, y[labeled], n_classes=2, seed=0)
    rest = np.arange(60, 300)
    accuracy = float((fitted.predict_proba(x[rest]).argmax(axis=1) == y[rest]).mean())
    assert accuracy >= 0.95
    summary = fitted.summary()
    views = str(summary["views"]).split(",")
    assert "vflip" not in views  # top-bottom flips swap the classes
    assert "hflip" in views  # left-right flips keep them
    assert summary["thresholds"] == "fixed"  # FixMatch's, the default
    assert summary["view_check_vflip"] < 0.3 < 0.9 <= summary["view_check_identity"]
    # every labeled row is held out by exactly one of the two fold networks
    assert np.isfinite(fitted.heldout_proba).all()
    assert np.allclose(fitted.heldout_proba.sum(axis=1), 1.0)
    assert summary["fold_networks"] == 2


def test_heldout_evidence_comes_from_networks_that_never_saw_the_label() -> None:
    """With labels that carry no signal, a network memorizes its training labels; held-out predictions
    that leaked them would look accurate. Honest ones are at chance."""
    rng = np.random.default_rng(1)
    x, _ = bars(200, rng)
    labeled = np.arange(80)
    noise = rng.integers(0, 2, 80)
    fitted = small(probe_steps=0, steps=200).fit(x, labeled, noise, n_classes=2, seed=0)
    held = float((fitted.heldout_proba.argmax(axis=1) == noise).mean())
    # 80 fair coin flips: P(>= 60 % right) ~ 0.05; memorized labels would give ~1.0
    assert held < 0.7
    assert fitted.summary()["views"] == "none"  # no probe, no views


def test_input_and_option_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        small().fit(np.zeros((10, 8, 8, 1), dtype=np.float32), np.arange(4), np.array([0, 1, 0, 1]), n_classes=2)
    with pytest.raises(ValueError, match="threshold"):
        PixelSSL(threshold=1.0)
    with pytest.raises(ValueError, match="folds"):
        PixelSSL(folds=1)
    with pytest.raises(ValueError, match="thresholds must be one of fixed, flex"):
        PixelSSL(thresholds="adaptive")
    assert PixelSSL(max_size=64).pixel_input(native_size=300, gray=True).size == 64
    assert PixelSSL(max_size=64).pixel_input(native_size=28, gray=False).channels == 3
    assert make_classifier("cnn_ssl", threads=1).name == "cnn_ssl"


def test_flex_thresholds_follow_flexmatchs_formula() -> None:
    """Worked by hand: effect = count / max(largest count, items not learned yet), threshold = 0.9 x b / (2 - b)."""
    import torch

    warming = torch.tensor([-1] * 10 + [0] * 5 + [1] * 2)  # 10 not learned: effects 0.5, 0.2, 0
    assert flex_thresholds(warming, 3, 0.9).tolist() == pytest.approx([0.9 * 0.5 / 1.5, 0.9 * 0.2 / 1.8, 0.0])
    learned = torch.tensor([0] * 6 + [1] * 3 + [-1])  # the largest class sets the scale once warm
    assert flex_thresholds(learned, 2, 0.9).tolist() == pytest.approx([0.9, 0.9 * 0.5 / 1.5])
    assert flex_thresholds(torch.full((4,), -1), 2, 0.95).tolist() == [0.0, 0.0]  # nothing learned: all used


def test_flexmatchs_per_class_thresholds_learn_the_pixels_too() -> None:
    """``flex`` learns the same pixels as the default ``fixed`` (the first test) and says so."""
    x, y = bars(300, np.random.default_rng(0))
    labeled = np.arange(60)
    fitted = small(thresholds="flex").fit(x, labeled, y[labeled], n_classes=2, seed=0)
    rest = np.arange(60, 300)
    assert float((fitted.predict_proba(x[rest]).argmax(axis=1) == y[rest]).mean()) >= 0.95
    assert fitted.summary()["thresholds"] == "flex"


def test_training_consults_and_updates_the_per_class_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every semi-supervised step of ``flex`` asks for the thresholds with the items learned so far: none
    at a network's first step, most of the pool by its last on data it learns; ``fixed`` never asks."""
    import dlforge.labeler.pixelnet as pixelnet

    seen: list[tuple[int, int]] = []
    real = pixelnet.flex_thresholds

    def recording(learned: object, n_out: int, threshold: float) -> object:
        seen.append((int((learned >= 0).sum()), len(learned)))  # type: ignore[operator, arg-type]
        return real(learned, n_out, threshold)

    monkeypatch.setattr(pixelnet, "flex_thresholds", recording)
    x, y = bars(300, np.random.default_rng(0))
    labeled = np.arange(60)
    small(probe_steps=0, thresholds="flex").fit(x, labeled, y[labeled], n_classes=2, seed=0)
    assert len(seen) == 2 * 150  # two fold networks, 150 steps each
    firsts, lasts = seen[0], seen[149]
    assert firsts == (0, 270) and seen[150] == (0, 270)  # pool: 240 unlabeled + the 30 held-out labeled
    assert lasts[0] > 0.5 * 270 and seen[-1][0] > 0.5 * 270
    seen.clear()
    small(probe_steps=0, thresholds="fixed").fit(x, labeled, y[labeled], n_classes=2, seed=0)
    assert seen == []


def test_one_class_known_gives_no_network_and_no_evidence() -> None:
    x, _ = bars(20, np.random.default_rng(2))
    fitted = small().fit(x, np.arange(5), np.zeros(5, dtype=np.int64), n_classes=2)
    assert fitted.model is None
    assert (fitted.predict_proba(x)[:, 0] == 1.0).all()
    assert np.isnan(fitted.heldout_proba).all()


def test_run_round_fits_a_pixel_classifier_on_the_pixels() -> None:
    rng = np.random.default_rng(3)
    x, y = bars(120, rng)
    embeddings = rng.normal(size=(120, 4))  # carries nothing: the pixels must do the work
    labels = np.full(120, -1)
    labels[:40] = y[:40]
    human = labels >= 0
    args = dict(labels=labels, human=human, representative=human, calibration=human, n_classes=2,
                options=PipelineOptions(label_budget=0.5), strategy=make_strategy("margin"),
                rng=np.random.default_rng(0), classifier=small())
    with pytest.raises(ValueError, match="pixels"):
        handlers.run_round(embeddings, **args)  # type: ignore[arg-type]
    result = handlers.run_round(embeddings, pixels=x, **args)  # type: ignore[arg-type]
    assert float((result.predicted[40:] == y[40:]).mean()) >= 0.95


def test_blend_weighs_the_input_that_carries_the_signal() -> None:
    """Embeddings that are pure noise and pixels that hold the class: the weight goes to the CNN,
    and every labeled row's held-out mixture is a proper distribution."""
    rng = np.random.default_rng(4)
    x, y = bars(240, rng)
    noise = rng.normal(size=(240, 6))
    labeled = np.arange(80)
    blend = Blend(width=8, steps=150, probe_steps=0, batch=16, unlabeled_ratio=2)
    fitted = blend.fit(Both(noise, x), labeled, y[labeled], n_classes=2, seed=0)
    assert fitted.summary()["cnn_weight"] >= 0.75
    rest = np.arange(80, 240)
    assert float((fitted.predict_proba(Both(noise[rest], x[rest])).argmax(axis=1) == y[rest]).mean()) >= 0.95
    assert np.allclose(fitted.heldout_proba.sum(axis=1), 1.0)
    # the other way round: informative embeddings (the class itself, with noise), pixels that carry nothing
    blank = np.full_like(x, 40)
    signal = np.stack([y + rng.normal(0, 0.1, 240), rng.normal(size=240)], axis=1)
    fitted = blend.fit(Both(signal, blank), labeled, y[labeled], n_classes=2, seed=0)
    assert fitted.summary()["cnn_weight"] <= 0.25
    with pytest.raises(ValueError, match="Both"):
        blend.fit(x, labeled, y[labeled], n_classes=2)  # type: ignore[arg-type]


def _store_images(tmp_path: Path, arrays: list[np.ndarray]) -> tuple[FsObjectStore, Manifest]:
    objects = FsObjectStore(tmp_path / "objects")
    items = []
    for n, arr in enumerate(arrays):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        data = buf.getvalue()
        objects.put_bytes(f"img/{n}.png", data)
        items.append(Item(item_id=f"i{n}", key=f"img/{n}.png", name=f"{n}.png",
                          sha256=hashlib.sha256(data).hexdigest(), width=arr.shape[1], height=arr.shape[0]))
    return objects, Manifest(dataset_id="px", name="px", classes=["a"], items=items)


def _resized(arr: np.ndarray, size: int, mode: str) -> np.ndarray:
    out = np.asarray(Image.fromarray(arr).convert(mode).resize((size, size), Image.Resampling.BILINEAR))
    return out[..., None] if out.ndim == 2 else out


def test_classifier_pixels_reads_a_chunk_of_decoded_images_at_a_time(tmp_path: Path) -> None:
    """The worker's pixels for cnn_ssl: each image at the plug-in's size (from the median image size),
    one channel when every image is gray, without holding every decoded image at its own size at once."""
    rng = np.random.default_rng(5)
    ramp = np.add.outer(np.arange(120), 2 * np.arange(120))
    gray = []  # 10 MB decoded; smooth, so the feature store's compressed copy is small
    for n in range(700):
        img = ((ramp + n) % 256).astype(np.uint8)
        img[0, 0] = n // 256
        gray.append(img)
    objects, manifest = _store_images(tmp_path / "g", gray)
    load_pixels(objects, manifest.items, threads=1)  # decoded into the feature store, as the embeddings stage does
    deps = SimpleNamespace(classifier=PixelSSL(max_size=16), settings=SimpleNamespace(labeler_threads=1))
    tracemalloc.start()
    try:
        out = classifier_pixels(objects, manifest, deps)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out is not None and out.shape == (700, 16, 16, 1) and out.dtype == np.uint8
    assert np.array_equal(out, np.stack([_resized(a, 16, "L") for a in gray]))
    assert peak < 0.6 * sum(a.nbytes for a in gray)  # all of them at once: more than their 10 MB
    # one colour image among gray ones: three channels for all
    mixed = [*gray[:3], rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)]
    objects, manifest = _store_images(tmp_path / "m", mixed)
    out = classifier_pixels(objects, manifest, deps)  # type: ignore[arg-type]
    assert out is not None and out.shape == (4, 16, 16, 3)
    assert np.array_equal(out, np.stack([_resized(a, 16, "RGB") for a in mixed]))


def test_pixel_statistics_need_no_float_copy_of_every_image() -> None:
    """cnn_ssl standardizes the pixels by their mean and spread over all items; on 20,000 images that
    must not take a float64 copy of them all (8x the images' bytes)."""
    x = np.random.default_rng(6).integers(0, 256, (3000, 24, 24, 3), dtype=np.uint8)  # 5 MB
    flat = x.reshape(-1).astype(np.float64)
    expected_mean = float(flat.sum() / flat.size)
    expected_std = float(np.sqrt(((flat - expected_mean) ** 2).sum() / flat.size))
    del flat
    tracemalloc.start()
    try:
        mean, std = _pixel_stats(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert mean == pytest.approx(expected_mean, rel=1e-9)
    assert std == pytest.approx(expected_std, rel=1e-9)
    assert peak < x.nbytes  # x.std() alone: 8 x x.nbytes
    assert _pixel_stats(np.zeros((0, 4, 4, 1), dtype=np.uint8)) == (0.0, 0.0)
    # the whole fit (torch's tensors are not traced; numpy's are): no float copy of the images either
    y = np.arange(40) % 2
    tiny = small(steps=1, probe_steps=0, batch=4, unlabeled_ratio=1)
    tiny.fit(x[:100], np.arange(40), y, n_classes=2, seed=0)  # first calls: imports and torch's own set-up
    tracemalloc.start()
    try:
        tiny.fit(x, np.arange(40), y, n_classes=2, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * x.nbytes  # before: a float32 copy and its scaled copy (8 x), then x.std() (8 x)


def test_a_view_is_kept_only_if_everything_it_composes_to_keeps_the_labels() -> None:
    """Bars at the top or bottom: only the left-right flip keeps the class. A short probe answers the
    same under one quarter turn by chance (it scores 1.0 on rot90 here), but rot90 with hflip also
    draws the top-bottom flip and the half turn, which swap the classes: only hflip may be used."""
    x, y = bars(300, np.random.default_rng(0))
    labeled = np.arange(60)
    fitted = small(probe_steps=80).fit(x, labeled, y[labeled], n_classes=2, seed=0)
    summary = fitted.summary()
    assert float(summary["view_check_rot90"] or 0) >= 0.98  # alone, it passes: the chance this test is about
    assert summary["views"] == "hflip"
    assert fitted.summary()["heldout_accuracy"] == pytest.approx(1.0, abs=0.05)
    # the symmetries each choice draws (a square's eight: identity, 3 turns, 4 flips)
    assert generated(("rot90",)) == {"identity", "rot90", "rot180", "rot270"}
    assert generated(("hflip", "vflip")) == {"identity", "hflip", "vflip", "rot180"}
    assert len(generated(("hflip", "rot90"))) == 8
    scores = {"identity": 0.9, "rot90": 0.9, "rot180": 0.9, "rot270": 0.9, "hflip": 0.1, "hflip_rot90": 0.1,
              "vflip": 0.1, "hflip_rot270": 0.1}
    assert choose_views(scores) == ("rot90",)
    assert choose_views({**scores, "rot180": 0.5}) == ()


def test_a_spent_time_budget_still_trains_the_floor_of_steps() -> None:
    """A deadline already past at the first step (a very busy machine, or a budget shorter than a step) cuts a
    network to its floor of steps; without a floor the budget is a hard cap: one step, not the 20 over which
    the step time is otherwise measured."""
    import time

    import torch

    from dlforge.labeler.pixelnet import _Augment, _tensor

    x, y = bars(40, np.random.default_rng(5))
    plugin = small(min_steps=60)
    xt = _tensor(x, mean=0.2, std=0.2)
    rows, pool = np.arange(20), np.arange(20, 40)
    past = time.monotonic() - 1.0
    augment = _Augment((), pad_border=False)
    with torch.random.fork_rng():
        _, floored = plugin._train(xt, rows, y[rows], pool, 2, seed=0, steps=100, augment=augment, semi=True,
                                   deadline=past, floor=60)
        _, unfloored = plugin._train(xt, rows, y[rows], pool, 2, seed=0, steps=100, augment=augment, semi=True,
                                     deadline=past, floor=0)
        _, undisturbed = plugin._train(xt, rows, y[rows], pool, 2, seed=0, steps=100, augment=augment, semi=True,
                                       deadline=None, floor=60)
    assert (floored, unfloored, undisturbed) == (60, 1, 100)

    # a budget that fits a few steps: on a clock that moves 0.1 s a step, a 1 s share is 10 steps from the
    # first step on (before, 20 ran before the budget was looked at), 15 with a floor of 15
    import itertools

    from dlforge.labeler import pixelnet

    clock = itertools.count()
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng():
        mp.setattr(pixelnet.time, "monotonic", lambda: 0.1 * next(clock))
        _, capped = plugin._train(xt, rows, y[rows], pool, 2, seed=0, steps=100, augment=augment, semi=True,
                                  deadline=1.0, floor=0)
        clock = itertools.count()
        _, floored_short = plugin._train(xt, rows, y[rows], pool, 2, seed=0, steps=100, augment=augment,
                                         semi=True, deadline=1.0, floor=15)
    assert (capped, floored_short) == (10, 15)
    with pytest.raises(ValueError, match="min_steps"):
        PixelSSL(min_steps=-1)


@pytest.mark.parametrize("name", ["cnn_ssl", "blend"])
async def test_the_settings_budget_and_floor_reach_the_pixel_classifier(tmp_path: Path, name: str) -> None:
    """``DLFORGE_LABELER_CNN_TIME_BUDGET_S``, ``…_CNN_MIN_STEPS``, ``…_CNN_STEPS`` and ``…_CNN_THRESHOLDS``
    configure the CNN the worker builds (0: the budget is a hard cap, the probe has no floor either)."""
    settings = labeler_settings_for(tmp_path, labeler_classifier=name, labeler_cnn_time_budget_s=7.5,
                                    labeler_cnn_min_steps=0, labeler_cnn_steps=1500, labeler_threads=1,
                                    labeler_cnn_thresholds="flex")
    deps = await stub_deps(settings, Backends.from_settings(settings))
    cnn = deps.classifier.cnn if isinstance(deps.classifier, Blend) else deps.classifier
    assert isinstance(cnn, PixelSSL)
    assert (cnn.time_budget_s, cnn.min_steps, cnn.steps, cnn.threads, cnn.thresholds) == (7.5, 0, 1500, 1, "flex")
    default = await stub_deps(labeler_settings_for(tmp_path, labeler_classifier=name),
                              Backends.from_settings(settings))
    default_cnn = default.classifier.cnn if isinstance(default.classifier, Blend) else default.classifier
    assert (default_cnn.min_steps, default_cnn.steps, default_cnn.thresholds) == (300, 3000, "fixed")  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="labeler_cnn_min_steps"):
        labeler_settings_for(tmp_path, labeler_classifier=name, labeler_cnn_min_steps=-1)
    with pytest.raises(ValueError, match="labeler_cnn_steps"):
        labeler_settings_for(tmp_path, labeler_classifier=name, labeler_cnn_steps=0)
    with pytest.raises(ValueError, match="labeler_cnn_thresholds"):
        labeler_settings_for(tmp_path, labeler_classifier=name, labeler_cnn_thresholds="adaptive")
