"""What the final training's learning choices buy: early stopping, confidence weights, views, test-time views.

One activation cache (EfficientNet-Lite0, ImageNet weights, every declared view) per data set, then
the same tail trained under each configuration with the trainer's own code (build_data, train_tail,
fit). Labels: ``--labels mixed`` mimics the pipeline: 20 % of the non-test items are labeled by people
(half of them, at random, form the val split the trainer validates and checks views on), the other
80 % are auto-labeled by a logistic regression on frozen ImageNet features fitted on the people's
labels (its probability is the auto-label's confidence); ``--labels true`` gives every item its
true label. The test split (20 %, true labels) is never seen before the end.

    python benchmarks/trainer_learning.py --dataset elpv --limit 1000
    python benchmarks/trainer_learning.py --dataset digits --limit 1000
    python benchmarks/trainer_learning.py --dataset fashion-mnist --limit 1000

``--input-size`` trains and tests the tail at another side (the auto-labels still come from the
network's own side); ``--relabel`` adds a second round in which the trained tail relabels the
auto-labeled train rows and a fresh tail trains on them (both, and their average, are tested);
``--crossfit`` relabels each half of those rows with a tail trained without it instead, averaged with
the labeler's probabilities. ``--targets soft`` replaces the confidence weights with soft targets (weight
1, the confidence on the label, the rest shared evenly among the other classes). ``--ensemble K`` trains
each configuration K times with seeds that differ and tests their averaged probabilities (with ``--soup``
the K share their starting weights and their averaged weights are tested too); ``--people-only`` trains it
once more on people's train rows alone.

Prints a table (test accuracy at the argmax, per-class recall, and for two classes the accuracy at
the lowest threshold giving recall >= 0.95 on test) and writes
benchmarks/results/trainer-learning-<dataset>-<labels>-u<unfreeze>[-lr…-body…]-<images>[-s<seed>][…].json
(each option that is not its default is part of the name, ``--configs`` as ``-c<numbers>``, ``--views``
as ``-v<views>`` and ``--max-seconds`` as ``-t<seconds>``).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import io
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_name
from PIL import Image

from dlforge.common.objects.fs import FsObjectStore
from dlforge.optimizer.handlers import averaging_gain, val_figures
from dlforge.trainer.cache import ActivationCache, CachedActivations, OnnxPrefixRunner, SplitArrays
from dlforge.trainer.handlers import build_data, train_tail
from dlforge.trainer.params import EpochMetrics, TrainParams
from dlforge.trainer.stages import staged
from dlforge.trainer.training import fit
from dlforge.trainer.views import IDENTITY, parse_views
from dlforge.vision.manifest import Item, Manifest, Split
from dlforge.vision.networks import build_network, spec_of

ARCH = "efficientnet_lite0"
RESULTS = Path(__file__).resolve().parent / "results"


class Quiet:
    def on_step(self, step: int, loss: float) -> None:
        """Not reported."""

    def on_epoch(self, metrics: EpochMetrics) -> bool:
        return True

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        """Not saved."""


# -- data sets -----------------------------------------------------------------------------------


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def load_images(dataset: str, limit: int, seed: int) -> tuple[list[bytes], list[str], list[str]]:
    """(PNG bytes, labels, classes) of a class-stratified random subset of ``limit`` images."""
    if dataset == "elpv":
        from dlforge.labeler.demo_data import elpv_cells, elpv_root

        root = elpv_root()
        cells = elpv_cells()
        labels = [c.label for c in cells]
        blobs: Any = [root / c.name for c in cells]
    elif dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        labels = [str(int(t)) for t in d.target]
        blobs = [(img * (255 / 16)).round() for img in d.images]
    elif dataset == "fashion-mnist":
        base = Path("/usr/share/datasets/fashion-mnist")
        with gzip.open(base / "t10k-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(base / "t10k-labels-idx1-ubyte.gz") as f:
            targets = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
        names = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
        labels = [names[int(t)] for t in targets]
        blobs = list(images)
    else:
        raise SystemExit(f"unknown dataset {dataset!r}")
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    chosen: list[int] = []
    for c in classes:
        members = [i for i, lab in enumerate(labels) if lab == c]
        k = min(len(members), round(limit * len(members) / len(labels)))
        chosen += rng.choice(members, size=k, replace=False).tolist()
    rng.shuffle(chosen)
    out = []
    for i in chosen:
        b = blobs[i]
        out.append(b.read_bytes() if isinstance(b, Path) else _png(np.asarray(b)))
    return out, [labels[i] for i in chosen], classes


def make_manifest(objects: FsObjectStore, dataset: str, blobs: list[bytes], labels: list[str], classes: list[str],
                  seed: int) -> tuple[Manifest, np.ndarray]:
    """Every item with its true label; splits: test 20 % (stratified), the rest 'pool' (train for now)."""
    rng = np.random.default_rng(seed + 1)
    split = np.array(["train"] * len(labels), dtype=object)
    for c in classes:
        members = np.flatnonzero(np.array(labels) == c)
        split[rng.choice(members, size=round(0.2 * len(members)), replace=False)] = "test"
    items = []
    for i, (data, label) in enumerate(zip(blobs, labels, strict=True)):
        key = f"bench/{dataset}/{i:05d}.png"
        objects.put_bytes(key, data, content_type="image/png")
        img = Image.open(io.BytesIO(data))
        s: Split = split[i]
        items.append(Item(item_id=f"{i:05d}", key=key, name=key, sha256=hashlib.sha256(data).hexdigest(),
                          width=img.width, height=img.height, label=label, label_source="given", confidence=1.0,
                          split=s))
    return Manifest(dataset_id=dataset, name=dataset, classes=classes, items=items), split


# -- labels as the pipeline would give them --------------------------------------------------------


def mixed_labels(features: np.ndarray, y_true: np.ndarray, *, people_fraction: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(labels, confidence, people mask, val mask) for the pool rows: people's labels true, the rest auto."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed + 2)
    n = len(y_true)
    people = np.zeros(n, dtype=bool)
    people[rng.choice(n, size=round(people_fraction * n), replace=False)] = True
    val = np.zeros(n, dtype=bool)
    p_rows = np.flatnonzero(people)
    val[rng.choice(p_rows, size=len(p_rows) // 2, replace=False)] = True
    x = features.astype(np.float32)
    x = (x - x[people].mean(0)) / (x[people].std(0) + 1e-6)
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(x[people], y_true[people])
    proba = clf.predict_proba(x)
    labels = np.where(people, y_true, clf.classes_[proba.argmax(1)])
    conf = np.where(people, 1.0, proba.max(1))
    return labels, conf, people, val


def true_labels(y_true: np.ndarray, *, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(labels, confidence, people mask, val mask) with every pool row labeled by people; 10 % of them val."""
    rng = np.random.default_rng(seed + 2)
    n = len(y_true)
    val = np.zeros(n, dtype=bool)
    val[rng.choice(n, size=round(0.1 * n), replace=False)] = True
    return y_true, np.ones(n), np.ones(n, dtype=bool), val


# -- evaluation --------------------------------------------------------------------------------------


def probabilities(tail: torch.nn.Module, xs: list[np.ndarray]) -> np.ndarray:
    """Softmax of ``tail`` averaged over the arrays of ``xs`` (one per view)."""
    tail.eval()
    out = []
    with torch.inference_mode():
        for x in xs:
            p = [torch.softmax(tail(torch.from_numpy(np.asarray(x[lo:lo + 256], dtype=np.float32))), 1)
                 for lo in range(0, len(x), 256)]
            out.append(torch.cat(p).numpy())
    return np.mean(out, axis=0)


def scores(proba: np.ndarray, y: np.ndarray, classes: list[str], positive: str | None) -> dict[str, Any]:
    pred = proba.argmax(1)
    out: dict[str, Any] = {
        "accuracy": float((pred == y).mean()),
        "recall": {c: float((pred[y == i] == i).mean()) for i, c in enumerate(classes)},
    }
    if positive is not None:
        k = classes.index(positive)
        s = proba[:, k]
        pos = y == k
        # the highest threshold whose recall on test is >= 0.95 (an oracle operating point on test)
        t = np.sort(s[pos])[::-1][int(np.ceil(0.95 * pos.sum())) - 1]
        flagged = s >= t
        out["accuracy_at_recall_95"] = float(((flagged & pos) | (~flagged & ~pos)).mean())
        out["recall_at_threshold"] = float(flagged[pos].mean())
    return out


# -- the data, cache and labels every configuration shares ---------------------------------------------


@dataclass
class Prepared:
    """A data set's images in an object store, its manifest, the activation cache at the tail's boundary
    (and the frozen trunk's pooled features), and the pool's labels as the pipeline would give them:
    ``lab_idx`` (people's true, the rest auto), ``conf`` (1 for people, the auto-label's probability),
    ``people`` and the train / people-labeled val rows ``tr`` / ``va`` of the pool (the cache's train split)."""

    objects: FsObjectStore
    manifest: Manifest
    labels: list[str]
    classes: list[str]
    fresh_net: Callable[[], Any]
    acts: CachedActivations
    feats: CachedActivations
    cache_seconds: float
    index: dict[str, int]
    pool: SplitArrays
    y_pool: np.ndarray
    lab_idx: np.ndarray
    conf: np.ndarray
    people: np.ndarray
    auto_acc: float
    tr: np.ndarray
    va: np.ndarray


def prepare(dataset: str, limit: int, *, seed: int, unfreeze: int, views: tuple[str, ...], labels: str,
            threads: int, work: Path, input_size: int | None = None) -> Prepared:
    objects = FsObjectStore(work / "objects")
    blobs, image_labels, classes = load_images(dataset, limit, seed)
    manifest, _ = make_manifest(objects, dataset, blobs, image_labels, classes, seed)
    spec = spec_of(ARCH)

    def fresh_net() -> Any:
        torch.manual_seed(seed)
        return staged(build_network(ARCH, len(classes), pretrained=True))

    net = fresh_net()
    cache = ActivationCache(objects, work_dir=work / "trainer", runner=OnnxPrefixRunner(threads=threads))
    digest = hashlib.sha256(manifest.model_dump_json().encode()).hexdigest()
    t0 = time.perf_counter()
    acts = cache.get(net=net, spec=spec, manifest=manifest, manifest_digest=digest, weights_digest="imagenet",
                     input_size=input_size or spec.input_size, boundary=net.boundary(unfreeze),
                     from_boundary=net.boundary(max(unfreeze, 3)), views=views)
    # the auto-labeler's features stay at the network's own side, so every --input-size gets the same labels
    feats = cache.get(net=net, spec=spec, manifest=manifest, manifest_digest=digest, weights_digest="imagenet",
                      input_size=spec.input_size, boundary=net.boundary(0))
    cache_seconds = time.perf_counter() - t0

    # Relabel the pool (cached 'train' rows) as the pipeline would and carve the people-labeled val split.
    index = {c: i for i, c in enumerate(classes)}
    pool = acts.splits["train"]
    y_pool = np.array([index[lab] for lab in pool.labels])
    if labels == "mixed":
        lab_idx, conf, people, val_mask = mixed_labels(np.asarray(feats.splits["train"].x), y_pool,
                                                       people_fraction=0.2, seed=seed)
    else:
        lab_idx, conf, people, val_mask = true_labels(y_pool, seed=seed)
    auto = ~people
    auto_acc = float((lab_idx[auto] == y_pool[auto]).mean()) if auto.any() else float("nan")
    return Prepared(objects, manifest, image_labels, classes, fresh_net, acts, feats, cache_seconds, index, pool,
                    y_pool, lab_idx, conf, people, auto_acc, np.flatnonzero(~val_mask), np.flatnonzero(val_mask))


# -- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["elpv", "digits", "fashion-mnist"], default="elpv")
    parser.add_argument("--limit", type=int, default=1000, help="class-stratified subset size")
    parser.add_argument("--labels", choices=["mixed", "true"], default="mixed")
    parser.add_argument("--views", default="flips", help="declared view set (see dlforge.trainer.views)")
    parser.add_argument("--unfreeze", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--body-lr-scale", type=float, default=None,
                        help="the unfrozen backbone stages' learning rate as a share of --lr (default: TrainParams')")
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                        help="the learning-rate schedule of the long configurations (cosine: over --max-epochs)")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="the long configurations' weight average (TrainParams.ema_decay; 0: off)")
    parser.add_argument("--max-seconds", type=float, default=0.0, help="time cap of a configuration's training")
    parser.add_argument("--tolerance", type=float, default=0.02, help="the view check's least allowed cost")
    parser.add_argument("--error-share", type=float, default=0.5, help="the view check's share of the probe error")
    parser.add_argument("--configs", default="all", help="comma list of configuration numbers (0-6) or 'all'")
    parser.add_argument("--input-size", type=int, default=None,
                        help="the side the tail trains and tests at (default: the network's, 224); the auto-labels "
                        "come from the network's side whatever this is")
    parser.add_argument("--relabel", action="store_true",
                        help="a second round for each configuration without test-time views: the trained tail "
                        "relabels the auto-labeled train rows, a fresh tail trains on them; both and their average "
                        "are tested")
    parser.add_argument("--people-only", action="store_true",
                        help="also train each configuration without test-time views on people's train rows alone")
    parser.add_argument("--ensemble", type=int, default=1,
                        help="also test the average of this many tails of each configuration without test-time "
                             "views that differ only by their seed (the first is the configuration's own)")
    parser.add_argument("--soup", action="store_true",
                        help="with --ensemble: the members share the starting weights (the head too) and their "
                             "weights' average is tested as well")
    parser.add_argument("--crossfit", action="store_true",
                        help="as --relabel, but each half of the auto-labeled rows is relabeled by a tail trained "
                        "without it, averaged with the labeler's probabilities (two more trainings)")
    parser.add_argument("--targets", choices=["hard", "soft"], default="hard",
                        help="how an auto-label's confidence enters the configurations with confidence weights: "
                        "hard (the trainer's: a one-hot target weighed by it) or soft (weight 1, the target puts "
                        "the confidence on the label and the rest evenly on the other classes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    if args.ensemble < 1:
        parser.error("--ensemble: at least 1 (1: no ensemble)")
    if args.soup and args.ensemble < 2:
        parser.error("--soup averages the members of --ensemble K: give K >= 2")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dlforge-bench-learning-"))
    views = parse_views(args.views)
    prep = prepare(args.dataset, args.limit, seed=args.seed, unfreeze=args.unfreeze, views=views,
                   labels=args.labels, threads=args.threads, work=work, input_size=args.input_size)
    labels, classes = prep.labels, prep.classes
    fresh_net, acts, cache_seconds = prep.fresh_net, prep.acts, prep.cache_seconds
    index, pool, y_pool, lab_idx, conf = prep.index, prep.pool, prep.y_pool, prep.lab_idx, prep.conf
    people, auto, auto_acc, tr, va = prep.people, ~prep.people, prep.auto_acc, prep.tr, prep.va
    positive = "defect" if args.dataset == "elpv" else None
    print(f"{args.dataset}: {len(labels)} images, {len(classes)} classes, views {list(views)}; cache "
          f"{cache_seconds:.0f}s; work dir {work}")

    def part(arr: SplitArrays, rows: np.ndarray, lab: np.ndarray) -> SplitArrays:
        return SplitArrays(np.asarray(arr.x[rows]), [classes[i] for i in lab[rows]], [arr.item_ids[i] for i in rows])

    def splits_of(arrays: dict[str, SplitArrays], lab: np.ndarray = lab_idx,
                  rows: np.ndarray = tr) -> dict[str, SplitArrays]:
        return {"train": part(arrays["train"], rows, lab), "val": part(arrays["train"], va, y_pool),
                "test": arrays["test"]}

    def labeled_as(lab: np.ndarray, rows: np.ndarray = tr) -> CachedActivations:
        return CachedActivations(acts.boundary, splits_of(acts.splits, lab, rows), acts.source, 0.0,
                                 views={v: splits_of(s, lab, rows) for v, s in acts.views.items()})

    relabeled = labeled_as(lab_idx)
    test_x = acts.splits["test"].x
    test_y = np.array([index[lab] for lab in acts.splits["test"].labels])
    test_views = [acts.views[v]["test"].x for v in views[1:]]
    print(f"train {len(tr)} (people {int(people[tr].sum())}, auto {int(auto[tr].sum())}; auto-label accuracy "
          f"{auto_acc:.3f}), val {len(va)} (people), test {len(test_y)}")

    base = TrainParams(lr=args.lr, batch_size=32, epochs=3, unfreeze=args.unfreeze, dropout=0.2, seed=args.seed,
                       **({} if args.body_lr_scale is None else {"body_lr_scale": args.body_lr_scale}))
    long = base.model_copy(update={"epochs": args.max_epochs, "patience": args.patience,
                                   "max_seconds": args.max_seconds, "lr_schedule": args.lr_schedule,
                                   "ema_decay": args.ema_decay})
    configs: list[tuple[str, TrainParams, bool, str, bool]] = [
        # name, params, confidence weights, views ("none" | "checked" | "forced"), test-time views
        ("before: 3 epochs", base, False, "none", False),
        (f"early stop ({args.max_epochs}/{args.patience})", long, False, "none", False),
        ("+ confidence weights", long, True, "none", False),
        (f"+ {args.views} views, checked", long, True, "checked", False),
        (f"+ {args.views} views, checked, test-time views", long, True, "checked", True),
        (f"+ {args.views} views, forced", long, True, "forced", False),
        (f"+ {args.views} views, forced, test-time views", long, True, "forced", True),
    ]
    if args.configs != "all":
        configs = [configs[int(i)] for i in args.configs.split(",")]
    rows = []
    for name, hp, weighted, view_mode, tta in configs:

        def train_fresh(lab: np.ndarray, lab_conf: np.ndarray, rows: np.ndarray = tr, *, hp: TrainParams = hp,
                        weighted: bool = weighted, view_mode: str = view_mode, member: bool = False
                        ) -> tuple[torch.nn.Module, Any, float]:
            """A fresh tail trained on ``rows`` labeled ``lab`` (weights ``lab_conf``) under this configuration:
            (the tail, train_tail's result, seconds)."""
            soft = weighted and args.targets == "soft"
            data, _, _ = build_data(labeled_as(lab, rows), classes, sample_fraction=1.0, sample_seed=0,
                                    weights={pool.item_ids[i]: float(lab_conf[i]) for i in rows}
                                    if weighted and not soft else None)
            if soft:  # build_data keeps the train rows in the order of ``rows`` (a val split is given, no sample)
                assert len(data.train_y) == len(rows) and (data.train_y == lab[rows]).all()
                data = replace(data, train_soft=lab_conf[rows].astype(np.float32))
            if view_mode == "none":
                data = replace(data, train_views=[], val_views={})
            tail = fresh_net().tail(args.unfreeze)
            if member and not args.soup:  # an ensemble member: its new head drawn from its own seed
                torch.manual_seed(hp.seed)
                for module in tail.modules():
                    if isinstance(module, torch.nn.Linear):
                        module.reset_parameters()
            t1 = time.perf_counter()
            trained = train_tail(tail, data, hp, run=lambda d, h: fit(tail, d, h, listener=Quiet()),
                                 check=view_mode == "checked", tolerance=args.tolerance,
                                 error_share=args.error_share, threads=args.threads)
            return tail, trained, time.perf_counter() - t1

        tail, trained, seconds = train_fresh(lab_idx, conf)
        used = trained.views
        kept = [test_views[list(views[1:]).index(v)] for v in used[1:]]  # the test rows under the kept views
        p_test = probabilities(tail, [test_x])
        s = scores(probabilities(tail, [test_x, *kept]) if tta else p_test, test_y, classes, positive)
        if not tta and kept:  # the same trained tail, averaged over the views it kept (as exported)
            s["with_test_time_views"] = scores(probabilities(tail, [test_x, *kept]), test_y, classes, positive)
            # what the optimizer's test_views=trained decides on these val items (people's labels)
            val_x, val_y = relabeled.splits["val"].x, y_pool[va]
            val_kept = [relabeled.views[v]["val"].x for v in used[1:]]
            k = classes.index(positive) if positive is not None else None
            plain_val, averaged_val = (val_figures(probabilities(tail, xs), val_y, positive=k, min_recall=0.95)
                                       for xs in ([val_x], [val_x, *val_kept]))
            s["test_views_check"] = {"val_plain": plain_val, "val_averaged": averaged_val,
                                     "gain": averaging_gain(plain_val, averaged_val)}
        if (args.relabel or args.crossfit) and not tta:
            # round 2: the trained tail relabels the auto-labeled train rows (its argmax, its probability as the
            # confidence; people's labels stay), a fresh tail trains on them the same way, and the two rounds'
            # probabilities are averaged as well (an ensemble of two tails over the same frozen prefix).
            # --crossfit: each half of the auto-labeled rows is relabeled by a tail trained without it (people's
            # rows and the other half), its probabilities averaged with the labeler's (its confidence on its
            # label, the rest shared evenly among the other classes)
            auto_tr = tr[auto[tr]]
            if args.crossfit:
                fold = np.random.default_rng(args.seed + 7).permutation(len(auto_tr)) % 2
                p_auto = np.zeros((len(auto_tr), len(classes)))
                for f in (0, 1):
                    held = auto_tr[fold == f]
                    tail_f, _, _ = train_fresh(lab_idx, conf, np.setdiff1d(tr, held))
                    p_auto[fold == f] = probabilities(tail_f, [pool.x[held]])
                given = np.repeat(((1.0 - conf[auto_tr]) / max(len(classes) - 1, 1))[:, None], len(classes), axis=1)
                given[np.arange(len(auto_tr)), lab_idx[auto_tr]] = conf[auto_tr]
                p_auto = (p_auto + given) / 2
            else:
                p_auto = probabilities(tail, [pool.x[auto_tr]])
            lab2, conf2 = lab_idx.copy(), conf.copy()
            lab2[auto_tr], conf2[auto_tr] = p_auto.argmax(1), p_auto.max(1)
            tail2, trained2, seconds2 = train_fresh(lab2, conf2)
            p2 = probabilities(tail2, [test_x])
            s["relabel"] = {
                "by": "crossfit" if args.crossfit else "the trained tail",
                "auto_label_accuracy_before": float((lab_idx[auto_tr] == y_pool[auto_tr]).mean()),
                "auto_label_accuracy_after": float((lab2[auto_tr] == y_pool[auto_tr]).mean()),
                "changed": int((lab2[auto_tr] != lab_idx[auto_tr]).sum()), "auto_rows": len(auto_tr),
                "views": trained2.views, "epochs": len(trained2.result.epochs),
                "best_epoch": trained2.result.best_epoch, "train_seconds": round(seconds2, 1),
                "second": scores(p2, test_y, classes, positive),
                "ensemble": scores((p_test + p2) / 2, test_y, classes, positive)}
        if args.people_only and not tta:  # the same configuration on people's train rows alone (no auto-labels)
            own = tr[people[tr]]
            tail_p, trained_p, seconds_p = train_fresh(lab_idx, conf, own)
            s["people_only"] = {"rows": len(own), "views": trained_p.views, "epochs": len(trained_p.result.epochs),
                                "best_epoch": trained_p.result.best_epoch, "train_seconds": round(seconds_p, 1),
                                **scores(probabilities(tail_p, [test_x]), test_y, classes, positive)}
        if args.ensemble > 1 and not tta:  # tails that differ only by their seed, their probabilities averaged
            members, tails = [p_test], [tail]
            for k in range(1, args.ensemble):
                tail_k, _, _ = train_fresh(lab_idx, conf, hp=hp.model_copy(update={"seed": hp.seed + 1000 * k}),
                                           member=True)
                members.append(probabilities(tail_k, [test_x]))
                tails.append(tail_k)
            s["seed_ensemble"] = {"members": len(members), "same_init": args.soup,
                                  "each": [scores(m, test_y, classes, positive)["accuracy"] for m in members],
                                  **scores(np.mean(members, axis=0), test_y, classes, positive)}
            if args.soup:  # one network: the members' weights averaged (they share the starting weights)
                states = [t.state_dict() for t in tails]
                soup = copy.deepcopy(tail)
                soup.load_state_dict({k: (sum(st[k].double() for st in states) / len(states)).to(v.dtype)
                                      for k, v in states[0].items()})
                s["soup"] = scores(probabilities(soup, [test_x]), test_y, classes, positive)
        row = {"config": name, "views": used, "view_check": trained.check.val_accuracy if trained.check else None,
               "views_val_accuracy": trained.views_val_accuracy,
               "view_allowed_cost": trained.check.tolerance if trained.check else None,
               "epochs": len(trained.result.epochs), "best_epoch": trained.result.best_epoch,
               "out_of_time": trained.result.out_of_time,
               "train_seconds": round(seconds, 1), **s}
        rows.append(row)
        print(json.dumps(row), flush=True)
    model = cpu_name()
    result = {"dataset": args.dataset, "images": len(labels), "classes": classes, "labels": args.labels,
              "auto_label_accuracy": auto_acc, "train": len(tr), "val": len(va), "test": len(test_y),
              "unfreeze": args.unfreeze, "lr": args.lr, "body_lr_scale": base.body_lr_scale,
              "max_epochs": args.max_epochs, "patience": args.patience, "lr_schedule": args.lr_schedule,
              "ema_decay": args.ema_decay, "targets": args.targets, "ensemble": args.ensemble, "soup": args.soup,
              "people_only": args.people_only,
              "input_size": args.input_size or spec_of(ARCH).input_size,
              "max_seconds": args.max_seconds, "tolerance": args.tolerance,
              "error_share": args.error_share, "declared_views": list(views), "cpu": model,
              "threads": args.threads, "load_average": os.getloadavg()[0], "python": platform.python_version(),
              "cache_seconds": round(cache_seconds, 1), "seconds": round(time.perf_counter() - started, 1),
              "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    seed = f"-s{args.seed}" if args.seed else ""
    seed += "" if args.lr_schedule == "constant" else f"-{args.lr_schedule}{args.max_epochs}"
    seed += "" if args.patience == 5 else f"-p{args.patience}"
    seed += f"-ema{args.ema_decay:g}" if args.ema_decay else ""
    seed += f"-px{args.input_size}" if args.input_size else ""
    seed += "-crossfit" if args.crossfit else "-relabel" if args.relabel else ""
    seed += "-soft" if args.targets == "soft" else ""
    seed += "-people" if args.people_only else ""
    seed += f"-ens{args.ensemble}" if args.ensemble > 1 else ""
    seed += "-soup" if args.soup else ""
    seed += "" if args.configs == "all" else f"-c{args.configs.replace(',', '')}"
    seed += "" if args.views == "flips" else f"-v{args.views.replace(',', '+')}"
    seed += f"-t{args.max_seconds:g}" if args.max_seconds else ""
    rates = f"-lr{args.lr:g}-body{base.body_lr_scale:g}" if args.unfreeze else ""
    out = RESULTS / f"trainer-learning-{args.dataset}-{args.labels}-u{args.unfreeze}{rates}-{len(labels)}{seed}.json"
    out.write_text(json.dumps(result, indent=2))
    print()
    print(f"{args.dataset} ({len(labels)} images; labels {args.labels}, auto-label accuracy {auto_acc:.3f}; "
          f"unfreeze {args.unfreeze}, lr {args.lr}, backbone stages at {base.body_lr_scale:g} x lr; CPU {model})")
    print_table(rows)
    print(f"\nwritten {out}")


def print_table(rows: list[dict[str, Any]]) -> None:
    """The configurations' rows of a result (its ``rows``) as a table."""
    head = f"{'configuration':<46} {'test acc':>8} {'acc@R95':>8} {'epochs':>6} {'best':>4} {'s':>6}  recall per class"
    print(head)
    print("-" * len(head))

    def line(title: str, t: dict[str, Any], cols: str = f"{'':>6} {'':>4} {'':>6}", after: str = "") -> str:
        rec = " ".join(f"{c}:{v:.2f}" for c, v in t["recall"].items())
        a95 = f"{t['accuracy_at_recall_95']:.3f}" if "accuracy_at_recall_95" in t else "-"
        return f"{title:<46} {t['accuracy']:>8.3f} {a95:>8} {cols}  {rec}{after}"

    for r in rows:
        print(line(r["config"], r, f"{r['epochs']:>6} {r['best_epoch']:>4} {r['train_seconds']:>6.1f}",
                   f"  views={','.join(v for v in r['views'] if v != IDENTITY) or '-'}"))
        if "with_test_time_views" in r:
            print(line("  the same, averaged over its views", r["with_test_time_views"]))
            c = r["test_views_check"]
            shown = " / ".join(f"{a:.3f} -> {b:.3f}" for a, b in zip(c["val_plain"], c["val_averaged"], strict=True)
                               if a is not None and b is not None)
            print(f"  test_views=trained on val (argmax / at recall 0.95): {shown}: "
                  f"{'averages' if c['gain'] == 'higher' else 'stays plain'} ({c['gain']})")
        if "relabel" in r:
            rl = r["relabel"]
            print(f"  relabeled by {rl['by']}: {rl['changed']} of {rl['auto_rows']} auto-labels changed, their "
                  f"accuracy {rl['auto_label_accuracy_before']:.3f} -> {rl['auto_label_accuracy_after']:.3f}")
            trained_cols = f"{rl['epochs']:>6} {rl['best_epoch']:>4} {rl['train_seconds']:>6.1f}"
            print(line("  a fresh tail on those labels", rl["second"], trained_cols))
            print(line("  the two tails averaged", rl["ensemble"]))
        if "people_only" in r:
            po = r["people_only"]
            print(line(f"  people's {po['rows']} train rows alone", po,
                       f"{po['epochs']:>6} {po['best_epoch']:>4} {po['train_seconds']:>6.1f}"))
        if "seed_ensemble" in r:
            se = r["seed_ensemble"]
            each = ", ".join(f"{a:.3f}" for a in se["each"])
            print(line(f"  {se['members']} seeds' probabilities averaged", se, after=f"  members {each}"))
        if "soup" in r:
            print(line("  their weights averaged (one network)", r["soup"]))


if __name__ == "__main__":
    main()
