"""The labeler's event handlers: dataset.uploaded and labels.submitted.

``dataset.uploaded`` -> embeddings (cached in the object store), the FAISS index, splits and the
first batch -> ``labels.requested``. ``labels.submitted`` -> every accepted submission not applied
yet is folded into the dataset's labels (:mod:`dlforge.labeler.labels`: corrections and answers
to earlier batches too, none dropped); once every item of the waiting batch is answered, one round
of :func:`dlforge.labeler.handlers.run_round` -> the next ``labels.requested`` or, at the stop,
the labeled manifest (items below the guaranteed threshold left "needs review") and
``dataset.labeled``.
Heavy work runs in a thread; the record and every object key are deterministic per dataset and
round, so a redelivered event repeats the same writes.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from dlforge.common.errors import ConfigError, InvalidInput, PoisonMessage, RetryableError
from dlforge.common.events import (
    DatasetLabeled,
    DatasetUploaded,
    DomainAdaptation,
    Event,
    LabelingRound,
    LabelsRequested,
    LabelsSubmitted,
    PipelineOptions,
    Spec,
    SubsampleFigure,
    Topic,
)
from dlforge.common.objects import ObjectStore
from dlforge.common.runtime import Backends, HandlerContext, HandlerResult, Service
from dlforge.labeler import handlers, labels, records
from dlforge.labeler.classifier import LabelClassifier, make_classifier
from dlforge.labeler.embeddings import (
    Embedder,
    embed_items,
    embeddings_key,
    load_embeddings,
    make_embedder,
    save_embeddings,
)
from dlforge.labeler.index import SimilarSearch, build_index, normalize
from dlforge.labeler.ingest import dataset_prefix
from dlforge.labeler.settings import LabelerSettings
from dlforge.labeler.strategies import QueryStrategy, make_strategy
from dlforge.vision.domains import standardize_domains
from dlforge.vision.images import from_pixels
from dlforge.vision.manifest import Manifest, load_arrays, load_manifest, load_pixels, save_manifest

log = logging.getLogger(__name__)



@dataclass
class LabelerDeps:
    """What the labeler builds once at start from its validated settings: its plug-ins, and the API's
    caches of the last few datasets' similar-item searches and item ids."""

    settings: LabelerSettings
    embedder: Embedder
    strategy: QueryStrategy
    classifier: LabelClassifier
    searches: OrderedDict[str, SimilarSearch] = field(default_factory=OrderedDict)
    item_ids: OrderedDict[str, frozenset[str]] = field(default_factory=OrderedDict)


async def build_deps(settings: LabelerSettings, backends: Backends, *, embedder: Embedder | None = None) -> LabelerDeps:
    """The configured embedder (or ``embedder``: tests of the loop's logic pass a stub), query strategy
    and classifier."""
    if embedder is None:
        embedder = make_embedder(settings.labeler_embedder, size=settings.labeler_embed_size,
                                 threads=settings.labeler_threads, runtime=settings.labeler_embed_runtime,
                                 views=settings.labeler_embed_views)
    classifier = make_classifier(settings.labeler_classifier, **_classifier_options(settings))
    if getattr(classifier, "inputs", "embeddings") == "activations" and not hasattr(embedder, "activations_stored"):
        raise ConfigError(f"DLFORGE_LABELER_CLASSIFIER={classifier.name} trains the EfficientNet-Lite0 trunk's last "
                          f"units: it needs that embedder's activations, and {embedder.name!r} has none")
    return LabelerDeps(settings=settings, embedder=embedder, strategy=make_strategy(settings.labeler_query_strategy),
                       classifier=classifier)


def _classifier_options(settings: LabelerSettings) -> dict[str, Any]:
    options: dict[str, Any] = {"threads": settings.labeler_threads}
    if settings.labeler_classifier in ("cnn_ssl", "blend"):
        options["time_budget_s"] = settings.labeler_cnn_time_budget_s
        options["min_steps"] = settings.labeler_cnn_min_steps
        options["steps"] = settings.labeler_cnn_steps
        options["thresholds"] = settings.labeler_cnn_thresholds
    if settings.labeler_classifier == "finetune_top":
        options["steps"] = settings.labeler_finetune_steps
        options["folds"] = settings.labeler_finetune_folds
        options["time_budget_s"] = settings.labeler_finetune_time_budget_s
    return options


service = Service[LabelerDeps]("labeler")


def domain_adaptation(options: PipelineOptions, settings: LabelerSettings,
                      record: dict[str, Any] | None = None) -> DomainAdaptation:
    """The run's ``domain_adaptation`` option, or the labeler's ``labeler_domains`` setting when the run has none,
    as the labeling of ``record`` started with it (its ``domain_adaptation``): a setting changed while a dataset is
    being labeled does not move its later rounds to another embedding space."""
    if record is not None and record.get("domain_adaptation") in ("none", "standardize"):
        return cast(DomainAdaptation, record["domain_adaptation"])
    return options.domain_adaptation or settings.labeler_domains


def classifier_vectors(vectors: np.ndarray, manifest: Manifest, mode: DomainAdaptation
                       ) -> tuple[np.ndarray, dict[str, int]]:
    """The embeddings the seed, the query strategy and the classifier see: with ``mode`` ``standardize`` (see
    :func:`domain_adaptation`) and items of several domains, each domain given the set's moments
    (:func:`standardize_domains`), rows back to unit length; and the size of each domain standardized (``{}``:
    none)."""
    if mode == "none":
        return vectors, {}
    aligned, done = standardize_domains(vectors, [item.domain for item in manifest.items])
    return (normalize(aligned) if done else vectors), done


def index_key(dataset_id: str, embedder_name: str) -> str:
    return f"{dataset_prefix(dataset_id)}/index/{embedder_name}.faiss"


def labeled_key(dataset_id: str) -> str:
    return f"{dataset_prefix(dataset_id)}/labeled.json"


def ensure_embeddings(objects: ObjectStore, manifest: Manifest, deps: LabelerDeps) -> tuple[np.ndarray, str]:
    """The dataset's L2-normalized embeddings (computed once, then read back) and their object key."""
    embedder, settings = deps.embedder, deps.settings
    key = embeddings_key(manifest.dataset_id, embedder.name)
    ids = [i.item_id for i in manifest.items]
    vectors = load_embeddings(objects, key, ids)
    if vectors is None:
        vectors = normalize(embed_items(objects, manifest.items, embedder, batch_size=settings.labeler_embed_batch))
        save_embeddings(objects, key, vectors, ids)
        index = build_index(vectors, backend=settings.labeler_index)
        objects.put_bytes(index_key(manifest.dataset_id, embedder.name), index.to_bytes())
    return normalize(vectors), key


_PIXEL_CHUNK = 256  # decoded images held at once by classifier_pixels


def classifier_pixels(objects: ObjectStore, manifest: Manifest, deps: LabelerDeps) -> np.ndarray | None:
    """The items' pixels at the size and channels a pixel classifier plug-in asks for (None for the
    plug-ins that learn on the embeddings): read from the feature store's decoded images, so an image
    is decoded once per run whatever the rounds.

    Read ``_PIXEL_CHUNK`` items at a time (as :func:`load_arrays` does): holding every decoded image at its
    own size at once would take N x H x W x 3 bytes (20,000 photos of 512 px: 15 GB) for an output
    of N x 64 x 64. The size comes from the manifest's image sizes; whether the images are all gray
    is only known once they are decoded, so they are resized to three channels and the first one kept
    if they were (an L image converted to RGB is the L band three times)."""
    plugin = deps.classifier
    if getattr(plugin, "inputs", "embeddings") not in ("pixels", "both"):
        return None
    items = manifest.items
    native = int(np.median([min(i.width, i.height) for i in items])) if items else 32
    size = plugin.pixel_input(native_size=native, gray=False).size  # type: ignore[attr-defined]
    out = np.zeros((len(items), size, size, 3), dtype=np.uint8)
    gray = True
    threads = deps.settings.labeler_threads
    for start in range(0, len(items), _PIXEL_CHUNK):
        for n, p in enumerate(load_pixels(objects, items[start:start + _PIXEL_CHUNK], threads=threads)):
            gray = gray and p.ndim == 2
            out[start + n] = from_pixels(p, size=size, channels=3)
    wanted = plugin.pixel_input(native_size=native, gray=gray)  # type: ignore[attr-defined]
    if wanted.size != size:
        raise RuntimeError(f"{plugin.name}: the pixel size depends on the channels ({size} vs {wanted.size})")
    if wanted.channels == 3:
        return out
    if gray:
        return np.ascontiguousarray(out[..., :1])
    return load_arrays(objects, items, size=size, channels=wanted.channels, threads=threads)


def classifier_activations(objects: ObjectStore, manifest: Manifest, deps: LabelerDeps) -> np.ndarray | None:
    """The items' trunk activations at its shared boundary for a plug-in that fine-tunes the trunk's last
    units (None for the others): the embedding pass stored them in the feature store, so nothing is
    decoded or run through the trunk again."""
    plugin = deps.classifier
    if getattr(plugin, "inputs", "embeddings") != "activations":
        return None
    stored = getattr(deps.embedder, "activations_stored", None)
    if stored is None:
        raise ConfigError(f"DLFORGE_LABELER_CLASSIFIER={plugin.name} trains the EfficientNet-Lite0 trunk's last "
                          f"units: it needs that embedder's activations, and {deps.embedder.name!r} has none")
    return np.asarray(stored(objects, manifest.items, batch_size=deps.settings.labeler_embed_batch))


def _request(event: Event, dataset_id: str, rnd: int, batch: handlers.Batch, ids: list[str]) -> Event:
    return event.follow(LabelsRequested(dataset_id=dataset_id, batch_id=f"{dataset_id}-r{rnd}", round=rnd,
                                        item_ids=[ids[int(r)] for r in batch.rows], reason=batch.reason))


async def _replay(event: Event, ctx: HandlerContext[LabelerDeps], record: dict[str, Any]) -> HandlerResult:
    """``event`` advanced the round before a crash: bring the label inbox up to the record, emit what it emitted."""
    if record.get("state") == "labeling" and record.get("current_batch"):
        await labels.sync_batch(ctx.docs, record)
    elif record.get("state") == "labeled":
        await labels.close(ctx.docs, record, reason="labeled")
    return _resume(event, record)


def _resume(event: Event, record: dict[str, Any]) -> HandlerResult:
    """A redelivered event whose work was already recorded: emit what was emitted then."""
    if record.get("state") == "labeled" and record.get("labeled_event"):
        return event.follow(DatasetLabeled.model_validate(record["labeled_event"]))
    if record.get("request_event"):
        return event.follow(LabelsRequested.model_validate(record["request_event"]))
    return None


async def _record_failure(ctx: HandlerContext[LabelerDeps], dataset_id: str, exc: BaseException) -> None:
    """Mark the dataset failed with the reason (the runtime dead-letters the event and emits run.failed)."""
    try:
        record = await ctx.docs.get(records.DATASETS, dataset_id)
        if record is not None:
            record = await records.change(ctx.docs, record, state="failed", error=f"{type(exc).__name__}: {exc}")
            await labels.close(ctx.docs, record, reason="failed")
    except Exception:  # the original failure is what matters
        log.exception("could not mark dataset %s failed", dataset_id)


@service.handles(Topic.DATASET_UPLOADED)
async def on_dataset_uploaded(event: Event, ctx: HandlerContext[LabelerDeps]) -> HandlerResult:
    payload = event.payload
    assert isinstance(payload, DatasetUploaded)
    try:
        return await _start_labeling(event, ctx)
    except RetryableError:
        raise
    except Exception as exc:
        await _record_failure(ctx, payload.dataset_id, exc)
        raise


async def _start_labeling(event: Event, ctx: HandlerContext[LabelerDeps]) -> HandlerResult:
    payload = event.payload
    assert isinstance(payload, DatasetUploaded)
    record = await ctx.docs.get(records.DATASETS, payload.dataset_id)
    if record is None:
        raise PoisonMessage(f"dataset {payload.dataset_id} has no record in {records.DATASETS}")
    if record.get("state") in ("labeling", "labeled"):
        if record.get("state") == "labeling" and record.get("current_batch"):
            await labels.sync_batch(ctx.docs, record)
        return _resume(event, record)
    if record.get("state") == "failed" and record.get("current_batch"):
        return await _resume_after_failure(event, ctx, record)
    record = await records.change(ctx.docs, record, state="embedding")
    manifest = await asyncio.to_thread(load_manifest, ctx.objects, payload.manifest_key)
    vectors, key = await asyncio.to_thread(ensure_embeddings, ctx.objects, manifest, ctx.deps)
    options = payload.options
    ids = [i.item_id for i in manifest.items]
    n = len(ids)

    def plan() -> tuple[list[Any], handlers.Batch]:
        splits = handlers.assign_splits(n, budget=handlers.budget_of(n, options),
                                        rng=manifest.rng(options.seed, "splits"))
        known = np.array([i.label is not None for i in manifest.items], dtype=bool)
        seen, _ = classifier_vectors(vectors, manifest, domain_adaptation(options, ctx.deps.settings))
        batch = handlers.first_batch(seen, splits=splits, known=known, options=options,
                                     rng=manifest.rng(options.seed, "seed"))
        return splits, batch

    splits, batch = await asyncio.to_thread(plan)
    asked = {ids[int(r)]: reason for r, reason in zip(batch.rows, batch.reasons, strict=True)}
    record = await records.change(
        ctx.docs, record, embeddings_key=key, splits=dict(zip(ids, splits, strict=True)), asked=asked,
        human_labels={}, rounds=[], classes=list(manifest.classes), base_classes=list(manifest.classes),
        domain_adaptation=domain_adaptation(options, ctx.deps.settings),
    )
    if len(batch.rows) == 0:  # nothing to ask: every test item was labeled already
        return await _advance(event, ctx, record, manifest, vectors, rnd=1)
    request = _request(event, payload.dataset_id, 1, batch, ids)
    await _open_batch(ctx, record, request)
    return request


async def _resume_after_failure(event: Event, ctx: HandlerContext[LabelerDeps], record: dict[str, Any]
                                ) -> HandlerResult:
    """``dataset.uploaded`` again (``POST /runs/{id}/retry``) for a dataset that failed while labeling: go on from
    its open batch with every label people gave, instead of planning the labeling again.

    The inbox opens for the batch again; if people answered all of it (the failure came in the round
    after), that round runs now; otherwise the batch is asked again.
    """
    record = await records.change(ctx.docs, record, state="labeling", error=None)
    inbox = await labels.sync_batch(ctx.docs, record)
    inbox = (await labels.fold(ctx.docs, inbox)).inbox
    if inbox.get("waiting_count"):
        return _resume(event, record)
    record = await labels.sync_record(ctx.docs, record, inbox)
    batch = record["current_batch"]
    manifest = await asyncio.to_thread(load_manifest, ctx.objects, record["manifest_key"])
    vectors, _ = await asyncio.to_thread(ensure_embeddings, ctx.objects, manifest, ctx.deps)
    return await _advance(event, ctx, record, manifest, vectors, rnd=int(batch["round"]) + 1)


async def _open_batch(ctx: HandlerContext[LabelerDeps], record: dict[str, Any], request: Event, *,
                      advanced_by: str | None = None,
                      guesses: dict[str, handlers.Guess] | None = None) -> dict[str, Any]:
    """Record the batch waiting for people (with the round's ``guesses`` of its items, shown in the
    queue; none in the seed round) and open the label inbox for it."""
    req = request.payload
    assert isinstance(req, LabelsRequested)
    rounds = list(record.get("rounds", []))
    rounds.append({"round": req.round, "batch_id": req.batch_id, "reason": req.reason, "asked": len(req.item_ids),
                   "requested_at": records.now()})
    counts = dict(record.get("counts", {}))
    counts["pending"] = len(req.item_ids)
    record = await records.change(
        ctx.docs, record, state="labeling", rounds=rounds, counts=counts,
        current_batch={"batch_id": req.batch_id, "round": req.round, "reason": req.reason,
                       "item_ids": list(req.item_ids),
                       "guesses": {i: {"label": g.label, "confidence": g.confidence}
                                   for i, g in (guesses or {}).items()}},
        request_event=req.model_dump(mode="json"), advanced_by=advanced_by,
    )
    await labels.sync_batch(ctx.docs, record)
    return record


def _stored_submission(event: Event) -> bool:
    """A submission ``POST /labels`` stored in the inbox (it has a sequence): folding it again changes
    nothing (:func:`dlforge.labeler.labels.fold` skips what the items hold), so a handling that emitted
    nothing needs no processed-marker. Bus-only submissions keep theirs: they are appended by event id."""
    payload = event.payload
    return isinstance(payload, LabelsSubmitted) and payload.sequence is not None


@service.handles(Topic.LABELS_SUBMITTED, replay_safe=_stored_submission)
async def on_labels_submitted(event: Event, ctx: HandlerContext[LabelerDeps]) -> HandlerResult:
    payload = event.payload
    assert isinstance(payload, LabelsSubmitted)
    try:
        return await _take_labels(event, ctx)
    except (RetryableError, PoisonMessage):
        raise  # a refused submission does not fail the dataset: the batch stays open
    except Exception as exc:
        await _record_failure(ctx, payload.dataset_id, exc)
        raise


async def _take_labels(event: Event, ctx: HandlerContext[LabelerDeps]) -> HandlerResult:
    payload = event.payload
    assert isinstance(payload, LabelsSubmitted)
    dataset_id = payload.dataset_id
    inbox = await labels.load_inbox(ctx.docs, dataset_id)
    record: dict[str, Any] | None = None
    if inbox is not None and inbox.get("advanced_by") == event.event_id:
        # this very event closed the batch and its round was recorded, but the crash came before the
        # runtime's marker: emit what the round emitted (once: the marker is written with it now)
        record = await records.load(ctx.docs, dataset_id)
        return await _replay(event, ctx, record)
    if payload.sequence is None:  # straight from the bus (the simulated annotator, another producer)
        record = await ctx.docs.get(records.DATASETS, dataset_id)
        if record is None:
            raise PoisonMessage(f"labels for unknown dataset {dataset_id}")
        if inbox is None and record.get("state") == "labeling" and record.get("current_batch"):
            inbox = await labels.sync_batch(ctx.docs, record)
        if inbox is None or not inbox.get("accepting"):
            log.warning("labels of %s for dataset %s (event %s) left out: the dataset does not accept labels "
                        "(state %s)", payload.annotator, dataset_id, event.event_id, record.get("state"))
            return None
        asked = record.get("asked", {})
        outside = sorted(i for i in payload.labels if i not in asked)
        if outside:
            raise PoisonMessage(f"labels refused: {len(outside)} item(s) of dataset {dataset_id} were not asked of "
                                f"people: {', '.join(outside[:10])}")
        try:
            clean, _ = handlers.check_labels(payload.labels, classes=labels.known_classes(inbox),
                                             allow_new_classes=bool(inbox.get("allow_new_classes", True)))
        except InvalidInput as exc:
            raise PoisonMessage(f"labels refused: {exc}") from exc
        submitted = labels.entry(event_id=event.event_id, batch_id=payload.batch_id, annotator=payload.annotator,
                                 labels=clean, at=event.occurred_at.isoformat())
        inbox = await labels.append_once(ctx.docs, dataset_id, submitted)
    elif inbox is None:
        raise PoisonMessage(f"labels.submitted #{payload.sequence} for dataset {dataset_id}, which has no label inbox")
    if not inbox["pending"] and (inbox.get("waiting_count") or not inbox.get("accepting")):
        return None  # applied by an earlier fold; the batch still waits for people (or is closed)
    inbox = (await labels.fold(ctx.docs, inbox)).inbox
    if inbox.get("waiting_count") or not inbox.get("accepting"):
        return None
    # every item of the waiting batch has its label: one round
    record = record or await ctx.docs.get(records.DATASETS, dataset_id)
    if record is None:
        raise PoisonMessage(f"labels for unknown dataset {dataset_id}")
    if record.get("advanced_by") == event.event_id:
        return await _replay(event, ctx, record)
    batch = record.get("current_batch")
    if record.get("state") != "labeling" or not batch or batch["batch_id"] != inbox.get("batch_id"):
        return None
    record = await labels.sync_record(ctx.docs, record, inbox)
    if any(i not in record["human_labels"] for i in batch["item_ids"]):
        raise RetryableError(f"dataset {dataset_id}: the label inbox says batch {batch['batch_id']} is answered, "
                             "the labels do not (yet)")
    manifest = await asyncio.to_thread(load_manifest, ctx.objects, record["manifest_key"])
    vectors, _ = await asyncio.to_thread(ensure_embeddings, ctx.objects, manifest, ctx.deps)
    return await _advance(event, ctx, record, manifest, vectors, rnd=int(batch["round"]) + 1)


async def _advance(
    event: Event,
    ctx: HandlerContext[LabelerDeps],
    record: dict[str, Any],
    manifest: Manifest,
    vectors: np.ndarray,
    *,
    rnd: int,
) -> HandlerResult:
    """One round: fit, auto-label, then ask the next batch or finish."""
    dataset_id = record["_id"]
    options = PipelineOptions.model_validate(record["options"])
    spec = Spec.model_validate(record["spec"])
    ids = [i.item_id for i in manifest.items]
    splits = [record["splits"][i] for i in ids]
    asked_val = np.array([record.get("asked", {}).get(i) == "val" for i in ids], dtype=bool)
    vectors, standardized = await asyncio.to_thread(classifier_vectors, vectors, manifest,
                                                    domain_adaptation(options, ctx.deps.settings, record))

    pixels: list[np.ndarray | None] = []
    activations: list[np.ndarray | None] = []

    def fit(record: dict[str, Any]) -> tuple[handlers.LabelingView, handlers.RoundResult]:
        if not pixels:
            pixels.append(classifier_pixels(ctx.objects, manifest, ctx.deps))
            activations.append(classifier_activations(ctx.objects, manifest, ctx.deps))
        view = handlers.labeling_view(manifest, classes=record["classes"], human_labels=record.get("human_labels", {}),
                                      asked=record.get("asked", {}))
        return view, handlers.run_round(
            vectors, labels=view.labels, human=view.human, representative=view.representative,
            calibration=handlers.random_sample(view.labels, splits, asked_val=asked_val),
            n_classes=len(view.classes), options=options, strategy=ctx.deps.strategy,
            classifier=ctx.deps.classifier, rng=manifest.rng(options.seed, f"round-{rnd}"),
            seed=options.seed, pixels=pixels[0], guarantee=ctx.deps.settings.labeler_guarantee,
            activations=activations[0])

    view, result = await asyncio.to_thread(fit, record)
    if result.done:
        # Finalising: stop accepting labels first, then apply what came in while the round was fitted
        # (refitting if that changed a label), so no accepted label misses the final labels.
        inbox = await labels.close(ctx.docs, record, reason="finalising")
        folded = await labels.fold(ctx.docs, inbox)
        record = await labels.sync_record(ctx.docs, record, folded.inbox)
        if folded.changed:
            view, result = await asyncio.to_thread(fit, record)
    classes = list(view.classes)
    unlabeled = ~(view.human | view.given)
    selective = result.selective
    rounds = list(record.get("rounds", []))
    if rounds and "answered_at" not in rounds[-1]:
        rounds[-1] = {
            **rounds[-1],
            "answered_at": records.now(),
            "human_labels": result.human_labels,
            "auto_confident": result.auto_confident,
            "expected_auto_accuracy": float(result.confidence[unlabeled].mean()) if unlabeled.any() else None,
            "auto_label_threshold": result.threshold,
            "auto_label_error_bound": selective.error_bound if selective is not None else None,
            "calibration_items": selective.calibration_items if selective is not None else 0,
            "classifier": result.classifier,
            **({"subsample_points": [[n, acc] for n, acc in result.subsample_points]}
               if result.subsample_points else {}),
        }
    counts = dict(record.get("counts", {}))
    counts.update(human=int(view.human.sum()), auto_confident=result.auto_confident)
    if not result.done:
        assert result.next_batch is not None
        asked = dict(record.get("asked", {}))
        asked.update({ids[int(r)]: reason for r, reason in zip(result.next_batch.rows, result.next_batch.reasons,
                                                                  strict=True)})
        record = await records.change(ctx.docs, record, rounds=rounds, counts=counts, asked=asked)
        request = _request(event, dataset_id, rnd, result.next_batch, ids)
        await _open_batch(ctx, record, request, advanced_by=event.event_id,
                          guesses=result.guesses(result.next_batch.rows, ids=ids, classes=classes))
        return request

    decision = handlers.decide_auto_labels(result, known=~unlabeled, classes=classes, options=options)
    labeled = handlers.labeled_manifest(manifest, view=view, splits=splits, result=result, auto=decision.auto)
    key = labeled_key(dataset_id)
    await asyncio.to_thread(save_manifest, ctx.objects, key, labeled)
    auto = decision.auto
    n_auto = int(auto.sum())
    n_review = int(decision.review.sum())
    counts.update(auto=n_auto, needs_review=n_review, pending=0, human=int(view.human.sum()),
                  given=int(view.given.sum()))
    for warning in decision.warnings:
        log.warning("labeler: dataset %s: %s", dataset_id, warning)
    summary = {
        "stop_reason": result.stop_reason,
        "human_label_fraction": round(float(view.human.sum()) / max(len(ids), 1), 4),
        "auto_labeled": n_auto,
        "auto_at_target": result.auto_confident,
        "expected_auto_accuracy": round(float(result.confidence[auto].mean()), 4) if n_auto else None,
        **decision.summary,
        "people_labels_by_split": handlers.people_label_counts(view, splits=splits, asked=record.get("asked", {}),
                                                               ids=ids),
        "classifier": result.classifier,
        "domains_standardized": standardized,
    }
    labeled_event = DatasetLabeled(
        dataset_id=dataset_id, labels_key=key, classes=labeled.classes, counts=handlers.class_counts(labeled),
        human_labels=int(view.human.sum()), auto_labels=n_auto, needs_review=n_review, rounds=len(rounds), spec=spec,
        options=options, rounds_figures=_round_figures(rounds),
        subsample_figures=[SubsampleFigure(human_labels=n, heldout_accuracy=acc) for n, acc in result.subsample_points],
        auto_label_coverage=_fraction(decision.summary.get("auto_label_coverage")),
        auto_label_error_bound=_fraction(decision.summary.get("auto_label_error_bound")),
        auto_label_guarantee=decision.summary.get("auto_label_guarantee"),  # type: ignore[arg-type]
        expected_error_estimate=_fraction(decision.summary.get("expected_error_estimate")),
        domains_standardized=standardized,
    )
    record = await records.change(ctx.docs, record, state="labeled", rounds=rounds, counts=counts,
                                  current_batch=None, labels_key=key, result=summary,
                                  labeled_event=labeled_event.model_dump(mode="json"),
                                  advanced_by=event.event_id)
    await labels.close(ctx.docs, record, reason="labeled")
    return event.follow(labeled_event)


def _fraction(value: object) -> float | None:
    """A figure in [0, 1], or None when there is none (or it is not finite)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return min(1.0, max(0.0, float(value)))


def _round_figures(rounds: list[dict[str, Any]]) -> list[LabelingRound]:
    """The answered rounds' human labels and classifier accuracies, as ``dataset.labeled`` carries them."""
    out = []
    for r in rounds:
        if r.get("human_labels") is None:
            continue  # asked, never answered (the stop came first)
        clf = r.get("classifier") or {}
        out.append(LabelingRound(round=int(r["round"]), human_labels=int(r["human_labels"]),
                                 heldout_accuracy=_fraction(clf.get("heldout_accuracy")),
                                 cv_accuracy=_fraction(clf.get("cv_accuracy"))))
    return out
