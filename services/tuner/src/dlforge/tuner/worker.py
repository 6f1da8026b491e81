"""The tuner's event handlers: ``model.proposed`` and ``hpo.trial.completed`` -> ``hpo.trial`` / ``hpo.completed``.

Emitted events get deterministic ids (from the study name and trial number), so re-emitting one after
a redelivery is skipped by the consumer's processed-marker instead of training a trial twice.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dlforge.common.errors import InvalidInput, PoisonMessage
from dlforge.common.events import Event, HpoCompleted, HpoTrial, HpoTrialCompleted, ModelProposed, Topic
from dlforge.common.runtime import Backends, HandlerContext, Service
from dlforge.tuner.handlers import (
    AskedTrial,
    StudyContext,
    TuningConfig,
    TuningOverride,
    ask_for,
    best_trial,
    default_config,
    failure_reasons,
    is_done,
    load_study,
    prepare_study,
    resolve_storage_url,
    study_name_for,
    tell,
    trial_table,
)
from dlforge.tuner.settings import TunerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TunerDeps:
    """What the tuner builds once at start from its validated settings: every study's default
    configuration (search space, sampler, pruner: checked by building them) and the study storage."""

    settings: TunerSettings
    defaults: TuningConfig
    storage_url: str


async def build_deps(settings: TunerSettings, backends: Backends) -> TunerDeps:
    """Raises ConfigError naming the variable when the defaults cannot be built."""
    return TunerDeps(settings=settings, defaults=default_config(settings),
                     storage_url=resolve_storage_url(settings.tuner_storage))


service = Service[TunerDeps]("tuner")

STUDIES = "tuner_studies"
CONFIGS = "tuner_configs"


def now() -> str:
    return datetime.now(UTC).isoformat()


def _event_id(study_name: str, what: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"dlforge:tuner:{study_name}:{what}").hex


def trial_event(cause: Event, ctx: StudyContext, trial: AskedTrial) -> Event:
    event = cause.follow(HpoTrial(
        study_name=ctx.study_name, trial_number=trial.number, params=trial.params, dataset_id=ctx.dataset_id,
        model_id=ctx.model_id, arch=ctx.arch, weights_key=ctx.weights_key, manifest_key=ctx.manifest_key,
        classes=ctx.classes, epochs=ctx.trial_epochs, sample_fraction=ctx.config.sample_fraction,
        storage_url=ctx.storage_url,
    ))
    return event.model_copy(update={"event_id": _event_id(ctx.study_name, f"trial:{trial.number}")})


async def _save(ctx: HandlerContext[TunerDeps], doc: dict[str, Any]) -> None:
    await ctx.docs.upsert(STUDIES, {**doc, "updated_at": now()})


@service.handles(Topic.MODEL_PROPOSED)
async def on_model_proposed(event: Event, ctx: HandlerContext[TunerDeps]) -> list[Event] | None:
    """Create the run's study and ask its first ``hpo_parallel`` trials."""
    p = event.payload
    assert isinstance(p, ModelProposed)
    chosen = next((c for c in p.ranking if c.model_id == p.chosen_model_id), None)
    if chosen is None:
        raise PoisonMessage(f"the chosen model {p.chosen_model_id!r} is not in the ranking")
    name = study_name_for(event.run_id)
    existing = await ctx.docs.get(STUDIES, name)
    if existing is not None and existing.get("proposed_event_id") != event.event_id:
        log.warning("run %s is already being tuned (study %s); ignoring another model.proposed", event.run_id, name)
        return None
    config = ctx.deps.defaults
    override = await ctx.docs.get(CONFIGS, event.run_id)
    if override is not None:
        try:
            config = TuningOverride.model_validate(override["override"]).apply(config)
        except (ValueError, InvalidInput) as exc:
            raise PoisonMessage(f"the run's tuning override is invalid: {exc}") from exc
    study_ctx = StudyContext(
        study_name=name, run_id=event.run_id, storage_url=ctx.deps.storage_url,
        dataset_id=p.dataset_id, model_id=chosen.model_id, arch=chosen.arch, weights_key=chosen.weights_key,
        manifest_key=p.manifest_key, classes=p.classes, spec=p.spec, options=p.options, config=config,
    )
    if existing is not None:  # the same event again: the stored context is the truth
        study_ctx = StudyContext.model_validate(existing["context"])
    else:
        await _save(ctx, {"_id": name, "run_id": event.run_id, "state": "running", "stop_requested": False,
                          "proposed_event_id": event.event_id, "context": study_ctx.model_dump(mode="json"),
                          "created_at": now(), "best_value": None, "best_params": None, "n_trials": 0})

    def start() -> list[AskedTrial]:
        study = prepare_study(study_ctx)
        return ask_for(study, study_ctx, asked_by=event.event_id)

    asked = await asyncio.to_thread(start)
    log.info("study %s: %d trial(s) started (%s sampler, %s pruner)", name, len(asked), config.sampler.name,
             config.pruner.name)
    return [trial_event(event, study_ctx, t) for t in asked]


@service.handles(Topic.HPO_TRIAL_COMPLETED)
async def on_trial_completed(event: Event, ctx: HandlerContext[TunerDeps]) -> list[Event] | None:
    """Tell the study; ask the next trials, or finish with ``hpo.completed``."""
    p = event.payload
    assert isinstance(p, HpoTrialCompleted)
    doc = await ctx.docs.get(STUDIES, p.study_name)
    if doc is None:
        raise PoisonMessage(f"unknown study {p.study_name!r}")
    study_ctx = StudyContext.model_validate(doc["context"])
    stop = bool(doc.get("stop_requested"))

    def step() -> tuple[list[AskedTrial], bool, list[Any], Any, list[str]]:
        study = load_study(study_ctx)
        tell(study, study_ctx, p)
        asked = ask_for(study, study_ctx, asked_by=event.event_id, stop=stop)
        done = not asked and is_done(study, study_ctx, stop=stop)
        return asked, done, trial_table(study), best_trial(study), failure_reasons(study)

    asked, done, table, best, failures = await asyncio.to_thread(step)
    best_fields = {"best_value": best.value, "best_params": best.params, "best_trial": best.number} if best else {}
    await _save(ctx, {**doc, "n_trials": len(table), **best_fields})
    if not done:
        return [trial_event(event, study_ctx, t) for t in asked]
    if best is None:
        await _save(ctx, {**doc, "state": "failed", "n_trials": len(table), "finished_at": now()})
        raise PoisonMessage(f"study {p.study_name}: no trial produced a value ({'; '.join(failures) or 'none ran'})")
    await _save(ctx, {**doc, "state": "completed", "n_trials": len(table), "finished_at": now(), **best_fields})
    log.info("study %s completed: best value %.4f (trial %d) after %d trials", p.study_name, best.value, best.number,
             len(table))
    completed = event.follow(HpoCompleted(
        study_name=p.study_name, dataset_id=study_ctx.dataset_id, model_id=study_ctx.model_id, arch=study_ctx.arch,
        weights_key=study_ctx.weights_key, manifest_key=study_ctx.manifest_key, classes=study_ctx.classes,
        best_params=dict(best.params), best_value=float(best.value), trials=table, spec=study_ctx.spec,
        options=study_ctx.options,
    ))
    return [completed.model_copy(update={"event_id": _event_id(p.study_name, "completed")})]
