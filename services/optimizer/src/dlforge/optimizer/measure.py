"""Run the benchmark child (:mod:`dlforge.optimizer.probe`) for each variant and collect its numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dlforge.common.errors import DlforgeError
from dlforge.optimizer.probe import ProbeJob, ProbeResult


class ProbeFailed(DlforgeError):
    """The benchmark child process failed or timed out."""


def probe(job: ProbeJob, *, timeout: float = 900.0) -> ProbeResult:
    """Measure ``job`` in a fresh Python process (so its peak RSS is its own) and return the result."""
    with tempfile.TemporaryDirectory(prefix="dlforge-probe-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(job.model_dump_json())
        env = dict(os.environ)
        # One runtime thread pool of ``threads`` threads and nothing else competing inside the child.
        env.update({"OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads)})
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "dlforge.optimizer.probe", str(job_path), str(result_path)],
                capture_output=True, text=True, timeout=timeout, env=env, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ProbeFailed(f"benchmark of {job.path} timed out after {timeout:.0f}s") from exc
        if proc.returncode != 0 or not result_path.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise ProbeFailed(f"benchmark of {job.path} failed (exit {proc.returncode}): {tail}")
        return ProbeResult.model_validate(json.loads(result_path.read_text()))


def best_of(results: list[ProbeResult]) -> ProbeResult:
    """Several rounds of one variant -> the round with the lowest batch-1 median latency.

    On a shared machine other processes only ever slow a round down, so the fastest round is the
    closest to the variant's own speed; memory is the highest peak seen in any round.
    """
    if not results:
        raise ValueError("no benchmark rounds")
    best = min(results, key=lambda r: r.batches[min(r.batches, key=int)].p50_ms if r.batches else r.pipeline.p50_ms)
    peak = max(results, key=lambda r: r.peak_rss_mb)
    return best.model_copy(update={"peak_rss_mb": peak.peak_rss_mb, "peak_rss_delta_mb": peak.peak_rss_delta_mb,
                                   "rss_baseline_mb": peak.rss_baseline_mb})
