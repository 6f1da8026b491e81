"""Trainer benchmark on ELPV with EfficientNet-Lite0 (ImageNet weights).

Measures: the activation cache (images through the frozen prefix, ONNX Runtime vs PyTorch eager),
deriving shallower boundaries, seconds per epoch at unfreeze 0/1/2, and 1 vs 2 DDP workers at equal
total threads (1 worker x 2 threads against 2 workers x 1 thread), in interleaved rounds (the order
alternates each round) so that the machine's load falls on both alike; the speed-up is the ratio of
images/s within each round. Prints tables and writes benchmarks/results/trainer.json with the CPU's name.

    python benchmarks/trainer.py                 # all 2,624 ELPV cells
    python benchmarks/trainer.py --limit 400     # a quick look
    nice -n 19 python benchmarks/trainer.py --limit 300 --epochs 2 --rounds 3 --workers-only
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
from machine import cpu_name

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


def worker_rounds(objects: FsObjectStore, config: TrainerConfig, manifest_key: str, weights_key: str, *,
                  unfreeze: int, epochs: int, rounds: int, threads: int = 2) -> dict[str, Any]:
    """1 worker x ``threads`` threads against ``threads`` workers x 1 thread... for 2: 1x2 against 2x1,
    ``rounds`` times, the order alternating; the ratio of images/s is taken within each round."""
    runs: list[dict[str, Any]] = []
    ratios = []
    for r in range(rounds):
        order = (1, 2) if r % 2 == 0 else (2, 1)
        got = {}
        for workers in order:
            got[workers] = train(objects, config, manifest_key, weights_key, unfreeze=unfreeze, workers=workers,
                                 epochs=epochs, name=f"round{r}-u{unfreeze}-w{workers}", threads=threads)
            got[workers]["round"] = r
            runs.append(got[workers])
            run = got[workers]
            print(f"  round {r}, unfreeze {unfreeze}, {workers} worker(s) x {run['threads_per_worker']} "
                  f"thread(s): {run['images_per_second']:.0f} img/s, {run['wall_seconds']:.1f} s wall")
        ratios.append(got[2]["images_per_second"] / got[1]["images_per_second"])
    ips = {w: [x["images_per_second"] for x in runs if x["workers"] == w] for w in (1, 2)}
    return {
        "unfreeze": unfreeze, "total_threads": threads, "rounds": rounds, "epochs": epochs, "runs": runs,
        "images_per_second_median": {f"{w}_workers": float(np.median(v)) for w, v in ips.items()},
        "ratio_2_over_1_per_round": [round(x, 3) for x in ratios],
        "ratio_2_over_1_geomean": round(float(np.exp(np.mean(np.log(ratios)))), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="use this many ELPV cells (default: all)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "trainer.json")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of 1 vs 2 workers")
    parser.add_argument("--worker-unfreeze", type=int, nargs="+", default=[1, 2],
                        help="unfreeze depths at which 1 and 2 workers are compared")
    parser.add_argument("--workers-only", action="store_true",
                        help="only the 1 vs 2 workers rounds (skip the runner and unfreeze sweeps)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dlforge-bench-trainer-"))
    work.mkdir(parents=True, exist_ok=True)
    objects = FsObjectStore(work / "objects")
    manifest_key, counts = elpv_manifest(objects, limit=args.limit)
    weights_key = candidate(objects, work)
    load_before = os.getloadavg()
    cpu = cpu_name()
    print(f"ELPV: {counts} items; work dir {work}; CPU {cpu} x {os.cpu_count()}; load average {load_before[0]:.1f}")

    config = TrainerConfig(work_dir=work / "trainer", threads=2, prefix_runner="onnxruntime")
    runs: list[dict[str, Any]] = []
    speed: dict[str, float] = {}
    if not args.workers_only:
        speed = runner_speed(objects, manifest_key)
        print(f"frozen prefix: onnxruntime {speed['onnxruntime']:.1f} ms/image, torch eager {speed['torch']:.1f} "
              "ms/image")
        for unfreeze in (0, 1, 2):
            runs.append(train(objects, config, manifest_key, weights_key, unfreeze=unfreeze, workers=1,
                              epochs=args.epochs, name=f"u{unfreeze}-w1"))
            print(f"  unfreeze {unfreeze}, 1 worker: {runs[-1]}")
    else:  # the cache, computed once here, so that no round pays for it
        for unfreeze in sorted(set(args.worker_unfreeze)):
            train(objects, config, manifest_key, weights_key, unfreeze=unfreeze, workers=1, epochs=1,
                  name=f"warm-u{unfreeze}")
    comparisons = [worker_rounds(objects, config, manifest_key, weights_key, unfreeze=u, epochs=args.epochs,
                                 rounds=args.rounds) for u in args.worker_unfreeze]
    machine = {"cpu": cpu, "cpus": os.cpu_count(), "total_threads": 2, "python": platform.python_version(),
               "torch": torch.__version__, "load_average_start": load_before[0],
               "load_average_end": os.getloadavg()[0], "niceness": os.nice(0)}
    images = sum(counts.values())
    result: dict[str, Any] = {
        "machine": machine, "dataset": {"name": "elpv", "items": counts, "defect_threshold": 0.5},
        "arch": ARCH, "epochs": args.epochs, "workers_equal_threads": comparisons, "runs": runs,
    }
    if runs:
        first = runs[0]
        result["activation_cache"] = {
            "images": images, "computed_seconds": first["cache_seconds"],
            "seconds_per_image": round(first["cache_seconds"] / images, 4),
            "derived_seconds": {f"unfreeze_{r['unfreeze']}": r["cache_seconds"] for r in runs[1:3]},
            "prefix_ms_per_image": {k: round(v, 1) for k, v in speed.items()},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print()
    print(f"CPU: {cpu} ({os.cpu_count()} logical CPUs); load average {load_before[0]:.1f} -> "
          f"{machine['load_average_end']:.1f}")
    print("1 vs 2 DDP workers at 2 threads in all (images/s of the training part of each epoch, mean over epochs)")
    print("(wall s: the whole run_training call, the workers' start included)")
    head = (f"{'unfreeze':>8} {'round':>5} {'1w x 2t':>9} {'2w x 1t':>9} {'2w / 1w':>8} {'wall s 1w':>9} "
            f"{'wall s 2w':>9}")
    print(head)
    print("-" * len(head))
    for c in comparisons:
        for r in range(c["rounds"]):
            one = next(x for x in c["runs"] if x["round"] == r and x["workers"] == 1)
            two = next(x for x in c["runs"] if x["round"] == r and x["workers"] == 2)
            print(f"{c['unfreeze']:>8} {r:>5} {one['images_per_second']:>9.0f} {two['images_per_second']:>9.0f} "
                  f"{c['ratio_2_over_1_per_round'][r]:>8.2f} {one['wall_seconds']:>9.1f} {two['wall_seconds']:>9.1f}")
        print(f"{c['unfreeze']:>8} {'all':>5} {c['images_per_second_median']['1_workers']:>9.0f} "
              f"{c['images_per_second_median']['2_workers']:>9.0f} {c['ratio_2_over_1_geomean']:>8.2f}  "
              "(medians; geometric mean of the rounds' ratios)")
    if not runs:
        print(f"\nwritten {args.out}")
        return
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
