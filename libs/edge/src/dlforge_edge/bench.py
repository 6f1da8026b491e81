"""How fast a bundle's pipeline runs here, measured as the platform measures the spec's FPS.

One call is the deployed pipeline on a ``size x size`` uint8 frame at batch 1: PIL bilinear resize to
the network's input, normalization and inference (decoding excluded). FPS is calls per second over
the timed calls; p50/p99 are per-call latencies; peak memory is the process's maximum resident set.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from dlforge_edge.model import EdgeModel


@dataclass(frozen=True)
class BenchResult:
    frame_size: int
    input_size: int
    iterations: int
    threads: int
    fps: float
    latency_p50_ms: float
    latency_p99_ms: float
    peak_rss_mb: float | None
    spec_min_fps: float | None
    spec_fps_met: bool | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mb() -> float | None:
    """The process's peak resident set in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def bench(model: EdgeModel, *, size: int, iterations: int = 100, warmup: int = 10, threads: int = 0,
          seed: int = 0) -> BenchResult:
    """Time ``iterations`` pipeline calls on one random ``size x size`` frame after ``warmup`` untimed ones."""
    if size < 8 or iterations < 2 or warmup < 0:
        raise ValueError(f"size must be >= 8 and iterations >= 2 (got size {size}, iterations {iterations})")
    channels = model.bundle.preprocessing.channels
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    frame = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    for _ in range(warmup):
        model.probabilities([frame])
    times = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        model.probabilities([frame])
        times[i] = time.perf_counter() - start
    min_fps = model.bundle.spec.get("min_fps")
    min_fps = float(min_fps) if isinstance(min_fps, int | float) else None
    fps = float(iterations / times.sum())
    return BenchResult(
        frame_size=size, input_size=model.bundle.preprocessing.input_size, iterations=iterations, threads=threads,
        fps=fps, latency_p50_ms=float(np.percentile(times, 50) * 1e3),
        latency_p99_ms=float(np.percentile(times, 99) * 1e3), peak_rss_mb=peak_rss_mb(), spec_min_fps=min_fps,
        spec_fps_met=(fps >= min_fps) if min_fps is not None else None)
