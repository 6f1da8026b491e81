"""Structured compression: channel pruning, low-rank factorization, recovery, the search, the plug-in."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dlforge.optimizer.compression import (
    CompressionConfig,
    CompressionSearch,
    Trial,
    choose_trial,
    compress_model,
    onnx_features,
)
from dlforge.optimizer.compressors import Source
from dlforge.optimizer.export import export_onnx
from dlforge.optimizer.lowrank import choose_rank, factorize
from dlforge.optimizer.pruning import out_channels, prune_channels
from dlforge.optimizer.recovery import distill, refit_head, teacher_targets
from dlforge.optimizer.runners import OrtRunner

SIDE = 24


class Block(nn.Module):
    """An inverted residual: expand 1x1 -> depthwise 3x3 -> project 1x1, plus the input."""

    def __init__(self, width: int, expanded: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(width, expanded, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(expanded)
        self.dw = nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False)
        self.bn1 = nn.BatchNorm2d(expanded)
        self.project = nn.Conv2d(expanded, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.expand(x)))
        h = torch.relu(self.bn1(self.dw(h)))
        out: torch.Tensor = x + self.bn2(self.project(h))
        return out


class TinyNet(nn.Module):
    """A stem, two inverted residuals (16 -> 32 -> 16 channels), a 1x1 conv to 48 features, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Block(16, 32), Block(16, 32))
        self.last = nn.Conv2d(16, 48, 1)
        self.head = nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.last(self.blocks(self.stem(x))))
        out: torch.Tensor = self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1))
        return out


def tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet()
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIDE, SIDE)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# pruning
# ----------------------------------------------------------------------------------------------


def test_inner_pruning_halves_the_expanded_channels_and_keeps_the_residual_width() -> None:
    net = tiny()
    pruned, report = prune_channels(net, 0.5, torch.zeros(1, 3, SIDE, SIDE))  # auto: inner (it has depthwise)
    counts = out_channels(pruned)
    assert report.scope == "inner"
    assert counts["blocks.0.expand"] == 16 and counts["blocks.1.expand"] == 16
    assert pruned.blocks[0].dw.in_channels == 16 and pruned.blocks[0].dw.groups == 16  # type: ignore[index]
    assert pruned.blocks[0].project.in_channels == 16  # type: ignore[index]
    # the residual stream, the head's features and the logits keep their width
    assert counts["stem.0"] == 16 and counts["blocks.0.project"] == 16 and counts["last"] == 48
    assert counts["head"] == 3
    assert report.channels == {"blocks.0.expand": (32, 16), "blocks.0.dw": (32, 16),
                               "blocks.1.expand": (32, 16), "blocks.1.dw": (32, 16)}
    assert report.params_after < report.params_before
    assert pruned(torch.from_numpy(images(5, 1))).shape == (5, 3)
    assert out_channels(net)["blocks.0.expand"] == 32  # the original is untouched


def test_all_scope_prunes_the_residual_stream_too_but_never_the_logits() -> None:
    pruned, _ = prune_channels(tiny(), 0.5, torch.zeros(1, 3, SIDE, SIDE), scope="all")
    counts = out_channels(pruned)
    assert counts["stem.0"] == 8 and counts["blocks.0.project"] == 8 and counts["last"] == 24
    assert counts["head"] == 3 and pruned.head.in_features == 24  # type: ignore[union-attr]
    assert pruned(torch.zeros(2, 3, SIDE, SIDE)).shape == (2, 3)


def test_pruning_keeps_the_channels_with_the_largest_weights() -> None:
    net = tiny()
    block = net.blocks[0]
    keep = np.arange(16, 32)  # make channels 16..31 of the first block's group clearly the important ones
    with torch.no_grad():
        for w in (block.expand.weight, block.dw.weight):
            w[:16] *= 1e-3
        block.project.weight[:, :16] *= 1e-3
    pruned, _ = prune_channels(net, 0.5, torch.zeros(1, 3, SIDE, SIDE))
    got = pruned.blocks[0]  # type: ignore[index]
    assert torch.equal(got.expand.weight, block.expand.weight[keep])
    assert torch.equal(got.dw.weight, block.dw.weight[keep])
    assert torch.equal(got.project.weight, block.project.weight[:, keep])
    assert torch.equal(got.bn0.running_mean, block.bn0.running_mean[keep])


def test_pruning_refuses_a_ratio_of_one() -> None:
    with pytest.raises(ValueError, match="outside"):
        prune_channels(tiny(), 1.0, torch.zeros(1, 3, SIDE, SIDE))


# ----------------------------------------------------------------------------------------------
# low rank
# ----------------------------------------------------------------------------------------------


def test_full_rank_factorization_computes_what_the_original_computes() -> None:
    net = tiny()
    fact, report = factorize(net, rank_fraction=1.0, layers=10, only_if_smaller=False)
    names = {x.name for x in report.layers}
    assert names == {"blocks.0.expand", "blocks.0.project", "blocks.1.expand", "blocks.1.project", "last", "head"}
    x = torch.from_numpy(images(4, 2))
    with torch.no_grad():
        assert torch.allclose(fact(x), net(x), atol=1e-4)
    assert isinstance(fact.last, nn.Sequential) and isinstance(net.last, nn.Conv2d)


def test_reduced_rank_error_is_bounded_by_the_discarded_singular_values() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(40, 32, 1, stride=2)
    model = nn.Sequential(conv)
    fact, report = factorize(model, rank_fraction=0.25, layers=1)
    (layer,) = report.layers
    assert layer.rank == 8 and layer.params_after == 8 * (40 + 32)
    w = conv.weight.detach().numpy()[:, :, 0, 0].astype(np.float64)
    s = np.linalg.svd(w, compute_uv=False)  # independent of the code under test
    first, second = fact[0][0], fact[0][1]  # type: ignore[index]
    w_r = (second.weight.detach().numpy()[:, :, 0, 0].astype(np.float64)
           @ first.weight.detach().numpy()[:, :, 0, 0].astype(np.float64))
    assert np.linalg.matrix_rank(w_r, tol=1e-4) == 8
    # Eckart-Young: the best rank-8 approximation's Frobenius error is the root of the discarded s^2
    assert np.linalg.norm(w - w_r) == pytest.approx(np.sqrt((s[8:] ** 2).sum()), rel=1e-4)
    assert layer.energy_kept == pytest.approx((s[:8] ** 2).sum() / (s ** 2).sum(), rel=1e-6)
    x = torch.randn(3, 40, 9, 9)
    with torch.no_grad():
        full, approx = conv(x), fact(x)
    assert approx.shape == full.shape == (3, 32, 5, 5)  # the stride is kept
    per_pixel_err = (full - approx).norm(dim=1)
    per_pixel_in = x[:, :, ::2, ::2].norm(dim=1)
    assert bool((per_pixel_err <= s[8] * per_pixel_in + 1e-4).all())


def test_rank_from_energy_and_the_break_even_rule() -> None:
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # s^2: 16, 9, 4, 1 of 30
    assert choose_rank(s, energy=0.5) == 1   # 16/30 = 0.53
    assert choose_rank(s, energy=0.8) == 2   # 25/30 = 0.83
    assert choose_rank(s, energy=0.9) == 3   # 29/30
    assert choose_rank(s, energy=1.0) == 4
    assert choose_rank(s, rank_fraction=0.5) == 2 and choose_rank(s, rank_fraction=0.01) == 1
    with pytest.raises(ValueError):
        choose_rank(s, rank_fraction=0.5, energy=0.5)
    # a 48 -> 3 head: any rank >= 3 * 48 / 51 = 2.8 saves nothing, so it is left alone and named
    _, report = factorize(tiny(), rank_fraction=1.0, layers=0)
    assert report.layers == [] and "head" in report.skipped and "saves nothing" in report.skipped["head"]


# ----------------------------------------------------------------------------------------------
# recovery
# ----------------------------------------------------------------------------------------------


def kl_to_teacher(student: nn.Module, teacher: nn.Module, x: np.ndarray) -> float:
    """Mean KL(teacher || student) of the softmax outputs, computed here with numpy."""
    with torch.no_grad():
        t = teacher(torch.from_numpy(x)).double().numpy()
        s = student(torch.from_numpy(x)).double().numpy()
    pt = np.exp(t - t.max(1, keepdims=True))
    pt /= pt.sum(1, keepdims=True)
    ls = s - s.max(1, keepdims=True)
    ls -= np.log(np.exp(ls).sum(1, keepdims=True))
    return float((pt * (np.log(pt) - ls)).sum(1).mean())


def test_distillation_pulls_a_pruned_student_toward_its_teacher() -> None:
    teacher = tiny(5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, _ = prune_channels(teacher, 0.5, torch.zeros(1, 3, SIDE, SIDE), scope="all")
    train, held = images(64, 6), images(32, 7)
    gap_before = kl_to_teacher(student, teacher, held)
    report = distill(student, teacher_targets(teacher, train), train, seconds=600.0, max_steps=15, batch=16,
                     lr=3e-3)
    assert report.steps == 15 and report.images_seen == 240 and report.stopped_by == "max_steps"
    gap_after = kl_to_teacher(student, teacher, held)
    assert gap_after < 0.5 * gap_before  # on images the recovery never saw
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not student.training


def test_distillation_stops_at_its_time_budget() -> None:
    teacher = tiny(5)
    student, _ = prune_channels(teacher, 0.5, torch.zeros(1, 3, SIDE, SIDE))
    x = images(32, 8)
    ticks = itertools.count()  # a clock that reads 0, 1, 2, ... seconds, one tick per reading
    report = distill(student, teacher_targets(teacher, x), x, seconds=3.0, batch=8, clock=lambda: float(next(ticks)))
    # started at 0 (deadline 3); checked before each step: 1 and 2 are before the deadline, 3 is not
    assert report.stopped_by == "seconds" and report.steps == 2 and report.images_seen == 16
    assert report.seconds == 4.0  # the reading after the loop


# ----------------------------------------------------------------------------------------------
# the search and the plug-in
# ----------------------------------------------------------------------------------------------


def test_the_search_picks_the_fastest_trial_within_the_bound() -> None:
    trials = [
        Trial("slow_exact", p50_ms=5.0, agreement=1.0),
        Trial("fast_wrong", p50_ms=1.0, agreement=0.95),     # 5 % disagreement: out
        Trial("medium_ok", p50_ms=2.0, agreement=0.992),     # 0.8 %: in
        Trial("medium_ok_big", p50_ms=2.0, agreement=0.992, size_bytes=10),
        Trial("medium_edge", p50_ms=2.5, agreement=0.99),    # exactly 1 %: in, but slower
    ]
    choice = choose_trial(trials, max_disagreement=0.01)
    assert choice.chosen == "medium_ok"
    assert set(choice.rejected) == {"fast_wrong"} and "5.00 %" in choice.rejected["fast_wrong"]
    # the spec's FPS rules out trials that are too slow, even exact ones
    assert choose_trial(trials[:1], max_disagreement=0.01, max_p50_ms=4.0).chosen is None
    assert choose_trial([trials[1]], max_disagreement=0.01).chosen is None


def test_config_names_say_what_was_done() -> None:
    assert CompressionConfig(prune_ratio=0.5, rank_fraction=0.25, resolution=160).name == "pruned_p50_r25_s160_int8"
    assert CompressionConfig(int8=False).name == "pruned_p0_fp32"
    with pytest.raises(ValueError):
        CompressionConfig(prune_ratio=1.0)


def test_a_lower_resolution_is_a_resize_inside_the_model() -> None:
    teacher = tiny(9)
    student, details = compress_model(teacher, CompressionConfig(resolution=16, int8=False), images(8, 1),
                                      input_size=SIDE, recovery_seconds=0.0)
    seen: list[tuple[int, ...]] = []
    student.inner.stem.register_forward_pre_hook(lambda _m, a: seen.append(tuple(a[0].shape)))  # type: ignore[union-attr]
    with torch.no_grad():
        out = student(torch.from_numpy(images(2, 3)))
    assert out.shape == (2, 3) and seen == [(2, 3, 16, 16)]
    assert details["network_input_size"] == 16 and "resize_inside_model" in details


def test_compression_search_plugin_returns_the_fastest_variant_within_the_bound(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    teacher = tiny(11)
    cal = images(24, 12)
    exported = export_onnx(teacher, in_channels=3, input_size=SIDE, path=tmp_path / "ref.onnx", check_inputs=cal[:4])
    source = Source(Path(exported.path), exported.input_name, (3, SIDE, SIDE), model=teacher)
    configs = [CompressionConfig(int8=False), CompressionConfig(prune_ratio=0.5, rank_fraction=0.5, int8=True)]
    plugin = CompressionSearch(configs, recovery_seconds=1.0, max_disagreement=1.0, holdout=0.25)
    assert plugin.unavailable() is None
    variant = plugin.compress(source, cal, tmp_path)
    assert variant.name == "pruned" and variant.path.exists()
    table = {row["name"]: row for row in variant.details["search"]}
    assert set(table) == {"pruned_p0_fp32", "pruned_p50_r50_int8"}
    assert all(0.0 <= row["agreement"] <= 1.0 and row["p50_ms"] > 0 for row in table.values())
    # with every config admissible the fastest one is returned, and its own files only
    fastest = min(table.values(), key=lambda r: r["p50_ms"])["name"]
    assert variant.details["config"] == fastest
    assert variant.precision == ("int8" if fastest.endswith("int8") else "fp32")
    assert sorted(p.name for p in tmp_path.glob("pruned*")) == [variant.path.name]
    out = OrtRunner(variant.path).run(cal[:3])
    assert out.shape == (3, 3)
    # the unpruned config reproduces the reference model's decisions on the held-out images exactly
    assert table["pruned_p0_fp32"]["agreement"] == 1.0


def test_head_refit_puts_the_head_back_on_rescaled_features() -> None:
    teacher = tiny(13)
    student = tiny(13)
    with torch.no_grad():  # features twice as large: the teacher's head reads them wrong, W / 2 reads them right
        student.last.weight.mul_(2.0)
        student.last.bias.mul_(2.0)
    train, held = images(160, 14), images(40, 15)
    report = refit_head(student, teacher_targets(teacher, train), train, ridges=(1e-6, 1e-2))
    assert report.images == 160 and report.features == 48 and report.ridge == 1e-6
    assert report.holdout_agreement == 1.0
    with torch.no_grad():
        t = teacher(torch.from_numpy(held))
        s = student(torch.from_numpy(held))
    assert float((t - s).abs().max()) < 1e-3 * float(t.abs().max())
    assert torch.allclose(student.head.weight, teacher.head.weight / 2, atol=1e-3)


def test_head_refit_from_onnx_runtime_features_matches_the_torch_path(tmp_path: Path) -> None:
    teacher = tiny(13)
    train = images(96, 16)
    targets = teacher_targets(teacher, train)
    a, b = tiny(13), tiny(13)
    for s in (a, b):
        with torch.no_grad():
            s.last.weight.mul_(3.0)
            s.last.bias.mul_(3.0)
    feats = onnx_features(b, "head", train, input_size=SIDE, workdir=tmp_path)
    assert feats.shape == (96, 48) and not list(tmp_path.glob("*.onnx"))  # the trunk's file is removed
    ra = refit_head(a, targets, train, ridges=(1e-6,))
    rb = refit_head(b, targets, np.zeros((0, 3, SIDE, SIDE), np.float32), ridges=(1e-6,), features=feats)
    assert ra.ridge == rb.ridge == 1e-6
    assert torch.allclose(a.head.weight, b.head.weight, atol=1e-4)
    with pytest.raises(ValueError, match="feature rows"):
        refit_head(b, targets, train, features=feats[:10])


def test_compression_search_needs_the_torch_model(tmp_path: Path) -> None:
    plugin = CompressionSearch([CompressionConfig()])
    with pytest.raises(ValueError, match="torch model"):
        plugin.compress(Source(tmp_path / "x.onnx", "input", (3, SIDE, SIDE)), images(8, 0), tmp_path)
