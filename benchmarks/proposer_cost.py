"""What a proposal costs against fine-tuning every candidate the way the platform fine-tunes (issue 11).

``benchmarks/proposer.py``'s ground truth trains two units on cached 64-px activations of 300 images per
target: a stand-in for fine-tuning that costs about what the proposal does (its cost ratio, 0.81, says
nothing about real fine-tuning). Here both sides are the platform's own code on one target, in one
process, on one machine:

* the proposal: what the proposer's handler does for a run (``dlforge.proposer.worker``): the manifest,
  the target sample decoded (``proposer_train_sample`` + ``proposer_val_sample`` items), every
  repository candidate loaded, every default scorer, the data set's fingerprint;
* fine-tuning a candidate: the trainer's final training (``dlforge.trainer.worker.final_request`` with
  the trainer's default settings, and the tuner's baseline parameters as its best parameters — the
  configuration the demo trains): the images decoded, the frozen prefix's activation cache, the view
  check, up to ``trainer_final_epochs`` epochs with early stopping on val under ``trainer_final_max_seconds``,
  the test evaluation, from ``run_training``'s call to its return.

Nothing is shared between the measured jobs: the feature store (decoded images, embeddings) and the
trainer's activation cache are emptied before each, so every job starts cold, as on new data. The
proposal runs first and again last, and the ratio uses their mean (the machine's load moves during a run
this long). Hyperparameter search before the final training is not counted: the ratio's denominator is
the least that fine-tuning every candidate costs in the platform.

The target is ELPV (``--limit`` cells, default all 2,624; labels given; 10 % test, 13.5 % val), the
candidates the cells of ``--set`` (built into ``--store`` first when missing; that set-up is timed apart).
Prints a table and writes ``benchmarks/results/proposer-cost-<set>[-<limit>].json`` with ``cost_ratio``.

    nice -n 19 python benchmarks/proposer_cost.py --store /tmp/propcost [--set demo|extended] [--limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from machine import cpu_name
from proposer import open_repository
from trainer import elpv_manifest

from dlforge.common.events import Spec
from dlforge.common.objects import ObjectStore
from dlforge.common.settings import load_settings
from dlforge.proposer.repository import RECIPE_SETS
from dlforge.proposer.settings import ProposerSettings
from dlforge.proposer.worker import dataset_fingerprint, load_candidates, load_target, run_proposal
from dlforge.trainer.cache import CACHE_PREFIX
from dlforge.trainer.handlers import TrainerConfig, run_training
from dlforge.trainer.settings import TrainerSettings
from dlforge.trainer.worker import final_request
from dlforge.tuner.settings import TunerSettings
from dlforge.vision.features import FEATURES_PREFIX
from dlforge.vision.manifest import load_manifest

RESULTS = Path(__file__).resolve().parent / "results"
JOBS_PREFIX = "bench/jobs"


def cold(objects: ObjectStore, work: Path) -> int:
    """Empty every cache a job could reuse: the vision core's feature store (decoded images, embeddings,
    activations), the trainer's activation cache (in the object store and its local copies under ``work``)
    and earlier jobs' files. The next job computes everything, also when the store is reused for another run."""
    keys = [o.key for prefix in (FEATURES_PREFIX, CACHE_PREFIX, JOBS_PREFIX) for o in objects.list(prefix + "/")]
    for key in keys:
        objects.delete(key)
    shutil.rmtree(work / "trainer" / "cache", ignore_errors=True)
    return len(keys)


def propose_once(objects: ObjectStore, records: list[dict[str, Any]], manifest_key: str, *,
                 settings: ProposerSettings, seed: int, work: Path) -> dict[str, Any]:
    """The proposer handler's work for one run, timed: manifest, target sample, candidates, scorers, fingerprint."""
    t0 = time.perf_counter()
    manifest = load_manifest(objects, manifest_key)
    size = max(int(r["input_size"]) for r in records)
    channels = max(int(r["in_channels"]) for r in records)
    target = load_target(objects, manifest, size=size, channels=channels, settings=settings, seed=seed)
    t_target = time.perf_counter()
    candidates = load_candidates(objects, records, unfreeze_last=settings.proposer_unfreeze_last, work_dir=work)
    t_loaded = time.perf_counter()
    ranking, _ = run_proposal(candidates, target, spec=Spec(), settings=settings, seed=seed)
    dataset_fingerprint(candidates, target)
    seconds = time.perf_counter() - t0
    scorer_seconds: dict[str, float] = {}
    for c in ranking.candidates:
        for name, value in c.seconds.items():
            scorer_seconds[name] = round(scorer_seconds.get(name, 0.0) + value, 2)
    return {"seconds": round(seconds, 2), "target_sample_seconds": round(t_target - t0, 2),
            "load_candidates_seconds": round(t_loaded - t_target, 2), "scorer_seconds": scorer_seconds,
            "train_items": len(target.train_x), "val_items": len(target.val_x),
            "chosen": ranking.chosen_model_id,
            "ranking": [(c.model_id, round(c.total, 4)) for c in ranking.candidates]}


def finetune_once(objects: ObjectStore, record: dict[str, Any], manifest_key: str, classes: list[str], *,
                  settings: TrainerSettings, best_params: dict[str, Any]) -> dict[str, Any]:
    """The trainer's final training of one candidate, timed from the call to its return."""
    request = final_request(settings, best_params=best_params, arch=None, weights_key=record["weights_key"],
                            manifest_key=manifest_key, classes=classes, train_epochs=1, no_of_workers=1)
    config = TrainerConfig.from_settings(settings)
    name = f"cost-{record['model_id']}"
    t0 = time.perf_counter()
    out = run_training(objects, request, job_id=name, key_prefix=f"{JOBS_PREFIX}/{name}", config=config)
    seconds = time.perf_counter() - t0
    return {"model_id": record["model_id"], "seconds": round(seconds, 2),
            "cache_seconds": round(out.cache_seconds, 2), "train_seconds": round(out.train_seconds, 2),
            "epochs": len(out.epochs), "best_epoch": out.best_epoch, "out_of_time": out.out_of_time,
            "train_rows": out.train_rows, "views": list(out.views),
            "test_accuracy": round(out.test.accuracy, 4) if out.test else None,
            "input_size": out.input_size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="object store, document store and work dir")
    parser.add_argument("--set", choices=sorted(RECIPE_SETS), default="demo", help="the repository's cells")
    parser.add_argument("--limit", type=int, default=None, help="ELPV cells (default: all 2,624)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    store: Path = args.store
    store.mkdir(parents=True, exist_ok=True)
    urls = {"bus": "memory://", "objects": f"file://{store}/objects", "docs": f"sqlite:///{store}/docs.db",
            "work_dir": str(store / "work")}
    proposer_settings = load_settings(ProposerSettings, **urls, proposer_build_on_start=False)
    trainer_settings = load_settings(TrainerSettings, **urls)
    best_params = json.loads(load_settings(TunerSettings, **urls).tuner_baseline)
    torch.set_num_threads(proposer_settings.proposer_torch_threads)

    # the cells' training at the proposer's default of 2 threads (a set-up step, timed apart)
    backends, records, built, build_seconds = asyncio.run(open_repository(args.set, proposer_settings, threads=2))
    objects = backends.objects
    failed = [b for b in built if b.action == "failed"]
    if failed or len(records) < len(RECIPE_SETS[args.set]):
        raise SystemExit(f"the repository is incomplete: {[(b.model_id, b.error) for b in failed]}")
    manifest_key, counts = elpv_manifest(objects, limit=args.limit, seed=args.seed)
    classes = load_manifest(objects, manifest_key).classes
    cpu = cpu_name()
    print(f"ELPV {counts}; {len(records)} candidates ({args.set}); repository set-up {build_seconds:.0f}s "
          f"({sum(b.action == 'built' for b in built)} cells built); CPU {cpu} x {os.cpu_count()}", flush=True)
    work = store / "work"
    proposals, finetunes = [], []
    cold(objects, work)
    proposals.append(propose_once(objects, records, manifest_key, settings=proposer_settings, seed=args.seed,
                                  work=work / "proposer"))
    print(f"proposal: {proposals[-1]['seconds']:.1f}s, chose {proposals[-1]['chosen']}", flush=True)
    for record in records:
        cold(objects, work)
        finetunes.append(finetune_once(objects, record, manifest_key, classes, settings=trainer_settings,
                                       best_params=best_params))
        f = finetunes[-1]
        print(f"fine-tuning {record['model_id']}: {f['seconds']:.1f}s ({f['epochs']} epochs, cache "
              f"{f['cache_seconds']:.1f}s), test accuracy {f['test_accuracy']}", flush=True)
    cold(objects, work)
    proposals.append(propose_once(objects, records, manifest_key, settings=proposer_settings, seed=args.seed,
                                  work=work / "proposer"))
    print(f"proposal again: {proposals[-1]['seconds']:.1f}s", flush=True)
    asyncio.run(backends.stop())

    propose_seconds = sum(p["seconds"] for p in proposals) / len(proposals)
    finetune_all = sum(f["seconds"] for f in finetunes)
    truth = sorted(finetunes, key=lambda f: -(f["test_accuracy"] or 0.0))
    result = {
        "set": args.set, "target": "elpv", "counts": counts, "cpu": cpu, "cores": os.cpu_count(),
        "python": platform.python_version(), "load_average": os.getloadavg()[0],
        "repository_setup_seconds": round(build_seconds, 1),
        "best_params": best_params, "trainer_final": {
            "epochs": trainer_settings.trainer_final_epochs, "patience": trainer_settings.trainer_final_patience,
            "max_seconds": trainer_settings.trainer_final_max_seconds, "views": trainer_settings.trainer_final_views},
        "proposals": proposals, "finetunes": finetunes,
        "propose_seconds": round(propose_seconds, 2), "finetune_every_candidate_seconds": round(finetune_all, 2),
        "cost_ratio": round(propose_seconds / finetune_all, 4),
        "proposal_chose_best": proposals[0]["chosen"] == truth[0]["model_id"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"proposer-cost-{args.set}{f'-{args.limit}' if args.limit else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    print()
    print(f"ELPV ({sum(counts.values())} cells), {len(records)} candidates ({args.set}); CPU {cpu}")
    head = f"{'job':<44} {'seconds':>8} {'epochs':>6} {'test acc':>8}"
    print(head)
    print("-" * len(head))
    for i, p in enumerate(proposals):
        print(f"{'proposal ' + ('first' if i == 0 else 'last'):<44} {p['seconds']:>8.1f} {'':>6} {'':>8}")
    for f in finetunes:
        print(f"{'fine-tune ' + f['model_id']:<44} {f['seconds']:>8.1f} {f['epochs']:>6} {f['test_accuracy']:>8}")
    print("the proposal's parts (first run, s): " + ", ".join(
        f"{k} {v:.1f}" for k, v in [("target sample", proposals[0]["target_sample_seconds"]),
                                    ("candidates loaded", proposals[0]["load_candidates_seconds"]),
                                    *sorted(proposals[0]["scorer_seconds"].items(), key=lambda kv: -kv[1])]))
    print(f"\ncost ratio (mean proposal / fine-tuning every candidate): {propose_seconds:.1f} / {finetune_all:.1f} "
          f"= {result['cost_ratio']:.4f} (1/{finetune_all / propose_seconds:.0f}); the proposal chose "
          f"{proposals[0]['chosen']}, fine-tuning's best {truth[0]['model_id']}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
