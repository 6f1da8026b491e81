"""The proposer's pure logic: sample the target, score every candidate, normalize, weight, rank, explain.

Normalization (per proposal, per sub-score, across the candidates that have it):

- ``higher``: n = (x − min) / R; ``lower``: n = (max − x) / R; ``higher_log``: as ``higher`` on
  ln x (throughputs differ by orders of magnitude); with R = max(max − min, min_range).
  So 0 is the worst candidate on that sub-score, and the best gets 1 when the spread is at least
  the sub-score's ``min_range`` (the difference that counts as decisive: 0.1 of balanced accuracy,
  LogME or ∫L dt / ln K; 0.2 of domain similarity; a factor 4 of throughput) and proportionally less
  when the candidates are closer — differences within the noise of a small sample stay small.
- If every candidate has the same value (a spread of 0, or a single candidate), the sub-score
  carries no information and is left out of every total (reported under ``ties``).

Total of a candidate: Σ_s w_s n_s / Σ_s w_s over the weighted, non-tied sub-scores it has — a
weighted mean in [0, 1]; a sub-score a candidate lacks (e.g. ``domain_sim`` for ImageNet, which has
no source samples here) neither helps nor hurts it. Equal totals rank by ``model_id``, so the order
(and the choice) never depends on the order the candidates were measured or listed in: two candidates
of one architecture share one speed measurement and tie exactly on a speed-only re-ranking.

Gate: a candidate whose batch-1 throughput at ``spec.input_size`` times ``gate_speedup`` is below
``spec.min_fps`` fails the gate and ranks after every candidate that passes (its total is kept).
If none passes, the best total is chosen and the explanation says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from dlforge.common.blas import small_blas
from dlforge.common.errors import InvalidInput
from dlforge.common.events import CandidateScore, Spec
from dlforge.proposer.scoring import Candidate, CohortScorer, Direction, Scorer, SubScore, TargetSample, sub_score_specs
from dlforge.vision.manifest import Item, Manifest

# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


class CandidateResult(BaseModel):
    """One candidate's measurements, normalized sub-scores and total."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    arch: str
    source_dataset: str
    weights_key: str
    raw: dict[str, float]
    normalized: dict[str, float]
    contributions: dict[str, float]
    total: float
    gate_passed: bool
    seconds: dict[str, float]
    errors: dict[str, str] = {}

    def candidate_score(self) -> CandidateScore:
        scores: dict[str, float] = dict(self.raw)
        scores.update({f"{k}_norm": v for k, v in self.normalized.items()})
        scores["gate_passed"] = 1.0 if self.gate_passed else 0.0
        return CandidateScore(model_id=self.model_id, arch=self.arch, source_dataset=self.source_dataset,
                              weights_key=self.weights_key, scores=scores, total=self.total)


class Ranking(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidates: list[CandidateResult]
    weights: dict[str, float]
    ties: list[str]
    chosen_model_id: str
    explanation: str


# --------------------------------------------------------------------------------------------
# Weights, normalization, totals
# --------------------------------------------------------------------------------------------


def check_weights(weights: Mapping[str, float], specs: Mapping[str, SubScore]) -> dict[str, float]:
    """Weights restricted to weighted sub-scores; InvalidInput for unknown names or negative values."""
    unknown = sorted(set(weights) - {n for n, s in specs.items() if s.weighted})
    if unknown:
        known = ", ".join(n for n, s in specs.items() if s.weighted)
        raise InvalidInput(f"unknown sub-score weight(s) {', '.join(unknown)}; weighted sub-scores: {known}")
    bad = sorted(k for k, w in weights.items() if not (w >= 0 and math.isfinite(w)))
    if bad:
        raise InvalidInput(f"weights must be finite and >= 0: {', '.join(bad)}")
    if not any(w > 0 for w in weights.values()):
        raise InvalidInput("at least one weight must be > 0")
    return {k: float(w) for k, w in weights.items()}


def normalize(
    raw: Mapping[str, Mapping[str, float]], specs: Mapping[str, SubScore]
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per candidate, every sub-score mapped into [0, 1] (1 = best); and the sub-scores that tied."""
    normalized: dict[str, dict[str, float]] = {cid: {} for cid in raw}
    ties: list[str] = []
    for name, spec in specs.items():
        values = {cid: float(r[name]) for cid, r in raw.items() if name in r and math.isfinite(float(r[name]))}
        if not values:
            continue
        if spec.direction is Direction.HIGHER_LOG:
            scaled = {cid: math.log(max(v, 1e-12)) for cid, v in values.items()}
        else:
            scaled = dict(values)
        lo, hi = min(scaled.values()), max(scaled.values())
        if hi - lo <= 1e-12:
            ties.append(name)
            continue
        spread = max(hi - lo, spec.min_range)
        for cid, v in scaled.items():
            n = (hi - v) / spread if spec.direction is Direction.LOWER else (v - lo) / spread
            normalized[cid][name] = float(min(1.0, max(0.0, n)))
    return normalized, ties


def totals(
    normalized: Mapping[str, Mapping[str, float]], weights: Mapping[str, float]
) -> dict[str, tuple[float, dict[str, float]]]:
    """Weighted mean of each candidate's normalized sub-scores, and each sub-score's share of it."""
    out: dict[str, tuple[float, dict[str, float]]] = {}
    for cid, subs in normalized.items():
        used = {k: v for k, v in subs.items() if weights.get(k, 0.0) > 0}
        wsum = sum(weights[k] for k in used)
        contrib = {k: weights[k] * v / wsum for k, v in used.items()} if wsum > 0 else {}
        out[cid] = (float(sum(contrib.values())), contrib)
    return out


def gate(fps_at_spec: float | None, spec: Spec, *, speedup: float = 1.0) -> bool:
    """Whether a candidate meets ``spec.min_fps`` (unmeasurable or no requirement: passes)."""
    if spec.min_fps <= 0 or fps_at_spec is None:
        return True
    return fps_at_spec * speedup >= spec.min_fps


def rank(
    measured: Sequence[dict[str, Any]],
    specs: Mapping[str, SubScore],
    weights: Mapping[str, float],
    spec: Spec,
    *,
    gate_speedup: float = 1.0,
) -> Ranking:
    """Rank candidates from their raw sub-scores.

    ``measured``: per candidate ``model_id``, ``arch``, ``source_dataset``, ``weights_key``, ``raw``
    (name -> value), ``seconds`` (scorer -> s) and optionally ``errors``.
    """
    if not measured:
        raise InvalidInput("no candidates to rank")
    w = check_weights(weights, specs)
    weighted_specs = {n: s for n, s in specs.items() if s.weighted}
    raw = {m["model_id"]: m["raw"] for m in measured}
    normalized, ties = normalize(raw, weighted_specs)
    tot = totals(normalized, w)
    results = []
    for m in measured:
        total, contrib = tot[m["model_id"]]
        results.append(CandidateResult(
            model_id=m["model_id"], arch=m["arch"], source_dataset=m["source_dataset"], weights_key=m["weights_key"],
            raw=dict(m["raw"]), normalized=normalized[m["model_id"]], contributions=contrib, total=total,
            gate_passed=gate(m["raw"].get("fps_spec_b1"), spec, speedup=gate_speedup),
            seconds=dict(m.get("seconds", {})), errors=dict(m.get("errors", {})),
        ))
    results.sort(key=lambda r: (not r.gate_passed, -r.total, r.model_id))
    return Ranking(candidates=results, weights=w, ties=ties, chosen_model_id=results[0].model_id,
                   explanation=explain(results, spec, ties=ties, gate_speedup=gate_speedup))


def explain(results: Sequence[CandidateResult], spec: Spec, *, ties: Sequence[str], gate_speedup: float) -> str:
    """Why the first candidate won: its total, and the sub-scores that made the difference."""
    best = results[0]
    parts = [f"{best.model_id} ({best.arch}, trained on {best.source_dataset}) ranks first with total {best.total:.3f}"]
    if spec.min_fps > 0:
        passed = [r.model_id for r in results if r.gate_passed]
        if not passed:
            parts.append(f"no candidate reaches min_fps {spec.min_fps:g} at {spec.input_size}px "
                         f"(x{gate_speedup:g} expected speed-up), so the best total is proposed anyway")
        elif len(passed) < len(results):
            failed = ", ".join(r.model_id for r in results if not r.gate_passed)
            parts.append(f"{failed} failed the min_fps {spec.min_fps:g} gate at {spec.input_size}px")
    if len(results) == 1:
        parts.append("it is the only candidate")
    else:
        runner = results[1]
        keys = set(best.contributions) | set(runner.contributions)
        diffs = sorted(((best.contributions.get(k, 0.0) - runner.contributions.get(k, 0.0), k) for k in keys),
                       reverse=True)
        ahead = [f"{k} (+{d:.3f})" for d, k in diffs if d > 1e-4][:3]
        behind = [f"{k} ({d:.3f})" for d, k in sorted(diffs) if d < -1e-4][:2]
        text = f"ahead of {runner.model_id} ({runner.total:.3f})"
        if ahead:
            text += " thanks to " + ", ".join(ahead)
        if behind:
            text += "; behind it on " + ", ".join(behind)
        parts.append(text)
    if ties:
        parts.append("tied (left out of the totals): " + ", ".join(ties))
    return "; ".join(parts) + "."


# --------------------------------------------------------------------------------------------
# Target sample
# --------------------------------------------------------------------------------------------


def _stratified(items: list[Item], labels: np.ndarray, limit: int, rng: np.random.Generator) -> list[int]:
    """Indices of at most ``limit`` items, each class kept in proportion (at least one of each)."""
    if len(items) <= limit:
        return list(range(len(items)))
    chosen: list[int] = []
    classes = np.unique(labels)
    for c in classes:
        idx = np.flatnonzero(labels == c)
        take = max(1, round(limit * len(idx) / len(items)))
        chosen.extend(rng.choice(idx, min(take, len(idx)), replace=False).tolist())
    rng.shuffle(chosen)
    return sorted(chosen[:limit])


def sample_target_items(
    manifest: Manifest, *, train_limit: int, val_limit: int, seed: int = 0
) -> tuple[list[Item], list[Item]]:
    """Stratified train and val samples of the training manifest (val carved from train if absent)."""
    known = set(manifest.classes)
    train = [i for i in manifest.by_split("train") if i.label in known]
    val = [i for i in manifest.by_split("val") if i.label in known and i.label_source != "generated"]
    rng = np.random.default_rng(seed)
    if len({i.label for i in train}) < 2:
        raise InvalidInput(
            f"manifest {manifest.dataset_id}: the train split needs labeled items of at least two classes "
            f"(found {sorted({str(i.label) for i in train})})"
        )
    if not val:
        # No val split: hold out a stratified quarter of the real train items.
        real = [i for i in train if i.label_source != "generated"] or train
        labels = manifest.label_indices(real)
        val_idx = set(_stratified(real, labels, max(len(real) // 4, 1), rng))
        val = [real[k] for k in sorted(val_idx)]
        held = {i.item_id for i in val}
        train = [i for i in train if i.item_id not in held]
    t_idx = _stratified(train, manifest.label_indices(train), train_limit, rng)
    v_idx = _stratified(val, manifest.label_indices(val), val_limit, rng)
    return [train[k] for k in t_idx], [val[k] for k in v_idx]


def target_from_arrays(
    classes: list[str],
    *,
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    train_contents: Sequence[str] | None = None,
    val_contents: Sequence[str] | None = None,
) -> TargetSample:
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise InvalidInput("target images and labels differ in count")
    if (train_contents is not None and len(train_contents) != len(train_x)) or \
            (val_contents is not None and len(val_contents) != len(val_x)):
        raise InvalidInput("target images and content hashes differ in count")
    return TargetSample(classes=list(classes), train_x=train_x, train_y=np.asarray(train_y, dtype=np.int64),
                        val_x=val_x, val_y=np.asarray(val_y, dtype=np.int64),
                        train_contents=None if train_contents is None else list(train_contents),
                        val_contents=None if val_contents is None else list(val_contents))


# --------------------------------------------------------------------------------------------
# The proposal
# --------------------------------------------------------------------------------------------


def active_scorers(scorers: Sequence[Scorer], weights: Mapping[str, float]) -> list[Scorer]:
    """The scorers whose output matters: some weighted sub-score > 0, or the speed measurement (the spec's
    min_fps gate reads it, and the report shows every candidate's speed even when no weight asks for it).
    A scorer whose sub-scores all weigh 0 (e.g. NCTI by default) is not run."""
    out = []
    for scorer in scorers:
        names = {s.name for s in scorer.sub_scores}
        if any(weights.get(n, 0.0) > 0 for n in names) or "fps_spec_b1" in names:
            out.append(scorer)
    return out


@small_blas
def measure(candidates: Sequence[Candidate], target: TargetSample, scorers: Sequence[Scorer]) -> list[dict[str, Any]]:
    """Run every scorer on every candidate; raw sub-scores and seconds per scorer (``encode``: shared pass).

    A :class:`~dlforge.proposer.scoring.CohortScorer` first prepares on all candidates; its time is
    shared evenly among them. NumPy's BLAS runs on one thread meanwhile (:mod:`dlforge.common.blas`).
    """
    encode_seconds: dict[str, float] = {}
    for cand in candidates:  # the shared pass first, so that its time is not counted as a scorer's
        t0 = time.perf_counter()
        cand.encode("train", target.train_x, contents=target.train_contents)
        cand.encode("val", target.val_x, contents=target.val_contents)
        encode_seconds[cand.model_id] = time.perf_counter() - t0
    prepared: dict[str, float] = {}
    prepare_errors: dict[str, str] = {}
    for scorer in scorers:
        if isinstance(scorer, CohortScorer):  # compares candidates: sees all of them first
            t0 = time.perf_counter()
            try:
                scorer.prepare(candidates, target)
            except (ValueError, RuntimeError, np.linalg.LinAlgError) as exc:
                prepare_errors[scorer.name] = f"{type(exc).__name__}: {exc}"
            prepared[scorer.name] = (time.perf_counter() - t0) / max(len(candidates), 1)
    out = []
    for cand in candidates:
        raw: dict[str, float] = {}
        seconds: dict[str, float] = {}
        errors: dict[str, str] = {}
        seconds["encode"] = encode_seconds[cand.model_id]
        for scorer in scorers:
            if scorer.name in prepare_errors:
                errors[scorer.name] = prepare_errors[scorer.name]
                continue
            t0 = time.perf_counter()
            try:
                values = scorer.score(cand, target)
            except (ValueError, RuntimeError, np.linalg.LinAlgError) as exc:
                # One scorer failing on one candidate leaves that sub-score absent, recorded here.
                errors[scorer.name] = f"{type(exc).__name__}: {exc}"
                values = {}
            seconds[scorer.name] = time.perf_counter() - t0 + prepared.get(scorer.name, 0.0)
            raw.update({k: float(v) for k, v in values.items()})
        out.append({"model_id": cand.model_id, "arch": cand.arch, "source_dataset": cand.source_dataset,
                     "weights_key": cand.weights_key, "raw": raw, "seconds": seconds, "errors": errors})
    return out


def propose(
    candidates: Sequence[Candidate],
    target: TargetSample,
    scorers: Sequence[Scorer],
    *,
    weights: Mapping[str, float],
    spec: Spec,
    gate_speedup: float = 1.0,
) -> Ranking:
    """Score every candidate on ``target`` and rank them (see the module doc for the math)."""
    if not candidates:
        raise InvalidInput("the model repository has no candidates")
    specs = sub_score_specs(list(scorers))
    w = check_weights(weights, specs)
    measured = measure(candidates, target, active_scorers(scorers, w))
    return rank(measured, specs, w, spec, gate_speedup=gate_speedup)
