"""The augmenter's event handler: ``dataset.labeled`` -> generate, filter, write -> ``dataset.augmented``.

Artifacts: ``augmenter/<dataset_id>/generated/<sample_id>.png`` (every generated sample, kept or not,
so that people can look at what the filter refused) and ``augmenter/<dataset_id>/manifest.json`` (the
training manifest: real items + kept generated items). Metadata: ``augmenter_runs`` (one record per
data set: counts, filter accuracy, timings) and ``augmenter_samples`` (one document per sample).
Seeds come from ``options.seed`` and the images (``Manifest.content_key``, not the data set id) and
sample ids from a fingerprint of the inputs,
so a redelivered or repeated event rewrites the same objects, or is answered from the stored record.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
from pydantic import ValidationError

from dlforge.augmenter.filters import ConfidenceFilter, FrozenNetworkFeatures, SampleFilter
from dlforge.augmenter.generators import Generator, MixedGenerator, MixupGenerator, PolicyGenerator, ThenPolicies
from dlforge.augmenter.handlers import (
    GENERATED_PREFIX,
    AugmentationOutcome,
    AugmentConfig,
    ClassPlan,
    augment,
    count_train,
    fingerprint,
    plan_augmentation,
    samples_grid,
    training_manifest,
)
from dlforge.augmenter.settings import AugmenterSettings
from dlforge.common.errors import InvalidInput, NotFound, PoisonMessage, RetryableError
from dlforge.common.events import (
    AugmentationCount,
    AugmentationGain,
    DatasetAugmented,
    DatasetLabeled,
    Event,
    Topic,
)
from dlforge.common.objects import ObjectStore, check_key
from dlforge.common.runtime import Backends, HandlerContext, Service
from dlforge.vision.features import FeatureStore, feature_store
from dlforge.vision.manifest import Item, Manifest, load_arrays, save_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmenterDeps:
    """What the augmenter builds once at start from its validated settings: its two plug-ins."""

    settings: AugmenterSettings
    generator: Generator
    sample_filter: SampleFilter


service = Service[AugmenterDeps]("augmenter")

RUNS = "augmenter_runs"
SAMPLES = "augmenter_samples"


def manifest_key(dataset_id: str) -> str:
    return f"augmenter/{dataset_id}/manifest.json"


def build_generator(settings: AugmenterSettings) -> Generator:
    """The generator ``augmenter_generator`` names (the settings refuse unknown names)."""
    if settings.augmenter_generator in ("cvae", "cvae+policy"):
        from dlforge.augmenter.learned import ConditionalVAEGenerator

        vae = ConditionalVAEGenerator(seconds=settings.augmenter_cvae_seconds, steps=settings.augmenter_cvae_steps,
                                      mode=settings.augmenter_cvae_mode)
        return vae if settings.augmenter_generator == "cvae" else ThenPolicies(vae, settings.augmenter_policies)
    return MixedGenerator([
        (PolicyGenerator(settings.augmenter_policies), 1.0 - settings.augmenter_mixup_fraction),
        (MixupGenerator(settings.augmenter_mixup_alpha), settings.augmenter_mixup_fraction),
    ])


def build_filter(settings: AugmenterSettings, store: FeatureStore | None = None) -> SampleFilter:
    """The X2 filter; with ``store``, features of images other stages embedded are read, not recomputed."""
    extractor = FrozenNetworkFeatures(
        settings.augmenter_filter_arch, image_size=settings.augmenter_filter_image_size,
        batch_size=settings.augmenter_batch_size, threads=settings.augmenter_threads, store=store,
    )
    return ConfidenceFilter(extractor, threshold=settings.augmenter_threshold)


async def build_deps(settings: AugmenterSettings, backends: Backends) -> AugmenterDeps:
    """The generator and the X2 filter (reading features from the object store's feature store)."""
    return AugmenterDeps(settings=settings, generator=build_generator(settings),
                         sample_filter=build_filter(settings, feature_store(backends.objects)))


# settings only some generators read: they enter the fingerprint only where they decide the samples, so
# that a changed VAE default does not make every policy run's augmentation stale (and the other way round)
_ONLY_FOR = {"augmenter_cvae_": ("cvae", "cvae+policy"), "augmenter_mixup_": ("policy",),
             "augmenter_policies": ("policy", "cvae+policy")}


def _relevant(payload: DatasetLabeled, settings: AugmenterSettings) -> dict[str, Any]:
    """The options and settings the output depends on (they enter the fingerprint and the record)."""

    def used(key: str) -> bool:
        return all(settings.augmenter_generator in generators
                   for prefix, generators in _ONLY_FOR.items() if key.startswith(prefix))

    fields = {k: v for k, v in settings.model_dump().items()
              if k.startswith("augmenter_") and k not in ("augmenter_threads", "augmenter_write_threads",
                                                           "augmenter_batch_size") and used(k)}
    return {
        "min_per_class": payload.options.min_per_class,
        "max_imbalance": payload.options.max_imbalance,
        "seed": payload.options.seed,
        **{k.removeprefix("augmenter_"): v for k, v in fields.items()},
    }


def _read_manifest(objects: ObjectStore, payload: DatasetLabeled) -> tuple[Manifest, bytes]:
    try:
        raw = objects.get_bytes(payload.labels_key)
    except NotFound as exc:
        raise PoisonMessage(f"labeled manifest {payload.labels_key!r} does not exist") from exc
    except (OSError, ConnectionError, TimeoutError) as exc:
        raise RetryableError(f"reading {payload.labels_key!r}: {exc}") from exc
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise PoisonMessage(f"labeled manifest {payload.labels_key!r} is invalid: {exc}") from exc
    if manifest.dataset_id != payload.dataset_id:
        raise PoisonMessage(f"labeled manifest is of data set {manifest.dataset_id!r}, not {payload.dataset_id!r}")
    unknown = sorted({str(i.label) for i in manifest.items if i.label is not None} - set(manifest.classes))
    if unknown:
        raise PoisonMessage(f"labeled manifest has labels outside its classes: {unknown}")
    return manifest, raw


def grid_key(dataset_id: str) -> str:
    return f"augmenter/{dataset_id}/samples-grid.png"


def _write_outputs(objects: ObjectStore, manifest: Manifest, outcome: AugmentationOutcome, *,
                   threads: int) -> str | None:
    """The samples, their grid and the training manifest (last); returns the grid's key (None: no grid)."""
    key = manifest_key(manifest.dataset_id)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda s: objects.put_bytes(s.key, s.png, content_type="image/png"), outcome.samples))
    grid = samples_grid(outcome.samples, manifest.classes)
    if grid is not None:
        objects.put_bytes(grid_key(manifest.dataset_id), grid, content_type="image/png")
    elif objects.exists(grid_key(manifest.dataset_id)):  # an earlier run's, with other inputs
        objects.delete(grid_key(manifest.dataset_id))
    # The manifest last: whoever reads it finds every image it names.
    save_manifest(objects, key, training_manifest(manifest, outcome.samples))
    current = {s.key for s in outcome.samples}
    for info in list(objects.list(GENERATED_PREFIX.format(dataset_id=manifest.dataset_id))):
        if info.key not in current:  # left by an earlier run with other inputs
            objects.delete(info.key)
    return None if grid is None else grid_key(manifest.dataset_id)


def _event(event: Event, payload: DatasetLabeled, key: str, counts: list[AugmentationCount], *,
           gain: AugmentationGain | None, samples_grid_key: str | None) -> Event:
    return event.follow(DatasetAugmented(
        dataset_id=payload.dataset_id, manifest_key=key, classes=list(payload.classes),
        augmentation=counts, spec=payload.spec, options=payload.options, gain=gain,
        samples_grid_key=samples_grid_key,
    ))


async def _augment_and_write(
    ctx: HandlerContext[AugmenterDeps],
    manifest: Manifest,
    plans: list[ClassPlan],
    *,
    settings: AugmenterSettings,
    config: AugmentConfig,
    fp: str,
    generator: Generator,
    sample_filter: SampleFilter,
) -> tuple[AugmentationOutcome, str | None, dict[str, float]]:
    dataset_id = manifest.dataset_id

    def load(items: Sequence[Item], size: int, channels: int) -> np.ndarray:
        return load_arrays(ctx.objects, items, size=size, channels=channels)

    try:
        outcome = await asyncio.to_thread(
            augment, manifest, plans, load=load, generator=generator, sample_filter=sample_filter, config=config,
        )
    except (InvalidInput, NotFound) as exc:
        raise PoisonMessage(f"cannot read the real images of {dataset_id}: {exc}") from exc
    except (OSError, ConnectionError, TimeoutError) as exc:
        raise RetryableError(f"object store failure while augmenting {dataset_id}: {exc}") from exc

    t = time.perf_counter()
    grid = await asyncio.to_thread(_write_outputs, ctx.objects, manifest, outcome,
                                   threads=settings.augmenter_write_threads)
    for sample in outcome.samples:
        await ctx.docs.upsert(SAMPLES, {"_id": f"{dataset_id}:{sample.sample_id}", "dataset_id": dataset_id,
                                        "fingerprint": fp, **sample.record()})
    for stale in await ctx.docs.find(SAMPLES, {"dataset_id": dataset_id}):
        if stale.get("fingerprint") != fp:
            await ctx.docs.delete(SAMPLES, stale["_id"])
    return outcome, grid, {**outcome.timings, "write": round(time.perf_counter() - t, 3)}


@service.handles(Topic.DATASET_LABELED)
async def on_dataset_labeled(event: Event, ctx: HandlerContext[AugmenterDeps]) -> Event:
    payload = cast(DatasetLabeled, event.payload)
    settings = ctx.deps.settings
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat()
    try:
        key = check_key(manifest_key(payload.dataset_id))
    except InvalidInput as exc:
        raise PoisonMessage(f"data set id {payload.dataset_id!r} cannot name objects: {exc}") from exc
    manifest, raw = await asyncio.to_thread(_read_manifest, ctx.objects, payload)
    relevant = _relevant(payload, settings)
    fp = fingerprint(raw, dataset_id=payload.dataset_id, settings=relevant)

    previous = await ctx.docs.get(RUNS, payload.dataset_id)
    if (previous is not None and previous.get("status") == "completed" and previous.get("fingerprint") == fp
            and await asyncio.to_thread(ctx.objects.exists, key)):
        log.info("augmenter: %s already augmented with the same inputs; re-emitting", payload.dataset_id)
        counts = [AugmentationCount.model_validate(c) for c in previous["augmentation"]]
        gain = None if previous.get("gain") is None else AugmentationGain.model_validate(previous["gain"])
        return _event(event, payload, key, counts, gain=gain, samples_grid_key=previous.get("samples_grid_key"))

    counts_real = count_train(manifest)
    if sum(1 for c in counts_real.values() if c > 0) < 2:
        raise PoisonMessage(f"data set {payload.dataset_id} needs real train items of at least two classes, "
                            f"has {counts_real}")
    plans = plan_augmentation(counts_real, min_per_class=payload.options.min_per_class,
                              max_imbalance=payload.options.max_imbalance,
                              max_generated_ratio=settings.augmenter_max_generated_ratio)
    record: dict[str, Any] = {
        "_id": payload.dataset_id, "dataset_id": payload.dataset_id, "run_id": event.run_id,
        "event_id": event.event_id, "status": "running", "fingerprint": fp, "labels_key": payload.labels_key,
        "manifest_key": key, "classes": list(manifest.classes), "options": relevant,
        "plan": [{**dataclasses.asdict(p), "scarce": p.scarce} for p in plans], "started_at": started_at,
    }
    await ctx.docs.upsert(RUNS, record)

    generator, sample_filter = ctx.deps.generator, ctx.deps.sample_filter
    config = AugmentConfig(
        seed=payload.options.seed, id_prefix=f"g{fp[:8]}", max_sources=settings.augmenter_max_sources,
        max_filter_train=settings.augmenter_filter_max_train, max_side=settings.augmenter_max_side,
    )
    try:
        outcome, grid, timings = await _augment_and_write(ctx, manifest, plans, settings=settings, config=config, fp=fp,
                                                    generator=generator, sample_filter=sample_filter)
    except Exception as exc:
        await ctx.docs.upsert(RUNS, {**record, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                     "finished_at": datetime.now(UTC).isoformat()})
        raise
    timings["total"] = round(time.perf_counter() - started, 3)

    fit = outcome.filter_fit
    fit_ = getattr(generator, "last_fit", None)
    generator_record: dict[str, Any] = {
        "name": generator.name,
        **{k: relevant[k] for k in ("policies", "mixup_fraction", "mixup_alpha", "cvae_mode") if k in relevant},
        **({"cvae_fit": dataclasses.asdict(fit_)}
           if fit_ is not None and dataclasses.is_dataclass(fit_) and not isinstance(fit_, type) else {}),
    }
    record.update(
        status="completed",
        augmentation=[c.model_dump() for c in outcome.counts],
        filter=None if fit is None else {
            "name": sample_filter.name, "val_accuracy": fit.val_accuracy, "val_count": fit.val_count,
            "train_count": fit.train_count, "seconds": round(fit.seconds, 3), **fit.details,
        },
        generator=generator_record,
        image_size=outcome.image_size, channels=outcome.channels, timings=timings,
        gain=None if outcome.gain is None else outcome.gain.model_dump(), samples_grid_key=grid,
        finished_at=datetime.now(UTC).isoformat(),
    )
    await ctx.docs.upsert(RUNS, record)
    log.info("augmenter: %s augmented in %.1fs: %s", payload.dataset_id, timings["total"],
             ", ".join(f"{c.label} {c.real}+{c.kept}/{c.generated}" for c in outcome.counts))
    return _event(event, payload, key, outcome.counts, gain=outcome.gain, samples_grid_key=grid)
