"""The benchmark child process: load one variant, time it, report its peak memory.

Run as ``python -m dlforge.optimizer.probe JOB.json RESULT.json``, or as a serving probe with
``--serve JOB.json`` that loads the variant once and answers one :class:`Measure` request per line
of stdin (so that the stage can interleave short rounds across variants without reloading). Each
variant is measured in its own fresh process so that its peak resident memory (``ru_maxrss``) is its
own: the parent's torch, other sessions and earlier allocations do not count. The process imports
only the runtime it measures (numpy, PIL and onnxruntime for ONNX variants; torch only for the torch
baseline).

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


class Measure(BaseModel):
    """One measuring request to a serving probe: untimed then timed calls per batch size and for the pipeline."""

    model_config = ConfigDict(extra="forbid")

    warmup: dict[int, int] = Field(description="batch size -> untimed calls")
    iterations: dict[int, int] = Field(description="batch size -> timed calls (batch sizes left out: not timed)")
    pipeline_warmup: int = 1
    pipeline_iterations: int = Field(default=0, description="timed pipeline calls (0: the pipeline is not timed)")


class Measurement(BaseModel):
    """A serving probe's reply to one :class:`Measure`: what it timed, and the process's peak memory so far."""

    model_config = ConfigDict(extra="forbid")

    load_seconds: float
    batches: dict[str, LatencyStats]
    pipeline: LatencyStats | None = Field(description="None when the request timed no pipeline")
    rss_baseline_mb: float
    peak_rss_mb: float


class Probe:
    """One variant loaded in this process, measured on request (:meth:`measure`)."""

    def __init__(self, job: ProbeJob) -> None:
        import numpy as np

        if job.runtime == "torch":
            import torch  # noqa: F401 - the baseline's runtime belongs to its baseline
        elif job.runtime == "onnxruntime":
            import onnxruntime  # noqa: F401

        from dlforge.optimizer.preprocess import InputFormat
        from dlforge.optimizer.runners import open_runner

        self.job = job
        self.rss_baseline_mb = _maxrss_mb()
        started = time.perf_counter()
        self.runner = open_runner(job.runtime, job.path, providers=job.providers,
                                  provider_options=job.provider_options, threads=job.threads)
        self.load_seconds = time.perf_counter() - started
        self.rng = np.random.default_rng(job.seed)
        self.fmt = InputFormat(job.in_channels, job.input_size, tuple(job.mean), tuple(job.std))
        self.frame = self.rng.integers(0, 256, (job.frame_size, job.frame_size, job.in_channels), dtype=np.uint8)
        self._inputs: dict[int, Any] = {}

    def _input(self, b: int) -> Any:
        import numpy as np

        if b not in self._inputs:
            self._inputs[b] = self.rng.standard_normal(
                (b, self.job.in_channels, self.job.input_size, self.job.input_size)).astype(np.float32)
        return self._inputs[b]

    def _time(self, call: Any, *, warmup: int, iterations: int) -> list[float]:
        for _ in range(warmup):
            call()
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return times

    def measure(self, m: Measure) -> Measurement:
        """Time the batch sizes and the pipeline ``m`` asks for; ``pipeline`` is None when it asks for none."""
        from dlforge.optimizer.preprocess import frame_to_input

        batches: dict[str, LatencyStats] = {}
        for b, n in m.iterations.items():
            x = self._input(b)
            warm = m.warmup.get(b, 0)
            batches[str(b)] = _stats(self._time(lambda x=x: self.runner.run(x), warmup=warm, iterations=n),
                                     batch=b, warmup=warm)
        pipeline = None
        if m.pipeline_iterations > 0:
            times = self._time(lambda: self.runner.run(frame_to_input(self.frame, self.fmt)),
                               warmup=m.pipeline_warmup, iterations=m.pipeline_iterations)
            pipeline = _stats(times, batch=1, warmup=m.pipeline_warmup)
        return Measurement(load_seconds=self.load_seconds, batches=batches, pipeline=pipeline,
                           rss_baseline_mb=self.rss_baseline_mb, peak_rss_mb=_maxrss_mb())


def run_probe(job: ProbeJob) -> ProbeResult:
    """Measure ``job`` in this process (called in the child; also usable in-process in tests)."""
    m = Probe(job).measure(Measure(
        warmup=dict(job.warmup), iterations={b: job.iterations.get(b, 10) for b in job.batches},
        pipeline_warmup=job.warmup.get(1, 1), pipeline_iterations=max(1, job.pipeline_iterations)))
    assert m.pipeline is not None
    return ProbeResult(load_seconds=m.load_seconds, batches=m.batches, pipeline=m.pipeline,
                       rss_baseline_mb=m.rss_baseline_mb, peak_rss_mb=m.peak_rss_mb,
                       peak_rss_delta_mb=m.peak_rss_mb - m.rss_baseline_mb)


def serve(job: ProbeJob, requests: Any, replies: Any) -> None:
    """Load ``job`` once, then answer one :class:`Measure` per line of ``requests`` with a result line.

    The first reply line is ``{"ready": true}`` once the model is loaded. A line that is not a valid
    request gets ``{"error": ...}``; end of input ends the process.
    """
    probe = Probe(job)
    replies.write(json.dumps({"ready": True, "load_seconds": probe.load_seconds}) + "\n")
    replies.flush()
    for line in requests:
        if not line.strip():
            continue
        try:
            m = Measure.model_validate_json(line)
        except ValueError as exc:
            replies.write(json.dumps({"error": f"bad request: {exc}"}) + "\n")
        else:
            replies.write(probe.measure(m).model_dump_json() + "\n")
        replies.flush()


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--serve":
        serve(ProbeJob.model_validate_json(Path(argv[1]).read_text()), sys.stdin, sys.stdout)
        return 0
    if len(argv) != 2:
        sys.stderr.write("usage: python -m dlforge.optimizer.probe JOB.json RESULT.json\n"
                         "       python -m dlforge.optimizer.probe --serve JOB.json  (requests on stdin)\n")
        return 2
    job = ProbeJob.model_validate_json(Path(argv[0]).read_text())
    result = run_probe(job)
    Path(argv[1]).write_text(json.dumps(result.model_dump()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
