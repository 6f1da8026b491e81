"""The benchmark child process: load one variant, time it, report its peak memory.

Run as ``python -m dlforge.optimizer.probe JOB.json RESULT.json``. Each variant is measured in its
own fresh process so that its peak resident memory (``ru_maxrss``) is its own: the parent's torch,
other sessions and earlier allocations do not count. The process imports only the runtime it measures
(numpy, PIL and onnxruntime for ONNX variants; torch only for the torch baseline).

What is timed, after ``warmup`` untimed calls, ``iterations`` calls each:

* ``batch_<B>``: the model alone on a float32 ``(B, C, S, S)`` batch at the network's input size;
* ``pipeline``: one uint8 frame of the spec's size (e.g. 256x256) resized to the network's input size,
  normalized, and run at batch 1 — the frames-per-second the spec asks for.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ProbeJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runtime: str
    path: str
    providers: list[str] = ["CPUExecutionProvider"]
    provider_options: list[dict[str, Any]] | None = None
    threads: int = 2
    in_channels: int
    input_size: int
    mean: list[float]
    std: list[float]
    frame_size: int = Field(description="side of the spec's frames the pipeline is timed on")
    batches: list[int] = [1, 32]
    warmup: dict[int, int] = Field(description="batch size -> untimed calls")
    iterations: dict[int, int] = Field(description="batch size -> timed calls")
    pipeline_iterations: int = 50
    seed: int = 0


class LatencyStats(BaseModel):
    """Per-call latency of ``iterations`` timed calls at one batch size."""

    model_config = ConfigDict(extra="forbid")

    batch: int
    warmup: int
    iterations: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    min_ms: float
    throughput_ips: float = Field(description="images/s: batch * iterations / total time")
    throughput_p50_ips: float = Field(description="images/s at the median latency: batch / p50")


class ProbeResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    load_seconds: float
    batches: dict[str, LatencyStats]
    pipeline: LatencyStats
    rss_baseline_mb: float = Field(description="peak RSS after importing the runtime, before loading the model")
    peak_rss_mb: float = Field(description="peak RSS (VmHWM) of the whole benchmark process")
    peak_rss_delta_mb: float = Field(description="peak RSS added by loading and running the model")


def _maxrss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process image. ``ru_maxrss``
    is not used there because it survives ``fork``/``exec``: a child of a big parent would report the
    parent's peak. Elsewhere ``ru_maxrss`` (kilobytes on Linux, bytes on macOS) is the fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _stats(times: list[float], *, batch: int, warmup: int) -> LatencyStats:
    import numpy as np

    t = np.asarray(times, dtype=np.float64)
    p50 = float(np.percentile(t, 50))
    return LatencyStats(
        batch=batch, warmup=warmup, iterations=len(t), mean_ms=float(t.mean() * 1e3), p50_ms=p50 * 1e3,
        p99_ms=float(np.percentile(t, 99) * 1e3), min_ms=float(t.min() * 1e3),
        throughput_ips=float(batch * len(t) / t.sum()), throughput_p50_ips=float(batch / p50),
    )


def run_probe(job: ProbeJob) -> ProbeResult:
    """Measure ``job`` in this process (called in the child; also usable in-process in tests)."""
    import numpy as np

    if job.runtime == "torch":
        import torch  # noqa: F401 - the baseline's runtime belongs to its baseline
    elif job.runtime == "onnxruntime":
        import onnxruntime  # noqa: F401

    from dlforge.optimizer.preprocess import InputFormat, frame_to_input
    from dlforge.optimizer.runners import open_runner

    baseline = _maxrss_mb()
    started = time.perf_counter()
    runner = open_runner(job.runtime, job.path, providers=job.providers, provider_options=job.provider_options,
                         threads=job.threads)
    load_seconds = time.perf_counter() - started
    rng = np.random.default_rng(job.seed)
    batches: dict[str, LatencyStats] = {}
    for b in job.batches:
        x = rng.standard_normal((b, job.in_channels, job.input_size, job.input_size)).astype(np.float32)
        warm = job.warmup.get(b, 1)
        for _ in range(warm):
            runner.run(x)
        times = []
        for _ in range(job.iterations.get(b, 10)):
            t0 = time.perf_counter()
            runner.run(x)
            times.append(time.perf_counter() - t0)
        batches[str(b)] = _stats(times, batch=b, warmup=warm)

    fmt = InputFormat(job.in_channels, job.input_size, tuple(job.mean), tuple(job.std))
    frame = rng.integers(0, 256, (job.frame_size, job.frame_size, job.in_channels), dtype=np.uint8)
    warm = job.warmup.get(1, 1)
    for _ in range(warm):
        runner.run(frame_to_input(frame, fmt))
    times = []
    for _ in range(job.pipeline_iterations):
        t0 = time.perf_counter()
        runner.run(frame_to_input(frame, fmt))
        times.append(time.perf_counter() - t0)
    peak = _maxrss_mb()
    return ProbeResult(
        load_seconds=load_seconds, batches=batches, pipeline=_stats(times, batch=1, warmup=warm),
        rss_baseline_mb=baseline, peak_rss_mb=peak, peak_rss_delta_mb=peak - baseline,
    )


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m dlforge.optimizer.probe JOB.json RESULT.json\n")
        return 2
    job = ProbeJob.model_validate_json(Path(argv[0]).read_text())
    result = run_probe(job)
    Path(argv[1]).write_text(json.dumps(result.model_dump()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
