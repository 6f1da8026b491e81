"""The proposer's event handler: dataset.augmented -> score every repository candidate -> model.proposed.

The repository is built in the background at start-up (missing or stale entries only) so that it
is usually ready long before the first dataset arrives; a handler that finds it empty waits for
that build (or starts one). Records: ``proposer_models`` (repository) and ``proposer_proposals``
(one per dataset, the full ranking with every raw and normalized sub-score and the timings).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from dlforge.common.docs import DocumentStore
from dlforge.common.errors import InvalidInput, NotFound, PoisonMessage, RetryableError
from dlforge.common.events import DatasetAugmented, Event, ModelProposed, Spec, Topic
from dlforge.common.objects import ObjectStore
from dlforge.common.runtime import Backends, HandlerContext, Service
from dlforge.proposer.handlers import Ranking, propose, sample_target_items, target_from_arrays
from dlforge.proposer.repository import (
    DEFAULT_RECIPES,
    RECIPE_SETS,
    BuildResult,
    ModelRecipe,
    SourceProvider,
    build_repository,
    default_sources,
    list_models,
    load_entry,
)
from dlforge.proposer.scoring import Candidate, ShortTermTrainingScorer, TargetSample, default_scorers
from dlforge.proposer.settings import ProposerSettings
from dlforge.vision.features import feature_store
from dlforge.vision.manifest import Manifest, load_arrays, load_manifest

log = logging.getLogger(__name__)

PROPOSALS = "proposer_proposals"


# --------------------------------------------------------------------------------------------
# Repository builds: one at a time in this process
# --------------------------------------------------------------------------------------------


class RepositoryBuilds:
    """The model repository of these stores and this process's builds of it, one at a time.

    ``recipes`` are the entries a build makes (default: :data:`DEFAULT_RECIPES`), ``sources`` the
    loaders of their source data sets (default: the configured Fashion-MNIST and MNIST files).
    """

    def __init__(
        self,
        objects: ObjectStore,
        docs: DocumentStore,
        settings: ProposerSettings,
        *,
        recipes: Sequence[ModelRecipe] = DEFAULT_RECIPES,
        sources: Mapping[str, SourceProvider] | None = None,
    ) -> None:
        self.objects = objects
        self.docs = docs
        self.settings = settings
        self.recipes = list(recipes)
        self.sources = dict(sources) if sources is not None else default_sources(
            fashion_mnist_dir=settings.proposer_fashion_mnist_dir, mnist_path=settings.proposer_mnist_path)
        self._task: asyncio.Task[list[BuildResult]] | None = None

    def build(self, *, force: bool = False, recipes: Sequence[ModelRecipe] | None = None
              ) -> asyncio.Task[list[BuildResult]]:
        """The running build, or a new one of every missing/stale recipe (default: all of ``self.recipes``)."""
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return task
        settings = self.settings
        task = loop.create_task(
            build_repository(self.objects, self.docs, recipes=self.recipes if recipes is None else recipes,
                             sources=self.sources, force=force, work_dir=Path(settings.work_dir) / "proposer",
                             threads=settings.proposer_torch_threads),
            name="proposer-repository-build",
        )
        self._task = task
        return task

    def status(self) -> dict[str, Any]:
        """State of this process's latest build."""
        task = self._task
        if task is None:
            return {"state": "idle"}
        if not task.done():
            return {"state": "running"}
        if task.cancelled():
            return {"state": "cancelled"}
        exc = task.exception()
        if exc is not None:
            return {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
        return {"state": "done", "results": [r.__dict__ for r in task.result()]}

    async def ensure(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The repository's records, building the default entries first if it is empty; and build problems.

        A build already running in this process (the start-up one) is waited for, so that a dataset
        arriving early is not scored against a half-built repository.
        """
        problems: list[str] = []
        running = self._task
        if running is not None and not running.done() and running.get_loop() is asyncio.get_running_loop():
            log.info("waiting for the model repository build in progress")
            results = await running
            problems = [f"{r.model_id}: {r.error}" for r in results if r.action == "failed"]
        records = await list_models(self.docs)
        if not records:
            log.info("model repository is empty: building it before proposing")
            results = await self.build()
            problems = [f"{r.model_id}: {r.error}" for r in results if r.action == "failed"]
            records = await list_models(self.docs)
        return records, problems


@dataclass
class ProposerDeps:
    """What the proposer builds once at start from its validated settings: the repository and its builds."""

    settings: ProposerSettings
    repository: RepositoryBuilds


async def build_deps(
    settings: ProposerSettings,
    backends: Backends,
    *,
    recipes: Sequence[ModelRecipe] | None = None,
    sources: Mapping[str, SourceProvider] | None = None,
) -> ProposerDeps:
    """The proposer's dependencies; ``recipes`` (default: the set ``proposer_repository`` names) and
    ``sources`` replace the repository's defaults."""
    chosen = RECIPE_SETS[settings.proposer_repository] if recipes is None else recipes
    return ProposerDeps(settings=settings, repository=RepositoryBuilds(backends.objects, backends.docs, settings,
                                                                       recipes=chosen, sources=sources))


service = Service[ProposerDeps]("proposer")


# --------------------------------------------------------------------------------------------
# The proposal
# --------------------------------------------------------------------------------------------


def load_candidates(
    objects: ObjectStore, records: Sequence[dict[str, Any]], *, unfreeze_last: int, work_dir: Path
) -> list[Candidate]:
    out = []
    store = feature_store(objects)
    for rec in records:
        model, sample = load_entry(objects, rec, work_dir=work_dir)
        out.append(Candidate.from_model(
            model, model_id=rec["model_id"], arch=rec["arch"], source_dataset=rec["source_dataset"],
            weights_key=rec["weights_key"], input_size=rec.get("input_size"), unfreeze_last=unfreeze_last,
            source_sample=sample, store=store,
        ))
    return out


def load_target(
    objects: ObjectStore, manifest: Manifest, *, size: int, channels: int, settings: ProposerSettings, seed: int
) -> TargetSample:
    train_items, val_items = sample_target_items(manifest, train_limit=settings.proposer_train_sample,
                                                 val_limit=settings.proposer_val_sample, seed=seed)
    return target_from_arrays(
        manifest.classes,
        train_x=load_arrays(objects, train_items, size=size, channels=channels),
        train_y=manifest.label_indices(train_items),
        val_x=load_arrays(objects, val_items, size=size, channels=channels),
        val_y=manifest.label_indices(val_items),
        train_contents=[i.sha256 for i in train_items],
        val_contents=[i.sha256 for i in val_items],
    )


def run_proposal(
    candidates: Sequence[Candidate],
    target: TargetSample,
    *,
    spec: Spec,
    settings: ProposerSettings,
    seed: int,
    weights: dict[str, float] | None = None,
) -> tuple[Ranking, dict[str, list[float]]]:
    """Score and rank with the configured scorers (CPU-bound: call it in a thread).

    Also returns each candidate's short-term training loss curve (at most 50 points) for reports.
    """
    torch.set_num_threads(settings.proposer_torch_threads)
    scorers = default_scorers(
        steps=settings.proposer_finetune_steps, batch_size=settings.proposer_finetune_batch,
        lr=settings.proposer_finetune_lr, speed_seconds=settings.proposer_speed_seconds,
        spec_input_size=spec.input_size, seed=seed,
    )
    ranking = propose(candidates, target, scorers, weights=weights or settings.weights(), spec=spec,
                      gate_speedup=settings.proposer_gate_speedup)
    curves: dict[str, list[float]] = {}
    for scorer in scorers:
        if isinstance(scorer, ShortTermTrainingScorer):
            for model_id, losses in scorer.last_curve.items():
                step = max(1, len(losses) // 50)
                curves[model_id] = [round(float(v), 5) for v in losses[::step]]
    return ranking, curves


REFERENCE_ARCH, REFERENCE_SOURCE = "efficientnet_lite0", "imagenet"


def dataset_fingerprint(candidates: Sequence[Candidate], target: TargetSample) -> tuple[list[float] | None, str | None]:
    """The target's fingerprint (:func:`dlforge.hpo.warmstart.fingerprint`) in the pooled features of the
    reference trunk (the ImageNet EfficientNet-Lite0, whatever the ranking chose: fingerprints of different runs
    must be in one space to be compared), and that candidate's id; ``(None, None)`` when the repository has no
    reference trunk or the sample is too small. Its encodings of the sample were made for scoring (cached)."""
    from dlforge.hpo.warmstart import fingerprint

    reference = next((c for c in candidates if (c.arch, c.source_dataset) == (REFERENCE_ARCH, REFERENCE_SOURCE)),
                     None)
    if reference is None or len(target.train_x) < 2:
        return None, None
    try:
        features = reference.encode("train", target.train_x, contents=target.train_contents).features
        return [float(v) for v in fingerprint(features)], reference.model_id
    except Exception as exc:  # not finite, or the trunk failed here: no warm start rather than no proposal
        log.warning("no data-set fingerprint: %s: %s", type(exc).__name__, exc)
        return None, None


@service.handles(Topic.DATASET_AUGMENTED)
async def on_dataset_augmented(event: Event, ctx: HandlerContext[ProposerDeps]) -> Event:
    payload = cast(DatasetAugmented, event.payload)
    settings = ctx.deps.settings
    started = time.perf_counter()
    records, problems = await ctx.deps.repository.ensure()
    if not records:
        raise RetryableError("the model repository is empty and could not be built: " + "; ".join(problems))
    try:
        manifest = await asyncio.to_thread(load_manifest, ctx.objects, payload.manifest_key)
    except NotFound as exc:
        raise PoisonMessage(f"training manifest {payload.manifest_key} does not exist") from exc
    size = max(int(r["input_size"]) for r in records)
    channels = max(int(r["in_channels"]) for r in records)
    seed = payload.options.seed
    try:
        target = await asyncio.to_thread(load_target, ctx.objects, manifest, size=size, channels=channels,
                                         settings=settings, seed=seed)
    except InvalidInput as exc:
        raise PoisonMessage(f"dataset {payload.dataset_id}: {exc}") from exc
    work_dir = Path(settings.work_dir) / "proposer"
    candidates = await asyncio.to_thread(load_candidates, ctx.objects, records,
                                         unfreeze_last=settings.proposer_unfreeze_last, work_dir=work_dir)
    ranking, curves = await asyncio.to_thread(run_proposal, candidates, target, spec=payload.spec,
                                              settings=settings, seed=seed)
    fp, fp_model = await asyncio.to_thread(dataset_fingerprint, candidates, target)
    seconds = time.perf_counter() - started
    doc = proposal_document(event, payload, ranking, target, settings=settings, problems=problems, seconds=seconds)
    doc["loss_curves"] = curves
    doc["fingerprint_model"] = fp_model
    await ctx.docs.upsert(PROPOSALS, doc)
    log.info("proposal for %s: %s", payload.dataset_id, ranking.explanation)
    return event.follow(ModelProposed(
        dataset_id=payload.dataset_id,
        manifest_key=payload.manifest_key,
        classes=list(manifest.classes),
        ranking=[c.candidate_score() for c in ranking.candidates],
        chosen_model_id=ranking.chosen_model_id,
        weights=ranking.weights,
        spec=payload.spec,
        options=payload.options,
        fingerprint=fp,
        fingerprint_model=fp_model,
    ))


def proposal_document(
    event: Event,
    payload: DatasetAugmented,
    ranking: Ranking,
    target: TargetSample,
    *,
    settings: ProposerSettings,
    problems: list[str],
    seconds: float,
) -> dict[str, Any]:
    counts = {c: int(np.sum(target.train_y == i)) for i, c in enumerate(target.classes)}
    return {
        "_id": payload.dataset_id,
        "dataset_id": payload.dataset_id,
        "run_id": event.run_id,
        "event_id": event.event_id,
        "manifest_key": payload.manifest_key,
        "classes": target.classes,
        "spec": payload.spec.model_dump(),
        "chosen_model_id": ranking.chosen_model_id,
        "explanation": ranking.explanation,
        "weights": ranking.weights,
        "ties": ranking.ties,
        "ranking": [c.model_dump() for c in ranking.candidates],
        "target": {"train_items": len(target.train_y), "val_items": len(target.val_y),
                   "train_counts": counts, "image_size": int(target.train_x.shape[1])},
        "scoring": {"finetune_steps": settings.proposer_finetune_steps,
                    "finetune_batch": settings.proposer_finetune_batch,
                    "unfreeze_last": settings.proposer_unfreeze_last,
                    "speed_seconds": settings.proposer_speed_seconds,
                    "gate_speedup": settings.proposer_gate_speedup},
        "repository_problems": problems,
        "seconds": seconds,
        "created_at": datetime.now(UTC).isoformat(),
    }
