"""The trainer's event handlers: ``hpo.trial`` -> ``hpo.trial.completed``; ``hpo.completed`` -> ``model.trained``.

While a trial trains, each epoch's value goes to the tuner as ``hpo.trial.reported`` and the tuner's
pruning decision comes back through :mod:`dlforge.trainer.pruning`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from dlforge.common.errors import InvalidInput, PoisonMessage, RetryableError
from dlforge.common.events import Event, HpoCompleted, HpoTrial, HpoTrialCompleted, ModelTrained, Topic
from dlforge.common.runtime import Backends, HandlerContext, Service
from dlforge.trainer.handlers import (
    TrainerConfig,
    TrainingOutcome,
    TrainingRequest,
    flat_metrics,
    run_training,
    save_model,
)
from dlforge.trainer.jobs import JobRecords, LoopBridge
from dlforge.trainer.params import EpochMetrics, RunOptions, TrainParams
from dlforge.trainer.pruning import TrialReporter
from dlforge.trainer.runner import JobRunner
from dlforge.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerDeps:
    """What the trainer builds once at start from its validated settings: the process-level knobs of
    every training run."""

    settings: TrainerSettings
    config: TrainerConfig
    jobs: JobRunner  # the REST jobs of this process


async def build_deps(settings: TrainerSettings, backends: Backends) -> TrainerDeps:
    config = TrainerConfig.from_settings(settings)
    return TrainerDeps(settings=settings, config=config,
                       jobs=JobRunner(backends, config, concurrent=settings.trainer_max_concurrent_jobs,
                                      lease_s=settings.trainer_job_lease_s))


service = Service[TrainerDeps]("trainer")

_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]")


def safe_id(value: str) -> str:
    """``value`` usable as one object-key segment."""
    return _UNSAFE.sub("_", value)[:120] or "_"


def stable_seed(text: str) -> int:
    """A seed derived from ``text`` (the same in every process, unlike ``hash()``)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def model_key(run_id: str, model_id: str) -> str:
    return f"trainer/models/{safe_id(run_id)}/{safe_id(model_id)}.pt"


@service.handles(Topic.HPO_TRIAL)
async def on_trial(event: Event, ctx: HandlerContext[TrainerDeps]) -> Event | None:
    """Train one trial on the study's representative sample (its share of the train split, chosen at random
    with the study's seed or as the coreset the event names), reporting val accuracy after each epoch.

    The trial stops early when the tuner's decision for an epoch says prune; it then completes as
    ``pruned`` with the value of its last epoch.
    """
    p = event.payload
    assert isinstance(p, HpoTrial)
    started = time.perf_counter()
    settings, config = ctx.deps.settings, ctx.deps.config
    records = JobRecords(ctx.docs)
    bridge = LoopBridge(asyncio.get_running_loop())
    job_id = f"{safe_id(p.study_name)}-trial-{p.trial_number:04d}"
    reporter = TrialReporter(bus=ctx.bus, docs=ctx.docs, cause=event, study_name=p.study_name,
                             trial_number=p.trial_number, wait_seconds=settings.trainer_decision_wait_seconds,
                             run=bridge.run)

    def completed(state: str, value: float | None, error: str | None = None,
                  val_loss: float | None = None, val_correct: str | None = None) -> Event:
        return event.follow(HpoTrialCompleted(
            study_name=p.study_name, trial_number=p.trial_number, state=state,  # type: ignore[arg-type]
            value=value, intermediate=reporter.intermediate, seconds=time.perf_counter() - started, error=error,
            val_loss=val_loss if val_loss is not None and math.isfinite(val_loss) else None,
            val_correct=val_correct,
        ))

    try:
        hparams = TrainParams.model_validate({**p.params, "epochs": p.epochs})
        request = TrainingRequest(
            arch=p.arch, weights_key=p.weights_key, manifest_key=p.manifest_key, classes=p.classes,
            hparams=hparams, run_config=RunOptions(summary_every_steps=settings.trainer_summary_every_steps,
                                                   input_size=settings.trainer_input_size),
            sample_fraction=p.sample_fraction, sample_method=p.sample_method,
            sample_seed=stable_seed(p.study_name) if p.sample_seed is None else p.sample_seed,
            evaluate_test=False,
            label_weighting=settings.trainer_label_weighting,  # type: ignore[arg-type]
        )
    except ValidationError as exc:
        return completed("failed", None, f"invalid trial parameters: {exc}")
    key_prefix = f"trainer/trials/{safe_id(p.study_name)}/{p.trial_number:04d}"
    await records.create(job_id, kind="trial", request=request.model_dump(mode="json"), run_id=event.run_id,
                         key_prefix=key_prefix, extra={"study_name": p.study_name, "trial_number": p.trial_number})
    await records.start(job_id)

    def on_epoch(m: EpochMetrics) -> bool:
        bridge.run(records.add_epoch(job_id, m))
        go_on = reporter.report(m.val_accuracy, m.epoch, last=m.epoch >= p.epochs)
        return go_on and not bridge.run(ctx.is_cancelled(event.run_id))

    try:
        outcome = await asyncio.to_thread(run_training, ctx.objects, request, job_id=job_id, key_prefix=key_prefix,
                                          config=config, on_epoch=on_epoch, resumable=True)
    except RetryableError:
        raise
    except Exception as exc:  # a trial that cannot train is a failed trial; the study goes on
        if not isinstance(exc, InvalidInput):
            log.exception("trial %d of %s failed", p.trial_number, p.study_name)
        await records.finish(job_id, state="failed", error=f"{type(exc).__name__}: {exc}")
        return completed("failed", None, f"{type(exc).__name__}: {exc}")
    summary = outcome.summary()
    if await ctx.is_cancelled(event.run_id):
        await records.finish(job_id, state="stopped", summary=summary, error="the run was cancelled")
        return None
    if outcome.state == "diverged":
        await records.finish(job_id, state="diverged", summary=summary, error="the training loss became non-finite")
        return completed("failed", None, "the training loss became non-finite (learning rate too high?)")
    value = outcome.epochs[-1].val_accuracy if outcome.epochs else None
    val_loss = outcome.epochs[-1].val_loss if outcome.epochs else None
    if outcome.state == "stopped":
        await records.finish(job_id, state="pruned", summary=summary)
        return completed("pruned", value, val_loss=val_loss)
    await records.finish(job_id, state="completed", summary=summary)
    # which val items the trained model got right: the tuner compares a trial with its baseline item by item.
    # Only when they are the items of the model the value is from (a trial with early stopping ends on its best
    # epoch's weights, not the last epoch's; the last epoch's value is the trial's)
    correct = outcome.val.correct if outcome.val else None
    if correct is not None and outcome.val is not None and (
            value is None or not math.isclose(outcome.val.accuracy, value, abs_tol=1e-9)):
        log.info("trial %d of %s: its model after training scores %.4f on val, its value is %s: no per-item results",
                 p.trial_number, p.study_name, outcome.val.accuracy, value)
        correct = None
    return completed("complete", value, val_loss=val_loss, val_correct=correct)


def final_request(settings: TrainerSettings, *, best_params: Mapping[str, Any], arch: str | None,
                  weights_key: str | None, manifest_key: str, classes: list[str], train_epochs: int,
                  no_of_workers: int) -> TrainingRequest:
    """The final training's job: ``best_params`` for up to max(``trainer_final_epochs``, the run's
    ``train_epochs``) epochs, early stopping on val deciding how many to keep, under the final time cap, with
    the final views and label weighting (``ValidationError`` when the parameters cannot be trained)."""
    epochs = max(settings.trainer_final_epochs or 0, train_epochs)
    patience = settings.trainer_final_patience if settings.trainer_final_epochs else 0
    hparams = TrainParams.model_validate({**best_params, "epochs": epochs, "patience": patience,
                                          "max_seconds": settings.trainer_final_max_seconds})
    return TrainingRequest(
        views=settings.trainer_final_views, check_views=settings.trainer_check_views,
        label_weighting=settings.trainer_label_weighting,  # type: ignore[arg-type]
        arch=arch, weights_key=weights_key, manifest_key=manifest_key, classes=classes, hparams=hparams,
        run_config=RunOptions(no_of_workers=no_of_workers,
                              checkpoint_every_steps=settings.trainer_checkpoint_every_steps,
                              summary_every_steps=settings.trainer_summary_every_steps,
                              engine=settings.trainer_engine,
                              input_size=settings.trainer_input_size),
    )


@service.handles(Topic.HPO_COMPLETED)
async def on_hpo_completed(event: Event, ctx: HandlerContext[TrainerDeps]) -> Event | None:
    """Final training with the best parameters on the full train split; evaluate on val and test."""
    p = event.payload
    assert isinstance(p, HpoCompleted)
    settings, config = ctx.deps.settings, ctx.deps.config
    records = JobRecords(ctx.docs)
    job_id = f"{safe_id(event.run_id)}-final"
    key = model_key(event.run_id, p.model_id)

    def trained(params: dict[str, object], metrics: dict[str, float], no_of_workers: int) -> Event:
        return event.follow(ModelTrained(
            dataset_id=p.dataset_id, model_id=p.model_id, arch=p.arch, checkpoint_key=key,
            manifest_key=p.manifest_key, classes=p.classes, params=params, metrics=metrics,
            no_of_workers=no_of_workers, spec=p.spec, options=p.options,
        ))

    existing = await records.get(job_id)
    if existing is not None and existing.get("state") == "completed" and await asyncio.to_thread(ctx.objects.exists,
                                                                                                  key):
        log.info("%s: the final model exists already; re-emitting model.trained", job_id)
        return trained(existing["params"], existing["metrics"], int(existing["no_of_workers"]))
    try:
        request = final_request(settings, best_params=p.best_params, arch=p.arch, weights_key=p.weights_key,
                                manifest_key=p.manifest_key, classes=p.classes, train_epochs=p.options.train_epochs,
                                no_of_workers=p.options.no_of_workers)
    except ValidationError as exc:
        raise PoisonMessage(f"the best parameters cannot be trained: {exc}") from exc
    key_prefix = f"trainer/jobs/{job_id}"
    await records.create(job_id, kind="final", request=request.model_dump(mode="json"), run_id=event.run_id,
                         key_prefix=key_prefix, extra={"model_id": p.model_id})
    await records.start(job_id)
    bridge = LoopBridge(asyncio.get_running_loop())

    def on_epoch(m: EpochMetrics) -> bool:
        bridge.run(records.add_epoch(job_id, m))
        return not bridge.run(ctx.is_cancelled(event.run_id))

    try:
        outcome: TrainingOutcome = await asyncio.to_thread(run_training, ctx.objects, request, job_id=job_id,
                                                           key_prefix=key_prefix, config=config, on_epoch=on_epoch,
                                                           resumable=True)
    except InvalidInput as exc:
        await records.finish(job_id, state="failed", error=str(exc))
        raise PoisonMessage(f"final training refused: {exc}") from exc
    if await ctx.is_cancelled(event.run_id):
        await records.finish(job_id, state="stopped", summary=outcome.summary(), error="the run was cancelled")
        return None
    if outcome.state == "diverged":
        await records.finish(job_id, state="diverged", summary=outcome.summary())
        raise PoisonMessage("final training diverged: the training loss became non-finite")
    params = {**request.hparams.model_dump(), "input_size": outcome.input_size}
    metrics = flat_metrics(outcome)
    await asyncio.to_thread(save_model, ctx.objects, outcome, key, work_dir=config.work_dir,
                            extra={"params": params, "run_id": event.run_id, "model_id": p.model_id})
    await records.add_model(f"{safe_id(event.run_id)}.{safe_id(p.model_id)}", checkpoint_key=key, arch=outcome.arch,
                            classes=outcome.classes, job_id=job_id, run_id=event.run_id, metrics=metrics)
    await records.finish(job_id, state="completed", summary=outcome.summary(), params=params, metrics=metrics,
                         no_of_workers=outcome.no_of_workers, model_key=key)
    return trained(params, metrics, outcome.no_of_workers)
