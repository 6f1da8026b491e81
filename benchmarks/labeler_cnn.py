"""What training length and pseudo-label thresholds buy the ``cnn_ssl`` classifier, on random labels (no loop).

    python benchmarks/labeler_cnn.py --dataset {mnist,fashion-mnist,digits,elpv} [--labels N] [--steps 1500 3000]
                                     [--seeds 0 1] [--thresholds fixed flex]

A random sample of the set (``--items``; default 5,000 images of the MNIST sets, all 1,797 digits,
all 2,624 ELPV cells at 64 px, the plug-in's largest size) is drawn, and ``--labels`` of its items,
drawn at random too (default: the budget issue 7 names, of the sample: MNIST 5 %, Fashion-MNIST
10 %, digits 10 %, ELPV 20 %, so 250, 500, 180 and 525 by default), get their known label; the rest
stay unlabeled.
``cnn_ssl`` (:class:`dlforge.labeler.pixelnet.PixelSSL`) is fitted with each ``--steps`` value and
each ``--thresholds`` rule (FixMatch's fixed one, FlexMatch's per-class ones), with no time budget
unless ``--time-budget`` (seconds a fit may take, never below ``--min-steps`` steps a network),
every variant of one seed before the next seed, and scored on the unlabeled items
(the accuracy the auto-labels would have at full coverage) with each class's recall (None for a class
no unlabeled item has). The labeler benchmark (``benchmarks/labeler.py --classifier cnn_ssl``)
measures the same plug-in inside the loop; this one isolates the training from the loop's choice
of items.

Prints a table and writes ``benchmarks/results/labeler-cnn-<dataset>-<labels>-<thresholds>-<steps>-s<seeds>.json``
(e.g. ``labeler-cnn-mnist-250-fixed-flex-1500-s0-1.json``; ``-of<items>`` after the labels when
``--items`` is not the default): runs with other variants do not overwrite it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from labeler import _per_class
from machine import cpu_name

from dlforge.labeler.pixelnet import THRESHOLDS, PixelSSL

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET = {"mnist": 0.05, "fashion-mnist": 0.10, "digits": 0.10, "elpv": 0.20}  # issue 7's label budgets
ITEMS = {"mnist": 5000, "fashion-mnist": 5000, "digits": 1797, "elpv": 2624}  # the default sample


def _data(name: str, workdir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The whole set as uint8 N x H x W x 1 images, their labels and the class names (decoded once a run)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images * (255 / 16)).round().astype(np.uint8)
        y = d.target.astype(np.int64)
        classes = [str(c) for c in range(10)]
    elif name == "elpv":
        from augmenter import elpv_arrays

        x, defect = elpv_arrays(workdir, 64)
        classes = ["defect", "good"]
        y = (1 - defect).astype(np.int64)
    else:
        from dlforge.proposer.sources import load_fashion_mnist, load_mnist

        data = load_fashion_mnist() if name == "fashion-mnist" else load_mnist()
        x, y, classes = data.train_x, np.asarray(data.train_y, dtype=np.int64), list(data.classes)
    return (x[..., None] if x.ndim == 3 else x), y, classes


def _sample(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, items: int) -> tuple[np.ndarray, np.ndarray]:
    """A seed's random sample of ``items`` items (all of them, in random order, when that is the whole set)."""
    rows = rng.choice(len(x), items, replace=False)
    return x[rows], y[rows]


def measure(x: np.ndarray, y: np.ndarray, labeled: np.ndarray, *, classes: list[str], steps: int, seed: int,
            threads: int, thresholds: str, time_budget: float | None = None, min_steps: int = 300) -> dict[str, Any]:
    t = time.perf_counter()
    fitted = PixelSSL(steps=steps, threads=threads, thresholds=thresholds, time_budget_s=time_budget,
                      min_steps=min_steps).fit(
        x, labeled, y[labeled], n_classes=len(classes), seed=seed)
    seconds = time.perf_counter() - t
    rest = np.setdiff1d(np.arange(len(x)), labeled)
    pred = fitted.predict_proba(x[rest]).argmax(axis=1)
    truth = y[rest]
    summary = fitted.summary()
    return {"steps": steps, "thresholds": thresholds, "seed": seed, "accuracy": round(float((pred == truth).mean()), 4),
            # a class no unlabeled item has: None
            "per_class_recall": [c["accuracy"] for c in _per_class(pred, truth, classes).values()],
            "fit_seconds": round(seconds, 1), "steps_run": summary.get("steps"), "views": summary.get("views"),
            "heldout_accuracy": summary.get("heldout_accuracy")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(BUDGET), default="mnist")
    p.add_argument("--items", type=int, default=None,
                   help="the sample's size (default: 5,000 of the MNIST sets, all of digits and ELPV)")
    p.add_argument("--labels", type=int, default=None,
                   help="people's labels (default: issue 7's budget of the sample, e.g. 5 %% of MNIST's)")
    p.add_argument("--steps", type=int, nargs="+", default=[1500, 3000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--thresholds", choices=THRESHOLDS, nargs="+", default=["fixed"],
                   help="pseudo-label thresholds: fixed (FixMatch's) and/or flex (FlexMatch's per-class ones)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds a fit may take (default: none); the fold networks' steps are cut to fit it")
    p.add_argument("--min-steps", type=int, default=300, help="the floor a time budget never cuts below")
    p.add_argument("--workdir", type=Path, default=Path(".dlforge/augbench"),
                   help="ELPV: where the decoded cells are cached (shared with augmenter.py)")
    args = p.parse_args()
    if min(args.steps) < 1 or args.threads < 1:
        p.error("--steps and --threads must be >= 1")
    if len(set(args.steps)) < len(args.steps) or len(set(args.seeds)) < len(args.seeds) \
            or len(set(args.thresholds)) < len(args.thresholds):
        p.error("--steps, --seeds and --thresholds must not repeat a value")
    items = ITEMS[args.dataset] if args.items is None else args.items
    if items < 20:
        p.error("--items must be >= 20")
    n_labels = round(BUDGET[args.dataset] * items) if args.labels is None else args.labels
    if not 10 <= n_labels < items:
        p.error(f"--labels must lie in [10, {items})")
    x_all, y_all, classes = _data(args.dataset, args.workdir)  # the set's size is known once it is decoded
    if items > len(x_all):
        p.error(f"--items must be at most {len(x_all)} for {args.dataset}")
    runs = []
    for seed in args.seeds:
        rng = np.random.default_rng(1000 + seed)
        x, y = _sample(x_all, y_all, rng, items)
        labeled = np.sort(rng.choice(len(x), n_labels, replace=False))
        for steps in args.steps:
            for thresholds in args.thresholds:  # interleaved: each variant of a seed and step count in turn
                r = measure(x, y, labeled, classes=classes, steps=steps, seed=seed, threads=args.threads,
                            thresholds=thresholds, time_budget=args.time_budget, min_steps=args.min_steps)
                runs.append({**r, "labels": n_labels, "items": len(x)})
                print(json.dumps(r), flush=True)
    print(f"\n{args.dataset}: cnn_ssl on random labels, accuracy on the unlabeled items ({cpu_name()})")
    print(f"{'steps':>6} {'thresholds':>10} {'seeds':>5} {'accuracy':>9} {'fit s':>7}  worst class (recall)")
    by_variant: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in runs:
        by_variant.setdefault((r["steps"], r["thresholds"]), []).append(r)
    table = []
    for (steps, thresholds), rs in by_variant.items():
        recalls = np.array([[np.nan if v is None else v for v in r["per_class_recall"]] for r in rs])
        seen = np.isfinite(recalls).any(axis=0)  # a class no unlabeled item has, in any seed, has no recall
        recall = np.full(len(classes), np.nan)
        recall[seen] = np.nanmean(recalls[:, seen], axis=0)
        worst = int(np.nanargmin(recall))
        row = {"steps": steps, "thresholds": thresholds, "seeds": len(rs),
               "accuracy": round(float(np.mean([r["accuracy"] for r in rs])), 4),
               "fit_seconds": round(float(np.mean([r["fit_seconds"] for r in rs])), 1),
               "per_class_recall": {c: (round(float(v), 4) if np.isfinite(v) else None)
                                    for c, v in zip(classes, recall, strict=True)}}
        table.append(row)
        print(f"{steps:>6} {thresholds:>10} {len(rs):>5} {row['accuracy']:>9.4f} {row['fit_seconds']:>7.1f}  "
              f"{classes[worst]} ({recall[worst]:.3f})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    variant = "-".join([*args.thresholds, *map(str, args.steps)]) + "-s" + "-".join(map(str, args.seeds))
    size = "" if items == ITEMS[args.dataset] else f"-of{items}"
    if args.time_budget is not None:
        variant += f"-b{args.time_budget:g}-f{args.min_steps}"
    out = RESULTS / f"labeler-cnn-{args.dataset}-{n_labels}{size}-{variant}.json"
    out.write_text(json.dumps({"dataset": args.dataset, "cpu": cpu_name(), "machine": platform.machine(),
                               "date": datetime.now().isoformat(timespec="seconds"), "runs": runs,
                               "table": table}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
