"""Benchmark of the labeler on ELPV: human label fraction, auto-label accuracy, rounds, seconds.

All 2,624 ELPV solar cells (PyPI ``elpv-dataset``; defect = probability >= 0.5) are written to a
folder with an EMPTY label column, imported through the labeler's ingestion, embedded with
EfficientNet-Lite0 and labeled by the active-learning loop on the memory bus, with the SIMULATED
annotator answering every batch from the known labels. The auto-labels are then scored against
the known labels (the loop never sees the labels of the items it auto-labels).

    python benchmarks/labeler.py [--limit N] [--workdir DIR] [--label-budget 0.3] ...

``--workdir`` keeps the object store between runs, so the embeddings are computed once and the
loop can be re-run in seconds. Prints a table and writes benchmarks/results/labeler.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from dlforge.common.events import DatasetLabeled, Event, LabelsRequested, PipelineOptions, Spec, Topic, decode
from dlforge.common.runtime import Backends, Worker, run_workers
from dlforge.labeler import records, simulated
from dlforge.labeler.app import DatasetRequest, _limits, import_dataset
from dlforge.labeler.demo_data import elpv_cells, materialize_elpv
from dlforge.labeler.ingest import open_folder, scan
from dlforge.labeler.settings import LabelerSettings
from dlforge.labeler.worker import service
from dlforge.vision.manifest import load_manifest

RESULTS = Path(__file__).resolve().parent / "results" / "labeler.json"
DATASET_ID = "elpv-bench"


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = os.getloadavg()
    data = work / "elpv"
    truth = materialize_elpv(data, limit=args.limit)
    t_materialize = time.perf_counter() - started
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    settings = LabelerSettings(
        bus="memory://", objects=f"file://{work}/objects", docs=f"sqlite:///{work}/docs-{stamp}.db",
        work_dir=str(work / "work"), labeler_import_roots=[str(work)], labeler_embed_size=args.embed_size,
        labeler_embed_batch=args.batch, labeler_threads=args.threads, labeler_query_strategy=args.strategy,
        labeler_embed_runtime=args.runtime,
        poll_seconds=0.05,
    )
    backends = Backends.from_settings(settings)
    await backends.start()
    options = PipelineOptions(label_budget=args.label_budget, target_confidence=args.target_confidence,
                              seed_fraction=args.seed_fraction, batch_fraction=args.batch_fraction, seed=args.seed)
    stop = asyncio.Event()
    workers = [Worker(service, backends), Worker(simulated.service, backends)]
    observer = await backends.bus.subscribe(group="benchmark", topics=[
        Topic.DATASET_UPLOADED, Topic.LABELS_REQUESTED, Topic.LABELS_SUBMITTED, Topic.DATASET_LABELED,
        Topic.RUN_FAILED])
    running = asyncio.create_task(run_workers(workers, stop))
    events: list[Event] = []
    try:
        await asyncio.to_thread(simulated.register_answers, backends.objects, DATASET_ID, truth)
        t0 = time.perf_counter()

        def scan_folder() -> Any:
            tree = open_folder(data, roots=settings.import_roots, limits=_limits(settings))
            return tree, scan(tree)

        tree, result = await asyncio.to_thread(scan_folder)
        request = DatasetRequest(folder=str(data), name="elpv", spec=Spec(positive_class="defect"), options=options,
                                 dataset_id=DATASET_ID, run_id=f"bench-{stamp}")
        created = await import_dataset(backends, settings, request, tree, result)
        tree.close()
        t_ingest = time.perf_counter() - t0
        marks: dict[str, float] = {"uploaded": time.perf_counter()}
        while True:
            delivery = await observer.get(timeout=args.timeout)
            if delivery is None:
                raise TimeoutError("no dataset.labeled within the timeout")
            event = decode(delivery.value)
            await observer.commit(delivery)
            events.append(event)
            if event.event_type == Topic.LABELS_REQUESTED and "first_request" not in marks:
                marks["first_request"] = time.perf_counter()
            if event.event_type == Topic.RUN_FAILED:
                raise RuntimeError(f"the run failed: {event.payload}")
            if event.event_type == Topic.DATASET_LABELED:
                marks["labeled"] = time.perf_counter()
                break
        record = await records.load(backends.docs, DATASET_ID)
    finally:
        stop.set()
        await running
        await observer.close()
    labeled_payload = events[-1].payload
    assert isinstance(labeled_payload, DatasetLabeled)
    manifest = await asyncio.to_thread(load_manifest, backends.objects, labeled_payload.labels_key)
    await backends.stop()

    n = len(manifest.items)
    target = options.target_confidence
    auto = [i for i in manifest.items if i.label_source == "auto"]
    human = [i for i in manifest.items if i.label_source == "human"]
    at_target = [i for i in auto if (i.confidence or 0) >= target]
    below = [i for i in auto if (i.confidence or 0) < target]

    def acc(items: list[Any]) -> float | None:
        return round(sum(i.label == truth[i.name] for i in items) / len(items), 4) if items else None

    conf = np.array([i.confidence for i in auto], dtype=float)
    correct = np.array([i.label == truth[i.name] for i in auto], dtype=float)
    bins = np.minimum((conf * 10).astype(int), 9) if len(conf) else np.zeros(0, dtype=int)
    ece = float(sum(abs(conf[bins == b].mean() - correct[bins == b].mean()) * (bins == b).mean()
                    for b in range(10) if (bins == b).any())) if len(conf) else None
    defect_auto = [i for i in auto if truth[i.name] == "defect"]
    probability = {Path(c.name).name: c.probability for c in elpv_cells()}
    by_probability = {
        f"{p:.2f}": {"auto": len(group), "accuracy": acc(group)}
        for p in sorted({probability[i.name] for i in auto})
        for group in [[i for i in auto if probability[i.name] == p]]
    }
    requests = [e.payload for e in events if isinstance(e.payload, LabelsRequested)]
    rounds = [
        {"round": r["round"], "reason": r["reason"], "asked": r["asked"], "human_labels": r.get("human_labels"),
         "auto_confident": r.get("auto_confident"), "expected_auto_accuracy": r.get("expected_auto_accuracy"),
         "classifier": r.get("classifier")}
        for r in record["rounds"]
    ]
    return {
        "dataset": "ELPV (elpv-dataset)",
        "items": n,
        "defect_share": round(sum(v == "defect" for v in truth.values()) / len(truth), 4),
        "options": options.model_dump(),
        "embedder": f"efficientnet_lite0 multi-stage pooled, {args.embed_size} px, batch {args.batch}, "
                    f"{args.runtime}, {args.threads} threads",
        "query_strategy": args.strategy,
        "human_labels": len(human),
        "human_label_fraction": round(len(human) / n, 4),
        "auto_labels": len(auto),
        "auto_label_accuracy": acc(auto),
        "auto_at_target": len(at_target),
        "auto_at_target_accuracy": acc(at_target),
        "auto_below_target": len(below),
        "auto_below_target_accuracy": acc(below),
        "auto_defect_recall": acc(defect_auto),
        "auto_accuracy_by_elpv_probability": by_probability,
        "expected_auto_accuracy": record["result"]["expected_auto_accuracy"],
        "calibration_ece": round(ece, 4) if ece is not None else None,
        "all_labels_accuracy": acc(list(manifest.items)),
        "stop_reason": record["result"]["stop_reason"],
        "rounds": len(requests),
        "per_round": rounds,
        "splits": {s: sum(1 for i in manifest.items if i.split == s) for s in ("train", "val", "test")},
        "rejected": created.counts["rejected"],
        "duplicates": created.counts["duplicates"],
        "seconds": {
            "materialize": round(t_materialize, 1),
            "ingest": round(t_ingest, 1),
            "embed_index_seed": round(marks["first_request"] - marks["uploaded"], 1),
            "loop": round(marks["labeled"] - marks["first_request"], 1),
            "total": round(time.perf_counter() - started, 1),
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
    }


def table(r: dict[str, Any]) -> str:
    s = r["seconds"]
    rows = [
        ("items", r["items"]),
        ("human labels", f"{r['human_labels']} ({r['human_label_fraction']:.1%}; budget "
                         f"{r['options']['label_budget']:.0%})"),
        ("rounds", f"{r['rounds']} (stop: {r['stop_reason']})"),
        ("auto labels", r["auto_labels"]),
        ("auto-label accuracy (all auto)", r["auto_label_accuracy"]),
        (f"  at confidence >= {r['options']['target_confidence']}", f"{r['auto_at_target']} items, accuracy "
                                                                    f"{r['auto_at_target_accuracy']}"),
        ("  below it (labeled at the stop)", f"{r['auto_below_target']} items, accuracy "
                                              f"{r['auto_below_target_accuracy']}"),
        ("  expected from calibration", r["expected_auto_accuracy"]),
        ("  calibration ECE", r["calibration_ece"]),
        ("  defect recall among auto", r["auto_defect_recall"]),
        ("  by ELPV defect probability", ", ".join(f"p={k}: {v['accuracy']} ({v['auto']})"
                                                   for k, v in r["auto_accuracy_by_elpv_probability"].items())),
        ("all labels accuracy", r["all_labels_accuracy"]),
        ("seconds: ingest", s["ingest"]),
        ("seconds: embeddings + index + seed", s["embed_index_seed"]),
        ("seconds: active-learning loop", s["loop"]),
        ("seconds: total", s["total"]),
        ("load average before/after", f"{r['machine']['load_avg_before'][0]} / {r['machine']['load_avg_after'][0]}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    head = ("round", "reason", "asked", "human", "auto>=t", "exp.acc", "C", "T")
    lines.append("{:>5} {:>9} {:>6} {:>6} {:>8} {:>8} {:>6} {:>6}".format(*head))
    for x in r["per_round"]:
        c = x.get("classifier") or {}
        exp = x.get("expected_auto_accuracy")
        lines.append(f"{x['round']:>5} {x['reason']:>9} {x['asked']:>6} {x.get('human_labels') or '':>6} "
                     f"{x.get('auto_confident') or 0:>8} {exp if exp is None else round(exp, 3)!s:>8} "
                     f"{c.get('C', '')!s:>6} {round(c.get('temperature', 0), 2)!s:>6}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=None, help="use a stratified subset of N images")
    p.add_argument("--workdir", default=None, help="keep data and the object store here (reuses embeddings)")
    p.add_argument("--embed-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--strategy", default="margin", choices=["margin", "least_confidence", "entropy"])
    defaults = PipelineOptions()
    p.add_argument("--label-budget", type=float, default=defaults.label_budget)
    p.add_argument("--target-confidence", type=float, default=defaults.target_confidence)
    p.add_argument("--seed-fraction", type=float, default=defaults.seed_fraction)
    p.add_argument("--batch-fraction", type=float, default=defaults.batch_fraction)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args()
    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(run(args, work))
    else:
        with tempfile.TemporaryDirectory(prefix="dlforge-bench-labeler-") as tmp:
            result = asyncio.run(run(args, Path(tmp)))
    print(table(result))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
