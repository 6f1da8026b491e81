"""The scorers: LogME, the loss-curve integral, short-term training, speed, the domain discriminator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from proposer_testdata import bars, blobs

from dlforge.proposer.backbone import split_backbone
from dlforge.proposer.handlers import target_from_arrays
from dlforge.proposer.scoring import (
    Candidate,
    DomainDiscriminatorScorer,
    LinearProbeScorer,
    LogMEScorer,
    Scorer,
    ShortTermTrainingScorer,
    SpeedScorer,
    balanced_accuracy,
    logme,
    loss_curve_integral,
    measure_throughput,
)
from dlforge.vision.networks import build_network


def logme_reference(f: np.ndarray, y: np.ndarray) -> float:
    """LogME straight from the paper's formulas with dense D x D algebra (no SVD shortcut)."""
    f = f.astype(np.float64)
    n, d = f.shape
    ftf = f.T @ f
    sigma = np.clip(np.linalg.eigvalsh(ftf), 0, None)
    out = []
    for k in np.unique(y):
        yk = (y == k).astype(np.float64)
        alpha, beta = 1.0, 1.0
        for _ in range(100):
            a = alpha * np.eye(d) + beta * ftf
            m = beta * np.linalg.solve(a, f.T @ yk)
            gamma = float(np.sum(beta * sigma / (alpha + beta * sigma)))
            new_alpha = gamma / (float(m @ m) + 1e-5)
            new_beta = max(n - gamma, 1e-5) / (float(np.sum((f @ m - yk) ** 2)) + 1e-5)
            done = abs(new_alpha / new_beta - alpha / beta) <= 1e-4 * (alpha / beta)
            alpha, beta = new_alpha, new_beta
            if done:
                break
        a = alpha * np.eye(d) + beta * ftf
        m = beta * np.linalg.solve(a, f.T @ yk)
        res = float(np.sum((f @ m - yk) ** 2))
        logdet = np.linalg.slogdet(a)[1]
        ev = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - n / 2 * math.log(2 * math.pi)
              - beta / 2 * res - alpha / 2 * float(m @ m) - 0.5 * logdet)
        out.append(ev / n)
    return float(np.mean(out))


def separated(n: int, d: int, *, seed: int, gap: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centers = rng.normal(size=(3, d)) * gap
    return centers[y] + rng.normal(size=(n, d)), y


@pytest.mark.parametrize(("n", "d"), [(120, 16), (40, 100)])
def test_logme_matches_the_dense_reference(n: int, d: int) -> None:
    f, y = separated(n, d, seed=0, gap=1.0)
    assert logme(f, y) == pytest.approx(logme_reference(f, y), rel=1e-6, abs=1e-8)


def test_logme_ranks_separated_features_above_random_ones() -> None:
    f_good, y = separated(300, 64, seed=1, gap=3.0)
    f_random = np.random.default_rng(2).normal(size=(300, 64))
    good, rand = logme(f_good, y), logme(f_random, y)
    # Measured: 1.42 for separated features, -0.87 for random ones (the evidence of a model that
    # explains nothing, not even the class frequencies: there is no intercept).
    assert good > 1.0
    assert rand < -0.7
    assert good - rand > 2.0
    f_weak, _ = separated(300, 64, seed=1, gap=0.3)
    assert rand < logme(f_weak, y) < good  # monotone in how separable the classes are


def test_loss_curve_integral_numbers() -> None:
    k = 4
    assert loss_curve_integral([math.log(k)] * 10, num_classes=k) == pytest.approx(1.0)
    linear = np.linspace(math.log(k), 0.0, 11)
    assert loss_curve_integral(linear, num_classes=k) == pytest.approx(0.5)
    assert loss_curve_integral([0.0, math.log(2)], num_classes=2) == pytest.approx(0.5)


def test_balanced_accuracy() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    assert balanced_accuracy(y, np.zeros(6, dtype=int), 2) == pytest.approx(0.5)
    assert balanced_accuracy(y, np.array([0, 0, 1, 1, 1, 1]), 2) == pytest.approx(0.75)


def small_candidate(*, unfreeze_last: int = 1, source_sample: np.ndarray | None = None, size: int = 32) -> Candidate:
    torch.manual_seed(0)
    model = build_network("small_cnn", 2, pretrained=False)
    return Candidate.from_model(model, model_id="c", arch="small_cnn", source_dataset="synthetic", weights_key="k",
                                input_size=size, unfreeze_last=unfreeze_last, source_sample=source_sample)


@pytest.mark.parametrize("arch", ["small_cnn", "efficientnet_lite0"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_prefix_then_tail_is_the_backbone(arch: str, k: int) -> None:
    torch.manual_seed(0)
    model = build_network(arch, 3, pretrained=False).eval()
    split = split_backbone(model, unfreeze_last=k)
    x = torch.randn(2, 1 if arch == "small_cnn" else 3, 64, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(split.tail(split.prefix(x)).numpy(), model.features(x).numpy(), rtol=1e-4,
                                   atol=1e-5)
    trainable = sum(p.numel() for p in split.tail.parameters())
    assert (trainable == 0) == (k == 0)


def test_short_term_training_integral_is_lower_on_an_easier_dataset() -> None:
    xe, ye = blobs(96, seed=3)  # brightness alone separates the classes
    xh, _ = bars(96, seed=3)
    yh = np.random.default_rng(0).integers(0, 2, 96)  # random labels: nothing to learn
    scorer = ShortTermTrainingScorer(steps=40, batch_size=16, lr=3e-3, seed=0)
    results = {}
    for name, (x, y) in {"easy": (xe, ye), "hard": (xh, yh)}.items():
        target = target_from_arrays(["a", "b"], train_x=x[:64, :, :, None], train_y=y[:64],
                                    val_x=x[64:, :, :, None], val_y=y[64:])
        results[name] = scorer.score(small_candidate(), target)
        assert len(scorer.last_curve["c"]) == 40
    assert results["easy"]["loss_auc"] < results["hard"]["loss_auc"] - 0.2
    assert results["hard"]["loss_auc"] > 0.6  # random labels: only memorization lowers the loss
    assert results["easy"]["finetune_bacc"] >= 0.9


def test_feature_scorers_prefer_the_separable_target() -> None:
    xe, ye = blobs(96, seed=4)
    yr = np.random.default_rng(1).integers(0, 2, 96)
    scores = {}
    for name, y in {"real": ye, "random": yr}.items():
        target = target_from_arrays(["a", "b"], train_x=xe[:64, :, :, None], train_y=y[:64],
                                    val_x=xe[64:, :, :, None], val_y=y[64:])
        cand = small_candidate()
        scores[name] = {**LogMEScorer().score(cand, target), **LinearProbeScorer().score(cand, target)}
    assert scores["real"]["logme"] > scores["random"]["logme"] + 0.1
    assert scores["real"]["probe_bacc"] >= 0.9
    assert scores["random"]["probe_bacc"] < 0.8


def test_domain_discriminator_similar_vs_different_source() -> None:
    x, y = bars(120, seed=6)
    target = target_from_arrays(["a", "b"], train_x=x[:100, :, :, None], train_y=y[:100],
                                val_x=x[100:, :, :, None], val_y=y[100:])
    same, _ = bars(100, seed=7)
    other, _ = blobs(100, seed=7)
    scorer = DomainDiscriminatorScorer(seed=0)
    sim_same = scorer.score(small_candidate(source_sample=same[:, :, :, None]), target)["domain_sim"]
    sim_other = scorer.score(small_candidate(source_sample=other[:, :, :, None]), target)["domain_sim"]
    assert sim_same > 0.6
    assert sim_other < 0.1
    assert scorer.score(small_candidate(source_sample=None), target) == {}


def test_speed_is_measured() -> None:
    model = build_network("small_cnn", 2, pretrained=False)
    assert measure_throughput(model, batch=4, size=32, channels=1, seconds=0.05) > 0
    x, y = bars(8, seed=0)
    target = target_from_arrays(["a", "b"], train_x=x[:, :, :, None], train_y=y, val_x=x[:, :, :, None], val_y=y)
    out = SpeedScorer(seconds=0.05, spec_input_size=48).score(small_candidate(), target)
    assert set(out) == {"fps_b1", "fps_b32", "fps_spec_b1"}
    assert all(v > 1.0 for v in out.values())


class RunClock:
    """A clock for :func:`measure_throughput` whose k-th timed run lasts ``durations[k]`` seconds.

    The function reads the clock once for the window's start, then twice a run (before and after);
    time advances only inside a run.
    """

    def __init__(self, durations: list[float]) -> None:
        self.durations, self.now, self.calls = durations, 0.0, 0

    def __call__(self) -> float:
        self.calls += 1
        if self.calls > 1 and self.calls % 2 == 1:  # the read after run (calls - 1) // 2
            self.now += self.durations[(self.calls - 1) // 2 - 1]
        return self.now


def test_speed_is_the_median_stretch_so_a_stall_does_not_reject_a_candidate() -> None:
    model = build_network("small_cnn", 2, pretrained=False)

    def fps(durations: list[float], *, batch: int = 1, seconds: float = 0.5) -> tuple[float, int]:
        clock = RunClock(durations)
        value = measure_throughput(model, batch=batch, size=32, channels=1, seconds=seconds, min_runs=3,
                                   clock=clock)
        return value, (clock.calls - 1) // 2  # the runs it timed

    # runs end at 0.1, 0.2 and 5.2 s: past the 0.5 s window with 3 runs, so it stops there; one stretch a
    # run, median 0.1 s: 10 images/s at batch 1 (40 at batch 4). The window's mean would say 3 / 5.2 = 0.58.
    assert fps([0.1, 0.1, 5.0, 0.1]) == (pytest.approx(10.0), 3)
    assert fps([0.1, 0.1, 5.0, 0.1], batch=4) == (pytest.approx(40.0), 3)
    # a stall in two of the three stretches is what the machine does: 1 / 5 s
    assert fps([5.0, 0.1, 5.0, 0.1]) == (pytest.approx(0.2), 3)
    # ten runs of 0.1 s, the fourth stalled 4.9 s longer: 5 stretches of 2 runs (2 / 0.2 s = 10 images/s,
    # and 2 / 5.1 s for the stalled one); the window ends with the tenth run (5.9 s >= 5.85 s)
    assert fps([0.1] * 3 + [5.0] + [0.1] * 10, seconds=5.85) == (pytest.approx(10.0), 10)
    # the same ten runs under a steady load that makes every run take twice as long: the figure halves
    assert fps([0.2] * 3 + [10.0] + [0.2] * 10, seconds=11.7) == (pytest.approx(5.0), 10)
    # a window shorter than a stretch (0.1 s) is one stretch, whose mean counts a stall in full:
    # nine runs of 1 ms and one of 50 ms, ten images in 59 ms
    assert fps([0.001] * 9 + [0.05], seconds=0.055) == (pytest.approx(10 / 0.059), 10)
    for batch, max_runs, groups, stretch in ((0, 200, 5, 0.1), (1, 0, 5, 0.1), (1, 200, 0, 0.1), (1, 200, 5, 0.0)):
        with pytest.raises(ValueError, match="must be >= 1 and stretch_seconds > 0"):
            measure_throughput(model, batch=batch, size=32, channels=1, seconds=0.1, max_runs=max_runs,
                               groups=groups, stretch_seconds=stretch)


def test_scorers_follow_the_protocol() -> None:
    for scorer in (LogMEScorer(), LinearProbeScorer(), DomainDiscriminatorScorer(), ShortTermTrainingScorer(),
                   SpeedScorer()):
        assert isinstance(scorer, Scorer)
        assert scorer.sub_scores
