"""The benchmark child process: latency statistics, throughput, per-process peak memory, failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from optimizer_testdata import SIZE, Trained, separable

from dlforge.optimizer.export import export_onnx
from dlforge.optimizer.measure import (
    ProbeFailed,
    ProbeWorker,
    StopRule,
    best_of,
    combine,
    decide_stop,
    probe,
    ratio_spread,
)
from dlforge.optimizer.preprocess import InputFormat, normalize
from dlforge.optimizer.probe import LatencyStats, Measure, Measurement, ProbeJob, ProbeResult


def _job(runtime: str, path: Path) -> ProbeJob:
    return ProbeJob(runtime=runtime, path=str(path), threads=1, in_channels=1, input_size=SIZE, mean=[0.5],
                    std=[0.5], frame_size=256, batches=[1, 8], warmup={1: 2, 8: 1}, iterations={1: 20, 8: 4},
                    pipeline_iterations=10)


@pytest.fixture(scope="module")
def onnx_model(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, _ = separable(4, seed=2)
    fmt = InputFormat(1, SIZE, (0.5,), (0.5,))
    return Path(export_onnx(trained.model, in_channels=1, input_size=SIZE,
                            path=tmp_path_factory.mktemp("m") / "m.onnx", check_inputs=normalize(x, fmt)).path)


def test_probe_measures_latency_throughput_and_memory(onnx_model: Path, trained: Trained) -> None:
    ort = probe(_job("onnxruntime", onnx_model))
    assert set(ort.batches) == {"1", "8"}
    for b, stats in ort.batches.items():
        assert stats.batch == int(b)
        assert 0 < stats.min_ms <= stats.p50_ms <= stats.p99_ms
        assert stats.throughput_ips == pytest.approx(stats.batch / stats.mean_ms * 1e3, rel=1e-6)
        assert stats.throughput_p50_ips == pytest.approx(stats.batch / stats.p50_ms * 1e3, rel=1e-6)
    assert ort.batches["1"].iterations == 20 and ort.batches["8"].iterations == 4
    # the pipeline resizes a 256x256 frame first: it cannot be faster than the model alone (up to noise)
    assert ort.pipeline.iterations == 10 and ort.pipeline.min_ms > 0.5 * ort.batches["1"].min_ms
    assert 0 < ort.rss_baseline_mb <= ort.peak_rss_mb
    assert ort.peak_rss_delta_mb == pytest.approx(ort.peak_rss_mb - ort.rss_baseline_mb)

    eager = probe(_job("torch", trained.checkpoint))
    # each variant in its own process: the ONNX Runtime child never imports torch, so it starts smaller
    assert ort.rss_baseline_mb < eager.rss_baseline_mb


def test_probe_failure_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ProbeFailed, match="failed"):
        probe(_job("onnxruntime", bad))


def _result(p50: float, rss: float) -> ProbeResult:
    stats = LatencyStats(batch=1, warmup=1, iterations=3, mean_ms=p50, p50_ms=p50, p99_ms=p50, min_ms=p50,
                         throughput_ips=1e3 / p50, throughput_p50_ips=1e3 / p50)
    return ProbeResult(load_seconds=0.1, batches={"1": stats}, pipeline=stats, rss_baseline_mb=50,
                       peak_rss_mb=rss, peak_rss_delta_mb=rss - 50)


def test_best_of_rounds_keeps_the_fastest_round_and_the_highest_memory() -> None:
    best = best_of([_result(12.0, 100), _result(9.0, 90), _result(15.0, 120)])
    assert best.batches["1"].p50_ms == 9.0
    assert best.peak_rss_mb == 120 and best.peak_rss_delta_mb == 70
    with pytest.raises(ValueError):
        best_of([])
    assert np.isfinite(best.pipeline.throughput_ips)


# ----------------------------------------------------------------------------------------------
# interleaved rounds: the stop rule on hand-made timings, combining rounds, the serving probe
# ----------------------------------------------------------------------------------------------


def test_ratio_spread_is_the_relative_half_width_of_the_mean_ratios_95_interval() -> None:
    # [2.0, 2.2, 1.8]: mean 2, sample sd 0.2, n 3, t(0.975, 2) = 4.303 -> 4.303 * 0.2 / sqrt(3) / 2
    assert ratio_spread([2.0, 2.2, 1.8]) == pytest.approx(4.303 * 0.2 / 3 ** 0.5 / 2, rel=1e-9)
    # [2, 2.1, 2, 2.1]: mean 2.05, sd sqrt(4 * 0.05^2 / 3), t(0.975, 3) = 3.182
    assert ratio_spread([2.0, 2.1, 2.0, 2.1]) == pytest.approx(3.182 * (0.01 / 3) ** 0.5 / 2 / 2.05, rel=1e-9)
    assert ratio_spread([3.0, 3.0, 3.0]) == 0.0
    assert ratio_spread([3.0]) == float("inf") and ratio_spread([]) == float("inf")
    # steady rounds make it shrink (a range would only grow)
    assert ratio_spread([2.0, 2.1] * 4) < ratio_spread([2.0, 2.1, 2.0]) < ratio_spread([2.0, 2.1])


def _rounds_until_stop(ref: list[float], other: list[float], rule: StopRule) -> tuple[int, str]:
    """Feed the rounds one by one, as the stage does, until the rule says stop."""
    for n in range(1, len(ref) + 1):
        d = decide_stop({"onnx_fp32": ref[:n], "onnx_int8": other[:n]}, reference="onnx_fp32", rule=rule)
        if d.stop:
            return n, d.reason
    raise AssertionError("never stopped")


def test_rounds_stop_once_the_ratio_spread_is_small() -> None:
    rule = StopRule(tolerance=0.05, min_rounds=3, max_rounds=8)
    # ratios 2.0, 2.1, 2.0, 2.1, ...: spread 0.0706 after 3 rounds, 0.0448 after 4 (see above)
    ref = [10.0, 10.5, 10.0, 10.5, 10.0, 10.5, 10.0, 10.5]
    n, reason = _rounds_until_stop(ref, [5.0] * 8, rule)
    assert n == 4 and "within ±5.0 %" in reason
    # identical ratios: stop at the minimum, not before
    assert _rounds_until_stop([10.0] * 8, [4.0] * 8, rule)[0] == 3
    d = decide_stop({"onnx_fp32": [10.0, 10.0], "onnx_int8": [4.0, 4.0]}, reference="onnx_fp32", rule=rule)
    assert not d.stop and d.ratios["onnx_int8"].per_round == [2.5, 2.5]


def test_noisy_rounds_run_to_the_cap_and_say_so() -> None:
    rule = StopRule(tolerance=0.05, min_rounds=3, max_rounds=5)
    # a busy spell in every other round: ratios 2.0, 1.2, 2.0, 1.2, 2.0 -> spread far above 5 %
    ref = [10.0, 6.0, 10.0, 6.0, 10.0]
    n, reason = _rounds_until_stop(ref, [5.0] * 5, rule)
    assert n == 5 and "cap of 5 rounds" in reason
    d = decide_stop({"onnx_fp32": ref, "onnx_int8": [5.0] * 5}, reference="onnx_fp32", rule=rule)
    est = d.ratios["onnx_int8"]
    assert est.per_round == [2.0, 1.2, 2.0, 1.2, 2.0] and est.median == 2.0
    # mean 1.68, sd sqrt((3 * 0.32^2 + 2 * 0.48^2) / 4), t(0.975, 4) = 2.776
    sd = ((3 * 0.32 ** 2 + 2 * 0.48 ** 2) / 4) ** 0.5
    assert est.spread == pytest.approx(2.776 * sd / 5 ** 0.5 / 1.68, rel=1e-9)


def test_the_widest_ratio_decides() -> None:
    rule = StopRule(tolerance=0.05, min_rounds=3, max_rounds=8)
    p50s = {"onnx_fp32": [10.0, 10.0, 10.0], "onnx_int8": [4.0, 4.0, 4.0], "torch_fp32": [40.0, 60.0, 40.0]}
    d = decide_stop(p50s, reference="onnx_fp32", rule=rule)
    assert not d.stop and "torch_fp32" in d.reason
    assert d.ratios["onnx_int8"].spread == 0.0 and d.ratios["torch_fp32"].spread > 0.05


def _measurement(p50: dict[str, float], pipe: float | None, rss: float) -> Measurement:
    def st(b: int, ms: float) -> LatencyStats:
        return LatencyStats(batch=b, warmup=1, iterations=3, mean_ms=ms, p50_ms=ms, p99_ms=ms, min_ms=ms,
                            throughput_ips=b * 1e3 / ms, throughput_p50_ips=b * 1e3 / ms)

    return Measurement(load_seconds=0.2, batches={b: st(int(b), ms) for b, ms in p50.items()},
                       pipeline=st(1, pipe) if pipe is not None else None, rss_baseline_mb=40, peak_rss_mb=rss)


def test_combine_takes_each_figure_from_its_fastest_round() -> None:
    rounds = [_measurement({"1": 12.0, "32": 300.0}, 15.0, 100), _measurement({"1": 9.0}, 16.0, 130),
              _measurement({"1": 11.0}, 14.0, 110)]
    r = combine(rounds)
    assert r.batches["1"].p50_ms == 9.0 and r.batches["32"].p50_ms == 300.0 and list(r.batches) == ["1", "32"]
    assert r.pipeline.p50_ms == 14.0
    assert r.peak_rss_mb == 130 and r.peak_rss_delta_mb == 90
    with pytest.raises(ValueError):
        combine([])


def test_serving_probe_answers_rounds_without_reloading(onnx_model: Path) -> None:
    with ProbeWorker(_job("onnxruntime", onnx_model)) as w:
        first = w.measure(Measure(warmup={1: 2, 8: 1}, iterations={1: 10, 8: 3}, pipeline_iterations=5))
        second = w.measure(Measure(warmup={1: 1}, iterations={1: 7}, pipeline_iterations=0))
        pid = w.proc.pid
        assert w.proc.poll() is None
    assert set(first.batches) == {"1", "8"} and first.batches["8"].iterations == 3
    assert first.pipeline is not None and first.pipeline.iterations == 5
    assert set(second.batches) == {"1"} and second.batches["1"].iterations == 7 and second.pipeline is None
    assert second.load_seconds == first.load_seconds  # loaded once
    assert 0 < first.rss_baseline_mb <= first.peak_rss_mb <= second.peak_rss_mb
    assert w.proc.poll() == 0 and pid > 0  # closed with the context


def test_serving_probe_failure_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ProbeFailed, match=r"broken\.onnx failed"):
        ProbeWorker(_job("onnxruntime", bad), timeout=120)
