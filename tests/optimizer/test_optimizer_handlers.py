"""optimize() end to end on a small CNN: variants, thresholds, spec check, choice, and the plug-in seam."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from optimizer_testdata import CLASSES, FMT, SIZE, SPEC, Trained, separable

from dlforge.common.errors import InvalidInput
from dlforge.common.events import Spec
from dlforge.optimizer.compression import CompressionConfig
from dlforge.optimizer.compressors import OrtFp32, OrtStaticInt8, Source, TensorRTEngine, Variant
from dlforge.optimizer.evaluation import choose_threshold, decide, metrics
from dlforge.optimizer.handlers import (
    LabeledImages,
    OptimizeInput,
    OptimizeOptions,
    OptimizeResult,
    optimize,
    pick_calibration,
    probabilities,
)
from dlforge.optimizer.runners import open_runner


def _input(trained: Trained, spec: Spec = SPEC, classes: list[str] | None = None) -> OptimizeInput:
    cal, _ = separable(24, seed=21)
    vx, vy = separable(80, seed=22)
    tx, ty = separable(80, seed=23)
    return OptimizeInput(checkpoint_path=trained.checkpoint, classes=classes or CLASSES, spec=spec, calibration=cal,
                         val=LabeledImages(vx, vy), test=LabeledImages(tx, ty), dataset_id="ds", model_id="m1")


@pytest.fixture(scope="module")
def result(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> OptimizeResult:
    options = OptimizeOptions(rounds=1, warmup=1, iterations=8, iterations_large_batch=2, batch_sizes=[1, 8],
                              calibration_methods=["minmax", "entropy"])
    return optimize(_input(trained), workdir=tmp_path_factory.mktemp("work"), options=options)


def test_variants_and_files(result: OptimizeResult) -> None:
    r = result.report
    assert list(r.variants) == ["torch_fp32", "onnx_fp32", "onnx_int8"]
    assert set(result.files) == {"onnx_fp32", "onnx_int8"}  # the torch baseline is not an artifact
    assert all(p.exists() for p in result.files.values())
    assert r.variants["onnx_int8"].size_bytes < 0.4 * r.variants["onnx_fp32"].size_bytes
    assert r.int8_size_ratio is not None and r.int8_size_ratio > 2.5
    assert r.export.max_abs_diff < 1e-4 and r.export.opset == 17
    assert r.input == {"in_channels": 1, "input_size": SIZE, "mean": [0.5], "std": [0.5], "frame_size": 256}
    # calibration: every method tried, the one agreeing best with FP32 on validation renamed onnx_int8
    assert [c.method for c in r.calibration.candidates] == ["minmax", "entropy"]
    best = max(r.calibration.candidates, key=lambda c: (c.val_agreement, -c.val_mean_abs_diff))
    assert r.calibration.chosen == best.method == r.variants["onnx_int8"].details["calibration"]
    assert r.calibration.images == 24
    # no GPU here: the GPU variants are reported as skipped, with what to install
    assert "pip install tensorrt pycuda" in r.skipped["trt_fp16"]
    assert "onnxruntime-gpu" in r.skipped["onnx_fp32_cuda"]


def test_every_variant_is_measured(result: OptimizeResult) -> None:
    for v in result.report.variants.values():
        assert set(v.speed.batches) == {"1", "8"}
        assert v.latency_b1_p50_ms > 0 and v.latency_b1_p99_ms >= v.latency_b1_p50_ms
        assert v.throughput_b1_ips > 0 and v.fps > 0 and v.fps == v.speed.pipeline.throughput_ips
        assert v.peak_rss_mb > 0 and v.size_mb > 0
        assert v.test.n == 80 and v.val.n == 80
    r = result.report
    for key in ("int8_speedup_vs_onnx_fp32", "int8_speedup_vs_torch_eager", "int8_speedup_vs_onnx_fp32_batch32"):
        assert getattr(r, key) is not None and getattr(r, key) > 0
    fp32, int8 = r.variants["onnx_fp32"], r.variants["onnx_int8"]
    assert r.int8_speedup_vs_onnx_fp32 == pytest.approx(fp32.latency_b1_p50_ms / int8.latency_b1_p50_ms)


def test_int8_keeps_accuracy(result: OptimizeResult) -> None:
    r = result.report
    fp32, int8 = r.variants["onnx_fp32"], r.variants["onnx_int8"]
    assert fp32.test_argmax.accuracy >= 0.95
    assert r.int8_accuracy_drop_at_threshold is not None and r.int8_accuracy_drop_at_threshold <= 0.01
    assert r.int8_accuracy_drop_at_threshold == pytest.approx(fp32.test_accuracy - int8.test_accuracy)
    assert r.int8_accuracy_drop == pytest.approx(fp32.test_argmax.accuracy - int8.test_argmax.accuracy)
    assert r.int8_accuracy_drop is not None and r.int8_accuracy_drop <= 0.01
    assert fp32.accuracy_drop_vs_onnx_fp32 == 0.0 and fp32.test_agreement_vs_onnx_fp32 == 1.0
    assert r.int8_test_agreement is not None and r.int8_test_agreement >= 0.95
    for c in r.calibration.candidates:
        assert c.val_agreement >= 0.95 and 0 <= c.val_mean_abs_diff < 0.1


def test_thresholds_are_recomputable_from_the_variant_outputs(result: OptimizeResult, trained: Trained) -> None:
    """Each variant's threshold is choose_threshold on its own validation scores; test metrics follow."""
    inp = _input(trained)
    r = result.report
    for name in ("onnx_fp32", "onnx_int8"):
        v = r.variants[name]
        runner = open_runner("onnxruntime", result.files[name])
        pv = probabilities(runner, inp.val.images, FMT, batch=32)
        pt = probabilities(runner, inp.test.images, FMT, batch=32)
        expected = choose_threshold(pv[inp.val.labels == 0, 0], min_recall=SPEC.min_recall)
        assert v.threshold.threshold == pytest.approx(expected.threshold, abs=1e-6)
        assert v.threshold.val_recall is not None and v.threshold.val_recall >= SPEC.min_recall
        at = metrics(inp.test.labels, decide(pt, positive=0, threshold=v.threshold.threshold), CLASSES)
        assert v.test_accuracy == pytest.approx(at.accuracy)
        assert v.test_positive_recall == pytest.approx(at.recall["defect"])
        assert v.spec_check.recall == v.test_positive_recall


def test_spec_check_and_choice(result: OptimizeResult) -> None:
    r = result.report
    assert r.choice.reference == "onnx_fp32"
    assert "torch_fp32" not in r.choice.rejected and r.chosen_variant != "torch_fp32"
    chosen = r.variants[r.chosen_variant]
    assert r.threshold == chosen.threshold.threshold and r.fps == chosen.fps
    assert r.test_accuracy == chosen.test_accuracy and r.test_positive_recall == chosen.test_positive_recall
    # the accuracy tolerance compares argmax accuracies (the compression's loss), not threshold-moved ones
    ref_acc = r.variants["onnx_fp32"].test_argmax.accuracy
    assert r.choice.reference_accuracy == ref_acc
    for v in r.variants.values():
        if v.deployable and ref_acc - v.test_argmax.accuracy > r.choice.max_accuracy_drop + 1e-9:
            assert v.name in r.choice.rejected and v.name != r.chosen_variant
    if r.spec_met:
        assert chosen.spec_check.met
        eligible = [v for v in r.variants.values() if v.deployable and v.name not in r.choice.rejected]
        assert chosen.fps == max(v.fps for v in eligible)
    else:
        assert all(not v.spec_check.met or v.name in r.choice.rejected for v in r.variants.values())


def test_plug_in_compressors_replace_the_defaults(trained: Trained, tmp_path: Path) -> None:
    class Renamed:
        """A stand-in technique: the FP32 model under another name (what a pruning plug-in would return)."""

        name = "onnx_fp32_copy"

        def unavailable(self) -> str | None:
            return None

        def compress(self, source: Source, calibration: np.ndarray, workdir: Path) -> Variant:
            out = workdir / "copy.onnx"
            shutil.copyfile(source.onnx_path, out)
            return Variant(self.name, "onnxruntime", "fp32", out, details={"plug_in": True})

    options = OptimizeOptions(rounds=1, warmup=1, iterations=3, iterations_large_batch=2, batch_sizes=[1],
                              benchmark_torch=False)
    res = optimize(_input(trained), workdir=tmp_path, options=options,
                   compressors=[OrtFp32(), OrtStaticInt8(method="minmax"), Renamed(), TensorRTEngine()])
    assert set(res.report.variants) == {"onnx_fp32", "onnx_int8", "onnx_fp32_copy"}
    assert res.report.variants["onnx_fp32_copy"].details == {"plug_in": True}
    assert res.report.int8_speedup_vs_torch_eager is None and "trt_fp16" in res.report.skipped
    a, b = res.report.variants["onnx_fp32"], res.report.variants["onnx_fp32_copy"]
    assert a.test_argmax == b.test_argmax and a.threshold == b.threshold


def test_structured_compression_is_one_more_variant_when_configured(trained: Trained, tmp_path: Path) -> None:
    options = OptimizeOptions(rounds=1, warmup=1, iterations=3, iterations_large_batch=2, batch_sizes=[1],
                              calibration_methods=["minmax"], gpu=False, benchmark_torch=False,
                              compression=[CompressionConfig(prune_ratio=0.5, int8=False)],
                              compression_recovery_seconds=1.0)
    report = optimize(_input(trained), workdir=tmp_path, options=options).report
    assert set(report.variants) == {"onnx_fp32", "onnx_int8", "pruned"}
    pruned = report.variants["pruned"]
    assert pruned.details["config"] == "pruned_p50_fp32" and pruned.precision == "fp32"
    # small_cnn has no depthwise convs: every conv group loses half its channels (128 features -> 64)
    assert pruned.details["pruning"]["scope"] == "all"
    assert pruned.details["pruning"]["channels"]["backbone.body.12"] == [128, 64]
    assert pruned.size_bytes < report.variants["onnx_fp32"].size_bytes / 2
    assert pruned.test_argmax.accuracy > 0.5 and pruned.speed.batches["1"].p50_ms > 0


def test_refuses_inputs_it_cannot_optimize(trained: Trained, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="positive_class 'crack'"):
        optimize(_input(trained, Spec(positive_class="crack", min_recall=0.9)), workdir=tmp_path)
    with pytest.raises(InvalidInput, match="checkpoint classes"):
        optimize(_input(trained, classes=["good", "defect"]), workdir=tmp_path)
    bad = _input(trained)
    wrong = OptimizeInput(**{**bad.__dict__, "test": LabeledImages(np.zeros((2, 48, 48, 1), np.uint8),
                                                                 np.zeros(2, np.int64))})
    with pytest.raises(InvalidInput, match="test images"):
        optimize(wrong, workdir=tmp_path)


def test_pick_calibration_is_reproducible_and_order_free() -> None:
    ids = [f"item{i:03d}" for i in range(50)]
    a = pick_calibration(ids, n=10, seed=3)
    assert len(a) == 10 == len(set(a))
    assert [ids[i] for i in a] == [ids[i] for i in pick_calibration(ids, n=10, seed=3)]
    shuffled = ids[::-1]
    assert sorted(shuffled[i] for i in pick_calibration(shuffled, n=10, seed=3)) == sorted(ids[i] for i in a)
    assert pick_calibration(ids[:4], n=10, seed=0) == [0, 1, 2, 3]


def test_test_figures_rest_on_the_items_people_labeled(trained: Trained, tmp_path: Path) -> None:
    """Auto-labeled test items (here: deliberately wrong) never enter the test figures or the verdict."""
    base = _input(trained)
    tx, ty = base.test.images, base.test.labels
    people = np.arange(len(ty)) % 4 != 0  # 60 of 80 labeled by people
    wrong = np.where(people, ty, 1 - ty)  # the other 20 carry wrong auto-labels
    inp = OptimizeInput(**{**base.__dict__, "test": LabeledImages(tx, wrong, people)})
    options = OptimizeOptions(rounds=1, warmup=1, iterations=3, iterations_large_batch=2, batch_sizes=[1],
                              benchmark_torch=False)
    r = optimize(inp, workdir=tmp_path, options=options,
                 compressors=[OrtFp32(), OrtStaticInt8(method="minmax")]).report
    assert r.test_split == {"items": 80, "labeled_by_people": 60, "used": 60, "positives": int((ty[people] == 0).sum()),
                            "evidence": "labels given by people"}
    chosen = r.variants[r.chosen_variant]
    runner = open_runner("onnxruntime", tmp_path / f"{r.chosen_variant}.onnx")
    pt = probabilities(runner, tx[people], FMT, batch=32)
    pred = decide(pt, positive=0, threshold=r.threshold)
    assert r.test_accuracy_interval is not None and r.test_accuracy_interval.n == 60
    assert r.test_accuracy_interval.k == int((pred == ty[people]).sum())
    assert r.test_accuracy == pytest.approx(r.test_accuracy_interval.point)
    assert r.test_accuracy_argmax == pytest.approx(float((pt.argmax(1) == ty[people]).mean()))
    assert r.positive_recall_interval is not None
    assert r.positive_recall_interval.n == r.test_split["positives"]
    assert r.positive_recall_interval.k == int(((pred == 0) & (ty[people] == 0)).sum())
    assert r.test_figures is not None and sum(map(sum, r.test_figures.confusion)) == 60
    # the operating curve and the accuracy at the spec's recall, read off the test split
    assert r.operating_curve is not None and r.operating_curve.items == 60
    at = r.accuracy_at_spec_recall
    assert at is not None and at.recall >= SPEC.min_recall
    assert at.accuracy == pytest.approx(float((decide(pt, positive=0, threshold=at.threshold) == ty[people]).mean()))
    above = pt[ty[people] == 0, 0]
    higher = above[above > at.threshold]
    assert len(higher) / len(above) < SPEC.min_recall  # no higher threshold reaches the recall
    # the verdict follows the intervals; the threshold's own evidence travels with it
    v = r.spec_verdict
    assert v is not None and v.test_items == 60
    acc, rec = r.test_accuracy_interval, r.positive_recall_interval
    point_ok = acc.point >= SPEC.min_accuracy and rec.point >= SPEC.min_recall and chosen.fps >= SPEC.min_fps
    low_ok = acc.low >= SPEC.min_accuracy and rec.low >= SPEC.min_recall
    assert v.verdict == ("met" if point_ok and low_ok else "met_point_estimate" if point_ok else "not_met")
    assert v.threshold_positives == chosen.threshold.val_positives == int((base.val.labels == 0).sum())
    assert v.threshold_recall_lower_bound is not None and v.threshold_recall_lower_bound < 1.0
    # an INT8 agreement below 98 % would have been excluded
    assert r.choice.max_int8_disagreement == 0.02
    if r.int8_test_agreement is not None and r.int8_test_agreement < 0.98:
        assert "onnx_int8" in r.choice.excluded


def test_without_people_labeled_test_items_the_verdict_is_not_met(trained: Trained, tmp_path: Path) -> None:
    base = _input(trained)
    inp = OptimizeInput(**{**base.__dict__, "test": LabeledImages(base.test.images, base.test.labels,
                                                                 np.zeros(80, bool))})
    options = OptimizeOptions(rounds=1, warmup=1, iterations=3, iterations_large_batch=2, batch_sizes=[1],
                              benchmark_torch=False)
    r = optimize(inp, workdir=tmp_path, options=options, compressors=[OrtFp32()]).report
    assert r.test_split is not None and r.test_split["used"] == 80 and "cannot be checked" in r.test_split["evidence"]
    assert r.spec_verdict is not None and r.spec_verdict.verdict == "not_met"


def test_benchmark_rounds_are_interleaved_and_stop_by_the_rule(trained: Trained, tmp_path: Path) -> None:
    options = OptimizeOptions(rounds=4, min_rounds=2, ratio_tolerance=1e-9, warmup=1, iterations=4,
                              iterations_large_batch=2, batch_sizes=[1, 8], calibration_methods=["minmax"])
    r = optimize(_input(trained), workdir=tmp_path, options=options).report
    b = r.benchmark
    assert b is not None
    # a tolerance nothing real meets: the rounds run to the cap, and say so
    assert b.rounds == 4 and "cap of 4 rounds" in b.stop_reason
    assert [len(b.round_p50_ms[n]) for n in ("torch_fp32", "onnx_fp32", "onnx_int8")] == [1, 4, 4]
    int8 = b.speed_ratios_vs_onnx_fp32["onnx_int8"]
    expected = [f / i for f, i in zip(b.round_p50_ms["onnx_fp32"], b.round_p50_ms["onnx_int8"], strict=True)]
    assert int8.per_round == pytest.approx(expected) and int8.spread is not None
    assert b.speed_ratios_vs_onnx_fp32["torch_fp32"].spread is None  # one round: its spread is unknown
    # each variant's figure is its fastest round; the large batch was timed once (the first round)
    for name, v in r.variants.items():
        assert v.latency_b1_p50_ms == pytest.approx(min(b.round_p50_ms[name]))
        assert v.speed.batches["8"].iterations == 2
