"""The benchmark child process: latency statistics, throughput, per-process peak memory, failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from optimizer_testdata import SIZE, Trained, separable

from dlforge.optimizer.export import export_onnx
from dlforge.optimizer.measure import ProbeFailed, best_of, probe
from dlforge.optimizer.preprocess import InputFormat, normalize
from dlforge.optimizer.probe import LatencyStats, ProbeJob, ProbeResult


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
