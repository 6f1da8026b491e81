"""A study for issue 13: scarce-class samples on other images' backgrounds ("transplant"), against the policies.

The learned generators and the policies only rework the scarce class's few real images, and 248 more real
defects add far more than any of them (``benchmarks/augmenter.py --protocol scarce``). A transplant gives a
scarce image's defect new surroundings: per sample, a real scarce train image ``s``, its nearest image of
the other classes in the train split (32 px, standardized pixels), and the region where the two differ
most (the top 5-30 % of ``|gaussian(s - nearest, 1.5 px)|``, the share drawn at random, dilated by a 5-px
maximum filter and softened by a 2-px Gaussian) pasted from ``s`` onto one of its 10 next-nearest
other-class images (brightness matched to ``s``), then a random flip and quarter turn. Not a learned
generator: the study asks whether new backgrounds for the same defects teach a classifier more than the
policies do.

The protocol is ``augmenter.py --protocol scarce``'s on ELPV (the same splits, the same 62 scarce defects
per seed, 4 samples per real defect, the X2 filter at 0.9 on the same frozen features, recall at precision
0.9 on the real test split, 10 seeds); the classifier is its linear probe or, with ``--classifier tail``,
its tail (the trainer's ``fit``, 10 epochs). Variants: ``none``, ``policy`` (the service's policies and
mixup), ``transplant``, ``transplant-policy`` (each transplant then through one of the policies). Their
random numbers differ from ``augmenter.py``'s, so ``policy``'s figures differ a little from its run.

    OPENBLAS_NUM_THREADS=1 python benchmarks/augmenter_transplant.py --workdir /work/augcache [--classifier tail]

Prints a table and writes ``benchmarks/results/augmenter-transplant[-tail].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from augmenter import (
    CachedFeatures,
    TailClassifier,
    cached_array,
    elpv_arrays,
    recall_at_precision,
)
from machine import cpu_name

from dlforge.augmenter.filters import ConfidenceFilter, FrozenNetworkFeatures, resize_batch
from dlforge.augmenter.generators import apply_policy, parse_policy
from dlforge.augmenter.settings import AugmenterSettings
from dlforge.augmenter.worker import build_generator
from dlforge.common.settings import load_settings

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("none", "policy", "transplant", "transplant-policy")


def _standardized(images: np.ndarray, side: int = 32) -> np.ndarray:
    small = resize_batch(images, side).reshape(len(images), -1).astype(np.float32)
    small -= small.mean(1, keepdims=True)
    small /= small.std(1, keepdims=True) + 1e-6
    return small


def transplant(sources: np.ndarray, others: np.ndarray, n: int, rng: np.random.Generator, *, k: int = 10,
               area: tuple[float, float] = (0.05, 0.3), sigma: float = 1.5, soft: float = 2.0) -> np.ndarray:
    """``n`` samples (uint8, the sources' shape, one channel): see the module docstring."""
    from scipy import ndimage

    if sources.shape[3] != 1 or others.shape[3] != 1:
        raise ValueError("transplant: one-channel images only")
    s_small, o_small = _standardized(sources), _standardized(others)
    dist = -2 * s_small @ o_small.T + (o_small ** 2).sum(1)[None]
    near = np.argsort(dist, axis=1)[:, :k + 1]
    out = []
    for p in rng.integers(0, len(sources), size=n):
        s = sources[p, ..., 0].astype(np.float32)

        def matched(img: np.ndarray, s: np.ndarray = s) -> np.ndarray:
            img = img.astype(np.float32)
            return (img - img.mean()) / (img.std() + 1e-6) * s.std() + s.mean()

        ref = matched(others[near[p, 0], ..., 0])
        diff = np.abs(ndimage.gaussian_filter(s - ref, sigma))
        mask = (diff >= np.quantile(diff, 1 - rng.uniform(*area))).astype(np.float32)
        mask = ndimage.gaussian_filter(ndimage.maximum_filter(mask, 5), soft)
        mask = np.clip(mask / max(float(mask.max()), 1e-6), 0, 1)
        background = matched(others[near[p, rng.integers(1, k + 1)], ..., 0])
        sample = np.rot90((1 - mask) * background + mask * s, int(rng.integers(4)))
        if rng.random() < 0.5:
            sample = sample[:, ::-1]
        out.append(np.clip(np.rint(sample), 0, 255).astype(np.uint8)[..., None])
    return np.stack(out) if out else sources[:0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--classifier", choices=("linear", "tail"), default="linear")
    parser.add_argument("--workdir", type=Path, default=Path(".dlforge/augbench"), help="cache (augmenter.py's)")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    images, labels = elpv_arrays(args.workdir, 128)
    features = CachedFeatures(FrozenNetworkFeatures(image_size=128))
    feats = cached_array(args.workdir / "elpv-128-feat128.npy", lambda: features.inner(images))
    features.remember(images, feats)
    tail = TailClassifier(size=128, unfreeze=3, epochs=10, lr=1e-3) if args.classifier == "tail" else None
    acts = (cached_array(args.workdir / "elpv-128-tail128-u3.npy", lambda: tail.activations(images))
            if tail is not None else None)
    settings = load_settings(AugmenterSettings, augmenter_generator="policy")
    policy = build_generator(settings)
    policies = [parse_policy(t) for t in settings.augmenter_policies]
    per_seed: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        rng = np.random.default_rng([seed, 13])  # augmenter.py's splits and scarce defects
        train, test = train_test_split(np.arange(len(images)), test_size=0.25, stratify=labels, random_state=seed)
        defect_train = train[labels[train] == 1]
        scarce = np.sort(rng.choice(defect_train, size=max(2, round(0.1 * len(defect_train))), replace=False))
        train = np.sort(np.concatenate([train[labels[train] == 0], scarce]))
        x2 = ConfidenceFilter(features, threshold=0.9)
        x2.fit(images[train], labels[train], num_classes=2, val_images=images[:0], val_labels=labels[:0])
        sources, others = images[scarce], images[train[labels[train] == 0]]
        n = 4 * len(sources)
        row: dict[str, Any] = {"seed": seed, "train_defects": len(sources), "variants": {}}
        for i, name in enumerate(VARIANTS):
            g = np.random.default_rng([seed, 17, i])
            made = images[:0]
            if name == "policy":
                made = policy.generate(sources, n, g).images
            elif name.startswith("transplant"):
                made = transplant(sources, others, n, g)
                if name == "transplant-policy":
                    made = np.stack([apply_policy(m, policies[int(g.integers(len(policies)))], g) for m in made])
            kept = made[x2.judge(made, np.ones(len(made), dtype=np.int64)).keep] if len(made) else made
            gen_x = features(kept) if len(kept) else np.zeros((0, feats.shape[1]), dtype=np.float32)
            y = np.concatenate([labels[train], np.ones(len(kept), dtype=np.int64)])
            if tail is not None and acts is not None:
                scores = tail.scores(np.concatenate([acts[train], tail.activations(kept)]), y, acts[test], seed=seed)
            else:
                with threadpool_limits(limits=1, user_api="blas"):
                    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000))
                    scores = model.fit(np.concatenate([feats[train], gen_x]), y).predict_proba(feats[test])[:, 1]
            row["variants"][name] = {
                "generated": len(made), "kept": len(kept),
                "recall_at_precision_0_9": round(recall_at_precision(scores, labels[test], 0.9), 4),
                "average_precision": round(float(average_precision_score(labels[test], scores)), 4)}
            print(f"  seed {seed} {name:<18} {row['variants'][name]}", flush=True)
        per_seed.append(row)

    def paired(name: str, key: str) -> dict[str, Any]:
        d = 100 * np.array([r["variants"][name][key] - r["variants"]["none"][key] for r in per_seed])
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        return {"mean": round(float(d.mean()), 2), "se": round(se, 2), "better": int((d > 0).sum()),
                "worse": int((d < 0).sum())}

    summary = {name: {"kept": round(float(np.mean([r["variants"][name]["kept"] for r in per_seed])), 1),
                      "recall_at_precision_0_9": round(float(np.mean(
                          [r["variants"][name]["recall_at_precision_0_9"] for r in per_seed])), 4),
                      **({} if name == "none" else {"gain_points": paired(name, "recall_at_precision_0_9"),
                                                    "ap_gain_points": paired(name, "average_precision")})}
               for name in VARIANTS}
    result = {"benchmark": "augmenter-transplant", "dataset": "elpv", "classifier": args.classifier,
              "seeds": args.seeds, "summary": summary, "per_seed": per_seed,
              "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform()},
              "seconds": round(time.perf_counter() - started, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"augmenter-transplant{'-tail' if args.classifier == 'tail' else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nELPV, defects cut to 10 %, {args.seeds} seeds, classifier {args.classifier}; CPU {cpu_name()}")
    print(f"{'variant':<18} {'kept of 248':>11} {'recall@P0.9':>11} {'gain (points)':>16} {'better/worse':>12} "
          f"{'AP gain':>12}")
    for name, s in summary.items():
        g, a = s.get("gain_points"), s.get("ap_gain_points")
        gain = f"{g['mean']:+.1f} ± {g['se']:.1f}" if g else "-"
        ap = f"{a['mean']:+.1f} ± {a['se']:.1f}" if a else "-"
        bw = f"{g['better']} / {g['worse']}" if g else "-"
        print(f"{name:<18} {s['kept']:>11.0f} {s['recall_at_precision_0_9']:>11.3f} {gain:>16} {bw:>12} {ap:>12}")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
