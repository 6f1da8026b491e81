"""Benchmark of the augmenter on ELPV: time, generated/kept per class, and whether the X2 filter matters.

The ELPV solar cells (PyPI ``elpv-dataset``; defect = probability >= 0.5) are put in a temporary
filesystem object store with a labeled manifest (true labels; a stratified 10/15/75 test/val/train
split). The augmenter worker handles a ``dataset.labeled`` event on the memory bus exactly as in the
pipeline; then a quick classifier (logistic regression on frozen EfficientNet-Lite0 features) is
trained on real only, real + kept generated, real + all generated, and scored on val and test.

    python benchmarks/augmenter.py [--max-imbalance 1.0] [--threshold 0.9] [--limit 800]

Prints a table and writes benchmarks/results/augmenter.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dlforge.augmenter.filters import FrozenNetworkFeatures
from dlforge.augmenter.settings import AugmenterSettings
from dlforge.augmenter.worker import RUNS, SAMPLES, build_deps, service
from dlforge.common.bus import Delivery
from dlforge.common.events import (
    ClassCount,
    DatasetAugmented,
    DatasetLabeled,
    Event,
    PipelineOptions,
    Spec,
    Topic,
    decode,
    encode,
)
from dlforge.common.objects import ObjectStore
from dlforge.common.runtime import Backends, Outcome, Worker
from dlforge.common.settings import load_settings
from dlforge.vision.manifest import Item, Manifest, load_arrays, load_manifest, save_manifest

RESULTS = Path(__file__).resolve().parent / "results" / "augmenter.json"


def elpv_manifest(objects: ObjectStore, *, dataset_id: str, seed: int, limit: int | None) -> Manifest:
    """ELPV in the object store with true labels and a stratified 10/15/75 test/val/train split."""
    from sklearn.model_selection import train_test_split

    from dlforge.labeler.demo_data import elpv_cells, elpv_root

    root, rows = elpv_root(), elpv_cells()
    if limit:
        pick = np.random.default_rng(seed).choice(len(rows), size=min(limit, len(rows)), replace=False)
        rows = [rows[i] for i in sorted(pick)]
    labels = np.array([r.label for r in rows])
    idx = np.arange(len(rows))
    rest, test = train_test_split(idx, test_size=0.10, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=0.15 / 0.90, stratify=labels[rest], random_state=seed)
    split = {**dict.fromkeys(train.tolist(), "train"), **dict.fromkeys(val.tolist(), "val"),
             **dict.fromkeys(test.tolist(), "test")}
    items = []
    for n, cell in enumerate(rows):
        path, kind = cell.name, cell.kind
        data = (root / path).read_bytes()
        key = f"labeler/{dataset_id}/images/{Path(path).name}"
        objects.put_bytes(key, data, content_type="image/png")
        items.append(Item(item_id=Path(path).stem, key=key, name=path, sha256=hashlib.sha256(data).hexdigest(),
                          width=300, height=300, label=str(labels[n]), label_source="human", confidence=1.0,
                          split=split[n], domain=kind))  # type: ignore[arg-type]
    return Manifest(dataset_id=dataset_id, name="elpv", classes=["defect", "good"], items=items)


async def run_augmenter(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings(
        AugmenterSettings, bus="memory://", objects=f"file://{workdir}/objects", docs=f"sqlite:///{workdir}/docs.db",
        augmenter_threshold=args.threshold, augmenter_filter_image_size=args.filter_size, retry_attempts=1,
    )
    backends = Backends.from_settings(settings)
    await backends.start()
    try:
        manifest = elpv_manifest(backends.objects, dataset_id="elpv", seed=args.seed, limit=args.limit)
        labels_key = "labeler/elpv/labeled.json"
        save_manifest(backends.objects, labels_key, manifest)
        counts = {c: sum(1 for i in manifest.items if i.label == c) for c in manifest.classes}
        load_before = os.getloadavg()
        event = Event.new(DatasetLabeled(
            dataset_id="elpv", labels_key=labels_key, classes=manifest.classes,
            counts=[ClassCount(label=c, count=n) for c, n in counts.items()],
            human_labels=len(manifest.items), auto_labels=0, rounds=0,
            spec=Spec(positive_class="defect"),
            options=PipelineOptions(min_per_class=args.min_per_class, max_imbalance=args.max_imbalance,
                                    seed=args.seed),
        ), run_id="bench")
        started, cpu_started = time.perf_counter(), time.process_time()
        outcome = await Worker(service, backends, deps=await build_deps(settings, backends)).process(
            Delivery(topic=event.event_type.value, key=event.run_id, value=encode(event)))
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        if outcome != Outcome.HANDLED:
            raise SystemExit(f"the augmenter did not handle the event: {outcome}")
        sub = await backends.bus.subscribe(group="bench", topics=[Topic.DATASET_AUGMENTED])
        delivery = await sub.get(timeout=1)
        assert delivery is not None
        augmented = decode(delivery.value).payload
        assert isinstance(augmented, DatasetAugmented)
        record = await backends.docs.get(RUNS, "elpv")
        samples = await backends.docs.find(SAMPLES, {"dataset_id": "elpv"}, sort=[("_id", 1)])
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "load_before": load_before, "record": record,
                "samples": samples, "manifest": manifest,
                "training_manifest": load_manifest(backends.objects, augmented.manifest_key),
                "objects": backends.objects}
    finally:
        await backends.stop()


def quick_classifiers(
    run: dict[str, Any], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """LR on frozen features trained on real / real+kept / real+all generated; scored on val and test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    manifest: Manifest = run["manifest"]
    objects: ObjectStore = run["objects"]
    extractor = FrozenNetworkFeatures(image_size=args.eval_size)
    classes = manifest.classes
    positive = classes.index("defect")

    def features(items: list[Item]) -> np.ndarray:
        return extractor(load_arrays(objects, items, size=args.eval_size, channels=1))

    t = time.perf_counter()
    split = {s: [i for i in manifest.items if i.split == s] for s in ("train", "val", "test")}
    feats = {s: features(items) for s, items in split.items()}
    ys = {s: manifest.label_indices(items) for s, items in split.items()}
    gen_docs = run["samples"]
    gen_items = [Item(item_id=d["sample_id"], key=d["key"], name=d["key"], sha256=d["sha256"], width=d["width"],
                      height=d["height"], label=d["label"]) for d in gen_docs]
    gen_feats = features(gen_items) if gen_items else np.zeros((0, feats["train"].shape[1]), dtype=np.float32)
    gen_y = manifest.label_indices(gen_items)
    kept = np.array([bool(d["kept"]) for d in gen_docs], dtype=bool)
    feature_seconds = time.perf_counter() - t

    held_out = np.concatenate([ys["val"], ys["test"]])
    held_feats = np.concatenate([feats["val"], feats["test"]])
    n_val = len(ys["val"])
    none, every = np.zeros(len(gen_docs), dtype=bool), np.ones(len(gen_docs), dtype=bool)
    variants = (("real only", none, None), ("real only, balanced weights", none, "balanced"),
                ("real + kept (X2)", kept, None), ("real + all generated", every, None))
    rows, correct, hits = [], [], []
    for name, mask, weight in variants:
        x = np.concatenate([feats["train"], gen_feats[mask]])
        y = np.concatenate([ys["train"], gen_y[mask]])
        with threadpool_limits(limits=1, user_api="blas"):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=args.eval_c, class_weight=weight,
                                                                       max_iter=3000)).fit(x, y)
            pred = model.predict(held_feats)
        row: dict[str, Any] = {"train_set": name, "train_images": len(y),
                               "defect_share": round(float(np.mean(y == positive)), 3)}
        for s, part in (("val", slice(0, n_val)), ("test", slice(n_val, None)), ("held_out", slice(None))):
            p, truth = pred[part], held_out[part]
            row[f"{s}_accuracy"] = round(float(np.mean(p == truth)), 4)
            row[f"{s}_defect_recall"] = round(float(np.mean(p[truth == positive] == positive)), 4)
        correct.append(pred == held_out)
        hits.append(pred[held_out == positive] == positive)
        rows.append(row)
    # the same samples under other thresholds (the stored confidences decide; nothing is regenerated)
    confidence = np.array([d["confidence"] if d["confidence"] is not None else 1.0 for d in gen_docs])
    sweep = []
    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        mask = confidence >= threshold
        with threadpool_limits(limits=1, user_api="blas"):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=args.eval_c, max_iter=3000)).fit(
                np.concatenate([feats["train"], gen_feats[mask]]), np.concatenate([ys["train"], gen_y[mask]]))
            pred = model.predict(held_feats)
        sweep.append({"threshold": threshold, "kept": int(mask.sum()),
                      "held_out_accuracy": round(float(np.mean(pred == held_out)), 4),
                      "held_out_defect_recall": round(float(np.mean(pred[held_out == positive] == positive)), 4)})
    # paired bootstrap over the held-out images (val + test): 95 % interval of the change vs real only
    rng = np.random.default_rng(0)
    boot_all = rng.integers(0, len(held_out), size=(2000, len(held_out)))
    boot_pos = rng.integers(0, len(hits[0]), size=(2000, len(hits[0])))
    for row, c, h in zip(rows, correct, hits, strict=True):
        d_acc = (c[boot_all].mean(axis=1) - correct[0][boot_all].mean(axis=1)) * 100
        d_rec = (h[boot_pos].mean(axis=1) - hits[0][boot_pos].mean(axis=1)) * 100
        row["held_out_accuracy_change_pts_ci95"] = [round(float(v), 1) for v in np.percentile(d_acc, [2.5, 97.5])]
        row["held_out_recall_change_pts_ci95"] = [round(float(v), 1) for v in np.percentile(d_rec, [2.5, 97.5])]
        row["feature_seconds_all_sets"] = round(feature_seconds, 1)
    return rows, sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-imbalance", type=float, default=1.0,
                        help="options.max_imbalance (ELPV train is 2.2:1, so the default 3.0 generates nothing)")
    parser.add_argument("--min-per-class", type=int, default=200)
    parser.add_argument("--threshold", type=float, default=0.9, help="X2 filter threshold")
    parser.add_argument("--filter-size", type=int,
                        default=AugmenterSettings.model_fields["augmenter_filter_image_size"].default,
                        help="X2 filter input side (default: the service's, which reuses the labeler's 224 px pass)")
    parser.add_argument("--eval-size", type=int, default=128, help="input side of the quick classifiers' features")
    parser.add_argument("--eval-c", type=float, default=0.01, help="C of the quick classifiers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use a random subset of this many images")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="dlforge-augbench-") as tmp:
        run = asyncio.run(run_augmenter(Path(tmp), args))
        record = run["record"]
        rows, sweep = quick_classifiers(run, args)

    counts = record["augmentation"]
    fit = record.get("filter") or {}
    print(f"\naugmenter on ELPV ({len(run['manifest'].items)} images; max_imbalance={args.max_imbalance}, "
          f"min_per_class={args.min_per_class}, threshold={args.threshold}, filter {args.filter_size}px)")
    print(f"  handler seconds: {run['seconds']:.1f} wall, {run['cpu_seconds']:.1f} CPU (2 cores; load average "
          f"before {run['load_before'][0]:.1f})")
    print(f"  timings: {record['timings']}")
    print(f"  X2 filter: val accuracy {fit.get('val_accuracy')}, C={fit.get('C')}, "
          f"trained on {fit.get('train_count')} real train images in {fit.get('seconds')} s")
    print(f"  {'class':<8} {'real':>6} {'target':>7} {'generated':>10} {'kept':>6} {'kept %':>7}")
    plan = {p["label"]: p for p in record["plan"]}
    for c in counts:
        share = f"{100 * c['kept'] / c['generated']:.0f}%" if c["generated"] else "-"
        print(f"  {c['label']:<8} {c['real']:>6} {plan[c['label']]['target']:>7} {c['generated']:>10} "
              f"{c['kept']:>6} {share:>7}")
    print(f"\n  {'quick classifier trained on':<28} {'images':>6} {'defect%':>8} {'val acc':>8} {'val rec':>8} "
          f"{'test acc':>9} {'test rec':>9}   change vs real only on val+test, 95% CI (acc | recall, pts)")
    for r in rows:
        acc_ci, rec_ci = r["held_out_accuracy_change_pts_ci95"], r["held_out_recall_change_pts_ci95"]
        print(f"  {r['train_set']:<28} {r['train_images']:>6} {100 * r['defect_share']:>7.1f}% "
              f"{r['val_accuracy']:>8.3f} {r['val_defect_recall']:>8.3f} {r['test_accuracy']:>9.3f} "
              f"{r['test_defect_recall']:>9.3f}   [{acc_ci[0]:+.1f}, {acc_ci[1]:+.1f}] | "
              f"[{rec_ci[0]:+.1f}, {rec_ci[1]:+.1f}]")

    print("\n  X2 threshold (same samples)   kept   val+test acc   val+test defect recall")
    for w in sweep:
        print(f"  {w['threshold']:>27.2f} {w['kept']:>6} {w['held_out_accuracy']:>14.3f} "
              f"{w['held_out_defect_recall']:>24.3f}")

    result = {
        "benchmark": "augmenter",
        "dataset": "elpv",
        "images": len(run["manifest"].items),
        "options": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_end": os.getloadavg()},
        "handler_seconds": round(run["seconds"], 2),
        "handler_cpu_seconds": round(run["cpu_seconds"], 2),
        "loadavg_before": run["load_before"],
        "timings": record["timings"],
        "augmentation": counts,
        "plan": record["plan"],
        "filter": fit,
        "kept_confidence": _confidence_summary(run["samples"]),
        "quick_classifiers": rows,
        "threshold_sweep": sweep,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {args.out}")


def _confidence_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in sorted({s["label"] for s in samples}):
        conf = np.array([s["confidence"] for s in samples if s["label"] == label and s["confidence"] is not None])
        by_recipe: dict[str, list[bool]] = {}
        for s in samples:
            if s["label"] == label:
                op = "mixup" if s["recipe"].startswith("mixup") else s["recipe"]
                by_recipe.setdefault(op, []).append(bool(s["kept"]))
        out[label] = {
            "confidence_quartiles": [round(float(q), 3) for q in np.quantile(conf, [0.25, 0.5, 0.75])] if len(conf)
            else None,
            "kept_share_by_recipe": {k: round(float(np.mean(v)), 3) for k, v in sorted(by_recipe.items())},
        }
    return out


if __name__ == "__main__":
    main()
