"""Proposer benchmark on ELPV: build the model repository, propose a model, print the ranking table.

The ELPV solar cells (PyPI ``elpv-dataset``; defect = probability >= 0.5) become a training
manifest with a seeded 10 % test / 15 % val / rest train split in a temporary (or ``--store``)
filesystem object store; the proposer's handler then runs on a ``dataset.augmented`` event on the
memory bus exactly as in the pipeline. Prints every raw and normalized sub-score and the seconds
per scorer per candidate, and writes ``benchmarks/results/proposer.json``.

    python benchmarks/proposer.py [--store DIR] [--train 400 --val 200] [--min-fps 10 --input-size 256]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dlforge.common.bus import Delivery
from dlforge.common.events import AugmentationCount, DatasetAugmented, Event, PipelineOptions, Spec, Topic, encode
from dlforge.common.runtime import Backends, Outcome, Worker
from dlforge.common.settings import load_settings
from dlforge.proposer import worker as proposer_worker
from dlforge.proposer.repository import build_repository, default_sources
from dlforge.proposer.settings import ProposerSettings
from dlforge.vision.manifest import Item, Manifest, save_manifest

RESULTS = Path(__file__).resolve().parent / "results" / "proposer.json"


def elpv_manifest(objects: Any, *, seed: int) -> tuple[str, Manifest]:
    from dlforge.labeler.demo_data import elpv_cells, elpv_root

    root = elpv_root()
    rows = [(c.name, c.probability, c.kind) for c in elpv_cells()]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    n_test = round(0.10 * len(rows))
    n_val = round(0.15 * (len(rows) - n_test))
    split_of = {int(i): ("test" if k < n_test else "val" if k < n_test + n_val else "train")
                for k, i in enumerate(order)}
    items = []
    for i, (rel, prob, cell_type) in enumerate(rows):
        data = (root / rel).read_bytes()
        key = f"bench/elpv/images/{Path(rel).name}"
        if not objects.exists(key):
            objects.put_bytes(key, data, content_type="image/png")
        items.append(Item(item_id=Path(rel).stem, key=key, name=rel, sha256=hashlib.sha256(data).hexdigest(),
                          width=300, height=300, label="defect" if float(prob) >= 0.5 else "good",
                          label_source="given", confidence=1.0, split=split_of[i], domain=cell_type))  # type: ignore[arg-type]
    manifest = Manifest(dataset_id="elpv", name="ELPV solar cells", classes=["defect", "good"], items=items)
    key = "bench/elpv/manifest.json"
    save_manifest(objects, key, manifest)
    return key, manifest


async def run(args: argparse.Namespace, store: Path) -> dict[str, Any]:
    settings = load_settings(
        ProposerSettings, bus="memory://", objects=f"file://{store}/objects", docs=f"sqlite:///{store}/docs.db",
        work_dir=str(store / "work"), proposer_train_sample=args.train, proposer_val_sample=args.val,
        proposer_build_on_start=False,
    )
    backends = Backends.from_settings(settings)
    await backends.start()
    try:
        t0 = time.perf_counter()
        build = await build_repository(
            backends.objects, backends.docs, force=args.force_build, work_dir=store / "work",
            sources=default_sources(fashion_mnist_dir=settings.proposer_fashion_mnist_dir,
                                    mnist_path=settings.proposer_mnist_path))
        build_seconds = time.perf_counter() - t0
        failed = [b for b in build if b.action == "failed"]
        if failed:
            for b in failed:
                print(f"not built: {b.model_id}: {b.error}", file=sys.stderr)

        t0 = time.perf_counter()
        manifest_key, manifest = await asyncio.to_thread(elpv_manifest, backends.objects, seed=0)
        manifest_seconds = time.perf_counter() - t0
        counts = {s: {c: sum(1 for i in manifest.items if i.split == s and i.label == c) for c in manifest.classes}
                  for s in ("train", "val", "test")}
        spec = Spec(positive_class="defect", min_fps=args.min_fps, input_size=args.input_size)
        event = Event.new(DatasetAugmented(
            dataset_id="elpv", manifest_key=manifest_key, classes=manifest.classes,
            augmentation=[AugmentationCount(label=c, real=counts["train"][c], generated=0, kept=0)
                          for c in manifest.classes],
            spec=spec, options=PipelineOptions(seed=0)), run_id="bench-proposer")
        load_before = os.getloadavg()
        t0, cpu0 = time.perf_counter(), time.process_time()
        deps = await proposer_worker.build_deps(settings, backends)
        outcome = await Worker(proposer_worker.service, backends, deps=deps).process(
            Delivery(topic=Topic.DATASET_AUGMENTED.value, key=event.run_id, value=encode(event)))
        propose_seconds = time.perf_counter() - t0
        propose_cpu_seconds = time.process_time() - cpu0
        if outcome != Outcome.HANDLED:
            raise SystemExit(f"the proposal did not complete: {outcome}")
        proposal = await backends.docs.get(proposer_worker.PROPOSALS, "elpv")
        assert proposal is not None
        models = await backends.docs.find("proposer_models", sort=[("_id", 1)])
    finally:
        await backends.stop()
    return {
        "dataset": {"name": "ELPV", "items": len(manifest.items), "counts": counts},
        "spec": spec.model_dump(),
        "repository": [{"model_id": m["model_id"], "arch": m["arch"], "source_dataset": m["source_dataset"],
                        "input_size": m["input_size"], "metrics": m["metrics"]} for m in models],
        "build": [b.__dict__ for b in build],
        "seconds": {"build_repository": build_seconds, "manifest": manifest_seconds, "proposal": propose_seconds,
                    "proposal_cpu": propose_cpu_seconds},
        "proposal": {k: v for k, v in proposal.items() if k not in ("_id", "_version")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before_proposal": load_before, "loadavg_after_proposal": os.getloadavg()},
    }


def table(result: dict[str, Any]) -> str:
    ranking = result["proposal"]["ranking"]
    names = ["logme", "sfda", "knn_bacc", "probe_bacc", "domain_sim", "agreement", "dissimilarity", "pca_class_var",
             "cam_focus", "loss_auc", "finetune_bacc", "fps_b1", "fps_b32", "fps_spec_b1"]
    lines = [f"{'rank':4} {'model_id':29} {'total':>6} {'gate':>4}  "
             + " ".join(f"{n:>13}" for n in names)]
    for k, c in enumerate(ranking, 1):
        cells = []
        for n in names:
            raw = c["raw"].get(n)
            norm = c["normalized"].get(n)
            cells.append(f"{'-' if raw is None else f'{raw:.3g}':>7}" + f"{'' if norm is None else f'({norm:.2f})':>6}")
        lines.append(f"{k:<4} {c['model_id']:29} {c['total']:6.3f} {'yes' if c['gate_passed'] else 'NO':>4}  "
                     + " ".join(cells))
    lines.append("")
    scorers = ["encode", "logme", "sfda", "knn", "probe", "domain", "agreement", "activation", "short_term", "speed"]
    lines.append(f"{'seconds':34} " + " ".join(f"{s:>10}" for s in scorers) + f" {'sum':>8}")
    for c in ranking:
        sec = c["seconds"]
        lines.append(f"{c['model_id']:34} " + " ".join(f"{sec.get(s, 0.0):10.2f}" for s in scorers)
                     + f" {sum(sec.values()):8.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="keep the object/doc stores here (the repository is reused)")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--min-fps", type=float, default=10.0)
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--force-build", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.store:
        args.store.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(run(args, args.store))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(run(args, Path(tmp)))
    print("repository:")
    for m in result["repository"]:
        print(f"  {m['model_id']:29} {m['arch']:18} {m['source_dataset']:14} {m['input_size']:4}px  "
              + ", ".join(f"{k}={v:.4g}" for k, v in m["metrics"].items()))
    print("build:", ", ".join(f"{b['model_id']} {b['action']} {b['seconds']:.1f}s" for b in result["build"]))
    d = result["dataset"]
    print(f"\nELPV: {d['items']} items, split counts {d['counts']}; spec {result['spec']}")
    print(f"target sample: {result['proposal']['target']}\n")
    print(table(result))
    print(f"\nchosen: {result['proposal']['chosen_model_id']}\n{result['proposal']['explanation']}")
    print("\nseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items())
          + f"; load average before/after the proposal {result['machine']['loadavg_before_proposal'][0]:.1f}"
          + f"/{result['machine']['loadavg_after_proposal'][0]:.1f} on {result['machine']['cpus']} CPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
