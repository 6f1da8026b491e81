"""Proposer ground-truth harness: how well do the proposer's scores rank the candidates the way
fine-tuning them does, and at what fraction of its cost?

For every repository candidate (the cells of ``--set``, built into ``--store`` first if missing) and
every target (ELPV defects and four others available here: ELPV cell type mono/poly, Fashion-MNIST,
MNIST, scikit-learn digits — each a seeded, class-stratified train/val/test sample of the source's
*test* split, so no image a repository cell trained on is a target image):

1. every scorer of :func:`dlforge.proposer.scoring.default_scorers` runs as in a proposal
   (:func:`dlforge.proposer.handlers.measure`) on the train/val sample, also those a proposal skips at
   the default weights (NCTI); their wall time is the proposal's cost (so an upper bound of it);
2. the ground truth: each candidate is fine-tuned on the train sample and its balanced accuracy on
   the held-out test sample measured, under two protocols that differ only in BatchNorm:

   - ``bn_frozen``: the trained units' BatchNorm layers stay in eval mode (the source's running
     statistics; their affine parameters still train);
   - ``bn_adapt``: they run in train mode (batch statistics, running statistics re-estimated on
     the target); everything else (dropout, drop-connect in train mode) is the same;

   both train the last ``--unfreeze`` backbone units and a new linear head (AdamW, lr ``--lr``,
   ``--epochs`` epochs, batch 32) on the frozen prefix's activations, for each of ``--seeds``
   (head/tail initialization and batch order); the truth is the mean over seeds. Results are cached
   in ``--cache`` keyed by everything that decides them;
3. per protocol: Kendall τ and weighted τ (``scipy.stats.weightedtau``, hyperbolic weights: the top
   of the truth ranking counts most, as in the LogME/SFDA papers) of every sub-score, of the
   hand-set default total, and of a learned combination — non-negative least squares of the
   per-target z-scored truth on the per-target z-scored sub-scores (higher = better; missing = 0),
   fitted on the other targets and scored on the held-out one (leave-one-target-out); a rank
   aggregation validated the same way (``rank_loto``: the equal-weight mean of the candidates' ranks
   under the at most 4 sub-scores that, on the other targets, rank like the truth best under the worse
   protocol; chosen again per held-out target) — both combine only sub-scores a proposal can weight,
   not the reported-only ones (NCTI's terms, ``dissimilarity``); the top-1
   regret (accuracy points lost by taking the combination's first choice) and the cost ratio
   (scorer seconds / fine-tuning seconds of one protocol and one seed for every candidate).

Writes ``benchmarks/results/proposer.json`` with ``weighted_tau`` (per protocol), ``top1_regret``,
``cost_ratio`` and every per-target number.

    nice -n 19 python benchmarks/proposer.py --store /tmp/propbench [--set extended] [--train 300 --val 100
        --test 200 --size 64 --seeds 0 1 2 --epochs 8 --unfreeze 2] [--targets elpv elpv_type ...]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dlforge.common.events import Spec
from dlforge.common.runtime import Backends
from dlforge.common.settings import load_settings
from dlforge.proposer.backbone import staged_of
from dlforge.proposer.handlers import measure, rank, target_from_arrays
from dlforge.proposer.repository import RECIPE_SETS, build_repository, default_sources, list_models, load_entry
from dlforge.proposer.scoring import Candidate, Direction, balanced_accuracy, default_scorers, sub_score_specs
from dlforge.proposer.settings import DEFAULT_WEIGHTS, ProposerSettings
from dlforge.proposer.sources import SourceData, load_digits, load_fashion_mnist, load_mnist
from dlforge.vision.images import to_tensor

RESULTS = Path(__file__).resolve().parent / "results" / "proposer.json"
PROTOCOLS = ("bn_frozen", "bn_adapt")
NOT_RANKED = {"fps_b1", "fps_b32", "fps_spec_b1"}  # speed is a constraint, not a predictor of accuracy


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    classes: list[str]
    x: dict[str, np.ndarray]  # split -> uint8 N x S x S x C
    y: dict[str, np.ndarray]


def _stratified_splits(labels: np.ndarray, counts: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Disjoint class-stratified index sets of (at most) the requested sizes."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    out: dict[str, np.ndarray] = {}
    for split, n in counts.items():
        share = {c: len(pools[c]) for c in classes}
        total = sum(share.values())
        take: list[int] = []
        for c in classes:
            k = min(len(pools[c]), max(1, round(n * share[c] / max(total, 1))))
            take += pools[c][:k]
            pools[c] = pools[c][k:]
        out[split] = np.asarray(rng.permutation(take), dtype=np.int64)
    return out


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    out = []
    for img in images:
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        out.append(np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR)))
    arr = np.stack(out)
    return arr[..., None] if arr.ndim == 3 else arr


def from_source(name: str, data: SourceData, counts: dict[str, int], *, size: int, seed: int) -> Target:
    idx = _stratified_splits(data.test_y, counts, seed)
    return Target(name, list(data.classes), {s: _resize(data.test_x[i], size) for s, i in idx.items()},
                  {s: data.test_y[i] for s, i in idx.items()})


def elpv_target(name: str, label: Callable[[Any], int], classes: list[str], counts: dict[str, int], *,
                size: int, seed: int) -> Target:
    from PIL import Image

    from dlforge.labeler.demo_data import elpv_cells, elpv_root

    cells, root = elpv_cells(), elpv_root()
    labels = np.array([label(c) for c in cells], dtype=np.int64)
    idx = _stratified_splits(labels, counts, seed)

    def load(rows: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(Image.open(root / cells[int(r)].name).convert("L")
                                    .resize((size, size), Image.Resampling.BILINEAR)) for r in rows])[..., None]

    return Target(name, classes, {s: load(i) for s, i in idx.items()}, {s: labels[i] for s, i in idx.items()})


def load_targets(names: list[str], counts: dict[str, int], *, size: int, settings: ProposerSettings) -> list[Target]:
    makers: dict[str, Callable[[], Target]] = {
        "elpv": lambda: elpv_target("elpv", lambda c: int(c.probability >= 0.5), ["good", "defect"], counts,
                                    size=size, seed=0),
        "elpv_type": lambda: elpv_target("elpv_type", lambda c: int(c.kind == "poly"), ["mono", "poly"], counts,
                                         size=size, seed=0),
        "fashion_mnist": lambda: from_source("fashion_mnist", load_fashion_mnist(settings.proposer_fashion_mnist_dir),
                                             counts, size=size, seed=0),
        "mnist": lambda: from_source("mnist", load_mnist(settings.proposer_mnist_path), counts, size=size, seed=0),
        "digits": lambda: from_source("digits", load_digits(), counts, size=size, seed=0),
    }
    unknown = sorted(set(names) - set(makers))
    if unknown:
        raise SystemExit(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(makers)}")
    return [makers[n]() for n in names]


# --------------------------------------------------------------------------------------------
# Ground truth: fine-tuning under a protocol
# --------------------------------------------------------------------------------------------


def prefix_activations(model: nn.Module, images: np.ndarray, *, size: int, unfreeze: int,
                       spec: Any) -> tuple[torch.Tensor, nn.Module]:
    """The frozen prefix's activations of ``images`` and a copy of the trainable tail."""
    staged = staged_of(model)  # type: ignore[arg-type]
    b = staged.boundary(min(unfreeze, len(staged)))
    prefix = staged.prefix(b).eval()
    acts = []
    with torch.inference_mode():
        for i in range(0, len(images), 64):
            acts.append(prefix(to_tensor(images[i:i + 64], spec)).clone())
    return torch.cat(acts), copy.deepcopy(staged.tail(b))


def finetune(tail: nn.Module, train: torch.Tensor, train_y: np.ndarray, test: torch.Tensor, test_y: np.ndarray, *,
             num_classes: int, feature_dim: int, protocol: str, seed: int, epochs: int, lr: float) -> float:
    """Train ``tail`` (a copy) and a new head under ``protocol``; balanced accuracy on ``test``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tail = copy.deepcopy(tail)
    for p in tail.parameters():
        p.requires_grad_(True)
    head = nn.Linear(feature_dim, num_classes)
    opt = torch.optim.AdamW([*tail.parameters(), *head.parameters()], lr=lr, weight_decay=1e-4)
    y = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    n = len(y)
    for _ in range(epochs):
        tail.train()  # dropout / drop-connect as in training; only BatchNorm differs between the protocols
        if protocol == "bn_frozen":
            for m in tail.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, 32):
            idx = order[s:s + 32]
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(head(tail(train[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    tail.eval()
    with torch.inference_mode():
        pred = torch.cat([head(tail(test[i:i + 128])).argmax(1) for i in range(0, len(test), 128)]).numpy()
    return balanced_accuracy(np.asarray(test_y), pred, num_classes)


# --------------------------------------------------------------------------------------------
# Rank agreement and the learned combination
# --------------------------------------------------------------------------------------------


def taus(truth: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """Kendall τ and weighted τ (hyperbolic, top of the truth ranking weighted most) of ``score`` vs ``truth``."""
    from scipy.stats import kendalltau, weightedtau

    ok = np.isfinite(score)
    if ok.sum() < 3 or np.ptp(score[ok]) == 0:
        return float("nan"), float("nan")
    k = float(kendalltau(truth[ok], score[ok]).statistic)
    w = float(weightedtau(truth[ok], score[ok]).statistic)
    return k, w


def zscore(v: np.ndarray) -> np.ndarray:
    ok = np.isfinite(v)
    out = np.zeros_like(v, dtype=np.float64)
    if ok.sum() >= 2 and np.std(v[ok]) > 0:
        out[ok] = (v[ok] - v[ok].mean()) / v[ok].std()
    return out


def fit_weights(features: list[np.ndarray], truths: list[np.ndarray]) -> np.ndarray:
    """Non-negative least squares of stacked z-scored truth on stacked z-scored sub-scores."""
    from scipy.optimize import nnls

    x = np.concatenate([np.column_stack([zscore(f[:, j]) for j in range(f.shape[1])]) for f in features])
    y = np.concatenate([zscore(t) for t in truths])
    w, _ = nnls(x, y)
    return np.asarray(w)


def combined(features: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.column_stack([zscore(features[:, j]) for j in range(features.shape[1])]) @ w


def rank_mean(features: np.ndarray, cols: tuple[int, ...]) -> np.ndarray:
    """Equal-weight mean of the chosen sub-scores' ranks among the candidates, from 0 (tied values share their
    average rank; a missing value ranks last)."""
    from scipy.stats import rankdata

    ranks = [rankdata(np.where(np.isfinite(features[:, j]), features[:, j], -np.inf), method="average") - 1.0
             for j in cols]
    return np.mean(ranks, axis=0)


def choose_subset(features: list[np.ndarray], truths: dict[str, list[np.ndarray]], *, max_size: int = 4
                  ) -> tuple[int, ...]:
    """The set of at most ``max_size`` sub-scores whose rank mean ranks like the truth best on these targets:
    the highest mean weighted τ under the worse of the protocols (ties: the smaller set, then the order)."""
    from itertools import combinations

    n = features[0].shape[1]
    best: tuple[float, tuple[int, ...]] = (-math.inf, ())
    for size in range(1, max_size + 1):
        for cols in combinations(range(n), size):
            means = [np.nanmean([taus(t, rank_mean(f, cols))[1] for f, t in zip(features, ts, strict=True)])
                     for ts in truths.values()]
            worst = min(float(m) if np.isfinite(m) else -math.inf for m in means)  # no τ at all: never chosen
            if worst > best[0] + 1e-12:
                best = (worst, cols)
    return best[1]


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


async def open_repository(set_name: str, settings: ProposerSettings, *, build: bool = True, threads: int = 1
                          ) -> tuple[Backends, list[dict[str, Any]], list[Any], float]:
    """The started backends of ``settings``, the records of the set's cells (the missing ones built first unless
    ``build`` is off, ``threads`` torch threads each), what the build did, and its seconds."""
    backends = Backends.from_settings(settings)
    await backends.start()
    t0 = time.perf_counter()
    built = [] if not build else await build_repository(
        backends.objects, backends.docs, recipes=RECIPE_SETS[set_name], work_dir=Path(settings.work_dir) / "proposer",
        sources=default_sources(fashion_mnist_dir=settings.proposer_fashion_mnist_dir,
                                mnist_path=settings.proposer_mnist_path), threads=threads)
    wanted = {r.model_id for r in RECIPE_SETS[set_name]}
    records = [r for r in await list_models(backends.docs) if r["model_id"] in wanted]
    return backends, records, built, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    store = args.store
    settings = load_settings(ProposerSettings, bus="memory://", objects=f"file://{store}/objects",
                             docs=f"sqlite:///{store}/docs.db", work_dir=str(store / "work"),
                             proposer_build_on_start=False)

    async def get() -> tuple[list[dict[str, Any]], list[Any], float, dict[str, Any]]:
        backends, records, built, secs = await open_repository(args.set, settings, build=not args.no_build)
        models = {}
        try:
            for rec in records:
                models[rec["model_id"]] = await asyncio.to_thread(load_entry, backends.objects, rec,
                                                                  work_dir=store / "work")
        finally:
            await backends.stop()
        return records, built, secs, models

    records, built, build_seconds, models = asyncio.run(get())
    failed = [b for b in built if b.action == "failed"]
    for b in failed:
        print(f"not built: {b.model_id}: {b.error}", file=sys.stderr)
    if len(records) < 3:
        raise SystemExit(f"only {len(records)} candidates in the repository: need at least 3")
    counts = {"train": args.train, "val": args.val, "test": args.test}
    targets = load_targets(args.targets, counts, size=args.size, settings=settings)
    cache: dict[str, float] = json.loads(args.cache.read_text()) if args.cache.is_file() else {}
    scorers_factory = lambda: default_scorers(steps=args.steps, speed_seconds=0.2, seed=0)  # noqa: E731
    specs = sub_score_specs(scorers_factory())
    names = [n for n in specs if n not in NOT_RANKED]
    per_target: list[dict[str, Any]] = []
    for target in targets:
        ts = target_from_arrays(target.classes, train_x=target.x["train"], train_y=target.y["train"],
                                val_x=target.x["val"], val_y=target.y["val"])
        candidates = [Candidate.from_model(models[r["model_id"]][0], model_id=r["model_id"], arch=r["arch"],
                                           source_dataset=r["source_dataset"], weights_key=r["weights_key"],
                                           input_size=args.size, unfreeze_last=1,
                                           source_sample=models[r["model_id"]][1]) for r in records]
        t0 = time.perf_counter()
        measured = measure(candidates, ts, scorers_factory())
        propose_seconds = time.perf_counter() - t0
        default_rank = rank(measured, specs, {k: v for k, v in DEFAULT_WEIGHTS.items() if v > 0}, Spec())
        default_total = {c.model_id: c.total for c in default_rank.candidates}
        truth: dict[str, dict[str, float]] = {p: {} for p in PROTOCOLS}
        finetune_seconds = 0.0
        for rec, cand in zip(records, candidates, strict=True):
            key_base = dict(target=target.name, model=rec["model_id"], recipe=rec["recipe_hash"], size=args.size,
                            train=args.train, test=args.test, epochs=args.epochs, unfreeze=args.unfreeze, lr=args.lr)
            acts = None
            for protocol in PROTOCOLS:
                accs = []
                for seed in args.seeds:
                    key = cache_key(**key_base, protocol=protocol, seed=seed)
                    if key not in cache or (protocol == PROTOCOLS[0] and seed == args.seeds[0]
                                            and f"{key}:seconds" not in cache):
                        t1 = time.perf_counter()
                        if acts is None:
                            tr, tail = prefix_activations(cand.model, target.x["train"], size=args.size,
                                                          unfreeze=args.unfreeze, spec=cand.spec)
                            te, _ = prefix_activations(cand.model, target.x["test"], size=args.size,
                                                       unfreeze=args.unfreeze, spec=cand.spec)
                            acts = (tr, te, tail)
                        tr, te, tail = acts
                        cache[key] = finetune(tail, tr, target.y["train"], te, target.y["test"],
                                              num_classes=len(target.classes), feature_dim=cand.spec.feature_dim,
                                              protocol=protocol, seed=seed, epochs=args.epochs, lr=args.lr)
                        if protocol == PROTOCOLS[0] and seed == args.seeds[0]:
                            cache[f"{key}:seconds"] = time.perf_counter() - t1
                        args.cache.parent.mkdir(parents=True, exist_ok=True)
                        args.cache.write_text(json.dumps(cache))
                    if protocol == PROTOCOLS[0] and seed == args.seeds[0]:
                        finetune_seconds += cache[f"{key}:seconds"]
                    accs.append(cache[key])
                truth[protocol][rec["model_id"]] = float(np.mean(accs))
        per_target.append({
            "target": target.name, "classes": target.classes,
            "counts": {s: len(v) for s, v in target.y.items()},
            "raw": {m["model_id"]: m["raw"] for m in measured},
            "scorer_seconds": {m["model_id"]: m["seconds"] for m in measured},
            "default_total": default_total, "truth": truth,
            "propose_seconds": propose_seconds, "finetune_seconds_one_protocol_one_seed": finetune_seconds,
        })
        print(f"{target.name}: proposal {propose_seconds:.1f}s, fine-tuning every candidate once "
              f"{finetune_seconds:.1f}s", flush=True)
    return summarize(args, per_target, names, specs, records, build_seconds, built)


def summarize(args: argparse.Namespace, per_target: list[dict[str, Any]], names: list[str], specs: Any,
              records: list[dict[str, Any]], build_seconds: float, built: list[Any]) -> dict[str, Any]:
    ids = [r["model_id"] for r in records]

    def feature_matrix(t: dict[str, Any]) -> np.ndarray:
        cols = []
        for n in names:
            v = np.array([t["raw"][i].get(n, np.nan) for i in ids], dtype=np.float64)
            cols.append(-v if specs[n].direction is Direction.LOWER else v)
        return np.column_stack(cols)

    feats = [feature_matrix(t) for t in per_target]
    # the learned combinations use only what a proposal can weight (not the reported-only terms)
    usable = [j for j, n in enumerate(names) if specs[n].weighted]
    cnames = [names[j] for j in usable]
    cfeats = [f[:, usable] for f in feats]
    out: dict[str, Any] = {"kendall_tau": {}, "weighted_tau": {}, "top1_regret": {}, "learned_weights": {},
                           "per_target": {}, "top1_regret_by_score": {}}
    all_truths = {p: [np.array([t["truth"][p][i] for i in ids]) for t in per_target] for p in PROTOCOLS}
    # the rank aggregation: per held-out target, the sub-scores chosen on the other targets (both protocols)
    subsets = []
    for k in range(len(per_target)):
        others = [m for m in range(len(per_target)) if m != k]
        subsets.append(choose_subset([cfeats[m] for m in others], {p: [all_truths[p][m] for m in others]
                                                                  for p in PROTOCOLS}) if others else (0,))
    out["rank_loto_subsets"] = {t["target"]: [cnames[j] for j in cols] for t, cols in zip(per_target, subsets,
                                                                                           strict=True)}
    out["rank_subset_all_targets"] = [cnames[j] for j in choose_subset(cfeats, all_truths)]
    for protocol in PROTOCOLS:
        truths = all_truths[protocol]
        rows: dict[str, list[tuple[float, float]]] = {
            n: [] for n in [*names, "default_total", "combined_loto", "rank_loto"]}
        regrets = []
        regret_rows: dict[str, list[float]] = {"default_total": [], "rank_loto": []}
        weights_per_fold = []
        for k, t in enumerate(per_target):
            for j, n in enumerate(names):
                rows[n].append(taus(truths[k], feats[k][:, j]))
            default = np.array([t["default_total"][i] for i in ids])
            rows["default_total"].append(taus(truths[k], default))
            ranked = rank_mean(cfeats[k], subsets[k])
            rows["rank_loto"].append(taus(truths[k], ranked))
            for row, sc in (("default_total", default), ("rank_loto", ranked)):
                regret_rows[row].append(100.0 * float(truths[k].max() - truths[k][int(np.argmax(sc))]))
            others = [m for m in range(len(per_target)) if m != k]
            w = fit_weights([cfeats[m] for m in others], [truths[m] for m in others]) if others else \
                np.ones(len(cnames))
            weights_per_fold.append(dict(zip(cnames, w.round(4).tolist(), strict=True)))
            score = combined(cfeats[k], w)
            rows["combined_loto"].append(taus(truths[k], score))
            regrets.append(100.0 * float(truths[k].max() - truths[k][int(np.argmax(score))]))
            out["per_target"].setdefault(t["target"], {})[protocol] = {
                "truth": dict(zip(ids, truths[k].round(4).tolist(), strict=True)),
                "chosen": ids[int(np.argmax(score))], "best": ids[int(np.argmax(truths[k]))],
                "regret_points": regrets[-1],
                "weighted_tau": {n: rows[n][-1][1] for n in rows}, "kendall_tau": {n: rows[n][-1][0] for n in rows}}
        out["kendall_tau"][protocol] = {n: float(np.nanmean([r[0] for r in v])) for n, v in rows.items()}
        out["weighted_tau"][protocol] = {n: float(np.nanmean([r[1] for r in v])) for n, v in rows.items()}
        out["top1_regret"][protocol] = {"mean_points": float(np.mean(regrets)), "max_points": float(np.max(regrets))}
        out["top1_regret_by_score"][protocol] = {
            "combined_loto": out["top1_regret"][protocol],
            **{row: {"mean_points": float(np.mean(v)), "max_points": float(np.max(v))}
               for row, v in regret_rows.items()}}
        out["learned_weights"][protocol] = weights_per_fold
    propose = sum(t["propose_seconds"] for t in per_target)
    finetune_all = sum(t["finetune_seconds_one_protocol_one_seed"] for t in per_target)
    out["cost_ratio"] = propose / finetune_all if finetune_all > 0 else math.nan
    out["seconds"] = {"propose_all_targets": propose, "finetune_every_candidate_all_targets": finetune_all,
                      "build_repository": build_seconds}
    scorer_names = sorted({s for t in per_target for secs in t["scorer_seconds"].values() for s in secs})
    all_secs = [secs for t in per_target for secs in t["scorer_seconds"].values()]
    out["scorer_seconds"] = {s: float(sum(secs.get(s, 0.0) for secs in all_secs)) for s in scorer_names}
    out["setting"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out["candidates"] = [{"model_id": r["model_id"], "arch": r["arch"], "source_dataset": r["source_dataset"],
                          "metrics": r["metrics"]} for r in records]
    out["build"] = [b.__dict__ for b in built]
    out["targets"] = [{"target": t["target"], "counts": t["counts"]} for t in per_target]
    out["raw"] = {t["target"]: t["raw"] for t in per_target}
    out["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg(),
                      "torch_threads": 1}
    return out


def table(result: dict[str, Any]) -> str:
    lines = [f"{'score':16} " + " ".join(f"{p + ' τ_w':>14} {p + ' τ':>12}" for p in PROTOCOLS)]
    for n in result["weighted_tau"][PROTOCOLS[0]]:
        lines.append(f"{n:16} " + " ".join(f"{result['weighted_tau'][p][n]:14.3f} {result['kendall_tau'][p][n]:12.3f}"
                                          for p in PROTOCOLS))
    lines.append("")
    for row in result["top1_regret_by_score"][PROTOCOLS[0]]:
        lines.append(f"top-1 regret (points, {row}): " + ", ".join(
            f"{p} mean {result['top1_regret_by_score'][p][row]['mean_points']:.2f} "
            f"max {result['top1_regret_by_score'][p][row]['max_points']:.2f}" for p in PROTOCOLS))
    lines.append("rank_loto's sub-scores per held-out target: " + "; ".join(
        f"{t}: {'+'.join(v)}" for t, v in result["rank_loto_subsets"].items())
        + f"; chosen on every target: {'+'.join(result['rank_subset_all_targets'])}")
    s = result["seconds"]
    lines.append(f"cost: proposal {s['propose_all_targets']:.1f}s vs fine-tuning every candidate (one protocol, "
                 f"one seed) {s['finetune_every_candidate_all_targets']:.1f}s -> cost_ratio {result['cost_ratio']:.3f}")
    lines.append("proposal seconds by scorer (all candidates, all targets): " + ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(result["scorer_seconds"].items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="the repository's object/doc stores (reused)")
    parser.add_argument("--set", default="extended", choices=sorted(RECIPE_SETS))
    parser.add_argument("--no-build", action="store_true",
                        help="use the set's cells already in the store (any recipe version) instead of building")
    parser.add_argument("--targets", nargs="+", default=["elpv", "elpv_type", "fashion_mnist", "mnist", "digits"])
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--size", type=int, default=64, help="image size every candidate sees the targets at")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--unfreeze", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=100, help="steps of the proposer's short training run")
    parser.add_argument("--cache", type=Path, help="ground-truth cache (default: STORE/proposer_truth.json)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.store.mkdir(parents=True, exist_ok=True)
    args.cache = args.cache or args.store / "proposer_truth.json"
    result = run(args)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
