"""What the labeler's classifier could gain from label-preserving views and from fine-tuning, on random labels.

    python benchmarks/labeler_views.py --dataset {elpv,fashion-mnist,mnist} --fraction F [--seeds 3]
        [--methods plain,mean,side_by_side,finetune] [--size 224] [--arch A] [--limit N] [--workdir DIR]

A study, not the loop: ``benchmarks/labeler.py`` measures the labeler itself. Here every image's
multi-stage EfficientNet-Lite0 features (the labeler's embedding) and its activation at the shared
freeze boundary (the input of the last three units) are computed under each of the square's eight
views (:data:`dlforge.vision.images.DIHEDRAL_VIEWS`) once, cached in ``--workdir``, and then, for
each seed, 10 % of the images are held out, a random ``--fraction`` of the rest is "labeled" and the
other unlabeled images are scored (auto-label accuracy at full coverage, and per class):

* ``plain``: the linear probe on the plain features (the labeler's default);
* ``mean``: the linear probe on the features averaged over the eight views;
* ``side_by_side``: both, concatenated (what ``DLFORGE_LABELER_EMBED_VIEWS=dihedral`` gives the labeler);
* ``finetune``: the last three units (block14, block15, head) and a new linear layer trained on the
  cached activations for ``--steps`` steps, a random view per image per step, class-weighted loss with
  label smoothing, the prediction averaged over the eight views.

Three transductive uses of the unlabeled images, on the plain features (not in the labeler; each
scored on the same rows):

* ``smooth``: ``plain``'s probabilities smoothed over the k-nearest-neighbour graph of the labeled and
  unlabeled images (cosine on 64 principal components of the standardized features, k 10): ten
  rounds of ``q = 0.7 p + 0.3 mean(q over the neighbours)``, people's labels clamped to theirs;
* ``spread``: label spreading (Zhou et al. 2004; scikit-learn's, alpha 0.2) on the 20-nearest-neighbour
  graph of the same principal components (Euclidean, not normalized);
* ``self_train``: ``plain`` fitted again with the more confident half of the unlabeled images added
  under its own labels.

The linear probe here is scikit-learn's logistic regression on standardized features with C chosen
by 4-fold cross-validation (not the labeler's calibrated probe). Prints a table and writes
``benchmarks/results/labeler-views-<dataset>-<fraction>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import cpu_name
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
ARCH = "efficientnet_lite0"
TRANSDUCTIVE = ("smooth", "spread", "self_train")


def _images(dataset: str, size: int, limit: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from dlforge.vision.images import to_array

    if dataset == "elpv":
        from dlforge.labeler.demo_data import elpv_cells, elpv_root

        root, cells = elpv_root(), elpv_cells()
        if limit:
            cells = [cells[int(i)] for i in np.random.default_rng(0).choice(len(cells), limit, replace=False)]
        names = sorted({c.label for c in cells})
        pixels = np.stack([to_array(Image.open(root / c.name), size=size, channels=3) for c in cells])
        return pixels, np.array([names.index(c.label) for c in cells]), names
    from dlforge.proposer.sources import load_fashion_mnist, load_mnist

    data = load_fashion_mnist() if dataset == "fashion-mnist" else load_mnist()
    rows = np.random.default_rng(0).choice(len(data.train_y), limit or 6000, replace=False)
    gray = [data.train_x[int(i)] for i in rows]
    pixels = np.stack([to_array(Image.fromarray(g[..., 0] if g.ndim == 3 else g), size=size, channels=3)
                       for g in gray])
    return pixels, np.asarray(data.train_y[rows], dtype=np.int64), list(data.classes)


def features(dataset: str, size: int, limit: int, workdir: Path,
             views: tuple[str, ...] | None = None, arch: str = ARCH) -> dict[str, np.ndarray]:
    """Per view: the multi-stage vector ``ms_<view>`` and the shared-boundary activation ``act_<view>``
    (every one of the eight views unless ``views`` names some). ``arch``: the ImageNet network whose last
    five stages and head make the vector (the labeler's: EfficientNet-Lite0)."""
    from dlforge.vision.images import DIHEDRAL_VIEWS

    views = tuple(views or DIHEDRAL_VIEWS)
    tag = "" if set(views) == set(DIHEDRAL_VIEWS) else "-" + "+".join(views)
    tag += "" if arch == ARCH else f"-{arch}"
    cache = workdir / f"views-{dataset}-{size}-{limit or 'all'}{tag}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    from dlforge.labeler.embeddings import _multi_stage_vector
    from dlforge.vision.images import dihedral_view
    from dlforge.vision.networks import build_network
    from dlforge.vision.staged import StagedNetwork
    from dlforge.vision.trunk import TrunkFeatures, _Out

    pixels, y, names = _images(dataset, size, limit)
    net = None if arch == ARCH else StagedNetwork(build_network(arch, 1, pretrained=True), arch=arch).eval()
    trunk = TrunkFeatures(None, net, batch_size=32)
    widths = [s for s in trunk.net.stages if s.startswith("c")]
    stages = (*widths[-5:], "head")  # Lite0: the labeler's c40 .. c320 and head
    outs = [_Out("pooled", trunk.net.index(s)) for s in stages] + [_Out("activation", trunk.shared)]
    out: dict[str, np.ndarray] = {"y": y, "names": np.array(names)}
    for view in views:
        started = time.perf_counter()
        viewed = dihedral_view(pixels, view)
        parts: list[list[np.ndarray]] = [[] for _ in outs]
        for lo in range(0, len(viewed), 32):
            for k, arr in enumerate(trunk._run(trunk._input(viewed[lo:lo + 32]), start=0, outs=outs)):
                parts[k].append(arr)
        out[f"ms_{view}"] = _multi_stage_vector([np.concatenate(p) for p in parts[:-1]])
        out[f"act_{view}"] = np.concatenate(parts[-1]).astype(np.float16)
        print(f"  {view}: {len(viewed)} images in {time.perf_counter() - started:.0f} s", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def _linear(x_train: np.ndarray, y_train: np.ndarray) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    xs = scaler.transform(x_train)
    folds = StratifiedKFold(4, shuffle=True, random_state=0)
    scores = {c: cross_val_score(LogisticRegression(C=c, max_iter=2000), xs, y_train, cv=folds).mean()
              for c in (0.003, 0.01, 0.03, 0.1, 0.3)}
    model = LogisticRegression(C=max(scores, key=lambda c: scores[c]), max_iter=3000).fit(xs, y_train)
    return lambda x: model.predict_proba(scaler.transform(x))


def _finetune(f: dict[str, np.ndarray], views: list[str], labeled: np.ndarray, y: np.ndarray, score: np.ndarray,
              n_classes: int, steps: int, seed: int) -> np.ndarray:
    import torch
    from torch import nn

    from dlforge.vision.staged import SHARED_UNFREEZE, imagenet_trunk

    torch.manual_seed(seed)
    net = imagenet_trunk()  # shared: only the tail is copied and trained
    tail = copy.deepcopy(net.tail(net.boundary(SHARED_UNFREEZE))).eval()  # BatchNorm statistics kept
    head = nn.Linear(1280, n_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    acts = [torch.from_numpy(f[f"act_{v}"].astype(np.float32)) for v in views]
    counts = np.bincount(y[labeled], minlength=n_classes).astype(np.float32)
    weight = torch.from_numpy(counts.sum() / np.maximum(counts, 1) / n_classes)
    lr = 1e-3
    opt = torch.optim.AdamW([{"params": tail.parameters(), "lr": lr}, {"params": head.parameters(), "lr": lr * 10}],
                            weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * 10], total_steps=steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    g = torch.Generator().manual_seed(seed)
    targets = torch.from_numpy(y[labeled]).long()
    for _ in range(steps):
        rows = torch.randint(0, len(labeled), (min(32, len(labeled)),), generator=g)
        which = torch.randint(0, len(views), (len(rows),), generator=g)
        x = torch.stack([acts[int(v)][int(labeled[int(r)])] for r, v in zip(rows, which, strict=True)])
        loss = loss_fn(head(tail(x)), targets[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.inference_mode():
        probs = [torch.softmax(head(torch.cat([tail(a[score[lo:lo + 256]]) for lo in range(0, len(score), 256)])), 1)
                 for a in acts]
    return torch.stack(probs).mean(0).numpy()


def _components(x: np.ndarray) -> np.ndarray:
    """64 principal components of the standardized rows."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    return np.asarray(PCA(min(64, *x.shape), random_state=0).fit_transform(StandardScaler().fit_transform(x)))


def _graph(x: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` nearest other rows (cosine on :func:`_components`)."""
    z = _components(x)
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
    sims = z @ z.T
    np.fill_diagonal(sims, -np.inf)
    return np.argpartition(-sims, k, axis=1)[:, :k]


def _transductive(method: str, x: np.ndarray, y: np.ndarray, labeled: np.ndarray, score: np.ndarray,
                  n_classes: int) -> np.ndarray:
    """The probabilities of the ``score`` rows under ``smooth``, ``spread`` or ``self_train`` (see above)."""
    rows = np.concatenate([labeled, score])  # graph rows: people's first
    n_lab = len(labeled)
    if len(np.unique(y[labeled])) < n_classes:  # the probabilities' columns would not be the classes
        raise ValueError(f"{method}: every class needs a labeled image")
    if method == "self_train":
        p = _linear(x[labeled], y[labeled])(x[score])
        conf = p.max(axis=1)
        top = conf >= np.median(conf)
        refit = _linear(np.concatenate([x[labeled], x[score][top]]), np.concatenate([y[labeled], p[top].argmax(1)]))
        return np.asarray(refit(x[score]))
    if method == "spread":
        from sklearn.semi_supervised import LabelSpreading

        z = _components(x[rows])
        target = np.concatenate([y[labeled], np.full(len(score), -1)])
        spread = LabelSpreading(kernel="knn", n_neighbors=20, alpha=0.2, max_iter=100).fit(z, target)
        return np.asarray(spread.label_distributions_[n_lab:])
    p = np.asarray(_linear(x[labeled], y[labeled])(x[rows]))
    neighbours = _graph(x[rows], 10)
    q, given = p.copy(), np.eye(n_classes)[y[labeled]]
    for _ in range(10):
        q = 0.7 * p + 0.3 * q[neighbours].mean(axis=1)
        q[:n_lab] = given
    return q[n_lab:]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dlforge.vision.images import DIHEDRAL_VIEWS

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    views = list(args.views or DIHEDRAL_VIEWS)
    f = features(args.dataset, args.size, args.limit, Path(args.workdir), tuple(views), args.arch)
    t_features = time.perf_counter() - started
    y, names = f["y"], [str(n) for n in f["names"]]
    plain = f["ms_identity"]
    mean = np.mean([f[f"ms_{v}"] for v in views], axis=0)
    inputs = {"plain": plain, "mean": mean, "side_by_side": np.concatenate([plain, mean], axis=1)}
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(y))
        pool = order[len(y) // 10:]  # the first 10 % held out, never labeled or scored
        labeled = np.sort(rng.choice(pool, round(args.fraction * len(pool)), replace=False))
        score = np.setdiff1d(pool, labeled)
        for method in args.methods:
            t0 = time.perf_counter()
            if method == "finetune":
                proba = _finetune(f, views, labeled, y, score, len(names), args.steps, seed)
            elif method in TRANSDUCTIVE:
                proba = _transductive(method, plain, y, labeled, score, len(names))
            else:
                proba = _linear(inputs[method][labeled], y[labeled])(inputs[method][score])
            pred = proba.argmax(axis=1)
            per_class = {names[c]: round(float((pred[y[score] == c] == c).mean()), 4)
                         for c in range(len(names)) if (y[score] == c).any()}
            row = {"seed": seed, "accuracy": round(float((pred == y[score]).mean()), 4), "per_class": per_class,
                   "labeled": len(labeled), "scored": len(score), "seconds": round(time.perf_counter() - t0, 1)}
            rows[method].append(row)
            print(f"  seed {seed} {method:13s} {row['accuracy']:.4f} ({row['seconds']:.0f} s)", flush=True)
    summary = {m: {"mean": round(float(np.mean([r["accuracy"] for r in rs])), 4),
                   "std": round(float(np.std([r["accuracy"] for r in rs])), 4)} for m, rs in rows.items()}
    return {"dataset": args.dataset, "images": len(y), "fraction": args.fraction, "size": args.size, "arch": args.arch,
            "views": views,
            "seeds": args.seeds, "finetune_steps": args.steps, "summary": summary, "runs": rows,
            "seconds_features": round(t_features, 1),
            "machine": {"cpu": cpu_name(), "python": platform.python_version(), "threads": args.threads}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["elpv", "fashion-mnist", "mnist"], default="elpv")
    p.add_argument("--fraction", type=float, default=0.2, help="share of the non-held-out images labeled")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", type=lambda s: s.split(","), default=["plain", "mean", "side_by_side", "finetune"])
    p.add_argument("--views", type=lambda s: s.split(","), default=None,
                   help="the views computed and used (default: all eight); `mean` averages and `finetune` "
                        "trains and predicts over these")
    p.add_argument("--steps", type=int, default=450, help="finetune: optimizer steps of 32 images")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--arch", default=ARCH, choices=[ARCH, "efficientnet_lite1", "efficientnet_lite2"],
                   help="the ImageNet network whose features the probe reads (its last five stages and head)")
    p.add_argument("--limit", type=int, default=0, help="use this many images (0: ELPV all, the MNIST sets 6,000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=str(RESULTS / "cache"), help="where the views' features are cached")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    unknown = set(args.methods) - {"plain", "mean", "side_by_side", "finetune", *TRANSDUCTIVE}
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(sorted(unknown))}")
    if args.arch != ARCH and "finetune" in args.methods:
        raise SystemExit(f"--methods finetune trains {ARCH}'s last units: use it without --arch")
    from dlforge.vision.images import DIHEDRAL_VIEWS

    if args.views and (set(args.views) - set(DIHEDRAL_VIEWS) or "identity" not in args.views):
        raise SystemExit(f"--views: give identity and any of {', '.join(DIHEDRAL_VIEWS)}")
    result = run(args)
    print(f"\n{result['dataset']}, {result['images']} images, {args.fraction:.0%} labeled at random, "
          f"{args.seeds} seeds, {result['machine']['cpu']}")
    print(f"{'method':14s} {'auto-label accuracy':>20s}")
    for method, s in result["summary"].items():
        print(f"{method:14s} {s['mean']:>12.4f} ± {s['std']:.4f}")
    tag = "" if not args.views or set(args.views) == set(DIHEDRAL_VIEWS) else "-" + "+".join(args.views)
    tag += "-transductive" if set(args.methods) & set(TRANSDUCTIVE) else ""
    tag += "" if args.arch == ARCH else f"-{args.arch}"
    tag += "" if args.size == 224 else f"-{args.size}"
    out = Path(args.output) if args.output else RESULTS / f"labeler-views-{args.dataset}-{args.fraction:g}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
