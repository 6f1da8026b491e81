"""Benchmark of the labeler: how few people's labels give how many trustworthy auto-labels.

    python benchmarks/labeler.py --dataset {elpv,fashion-mnist,mnist} --budget B [--seed S] [--views dihedral]
    python benchmarks/labeler.py --folder PATH --budget B      # any folder of class sub-folders

A stratified held-out split (``--heldout``: 10 % of ELPV, 1,000 images of the MNIST sets) is put
aside first and never shown to the loop. The rest (ELPV: 2,362 cells; Fashion-MNIST and MNIST: a
stratified ``--subset`` of 5,000 training images) is written to a flat folder with an EMPTY label
column, imported through the labeler's ingestion, embedded, and labeled by the real labeler
service on the memory bus, with the SIMULATED annotator answering each batch from the known
labels. The budget is the share of the loop's items people label: every label the loop asks
(its own random test split, the k-means seed, the uncertainty batches).

The run uses ``auto_label_all``, so every item people did not label gets the classifier's label
(``auto_label_accuracy``: full coverage, scored against the known labels), and the labeler's
selective rule at ``--max-error`` (default 1 %) and ``--guarantee`` (``bound``: 95 % confidence,
``expected``: in expectation, by conformal selection) is read from its result: the threshold chosen on
people's labels of the random test split and val sample, the exact 95 % bound on the error of the
calibration items above it (``selective_bound``), the conformal estimate with ``expected``, and,
scored against the
known labels, the error and coverage of the items that clear it (``selective_error``,
``selective_coverage``). ``heldout_accuracy`` is the final classifier on the held-out split: the
same plug-in refitted on the same labels, representative mask and seed as the loop's last round. The accuracy
after each round (``per_round``) is refitted the same way on the labels people had given by then
and plotted against the human labels (``--no-curve`` skips it).

Prints a table and writes ``benchmarks/results/labeler-<dataset>-<budget>[-s<seed>][-of<subset>][-<classifier>].json``
and the plot beside it (``.png``). ``--workdir`` keeps the object store, and with it the feature
store: the embeddings are computed once and a re-run takes seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from machine import cpu_name
from PIL import Image

from dlforge.common.events import DatasetLabeled, Event, LabelsRequested, PipelineOptions, Spec, Topic, decode
from dlforge.common.runtime import Backends, Worker, run_workers
from dlforge.labeler import records, simulated
from dlforge.labeler.app import DatasetRequest, _limits, import_dataset
from dlforge.labeler.demo_data import elpv_cells, elpv_root
from dlforge.labeler.index import normalize
from dlforge.labeler.ingest import open_folder, scan
from dlforge.labeler.pixelnet import Both
from dlforge.labeler.settings import LabelerSettings
from dlforge.labeler.worker import (
    build_deps,
    classifier_activations,
    classifier_pixels,
    ensure_embeddings,
    service,
)
from dlforge.vision.images import canonical_pixels, from_pixels
from dlforge.vision.manifest import Manifest, load_manifest

RESULTS = Path(__file__).resolve().parent / "results"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


# ------------------------------------------------------------------------------------------
# data sets: (pool images written for the loop, held-out images kept in memory, their truth)
# ------------------------------------------------------------------------------------------


def _stratified(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices with each class's share of ``labels`` (largest remainders)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / counts.sum() * n
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take))[: n - int(take.sum())]:
        take[i] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
              for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _source(args: argparse.Namespace) -> tuple[str, list[tuple[str, Any]], list[str]]:
    """The data set's name, its images as (name, loader) pairs and their labels."""
    if args.folder:
        root = Path(args.folder)
        entries: list[tuple[str, Any]] = []
        labels: list[str] = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(sub.rglob("*")):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    entries.append((f"{sub.name}__{f.relative_to(sub).as_posix().replace('/', '__')}", f))
                    labels.append(sub.name)
        if len({*labels}) < 2:
            raise SystemExit(f"{root}: need class sub-folders with images of at least two classes")
        return root.name, entries, labels
    if args.dataset == "elpv":
        src = elpv_root()
        cells = elpv_cells()
        return "elpv", [(Path(c.name).name, src / c.name) for c in cells], [c.label for c in cells]
    from dlforge.proposer.sources import load_fashion_mnist, load_mnist

    data = load_fashion_mnist() if args.dataset == "fashion-mnist" else load_mnist()
    x, y = data.train_x, data.train_y
    rng = np.random.default_rng(1000 + args.seed)
    chosen = _stratified(y, args.subset + args.heldout, rng)
    entries = [(f"{args.dataset}-{int(i):05d}.png", x[int(i)]) for i in chosen]
    # class names as people would type them: no "/" (Fashion-MNIST's "t-shirt/top")
    names = [c.replace("/", "-") for c in data.classes]
    return args.dataset, entries, [names[int(y[int(i)])] for i in chosen]


def _image(loader: Any) -> Image.Image:
    if isinstance(loader, np.ndarray):
        return Image.fromarray(loader[..., 0] if loader.ndim == 3 and loader.shape[2] == 1 else loader)
    return Image.open(loader)


def _write_pool(folder: Path, entries: list[tuple[str, Any]], domains: dict[str, str] | None = None) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with (folder / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", "domain"] if domains else ["file", "label"])
        for name, loader in entries:
            if isinstance(loader, Path):
                shutil.copyfile(loader, folder / name)
            else:
                _image(loader).save(folder / name)
            writer.writerow([name, "", domains[name]] if domains else [name, ""])


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------


async def _label(args: argparse.Namespace, work: Path, settings: LabelerSettings, truth: dict[str, str],
                 options: PipelineOptions, dataset_id: str) -> tuple[Backends, list[Event], Manifest, dict[str, Any],
                                                                     dict[str, float]]:
    backends = Backends.from_settings(settings)
    await backends.start()
    stop = asyncio.Event()
    workers = [Worker(service, backends, deps=await build_deps(settings, backends)),
               Worker(simulated.service, backends, deps=simulated.AnnotatorSim())]
    observer = await backends.bus.subscribe(group="benchmark", topics=[
        Topic.LABELS_REQUESTED, Topic.DATASET_LABELED, Topic.RUN_FAILED])
    running = asyncio.create_task(run_workers(workers, stop))
    events: list[Event] = []
    marks: dict[str, float] = {}
    try:
        await asyncio.to_thread(simulated.register_answers, backends.objects, dataset_id, truth)
        t0 = time.perf_counter()

        def scan_folder() -> Any:
            tree = open_folder(work / "pool", roots=settings.import_roots, limits=_limits(settings))
            return tree, scan(tree)

        tree, result = await asyncio.to_thread(scan_folder)
        request = DatasetRequest(folder=str(work / "pool"), name=dataset_id, spec=Spec(), options=options,
                                 dataset_id=dataset_id, run_id=f"bench-{dataset_id}")
        await import_dataset(backends, settings, request, tree, result)
        tree.close()
        marks["ingest"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        while True:
            delivery = await observer.get(timeout=args.timeout)
            if delivery is None:
                raise TimeoutError("no dataset.labeled within the timeout")
            event = decode(delivery.value)
            await observer.commit(delivery)
            events.append(event)
            if event.event_type == Topic.LABELS_REQUESTED and "first_request" not in marks:
                marks["embed_and_seed"] = time.perf_counter() - t1
                marks["first_request"] = time.perf_counter()
            if event.event_type == Topic.RUN_FAILED:
                raise RuntimeError(f"the run failed: {event.payload}")
            if event.event_type == Topic.DATASET_LABELED:
                marks["loop"] = time.perf_counter() - marks.pop("first_request", t1)
                break
        record = await records.load(backends.docs, dataset_id)
    finally:
        stop.set()
        await running
        await observer.close()
    payload = events[-1].payload
    assert isinstance(payload, DatasetLabeled)
    manifest = await asyncio.to_thread(load_manifest, backends.objects, payload.labels_key)
    return backends, events, manifest, record, marks


def _accuracy(pred: np.ndarray, truth: np.ndarray) -> float | None:
    return round(float((pred == truth).mean()), 4) if len(truth) else None


def _per_class(pred: np.ndarray, truth: np.ndarray, classes: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for c, name in enumerate(classes):
        rows = truth == c
        out[name] = {"items": int(rows.sum()), "accuracy": _accuracy(pred[rows], truth[rows])}
    return out


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = os.getloadavg()
    name, entries, labels = _source(args)
    label_array = np.array(labels)
    rng = np.random.default_rng(args.seed)
    n_heldout = args.heldout if args.dataset in ("fashion-mnist", "mnist") and not args.folder \
        else round(args.heldout_fraction * len(entries))
    heldout_rows = _stratified(label_array, n_heldout, rng)
    pool_rows = np.setdiff1d(np.arange(len(entries)), heldout_rows)
    pool = [entries[int(i)] for i in pool_rows]
    truth = {entries[int(i)][0]: labels[int(i)] for i in pool_rows}
    domains = None
    if args.domains != "none":
        if args.dataset != "elpv" or args.folder:
            raise SystemExit("--domains: only ELPV has domains (its cell types, mono and poly)")
        from dlforge.labeler.demo_data import elpv_cells

        domains = {Path(c.name).name: c.kind for c in elpv_cells()}
    await asyncio.to_thread(_write_pool, work / "pool", pool, domains)
    t_materialize = time.perf_counter() - started

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    settings = LabelerSettings(
        bus="memory://", objects=f"file://{work}/objects", docs=f"sqlite:///{work}/docs-{stamp}.db",
        work_dir=str(work / "work"), labeler_import_roots=[str(work)], labeler_embed_size=args.embed_size,
        labeler_threads=args.threads, labeler_classifier=args.classifier, poll_seconds=0.05,
        labeler_cnn_time_budget_s=args.cnn_budget, labeler_embed_views=args.views,
        labeler_domains="standardize" if args.domains == "standardize" else "none",
        labeler_guarantee=args.guarantee,
    )
    options = PipelineOptions(label_budget=args.budget, max_auto_label_error=args.max_error, auto_label_all=True,
                              seed=args.seed)
    dataset_id = f"{name}-{stamp}".replace("_", "-")[:60]
    backends, events, manifest, record, marks = await _label(args, work, settings, truth, options, dataset_id)

    classes = list(manifest.classes)
    # classes nobody labeled are not the labeler's: their items can only be wrong (index past its classes)
    index = {c: i for i, c in enumerate(classes + sorted(set(truth.values()) - set(classes)))}
    items = manifest.items
    y_true = np.array([index[truth[i.name]] for i in items])
    human = np.array([i.label_source == "human" for i in items])
    auto = np.array([i.label_source == "auto" for i in items])
    pred = np.array([index[i.label] if i.label is not None else -1 for i in items])
    conf = np.array([i.confidence if i.confidence is not None else 0.0 for i in items])
    result = record.get("result", {})
    threshold = result.get("auto_label_threshold")
    selective = auto & (conf >= threshold) if threshold is not None else np.zeros(len(items), dtype=bool)

    # the final classifier, refitted exactly as the last round fitted it, on the held-out split
    deps = await build_deps(settings, backends)
    plugin = deps.classifier
    vectors, _ = await asyncio.to_thread(ensure_embeddings, backends.objects, manifest, deps)
    embedder = deps.embedder
    held_images = np.stack([embedder.prepare(_image(entries[int(i)][1])) for i in heldout_rows])
    held_vectors = normalize(np.concatenate([embedder.embed(held_images[s:s + 64])
                                             for s in range(0, len(held_images), 64)]))
    held_truth = np.array([index[labels[int(i)]] for i in heldout_rows])
    asked = record.get("asked", {})
    # as the worker's labeling view marks them: people's labels asked at random or as the k-means seed
    representative = np.array([asked.get(i.item_id) in ("test", "val", "seed") for i in items])

    inputs, held_inputs = vectors, held_vectors
    pixels = await asyncio.to_thread(classifier_pixels, backends.objects, manifest, deps)
    if pixels is not None:  # a classifier on the pixels: the held-out images at the same size and channels
        size, channels = pixels.shape[1], pixels.shape[3]
        held_pixels = np.stack([from_pixels(canonical_pixels(_image(entries[int(i)][1])), size=size,
                                            channels=channels) for i in heldout_rows])
        both = getattr(plugin, "inputs", "") == "both"
        inputs = Both(vectors, pixels) if both else pixels
        held_inputs = Both(held_vectors, held_pixels) if both else held_pixels
    activations = await asyncio.to_thread(classifier_activations, backends.objects, manifest, deps)
    if activations is not None:  # a classifier on the trunk's activations: the held-out images' too
        inputs = activations
        held_inputs = np.concatenate([embedder.activations(held_images[s:s + 64])  # type: ignore[attr-defined]
                                      for s in range(0, len(held_images), 64)])

    def fit_on(rows: np.ndarray) -> Any:
        labeled = np.flatnonzero(rows)
        return plugin.fit(inputs, labeled, y_true[labeled], n_classes=len(classes),
                          representative=representative[labeled], seed=args.seed)

    final = await asyncio.to_thread(fit_on, human)
    held_pred = final.predict_proba(held_inputs).argmax(axis=1)

    # accuracy after each round: the labels people had given once that round's batch was answered
    per_round: list[dict[str, Any]] = []
    requests = [e.payload for e in events if isinstance(e.payload, LabelsRequested)]
    row_of = {i.item_id: n for n, i in enumerate(items)}
    known = np.zeros(len(items), dtype=bool)
    for r, (req, stored) in enumerate(zip(requests, record.get("rounds", []), strict=False), start=1):
        known[[row_of[i] for i in req.item_ids]] = True
        entry: dict[str, Any] = {"round": r, "human_labels": int(known.sum()),
                                 "heldout_accuracy_representative": (stored.get("classifier") or {}).get(
                                     "heldout_accuracy"),
                                 "classifier": (stored.get("classifier") or {}).get("classifier")}
        if args.curve:
            fitted = final if r == len(requests) else await asyncio.to_thread(fit_on, known.copy())
            rest = ~known
            entry["auto_label_accuracy"] = _accuracy(fitted.predict_proba(inputs[rest]).argmax(axis=1), y_true[rest])
        per_round.append(entry)
    await backends.stop()

    n = len(items)
    out: dict[str, Any] = {
        "dataset": name,
        "subset": (f"stratified {len(pool)} of the training set for the loop, {len(heldout_rows)} held out "
                   f"(seed {1000 + args.seed})") if args.dataset in ("fashion-mnist", "mnist") and not args.folder
        else f"all {len(entries)} images: {len(pool)} for the loop, {len(heldout_rows)} held out (stratified)",
        "items": n,
        "classes": classes,
        "budget": args.budget,
        "seed": args.seed,
        "classifier": args.classifier,
        "embedder": f"EfficientNet-Lite0 ImageNet multi-stage pooled, {args.embed_size} px"
                    + (", with the mean over the 8 dihedral views appended" if args.views == "dihedral" else ""),
        "views": args.views,
        "domains": args.domains,
        "human_labels": int(human.sum()),
        "human_label_fraction": round(float(human.sum()) / n, 4),
        "auto_labels": int(auto.sum()),
        "auto_label_accuracy": _accuracy(pred[auto], y_true[auto]),
        "auto_label_per_class": _per_class(pred[auto], y_true[auto], classes),
        "max_auto_label_error": args.max_error,
        "guarantee": args.guarantee,
        "selective_threshold": threshold,
        "selective_estimate": result.get("expected_error_estimate"),
        "selective_bound": result.get("guaranteed_error_bound", result.get("auto_label_error_bound")),
        "selective_calibration_items": result.get("calibration_items"),
        "selective_items": int(selective.sum()),
        "selective_coverage": round(float(selective.sum()) / max(int(auto.sum()), 1), 4),
        "selective_error": round(1.0 - float((pred[selective] == y_true[selective]).mean()), 4)
        if selective.any() else None,
        "selective_within_target": bool(not selective.any()
                                        or 1.0 - float((pred[selective] == y_true[selective]).mean())
                                        <= args.max_error),
        "heldout_items": len(heldout_rows),
        "heldout_accuracy": _accuracy(held_pred, held_truth),
        "heldout_per_class": _per_class(held_pred, held_truth, classes),
        "final_classifier": final.summary().get("classifier"),
        "final_classifier_summary": final.summary(),
        "labeler_warnings": result.get("warnings", []),
        "stop_reason": result.get("stop_reason"),
        "rounds": len(requests),
        "per_round": per_round,
        # the last round's learning-curve points: the linear probe on nested shares of its labels (the report
        # fits them when the rounds are too few; benchmarks/learning_curve_check.py checks what they predict)
        "subsample_points": (record.get("rounds") or [{}])[-1].get("subsample_points", []),
        "seconds": {
            "materialize": round(t_materialize, 1),
            "ingest": round(marks["ingest"], 1),
            "embed_and_seed": round(marks["embed_and_seed"], 1),
            "loop": round(marks["loop"], 1),
            "total": round(time.perf_counter() - started, 1),
        },
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
    }
    out["seconds_total"] = out["seconds"]["total"]
    return out


def table(r: dict[str, Any]) -> str:
    s = r["seconds"]
    rows = [
        ("data set", f"{r['dataset']}: {r['subset']}"),
        ("classifier", f"{r['classifier']} (final round: {r['final_classifier']})"),
        ("embedder", r["embedder"]),
        ("human labels", f"{r['human_labels']} of {r['items']} ({r['human_label_fraction']:.1%}; "
                         f"budget {r['budget']:.0%})"),
        ("rounds", f"{r['rounds']} (stop: {r['stop_reason']})"),
        ("auto-label accuracy, full coverage", f"{r['auto_label_accuracy']} over {r['auto_labels']} items"),
        ("  per class", ", ".join(f"{k}: {v['accuracy']}" for k, v in r["auto_label_per_class"].items())),
        (f"selective at {r['max_auto_label_error']:.0%}: threshold", r["selective_threshold"]),
        ("  guarantee", "expected error <= target (conformal selection), estimate "
                        f"{r['selective_estimate']}" if r["guarantee"] == "expected"
                        else "error <= target with 95 % confidence (exact binomial bound)"),
        ("  bound (95 %) of the calibration items above it, calibration items",
         f"{r['selective_bound']}, {r['selective_calibration_items']}"),
        ("  coverage, measured error", f"{r['selective_coverage']:.1%} ({r['selective_items']} items), "
                                       f"{r['selective_error']}"),
        ("held-out accuracy", f"{r['heldout_accuracy']} on {r['heldout_items']} items"),
        ("seconds: ingest / embed+seed / loop / total",
         f"{s['ingest']} / {s['embed_and_seed']} / {s['loop']} / {s['total']}"),
        ("CPU, load before/after", f"{r['machine']['cpu']}, {r['machine']['load_avg_before'][0]} / "
                                   f"{r['machine']['load_avg_after'][0]}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append(f"{'round':>5} {'human':>6} {'auto acc':>9} {'held-out acc (people, OOF)':>27} {'classifier':>10}")
    for x in r["per_round"]:
        lines.append(f"{x['round']:>5} {x['human_labels']:>6} {x.get('auto_label_accuracy')!s:>9} "
                     f"{x.get('heldout_accuracy_representative')!s:>27} {x.get('classifier')!s:>10}")
    for w in r["labeler_warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [x["human_labels"] for x in r["per_round"]]
    if any(x.get("auto_label_accuracy") is not None for x in r["per_round"]):
        ax.plot(xs, [x.get("auto_label_accuracy") for x in r["per_round"]], "o-",
                label="auto-label accuracy (known labels)")
    ax.plot(xs, [x.get("heldout_accuracy_representative") for x in r["per_round"]], "s--",
            label="held-out accuracy on people's representative labels")
    ax.set_xlabel("human labels")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{r['dataset']}, budget {r['budget']:.0%}, {r['classifier']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=["elpv", "fashion-mnist", "mnist"], default="elpv")
    source.add_argument("--folder", help="a folder of class sub-folders (the folder names are the known labels)")
    p.add_argument("--budget", type=float, default=0.2, help="share of the loop's items people may label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier", default="linear",
                   choices=["linear", "mlp_ssl", "cnn_ssl", "blend", "best", "finetune_top"])
    p.add_argument("--cnn-budget", type=float, default=900.0,
                   help="cnn_ssl: the most seconds one fit may take (DLFORGE_LABELER_CNN_TIME_BUDGET_S)")
    p.add_argument("--max-error", type=float, default=0.01, help="the selective rule's target auto-label error")
    p.add_argument("--guarantee", choices=["bound", "expected"], default="bound",
                   help="the selective rule: error <= target with 95 %% confidence, or in expectation "
                        "(DLFORGE_LABELER_GUARANTEE)")
    p.add_argument("--subset", type=int, default=5000, help="MNIST sets: stratified images for the loop")
    p.add_argument("--heldout", type=int, default=1000, help="MNIST sets: held-out images")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="ELPV and --folder: held-out share")
    p.add_argument("--embed-size", type=int, default=224)
    p.add_argument("--views", choices=["none", "dihedral"], default="none",
                   help="the labeler's DLFORGE_LABELER_EMBED_VIEWS: dihedral appends the features averaged over "
                   "the eight flips and quarter turns")
    p.add_argument("--domains", choices=["none", "given", "standardize"], default="none",
                   help="ELPV: give the labeler each cell's type as its domain (labels.csv's domain column), "
                        "with DLFORGE_LABELER_DOMAINS=none (given) or standardize")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-curve", dest="curve", action="store_false", help="skip refitting each round")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--workdir", default=None, help="keep data and the object store here (reuses embeddings)")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    if not 0.0 < args.budget <= 1.0:
        p.error("--budget must be in (0, 1]")
    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(run(args, work))
    else:
        with tempfile.TemporaryDirectory(prefix="dlforge-bench-labeler-") as tmp:
            result = asyncio.run(run(args, Path(tmp)))
    print(table(result))
    name = result["dataset"]
    out = Path(args.output) if args.output else RESULTS / (
        f"labeler-{name}-{args.budget:g}" + (f"-s{args.seed}" if args.seed else "")
        + (f"-of{args.subset}" if args.dataset != "elpv" and not args.folder and args.subset != 5000 else "")
        + (f"-{args.classifier}" if args.classifier != "linear" else "")
        + (f"-{args.views}" if args.views != "none" else "")
        + (f"-domains-{args.domains}" if args.domains != "none" else "")
        + (f"-{args.guarantee}" if args.guarantee != "bound" else "")
        + (f"-e{args.max_error:g}" if args.max_error != 0.01 else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"\nwritten to {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
