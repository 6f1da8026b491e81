"""Domain adaptation through intermediate domains: how much of the source-to-target gap it closes.

    python benchmarks/domain_adaptation.py [--pairs elpv,digits-mnist] [--seeds 3] [--workdir DIR]

Pairs (labeled source -> unlabeled target, scored on labeled target images the adaptation never saw):

* ``elpv``: ELPV's monocrystalline cells (all 1,074, labels "defect" / "good": defect probability >= 0.5)
  -> its polycrystalline cells (1,550: per seed, half unlabeled for adaptation, half for the score);
* ``digits-mnist``: scikit-learn's 8 x 8 digits (all 1,797) -> MNIST (a stratified 4,000 of its training
  set: 2,000 unlabeled, 2,000 scored), ten classes.

Every image is embedded once by the labeler's embedding (EfficientNet-Lite0, ImageNet weights, pooled
at six depths, 2,024 values; 224 px for ELPV, 128 px for the digits), cached in ``--workdir``. Rows:

* ``source_only``: logistic regression on the source's labels;
* ``aligned``: the same on the source's features given the target's per-feature moments (no pseudo-labels;
  per-domain standardization, :func:`dlforge.augmenter.domain.moment_blend` at 1);
* ``gradual``: :class:`dlforge.augmenter.domain.GradualSelfTraining` (ten intermediate domains, pseudo-labels);
* ``in_domain``: logistic regression on the target's own labels (the unlabeled half, labeled): the ceiling.

``gap_closed`` = (gradual - source_only) / (in_domain - source_only), per seed, then the mean. Prints a
table and writes ``benchmarks/results/domain_adaptation.json`` (``gap_closed`` is ELPV's, the issue's pair).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import cpu_name
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
FOURIER_STEPS = (0.25, 0.5, 0.75, 1.0)


def _embed(pixels: np.ndarray) -> np.ndarray:
    """The labeler's embedding of uint8 N x S x S x 3 images (computed, not stored)."""
    from dlforge.labeler.embeddings import EfficientNetLite0Embedder

    return EfficientNetLite0Embedder(size=pixels.shape[1]).embed(pixels)


def _pair(name: str) -> dict[str, Any]:
    """Source and target images (uint8 N x S x S x 3), labels, class names."""
    from dlforge.vision.images import to_array

    if name == "elpv":
        from dlforge.labeler.demo_data import elpv_cells, elpv_root

        root, cells = elpv_root(), elpv_cells()
        names = sorted({c.label for c in cells})
        out: dict[str, Any] = {"classes": names}
        for side, kind in (("source", "mono"), ("target", "poly")):
            chosen = [c for c in cells if c.kind == kind]
            out[f"{side}_x"] = np.stack([to_array(Image.open(root / c.name), size=224, channels=3) for c in chosen])
            out[f"{side}_y"] = np.array([names.index(c.label) for c in chosen])
        return out
    if name == "digits-mnist":
        from sklearn.datasets import load_digits

        from dlforge.proposer.sources import load_mnist

        digits = load_digits()
        src = [np.clip(d * 16, 0, 255).astype(np.uint8) for d in digits.images]
        mnist = load_mnist()
        rng = np.random.default_rng(0)
        y = np.asarray(mnist.train_y)
        rows = np.concatenate([rng.choice(np.flatnonzero(y == c), 400, replace=False) for c in range(10)])
        tgt = [np.squeeze(mnist.train_x[int(i)]) for i in rows]
        tgt = [(t * 255 if t.max() <= 1.0 else t).astype(np.uint8) for t in tgt]
        return {"classes": [str(c) for c in range(10)],
                "source_x": np.stack([to_array(Image.fromarray(g), size=128, channels=3) for g in src]),
                "source_y": np.asarray(digits.target), "target_x": np.stack(
                    [to_array(Image.fromarray(g), size=128, channels=3) for g in tgt]), "target_y": y[rows]}
    raise SystemExit(f"unknown pair {name!r}; known: elpv, digits-mnist")


def features(name: str, workdir: Path, *, fourier: float | None = None) -> dict[str, Any]:
    """The pair's embeddings; with ``fourier`` (the blend's ``beta``) also those of its Fourier-amplitude
    intermediate domains at :data:`FOURIER_STEPS`: the source carried ``lam`` toward the target images' mean
    amplitude (``fsrc_<k>``) and the target ``1 - lam`` toward the source's (``ftgt_<k>``). The mean amplitudes
    are of every image of each domain (pixels only, no label)."""
    cache = workdir / (f"domain-{name}.npz" if fourier is None else f"domain-{name}-fourier{fourier:g}.npz")
    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    started = time.perf_counter()
    data = _pair(name)
    out = {"classes": np.array(data["classes"]), "source_y": data["source_y"], "target_y": data["target_y"],
           "source_f": _embed(data["source_x"]), "target_f": _embed(data["target_x"])}
    if fourier is not None:
        from dlforge.vision.domains import amplitude_blend, mean_amplitude

        amp_s, amp_t = mean_amplitude(data["source_x"]), mean_amplitude(data["target_x"])
        for k, lam in enumerate(FOURIER_STEPS):
            out[f"fsrc_{k}"] = _embed(amplitude_blend(data["source_x"], amp_t, lam, beta=fourier))
            out[f"ftgt_{k}"] = out["target_f"] if lam == 1.0 else _embed(
                amplitude_blend(data["target_x"], amp_s, 1.0 - lam, beta=fourier))
    print(f"  {name}: {len(data['source_x'])} + {len(data['target_x'])} images embedded in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def run_pair(name: str, seeds: int, workdir: Path, fourier: float | None = None) -> dict[str, Any]:
    from dlforge.augmenter.domain import GradualSelfTraining, moment_blend, source_only

    f = features(name, workdir, fourier=fourier)
    xs, ys, xt_all, yt_all = f["source_f"], f["source_y"], f["target_f"], f["target_y"]
    classes = [str(c) for c in f["classes"]]
    rows: list[dict[str, Any]] = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(yt_all))
        unlabeled, scored = order[: len(order) // 2], order[len(order) // 2:]
        xt, xtest, ytest = xt_all[unlabeled], xt_all[scored], yt_all[scored]
        started = time.perf_counter()
        models = {
            "source_only": source_only(xs, ys, xt, seed=seed),
            "aligned": source_only(moment_blend(xs, xt, 1.0), ys, xt, seed=seed),
            "gradual": GradualSelfTraining(seed=seed).fit(xs, ys, xt),
            "in_domain": source_only(xt, yt_all[unlabeled], xt, seed=seed),
        }
        if fourier is not None:
            models["gradual_fourier"] = GradualSelfTraining(steps=FOURIER_STEPS, seed=seed).fit(
                xs, ys, xt, source_steps=[f[f"fsrc_{k}"] for k in range(len(FOURIER_STEPS))],
                target_steps=[f[f"ftgt_{k}"][unlabeled] for k in range(len(FOURIER_STEPS))])
        row: dict[str, Any] = {"seed": seed, "target_unlabeled": len(unlabeled), "target_scored": len(scored),
                               "seconds": round(time.perf_counter() - started, 1)}
        for method, model in models.items():
            pred = model.predict(xtest)
            row[method] = round(float((pred == ytest).mean()), 4)
            row[f"{method}_per_class"] = {classes[c]: round(float((pred[ytest == c] == c).mean()), 4)
                                          for c in np.unique(ytest)}
        gap = row["in_domain"] - row["source_only"]
        row["gap_closed"] = round((row["gradual"] - row["source_only"]) / gap, 4) if gap > 0 else None
        rows.append(row)
        if fourier is not None:
            row["gap_closed_fourier"] = round((row["gradual_fourier"] - row["source_only"]) / gap, 4) if gap > 0 \
                else None
        print(f"  {name} seed {seed}: source only {row['source_only']:.3f}, aligned {row['aligned']:.3f}, "
              f"gradual {row['gradual']:.3f}, in-domain {row['in_domain']:.3f} -> gap closed {row['gap_closed']}"
              + (f"; gradual (Fourier) {row['gradual_fourier']:.3f}" if fourier is not None else ""), flush=True)
    closed = [r["gap_closed"] for r in rows if r["gap_closed"] is not None]
    methods = ["source_only", "aligned", "gradual", "in_domain"] + (["gradual_fourier"] if fourier is not None else [])
    mean = {m: round(float(np.mean([r[m] for r in rows])), 4) for m in methods}
    return {"pair": name, "classes": classes, "source_items": len(ys), "target_items": len(yt_all),
            "seeds": rows, "mean": mean, "gap_closed": round(float(np.mean(closed)), 4) if closed else None,
            "gap_closed_min": round(float(np.min(closed)), 4) if closed else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="elpv,digits-mnist")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dlforge-domain"))
    ap.add_argument("--fourier", type=float, default=None, metavar="BETA",
                    help="also gradual self-training through Fourier-amplitude intermediate domains in pixels "
                         "(four steps; BETA: the share of the spectrum's side blended, e.g. 0.1)")
    ap.add_argument("--out", type=Path, default=RESULTS / "domain_adaptation.json")
    args = ap.parse_args()
    if args.fourier is not None and not 0.0 < args.fourier <= 1.0:
        ap.error(f"--fourier BETA must be in (0, 1], got {args.fourier}")
    import os

    load_before = list(os.getloadavg())
    started = time.perf_counter()
    pairs = {name: run_pair(name, args.seeds, args.workdir, args.fourier) for name in args.pairs.split(",")}
    print(f"\nCPU: {cpu_name()}; load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'pair':<14}{'source only':>12}{'aligned':>9}{'gradual':>9}{'in-domain':>11}{'gap closed':>12}{'min':>7}")
    for name, r in pairs.items():
        m = r["mean"]
        print(f"{name:<14}{m['source_only']:>12.3f}{m['aligned']:>9.3f}{m['gradual']:>9.3f}{m['in_domain']:>11.3f}"
              f"{r['gap_closed']:>12.3f}{r['gap_closed_min']:>7.3f}"
              + (f"   gradual (Fourier, beta {args.fourier:g}) {m['gradual_fourier']:.3f}" if args.fourier is not None
                 else ""))
    out = {"gap_closed": pairs.get("elpv", next(iter(pairs.values())))["gap_closed"],
           "gap_closed_by_pair": {n: r["gap_closed"] for n, r in pairs.items()}, "pairs": pairs,
           "seconds": round(time.perf_counter() - started, 1),
           "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
                       "load_avg_before": [round(v, 2) for v in load_before]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
