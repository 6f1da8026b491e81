"""The optimizer's event handler: ``model.trained`` -> variants, report -> ``model.optimized``."""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dlforge.common.errors import InvalidInput, NotFound, PoisonMessage, RetryableError
from dlforge.common.events import Event, ModelOptimized, ModelTrained, Topic
from dlforge.common.objects import ObjectStore
from dlforge.common.runtime import Backends, HandlerContext, Service
from dlforge.optimizer.bundle import BundleError, build_bundle, bundle_variant
from dlforge.optimizer.compressors import Compressor, Need, default_compressors, needs_of
from dlforge.optimizer.export import ExportMismatch
from dlforge.optimizer.handlers import (
    LabeledImages,
    OptimizationReport,
    OptimizeInput,
    OptimizeOptions,
    checkpoint_format,
    optimize,
    pick_calibration,
)
from dlforge.optimizer.loaded import LoadedModels
from dlforge.optimizer.measure import ProbeFailed
from dlforge.optimizer.predictor import Predictor
from dlforge.optimizer.settings import OptimizerSettings

log = logging.getLogger(__name__)


CAM_MODELS_KEPT = 4  # trained torch models kept loaded for class activation maps (a few: each is a whole model)


@dataclass
class OptimizerDeps:
    """What the optimizer builds once at start from its validated settings: the options of every run,
    its compressor plug-ins, and the API's loaded predictors (by report key and variant)."""

    settings: OptimizerSettings
    options: OptimizeOptions
    compressors: list[Compressor]
    predictors: dict[tuple[str, str | None], Predictor] = field(default_factory=dict)
    cam_models: LoadedModels[Any] = field(default_factory=lambda: LoadedModels(CAM_MODELS_KEPT))
    """the trained torch models the API's class activation maps come from (by checkpoint key; the last few)"""


async def build_deps(settings: OptimizerSettings, backends: Backends) -> OptimizerDeps:
    """The standard compressors: ONNX FP32, one INT8 per configured calibration, the GPU ones if enabled."""
    options = OptimizeOptions.from_settings(settings)
    fp32s, int8s, gpus = default_compressors(calibration_methods=tuple(settings.optimizer_calibration_methods),
                                             calibration_batch=settings.optimizer_calibration_batch)
    return OptimizerDeps(settings=settings, options=options,
                         compressors=[*fp32s, *int8s, *(gpus if settings.optimizer_gpu else [])])


service = Service[OptimizerDeps]("optimizer")

REPORTS = "optimizer_reports"
JOBS = "optimizer_jobs"  # one per model.trained being optimized: running, then completed (see reconcile.py)


def object_prefix(dataset_id: str, model_id: str) -> str:
    return f"optimizer/{dataset_id}/{model_id}"


def report_key(dataset_id: str, model_id: str) -> str:
    return f"{object_prefix(dataset_id, model_id)}/report.json"


def bundle_key(dataset_id: str, model_id: str) -> str:
    """Object key of the model's bundle (see :mod:`dlforge.optimizer.bundle`)."""
    return f"{object_prefix(dataset_id, model_id)}/bundle.zip"


@dataclass
class _Loaded:
    inp: OptimizeInput
    skipped_items: int


def _load_inputs(objects: ObjectStore, p: ModelTrained, work: Path, settings: OptimizerSettings, *,
                 with_train: bool = False) -> _Loaded:
    """Checkpoint to disk; calibration (train), val and test images from the manifest, at the net's size.

    ``with_train`` (a compressor declares :attr:`Need.TRAINING_IMAGES`) also loads up to
    ``optimizer_train_images`` labeled training images, real ones first.
    """
    from dlforge.vision.manifest import Item, load_arrays, load_manifest

    manifest = load_manifest(objects, p.manifest_key)
    checkpoint = objects.get_file(p.checkpoint_key, work / "checkpoint.pt")
    net = checkpoint_format(checkpoint)
    index = {c: i for i, c in enumerate(p.classes)}
    skipped = 0

    def labeled(split: str) -> list[Item]:
        nonlocal skipped
        items = manifest.by_split(split)  # type: ignore[arg-type]
        keep = [i for i in items if i.label in index]
        skipped += len(items) - len(keep)
        return keep

    def images(items: list[Item]) -> LabeledImages:
        arr = load_arrays(objects, items, size=net.input_size, channels=net.in_channels)
        people = np.array([i.labeled_by_people for i in items], dtype=bool)
        return LabeledImages(arr, np.array([index[str(i.label)] for i in items], dtype=np.int64), people)

    val, test = labeled("val"), labeled("test")
    train = manifest.by_split("train")
    real = [i for i in train if i.label_source != "generated"]
    generated = [i for i in train if i.label_source == "generated"]
    n = settings.optimizer_calibration_images
    cal_items = [real[k] for k in pick_calibration([i.item_id for i in real], n=n, seed=p.options.seed)]
    if len(cal_items) < n and generated:  # top up with generated training images only when real ones run out
        extra = pick_calibration([i.item_id for i in generated], n=n - len(cal_items), seed=p.options.seed)
        cal_items += [generated[k] for k in extra]
    calibration = load_arrays(objects, cal_items, size=net.input_size, channels=net.in_channels)
    train_images = None
    if with_train:
        known_real = [i for i in real if i.label in index]
        known_generated = [i for i in generated if i.label in index]
        m = settings.optimizer_train_images
        train_items = [known_real[k] for k in pick_calibration([i.item_id for i in known_real], n=m,
                                                                seed=p.options.seed)]
        if len(train_items) < m and known_generated:
            extra = pick_calibration([i.item_id for i in known_generated], n=m - len(train_items),
                                     seed=p.options.seed)
            train_items += [known_generated[k] for k in extra]
        train_images = images(train_items)
    inp = OptimizeInput(checkpoint_path=checkpoint, classes=list(p.classes), spec=p.spec, calibration=calibration,
                        val=images(val), test=images(test), dataset_id=p.dataset_id, model_id=p.model_id,
                        train=train_images)
    return _Loaded(inp, skipped)


def _run(objects: ObjectStore, p: ModelTrained, event_id: str, deps: OptimizerDeps) -> OptimizationReport:
    """Everything blocking: load, optimize, store the variant files and the report (deterministic keys)."""
    settings = deps.settings
    key = report_key(p.dataset_id, p.model_id)
    if objects.exists(key):
        stored = OptimizationReport.model_validate(objects.get_json(key))
        if stored.source_event_id == event_id:  # a redelivery after the report was written: reuse it
            log.info("optimizer: %s already holds the report of event %s", key, event_id)
            return stored
    work = Path(settings.work_dir) / "optimizer" / event_id
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        loaded = _load_inputs(objects, p, work, settings,
                              with_train=Need.TRAINING_IMAGES in needs_of(deps.compressors))
        if loaded.skipped_items:
            log.warning("optimizer: %d val/test items without a known label were left out", loaded.skipped_items)
        result = optimize(loaded.inp, workdir=work / "variants", options=deps.options, compressors=deps.compressors)
        report = result.report
        prefix = object_prefix(p.dataset_id, p.model_id)
        for name, path in result.files.items():
            vkey = f"{prefix}/{name}{path.suffix}"
            objects.put_file(vkey, path)
            report.variants[name].key = vkey
        report.source_event_id = event_id
        # the bundle is stored before the report: a stored report (what a redelivery reuses) has its bundle
        variant, _ = bundle_variant(report)
        bundle = work / "bundle.zip"
        build_bundle(report, model_path=result.files[variant.name], out=bundle, variant=variant.name)
        objects.put_file(bundle_key(p.dataset_id, p.model_id), bundle)
        objects.put_json(key, report.model_dump(mode="json"))
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


@service.handles(Topic.MODEL_TRAINED)
async def on_model_trained(event: Event, ctx: HandlerContext[OptimizerDeps]) -> Event:
    p = event.payload
    if not isinstance(p, ModelTrained):
        raise PoisonMessage(f"expected a ModelTrained payload, got {type(p).__name__}")
    job = {"_id": f"{p.dataset_id}:{p.model_id}", "run_id": event.run_id, "dataset_id": p.dataset_id,
           "model_id": p.model_id, "event_id": event.event_id, "state": "running",
           "started_at": datetime.now(UTC).isoformat()}
    await ctx.docs.upsert(JOBS, job)
    try:
        report = await asyncio.to_thread(_run, ctx.objects, p, event.event_id, ctx.deps)
    except (InvalidInput, ExportMismatch, NotFound, BundleError, ValueError) as exc:
        await ctx.docs.upsert(JOBS, {**job, "state": "failed", "error": f"{type(exc).__name__}: {exc}"})
        raise PoisonMessage(f"cannot optimize model {p.model_id} of dataset {p.dataset_id}: {exc}") from exc
    except (ProbeFailed, OSError) as exc:
        raise RetryableError(f"optimizing model {p.model_id}: {exc}") from exc  # the job stays running: retried
    key = report_key(p.dataset_id, p.model_id)
    artifacts = {name: v.key for name, v in report.variants.items() if v.key}
    await ctx.docs.upsert(REPORTS, _report_doc(report, key, artifacts, run_id=event.run_id,
                                               checkpoint_key=p.checkpoint_key,
                                               bundle=bundle_key(p.dataset_id, p.model_id)))
    await ctx.docs.upsert(JOBS, {**job, "state": "completed", "finished_at": datetime.now(UTC).isoformat()})
    return event.follow(ModelOptimized(
        dataset_id=p.dataset_id, model_id=p.model_id, chosen_variant=report.chosen_variant, artifacts=artifacts,
        report_key=key, report=report.model_dump(mode="json"), spec_met=report.spec_met, spec=p.spec,
    ))


def _report_doc(report: OptimizationReport, key: str, artifacts: dict[str, str], *, run_id: str,
                checkpoint_key: str | None = None, bundle: str | None = None) -> dict[str, Any]:
    return {
        "checkpoint_key": checkpoint_key,  # the trained torch model (class activation maps)
        "bundle_key": bundle,  # the model bundle (GET /models/{dataset_id}/bundle)
        "_id": f"{report.dataset_id}:{report.model_id}",
        "dataset_id": report.dataset_id,
        "model_id": report.model_id,
        "run_id": run_id,
        "report_key": key,
        "artifacts": artifacts,
        "chosen_variant": report.chosen_variant,
        "spec_met": report.spec_met,
        "spec_verdict": report.spec_verdict.verdict if report.spec_verdict else None,
        "test_accuracy_argmax": report.test_accuracy_argmax,
        "threshold": report.threshold,
        "test_accuracy": report.test_accuracy,
        "test_positive_recall": report.test_positive_recall,
        "fps": report.fps,
        "int8_speedup_vs_onnx_fp32": report.int8_speedup_vs_onnx_fp32,
        "int8_accuracy_drop": report.int8_accuracy_drop,
        "updated_at": datetime.now(UTC).isoformat(),
    }
