"""Trainer benchmark on ELPV with EfficientNet-Lite0 (ImageNet weights).

Measures: the activation cache (images through the frozen prefix, ONNX Runtime vs PyTorch eager),
deriving shallower boundaries, seconds per epoch at unfreeze 0/1/2, and 1 vs 2 DDP workers.
Prints a table and writes benchmarks/results/trainer.json.

    python benchmarks/trainer.py                 # all 2,624 ELPV cells
    python benchmarks/trainer.py --limit 400     # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlforge.common.objects.fs import FsObjectStore
from dlforge.trainer.cache import OnnxPrefixRunner, TorchPrefixRunner
from dlforge.trainer.handlers import TrainerConfig, TrainingRequest, run_training
from dlforge.trainer.params import RunOptions, TrainParams
from dlforge.trainer.stages import staged
from dlforge.vision.images import to_tensor
from dlforge.vision.manifest import Item, Manifest, Split, load_arrays, save_manifest
from dlforge.vision.networks import build_network, save_checkpoint, spec_of

ARCH = "efficientnet_lite0"
CLASSES = ["defect", "good"]
RESULTS = Path(__file__).resolve().parent / "results"


def elpv_manifest(objects: FsObjectStore, *, limit: int | None, seed: int = 0) -> tuple[str, dict[str, int]]:
    """ELPV cells into the object store with a manifest: defect = probability >= 0.5; 10 % test, 15 % val."""
    from dlforge.labeler.demo_data import elpv_cells, elpv_root

    root = elpv_root()
    rows = [(c.name, c.probability, c.kind) for c in elpv_cells()]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    if limit:
        order = order[:limit]
    items, counts = [], {"train": 0, "val": 0, "test": 0}
    for rank, i in enumerate(order):
        path, prob, kind = rows[i]
        data = (root / path).read_bytes()
        key = f"bench/elpv/{Path(path).name}"
        if not objects.exists(key):
            objects.put_bytes(key, data, content_type="image/png")
        share = rank / len(order)
        split: Split = "test" if share < 0.10 else "val" if share < 0.10 + 0.9 * 0.15 else "train"
        counts[split] += 1
        items.append(Item(item_id=Path(path).stem, key=key, name=path, sha256=hashlib.sha256(data).hexdigest(),
                          width=300, height=300, label="defect" if prob >= 0.5 else "good", label_source="given",
                          confidence=1.0, split=split, domain=kind))
    key = f"bench/elpv-{len(items)}.json"
    save_manifest(objects, key, Manifest(dataset_id="elpv", name="elpv", classes=CLASSES, items=items))
    return key, counts


def candidate(objects: FsObjectStore, work: Path) -> str:
    key = "bench/efficientnet_lite0-imagenet.pt"
    if not objects.exists(key):
        model = build_network(ARCH, 1000, pretrained=True)
        save_checkpoint(model, arch=ARCH, classes=[f"imagenet{i}" for i in range(1000)], path=str(work / "c.pt"))
        objects.put_file(key, work / "c.pt")
    return key


def runner_speed(objects: FsObjectStore, manifest_key: str, n: int = 64) -> dict[str, float]:
    """ms/image of the frozen prefix (unfreeze 3) with each runner on the same batch of ELPV cells."""
    from dlforge.vision.manifest import load_manifest

    spec = spec_of(ARCH)
    net = staged(build_network(ARCH, 2, pretrained=True))
    prefix = net.span(0, net.boundary(3)).eval()
    items = load_manifest(objects, manifest_key).items[:n]
    x = to_tensor(load_arrays(objects, items, size=spec.input_size, channels=3), spec).numpy()
    out = {}
    for runner in (OnnxPrefixRunner(threads=torch.get_num_threads()), TorchPrefixRunner()):
        fn = runner.compile(prefix, torch.from_numpy(x[:1]))
        fn(x[:8])  # warm-up
        t0 = time.perf_counter()
        for lo in range(0, len(x), 32):
            fn(x[lo:lo + 32])
        out[runner.name] = (time.perf_counter() - t0) / len(x) * 1000
    return out


def train(objects: FsObjectStore, config: TrainerConfig, manifest_key: str, weights_key: str, *, unfreeze: int,
          workers: int, epochs: int, name: str, threads: int = 2) -> dict[str, Any]:
    req = TrainingRequest(weights_key=weights_key, manifest_key=manifest_key, classes=CLASSES,
                          hparams=TrainParams(lr=1e-3, batch_size=32, epochs=epochs, unfreeze=unfreeze),
                          run_config=RunOptions(no_of_workers=workers))
    t0 = time.perf_counter()
    config = TrainerConfig(**{**config.__dict__, "train_threads": threads})
    out = run_training(objects, req, job_id=name, key_prefix=f"bench/jobs/{name}", config=config)
    wall = time.perf_counter() - t0
    eps = out.epochs
    return {
        "unfreeze": unfreeze, "workers": workers, "threads_per_worker": max(1, threads // workers),
        "epochs": len(eps), "steps": out.steps,
        "cache": out.cache_source, "cache_seconds": round(out.cache_seconds, 2),
        "seconds_per_epoch": round(float(np.mean([e.seconds for e in eps])), 3),
        "images_per_second": round(float(np.mean([e.images_per_second for e in eps])), 1),
        "train_seconds_incl_startup": round(out.train_seconds, 2), "wall_seconds": round(wall, 2),
        "val_accuracy": round(eps[-1].val_accuracy, 4), "val_recall_defect": round(eps[-1].val_recall["defect"], 4),
        "test_accuracy": round(out.test.accuracy, 4) if out.test else None, "train_rows": out.train_rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="use this many ELPV cells (default: all)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "trainer.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dlforge-bench-trainer-"))
    work.mkdir(parents=True, exist_ok=True)
    objects = FsObjectStore(work / "objects")
    manifest_key, counts = elpv_manifest(objects, limit=args.limit)
    weights_key = candidate(objects, work)
    load_before = os.getloadavg()
    print(f"ELPV: {counts} items; work dir {work}; load average {load_before[0]:.1f}")

    speed = runner_speed(objects, manifest_key)
    print(f"frozen prefix: onnxruntime {speed['onnxruntime']:.1f} ms/image, torch eager {speed['torch']:.1f} ms/image")
    config = TrainerConfig(work_dir=work / "trainer", threads=2, prefix_runner="onnxruntime")
    runs = []
    for unfreeze in (0, 1, 2):
        runs.append(train(objects, config, manifest_key, weights_key, unfreeze=unfreeze, workers=1,
                          epochs=args.epochs, name=f"u{unfreeze}-w1"))
        print(f"  unfreeze {unfreeze}, 1 worker: {runs[-1]}")
    for unfreeze in (1, 2):
        runs.append(train(objects, config, manifest_key, weights_key, unfreeze=unfreeze, workers=1,
                          epochs=args.epochs, name=f"u{unfreeze}-w1t1", threads=1))
        print(f"  unfreeze {unfreeze}, 1 worker x 1 thread: {runs[-1]}")
        runs.append(train(objects, config, manifest_key, weights_key, unfreeze=unfreeze, workers=2,
                          epochs=args.epochs, name=f"u{unfreeze}-w2"))
        print(f"  unfreeze {unfreeze}, 2 workers x 1 thread: {runs[-1]}")
    images = sum(counts.values())
    first = runs[0]
    result = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": 2, "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_start": load_before[0],
                    "load_average_end": os.getloadavg()[0]},
        "dataset": {"name": "elpv", "items": counts, "defect_threshold": 0.5},
        "arch": ARCH, "epochs": args.epochs,
        "activation_cache": {
            "images": images, "computed_seconds": first["cache_seconds"],
            "seconds_per_image": round(first["cache_seconds"] / images, 4),
            "derived_seconds": {f"unfreeze_{r['unfreeze']}": r["cache_seconds"] for r in runs[1:3]},
            "hit_seconds": {f"unfreeze_{r['unfreeze']}_w{r['workers']}_t{r['threads_per_worker']}": r["cache_seconds"]
                            for r in runs[3:]},
            "prefix_ms_per_image": {k: round(v, 1) for k, v in speed.items()},
        },
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print()
    print(f"activation cache: {images} images in {first['cache_seconds']:.1f}s "
          f"({first['cache_seconds'] / images * 1000:.0f} ms/image incl. decode); prefix alone: onnxruntime "
          f"{speed['onnxruntime']:.0f} ms/image vs torch eager {speed['torch']:.0f} ms/image")
    header = f"{'unfreeze':>8} {'workers':>7} {'threads':>7} {'cache':>8} {'cache s':>8} {'s/epoch':>8} {'img/s':>8} " \
             f"{'wall s':>7} {'val acc':>7} {'recall':>7} {'test acc':>8}"
    print(header)
    print("-" * len(header))
    for r in runs:
        print(f"{r['unfreeze']:>8} {r['workers']:>7} {r['threads_per_worker']:>7} {r['cache']:>8} "
              f"{r['cache_seconds']:>8.1f} {r['seconds_per_epoch']:>8.2f} {r['images_per_second']:>8.0f} "
              f"{r['wall_seconds']:>7.1f} "
              f"{r['val_accuracy']:>7.3f} {r['val_recall_defect']:>7.3f} {r['test_accuracy']:>8.3f}")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
