"""Would a multi-scale head help the final training? The same tail with and without mid-level features.

The final training trains the last ``--unfreeze`` units of EfficientNet-Lite0 and a linear head on their
pooled output. Mid-level stages carry local defects (cracks) that the last stage may pool away; a
multi-scale head sees the frozen trunk's pooled ``--stages`` (default c40, c80, c112) beside it. This
compares the two with the trainer's own ``fit`` on the data, labels and splits of
``benchmarks/trainer_learning.py`` (``--labels mixed``: 20 % people, half of them val, the rest
auto-labeled by a logistic regression and weighted by its confidence; the test split true labels, never
seen before the end), without views (so both sides train on the same rows).

The mid-level vector rides in the tail's input as constant channels beside the cached activation
(``N x (C + D) x H x W``; the tail splits it off), so ``fit`` and its batching are unchanged; the mid-level
stages stay frozen. What the product would need to ship it (the exported network computing the vector,
the optimizer's variants, the view cache) is not built: this measures whether it is worth building.

    python benchmarks/trainer_multiscale.py --dataset elpv --limit 2624 --unfreeze 3 --work-dir DIR

Prints a table and writes ``benchmarks/results/trainer-multiscale-<dataset>-<images>[-s<seed>].json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name
from trainer_learning import ARCH, Quiet, prepare, probabilities, scores

from dlforge.common.objects.fs import FsObjectStore
from dlforge.trainer.cache import CachedActivations, SplitArrays
from dlforge.trainer.handlers import build_data
from dlforge.trainer.params import TrainParams
from dlforge.trainer.stages import Tail
from dlforge.trainer.training import fit
from dlforge.trainer.views import IDENTITY
from dlforge.vision.features import feature_store
from dlforge.vision.manifest import Manifest
from dlforge.vision.networks import spec_of
from dlforge.vision.staged import imagenet_trunk
from dlforge.vision.trunk import TrunkFeatures

RESULTS = Path(__file__).resolve().parent / "results"


class MultiScaleTail(Tail):
    """``tail``'s units on the first ``channels`` input channels; its head replaced by one on the units'
    pooled output and the mid-level vector read off the other channels (constant planes). A :class:`Tail`,
    so ``fit`` gives its units the body's share of the learning rate as it does the shipped tail's."""

    def __init__(self, tail: Tail, channels: int, mid: int, classes: int) -> None:
        super().__init__(list(tail.body), tail.dropout, torch.nn.Linear(int(tail.head.in_features) + mid, classes))
        self.channels = channels
        self.mid_norm = torch.nn.LayerNorm(mid)  # the stages' scales differ by orders of magnitude

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        units = self.body(x[:, :self.channels])
        mid = self.mid_norm(x[:, self.channels:, 0, 0])
        out: torch.Tensor = self.head(self.dropout(torch.cat([units, mid], dim=1)))
        return out


def mid_vectors(objects: FsObjectStore, manifest: Manifest, stages: list[str], size: int, threads: int
                ) -> np.ndarray:
    """The ImageNet trunk's pooled ``stages``, concatenated, for every manifest item in its order: the vision
    core's feature store (decoded pixels and pooled features computed once, read again on the next run)."""
    features = TrunkFeatures(feature_store(objects), imagenet_trunk(), threads=threads)
    items = manifest.items
    pooled = features.pooled([i.sha256 for i in items], size=size, stages=stages,
                             load=features.for_items(objects, items, size=size))
    return np.concatenate([pooled[s] for s in stages], axis=1).astype(np.float32)


def with_planes(acts: np.ndarray, mid: np.ndarray) -> np.ndarray:
    """``acts`` (N x C x H x W) with ``mid`` (N x D) as D constant planes after its channels."""
    n, _, h, w = acts.shape
    planes = np.broadcast_to(mid[:, :, None, None], (n, mid.shape[1], h, w))
    return np.concatenate([np.asarray(acts, dtype=np.float32), planes], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["elpv", "digits", "fashion-mnist"], default="elpv")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--unfreeze", type=int, default=3)
    parser.add_argument("--stages", default="c40,c80,c112")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    stages = [s for s in args.stages.split(",") if s]
    prep = prepare(args.dataset, args.limit, seed=args.seed, unfreeze=args.unfreeze, views=(IDENTITY,),
                   labels="mixed", threads=args.threads, work=args.work_dir)
    manifest, classes, labels, acts = prep.manifest, prep.classes, prep.labels, prep.acts
    positive = "defect" if args.dataset == "elpv" else None
    spec = spec_of(ARCH)
    t0 = time.perf_counter()
    mid_all = mid_vectors(prep.objects, manifest, stages, spec.input_size, args.threads)
    mid_seconds = time.perf_counter() - t0
    row_of = {item.item_id: n for n, item in enumerate(manifest.items)}
    index, pool, y_pool, lab_idx, conf = prep.index, prep.pool, prep.y_pool, prep.lab_idx, prep.conf
    people, auto_acc, tr, va = prep.people, prep.auto_acc, prep.tr, prep.va

    def arrays(multi: bool) -> dict[str, SplitArrays]:
        def x_of(arr: SplitArrays, rows: np.ndarray | None = None) -> np.ndarray:
            ids = arr.item_ids if rows is None else [arr.item_ids[i] for i in rows]
            x = np.asarray(arr.x if rows is None else arr.x[rows])
            return with_planes(x, mid_all[[row_of[i] for i in ids]]) if multi else x

        def part(rows: np.ndarray, lab: np.ndarray) -> SplitArrays:
            return SplitArrays(x_of(pool, rows), [classes[i] for i in lab[rows]], [pool.item_ids[i] for i in rows])

        test = acts.splits["test"]
        return {"train": part(tr, lab_idx), "val": part(va, y_pool),
                "test": SplitArrays(x_of(test), test.labels, test.item_ids)}

    weights = {pool.item_ids[i]: float(conf[i]) for i in tr}
    test_y = np.array([index[lab] for lab in acts.splits["test"].labels])
    # the demo's final training's parameters (reports/demo.json), without its time cap
    hp = TrainParams(lr=args.lr, batch_size=32, optimizer="adam", weight_decay=1e-6, epochs=args.max_epochs,
                     unfreeze=args.unfreeze, dropout=0.2, body_lr_scale=0.1, class_weighting="balanced",
                     seed=args.seed, patience=args.patience)
    channels = int(pool.x.shape[1])
    print(f"{args.dataset}: {len(labels)} images; train {len(tr)} (people {int(people[tr].sum())}, auto-label "
          f"accuracy {auto_acc:.3f}), val {len(va)}, test {len(test_y)}; mid-level {stages} "
          f"({mid_all.shape[1]} values, {mid_seconds:.0f} s)", flush=True)
    rows = []
    for name, multi in (("last stage (as shipped)", False), (f"+ pooled {'+'.join(stages)}", True)):
        split = arrays(multi)
        data, _, _ = build_data(CachedActivations(acts.boundary, split, acts.source, 0.0), classes,
                                sample_fraction=1.0, sample_seed=0, weights=weights)
        tail = prep.fresh_net().tail(args.unfreeze)
        model = MultiScaleTail(tail, channels, mid_all.shape[1], len(classes)) if multi else tail
        t1 = time.perf_counter()
        result = fit(model, data, hp, listener=Quiet())
        seconds = time.perf_counter() - t1
        s = scores(probabilities(model, [split["test"].x]), test_y, classes, positive)
        row = {"config": name, "epochs": len(result.epochs), "best_epoch": result.best_epoch,
               "train_seconds": round(seconds, 1), **s}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result_doc = {"dataset": args.dataset, "images": len(labels), "classes": classes, "stages": stages,
                  "unfreeze": args.unfreeze, "lr": args.lr, "seed": args.seed, "auto_label_accuracy": auto_acc,
                  "train": len(tr), "val": len(va), "test": len(test_y), "cpu": cpu_name(),
                  "threads": args.threads, "python": platform.python_version(),
                  "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"trainer-multiscale-{args.dataset}-{len(labels)}{f'-s{args.seed}' if args.seed else ''}.json"
    out.write_text(json.dumps(result_doc, indent=2))
    print()
    print(f"{args.dataset} ({len(labels)} images, unfreeze {args.unfreeze}, no views; CPU {cpu_name()})")
    print(f"{'head':<32} {'test acc':>8} {'acc@R95':>8} {'epochs':>6} {'best':>4} {'s':>6}  recall per class")
    for r in rows:
        at = f"{r['accuracy_at_recall_95']:.3f}" if "accuracy_at_recall_95" in r else "-"
        recall = " ".join(f"{c}:{v:.2f}" for c, v in r["recall"].items())
        print(f"{r['config']:<32} {r['accuracy']:>8.3f} {at:>8} {r['epochs']:>6} {r['best_epoch'] or 0:>4} "
              f"{r['train_seconds']:>6.1f}  {recall}")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
