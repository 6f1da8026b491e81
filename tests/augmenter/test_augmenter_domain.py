"""Domain adaptation through intermediate domains: Fourier-amplitude and moment blends, gradual self-training."""

from __future__ import annotations

import numpy as np
import pytest

from dlforge.augmenter.domain import (
    GradualSelfTraining,
    amplitude_blend,
    mean_amplitude,
    moment_blend,
    source_only,
)
from dlforge.common.errors import InvalidInput


def test_the_mean_amplitude_of_flat_images_is_all_in_the_dc_term() -> None:
    images = np.stack([np.full((8, 6, 1), v, dtype=np.uint8) for v in (10, 30)])
    amp = mean_amplitude(images)
    expected = np.zeros((8, 6, 1))
    expected[4, 3, 0] = 20 * 8 * 6  # centred: the DC term sits at (H // 2, W // 2); the mean of 10 and 30 is 20
    assert amp == pytest.approx(expected, abs=1e-9)


def test_amplitude_blend_keeps_the_image_at_zero_and_takes_the_targets_amplitude_at_one() -> None:
    rng = np.random.default_rng(0)
    source = rng.integers(100, 150, size=(3, 16, 16, 1)).astype(np.uint8)
    target = rng.integers(60, 120, size=(5, 16, 16, 1)).astype(np.uint8)
    amp_t = mean_amplitude(target)
    assert np.array_equal(amplitude_blend(source, amp_t, 0.0, beta=1.0), source)
    # beta = 1: the whole spectrum's amplitude is the target's; only rounding to uint8 (and clipping) stands
    # between the result and it, so compare on an image whose blend stays inside 0..255
    out = amplitude_blend(source, amp_t, 1.0, beta=1.0).astype(np.float64)
    got = np.abs(np.fft.fftshift(np.fft.fft2(out, axes=(1, 2)), axes=(1, 2)))
    inside = (out > 0).all(axis=(1, 2, 3)) & (out < 255).all(axis=(1, 2, 3))
    assert inside.all()
    for i in np.flatnonzero(inside):
        assert np.abs(got[i] - amp_t).max() < 16 * 16 * 0.5 + 1e-6  # |rounding error| <= 0.5 per pixel
    # a small beta moves the low frequencies only: the brightness (DC) changes to the target's mean, the
    # high-frequency corner of the spectrum keeps the source's
    low = amplitude_blend(source, amp_t, 1.0, beta=0.2).astype(np.float64)
    assert low.mean(axis=(1, 2, 3)) == pytest.approx(np.full(3, target.mean()), abs=0.6)
    spec_low = np.abs(np.fft.fftshift(np.fft.fft2(low, axes=(1, 2)), axes=(1, 2)))
    spec_src = np.abs(np.fft.fftshift(np.fft.fft2(source.astype(np.float64), axes=(1, 2)), axes=(1, 2)))
    assert np.abs(spec_low[:, 0, 0] - spec_src[:, 0, 0]).max() < 16 * 16 * 0.5 + 1e-6


def test_moment_blend_moves_the_moments_and_keeps_the_order() -> None:
    rng = np.random.default_rng(1)
    source = rng.normal(0.0, 1.0, size=(400, 3))
    target = rng.normal([5.0, -2.0, 0.0], [2.0, 0.5, 3.0], size=(300, 3))
    assert moment_blend(source, target, 0.0) == pytest.approx(source, abs=1e-9)
    full = moment_blend(source, target, 1.0)
    assert full.mean(axis=0) == pytest.approx(target.mean(axis=0), abs=1e-9)
    assert full.std(axis=0) == pytest.approx(target.std(axis=0) + 1e-6, abs=1e-5)
    half = moment_blend(source, target, 0.5)
    assert half.mean(axis=0) == pytest.approx((source.mean(axis=0) + target.mean(axis=0)) / 2, abs=1e-9)
    assert (np.argsort(full[:, 0]) == np.argsort(source[:, 0])).all()  # a monotone map per feature


def _shifted_problem(seed: int) -> tuple[np.ndarray, ...]:
    """Two classes apart along feature 0; the target is the same problem moved +6 along it and stretched
    along feature 1 (a nuisance): a classifier of the source calls (almost) every target item class 1."""
    rng = np.random.default_rng(seed)

    def draw(n: int, shift: float, stretch: float) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        x = np.stack([np.where(y == 1, 2.0, -2.0) + rng.normal(0, 0.6, n) + shift,
                      rng.normal(0, stretch, n), rng.normal(0, 1, n)], axis=1)
        return x, y

    xs, ys = draw(300, 0.0, 1.0)
    xt, yt = draw(300, 6.0, 3.0)
    xtest, ytest = draw(300, 6.0, 3.0)
    return xs, ys, xt, yt, xtest, ytest


def test_gradual_self_training_crosses_a_shift_the_source_classifier_cannot() -> None:
    xs, ys, xt, _, xtest, ytest = _shifted_problem(0)
    before = float((source_only(xs, ys, xt).predict(xtest) == ytest).mean())
    adapted = GradualSelfTraining().fit(xs, ys, xt)
    after = float((adapted.predict(xtest) == ytest).mean())
    assert before < 0.7  # the class boundary at 0 lies left of the whole target: one class for nearly all
    assert after > 0.95  # the classes are 4 apart with spread 0.6 in both domains: about 0.1 % overlap
    # one step per intermediate domain, half of each predicted class pseudo-labeled (the default share)
    assert [s["lam"] for s in adapted.steps] == [0.0] + [round(0.1 * k, 1) for k in range(1, 11)]
    assert all(abs(s["pseudo_labeled"] - 150) <= 1 for s in adapted.steps[1:])


def test_given_domains_are_used_and_checked() -> None:
    xs, ys, xt, _, xtest, ytest = _shifted_problem(1)
    steps = (0.5, 1.0)
    source_steps = [moment_blend(xs, xt, lam) for lam in steps]
    target_steps = [moment_blend(xt, xs, 1 - lam) for lam in steps]
    adapted = GradualSelfTraining(steps=steps).fit(xs, ys, xt, source_steps=source_steps, target_steps=target_steps)
    assert float((adapted.predict(xtest) == ytest).mean()) > 0.95
    with pytest.raises(InvalidInput, match="one source domain per step"):
        GradualSelfTraining(steps=steps).fit(xs, ys, xt, source_steps=source_steps[:1])
    with pytest.raises(InvalidInput, match="one target domain per step"):
        GradualSelfTraining(steps=steps).fit(xs, ys, xt, target_steps=[xt[:10], xt])


@pytest.mark.parametrize("steps", [(), (0.5,), (0.5, 0.5, 1.0), (0.0, 1.0), (0.5, 1.5)])
def test_steps_must_increase_to_one(steps: tuple[float, ...]) -> None:
    with pytest.raises(InvalidInput, match="must increase within"):
        GradualSelfTraining(steps=steps)


def test_a_source_of_one_class_is_refused() -> None:
    with pytest.raises(InvalidInput, match="at least two classes"):
        GradualSelfTraining().fit(np.ones((5, 2)), np.zeros(5), np.ones((5, 2)))


@pytest.mark.parametrize("side", [7, 8, 9])
def test_the_whole_spectrum_is_blended_at_beta_one_whatever_the_side(side: int) -> None:
    """The brightness (the DC term) moves to the target's: the window covers the centre for odd sides too."""
    source = np.full((2, side, side, 1), 200, dtype=np.uint8)
    target = np.full((3, side, side, 1), 40, dtype=np.uint8)
    out = amplitude_blend(source, mean_amplitude(target), 1.0, beta=1.0)
    assert out.mean() == pytest.approx(40.0, abs=0.5)
