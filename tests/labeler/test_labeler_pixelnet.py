"""The ``cnn_ssl`` classifier plug-in on small synthetic images with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from dlforge.common.events import PipelineOptions
from dlforge.labeler import handlers
from dlforge.labeler.classifier import make_classifier
from dlforge.labeler.pixelnet import Blend, Both, PixelSSL
from dlforge.labeler.strategies import make_strategy


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
    assert PixelSSL(max_size=64).pixel_input(native_size=300, gray=True).size == 64
    assert PixelSSL(max_size=64).pixel_input(native_size=28, gray=False).channels == 3
    assert make_classifier("cnn_ssl", threads=1).name == "cnn_ssl"


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
