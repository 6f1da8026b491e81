"""Run the benchmark child (:mod:`dlforge.optimizer.probe`) for each variant and collect its numbers.

:func:`probe` measures one variant in a fresh process. :class:`ProbeWorker` keeps one variant loaded
in its own process so that the stage can interleave short rounds across variants (variant A, B, C,
then A, B, C again): a busy spell of the shared machine slows every variant of that round alike, and
the per-round speed ratios stay comparable. :func:`decide_stop` ends the rounds once every ratio's
spread (:func:`ratio_spread`) is small, or at a cap.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dlforge.common.errors import DlforgeError
from dlforge.optimizer.probe import LatencyStats, Measure, Measurement, ProbeJob, ProbeResult


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


# ----------------------------------------------------------------------------------------------
# Interleaved rounds in serving probes, and when to stop
# ----------------------------------------------------------------------------------------------

# two-sided 95 % quantiles of Student's t with 1..30 degrees of freedom (beyond: the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ratio_spread(ratios: Sequence[float]) -> float:
    """Relative half-width of the 95 % interval of the mean of per-round speed ratios.

    ``t(0.975, n-1) * sd / sqrt(n) / mean`` of the ratios (one per interleaved round): 0.05 means the
    ratio is known to within ±5 % of itself. Unlike the range of the rounds, it shrinks as steady rounds
    are added. Infinite with fewer than two rounds (nothing is known about the spread yet).
    """
    r = np.asarray(ratios, dtype=np.float64)
    n = int(r.size)
    if n < 2:
        return math.inf
    mean = float(r.mean())
    if mean <= 0:
        return math.inf
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return float(t * r.std(ddof=1) / math.sqrt(n) / mean)


class StopRule(BaseModel):
    """When interleaved benchmark rounds stop: every ratio's spread at most ``tolerance``, or ``max_rounds``."""

    model_config = ConfigDict(extra="forbid")

    tolerance: float = Field(default=0.05, gt=0, description="largest ratio_spread accepted")
    min_rounds: int = Field(default=3, ge=1)
    max_rounds: int = Field(default=8, ge=1)


class RatioEstimate(BaseModel):
    """One variant's speed ratio to the reference over the interleaved rounds (reference p50 / variant p50)."""

    model_config = ConfigDict(extra="forbid")

    per_round: list[float]
    median: float | None = Field(description="None without a round")
    spread: float | None = Field(description="relative half-width of the 95 % interval of the mean ratio "
                                             "(ratio_spread); None with fewer than two rounds")

    @property
    def width(self) -> float:
        """The spread, infinite when unknown (fewer than two rounds)."""
        return math.inf if self.spread is None else self.spread


class StopDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stop: bool
    reason: str
    ratios: dict[str, RatioEstimate]


def speed_ratios(p50s: Mapping[str, Sequence[float]], *, reference: str) -> dict[str, RatioEstimate]:
    """Per-round ratios ``reference p50 / variant p50`` of every other variant (rounds paired by index)."""
    ref = p50s[reference]
    out: dict[str, RatioEstimate] = {}
    for name, series in p50s.items():
        if name == reference:
            continue
        per_round = [r / v for r, v in zip(ref, series, strict=False) if v > 0]
        spread = ratio_spread(per_round)
        out[name] = RatioEstimate(per_round=per_round, median=float(np.median(per_round)) if per_round else None,
                                  spread=spread if math.isfinite(spread) else None)
    return out


def decide_stop(p50s: Mapping[str, Sequence[float]], *, reference: str, rule: StopRule) -> StopDecision:
    """Whether to stop after the rounds in ``p50s`` (variant -> batch-1 median latency of each round)."""
    ratios = speed_ratios(p50s, reference=reference)
    rounds = min((len(s) for s in p50s.values()), default=0)
    widest = max(ratios.items(), key=lambda kv: kv[1].width, default=None)
    if rounds >= rule.max_rounds:
        shown = f"; widest spread {widest[0]} ±{widest[1].width * 100:.1f} %" if widest else ""
        return StopDecision(stop=True, reason=f"cap of {rule.max_rounds} rounds reached{shown}", ratios=ratios)
    if rounds < max(rule.min_rounds, 2 if ratios else 1):
        return StopDecision(stop=False, reason=f"{rounds} of at least {rule.min_rounds} rounds", ratios=ratios)
    if widest is None or widest[1].width <= rule.tolerance:
        shown = f" (widest: {widest[0]} ±{widest[1].width * 100:.1f} %)" if widest else ""
        return StopDecision(stop=True, ratios=ratios, reason=(
            f"every speed ratio to {reference} known within ±{rule.tolerance * 100:.1f} % after {rounds} rounds"
            + shown))
    return StopDecision(stop=False, ratios=ratios,
                        reason=f"{widest[0]}'s ratio spread ±{widest[1].width * 100:.1f} % > "
                               f"±{rule.tolerance * 100:.1f} %")


class ProbeWorker:
    """A serving probe (``python -m dlforge.optimizer.probe --serve``): one variant loaded in its own process.

    :meth:`measure` sends one :class:`~dlforge.optimizer.probe.Measure` and waits (at most ``timeout``
    seconds) for its reply. Use as a context manager; :meth:`close` ends the process.
    """

    def __init__(self, job: ProbeJob, *, timeout: float = 900.0) -> None:
        self.job = job
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="dlforge-probe-")
        job_path = Path(self._tmp.name) / "job.json"
        job_path.write_text(job.model_dump_json())
        self._stderr = (Path(self._tmp.name) / "stderr.txt").open("w+")
        env = dict(os.environ)
        env.update({"OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads)})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dlforge.optimizer.probe", "--serve", str(job_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env, bufsize=1)
        ready = self._reply()
        if not ready.get("ready"):
            self.close()
            raise ProbeFailed(f"benchmark of {job.path} did not start: {ready}")

    def _fail(self, what: str) -> ProbeFailed:
        self._stderr.flush()
        self._stderr.seek(0)
        tail = "\n".join(self._stderr.read().strip().splitlines()[-15:])
        code = self.proc.poll()
        self.close()
        return ProbeFailed(f"benchmark of {self.job.path} {what} (exit {code}): {tail}")

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            raise self._fail(f"timed out after {self.timeout:.0f}s")
        line = self.proc.stdout.readline()
        if not line:
            raise self._fail("failed")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def measure(self, request: Measure) -> Measurement:
        """Time what ``request`` asks for in the worker's process."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(request.model_dump_json() + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise self._fail(f"could not be sent a request ({exc})") from exc
        reply = self._reply()
        if "error" in reply:
            raise ProbeFailed(f"benchmark of {self.job.path}: {reply['error']}")
        return Measurement.model_validate(reply)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self._stderr):
            if f is not None:
                f.close()
        self._tmp.cleanup()

    def __enter__(self) -> ProbeWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def combine(measurements: Sequence[Measurement]) -> ProbeResult:
    """Several rounds of one variant -> per batch size (and the pipeline) the round with the lowest median.

    As :func:`best_of`, figure by figure: a round measures some of them only (the large batch once),
    and on a shared machine other processes only slow a round down. Memory is the highest peak seen.
    """
    if not measurements:
        raise ValueError("no benchmark rounds")
    batches: dict[str, LatencyStats] = {}
    for m in measurements:
        for b, st in m.batches.items():
            if b not in batches or st.p50_ms < batches[b].p50_ms:
                batches[b] = st
    pipes = [m.pipeline for m in measurements if m.pipeline is not None]
    if not pipes:
        raise ValueError("no round timed the pipeline")
    last = measurements[-1]
    peak = max(m.peak_rss_mb for m in measurements)
    return ProbeResult(load_seconds=last.load_seconds, batches=dict(sorted(batches.items(), key=lambda kv: int(kv[0]))),
                       pipeline=min(pipes, key=lambda p: p.p50_ms), rss_baseline_mb=last.rss_baseline_mb,
                       peak_rss_mb=peak, peak_rss_delta_mb=peak - last.rss_baseline_mb)
