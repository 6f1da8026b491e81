"""The tuner's event handlers.

* ``dataset.uploaded``: the run becomes known (``PUT /runs/{run_id}/tuning`` accepts it from then on);
* ``model.proposed`` -> the run's study and its first ``hpo.trial`` events;
* ``hpo.trial.reported`` -> the value recorded in the study, the pruner asked -> ``hpo.trial.decision``;
* ``hpo.trial.completed`` -> told to the study (with a fidelity ladder, a trial that earned it is
  enqueued again at the next rung) -> the next ``hpo.trial``, or ``hpo.completed``, or ``run.failed``
  (no trial produced a value, or ``tuner_max_failed_trials`` trials failed in a row).

Only the tuner opens its Optuna storage: the trainer reports each epoch's value as an event and reads
the decision from its own store. Emitted events get deterministic ids (from the study name, trial
number and step), so re-emitting one after a redelivery is skipped by the consumer's processed-marker
instead of training a trial twice. The study document is changed by read-modify-write with the
version read (:func:`change_study`), so a stop request is never overwritten by a stale copy.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from optuna.trial import FrozenTrial

from dlforge.common.docs import DocumentStore
from dlforge.common.errors import Conflict, InvalidInput, NotFound, PoisonMessage, RetryableError
from dlforge.common.events import (
    DatasetUploaded,
    Event,
    HpoCompleted,
    HpoTrial,
    HpoTrialCompleted,
    HpoTrialDecision,
    HpoTrialReported,
    ModelProposed,
    RunFailed,
    Topic,
    TrialRecord,
)
from dlforge.common.runtime import Backends, HandlerContext, Service
from dlforge.hpo.coreset import fitted_ladder
from dlforge.tuner.handlers import (
    ERROR,
    AskedTrial,
    Decision,
    StudyContext,
    TuningConfig,
    TuningOverride,
    ask_for,
    chosen_trial,
    decide,
    default_config,
    failed_in_a_row,
    failure_reasons,
    is_done,
    load_study,
    prepare_study,
    promote_next,
    resolve_storage_url,
    study_name_for,
    tell,
    trial_table,
)
from dlforge.tuner.settings import TunerSettings
from dlforge.tuner.warmstart import best_params, remember_study, warm_started

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
RUNS = "tuner_runs"
CHANGE_ATTEMPTS = 20


def now() -> str:
    return datetime.now(UTC).isoformat()


def _event_id(study_name: str, what: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"dlforge:tuner:{study_name}:{what}").hex


async def change_study(
    docs: DocumentStore, name: str, change: Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]
) -> dict[str, Any]:
    """Read the study document, ``change`` it, write the changed fields back if nobody wrote in between.

    ``change(doc)`` returns the fields to set (None: nothing to write). On a version conflict the
    document is read again and ``change`` runs again on it (so it must be safe to repeat). NotFound
    if there is no such study; RetryableError if the writers never let up.
    """
    for _ in range(CHANGE_ATTEMPTS):
        doc = await docs.get(STUDIES, name)
        if doc is None:
            raise NotFound(f"no study {name!r}")
        fields = await change(doc)
        if not fields:
            return doc
        try:
            return await docs.update(STUDIES, name, {**fields, "updated_at": now()}, expected_version=doc["_version"])
        except Conflict:
            continue
    raise RetryableError(f"study {name!r}: {CHANGE_ATTEMPTS} concurrent changes in a row; try again")


def trial_event(cause: Event, ctx: StudyContext, trial: AskedTrial) -> Event:
    event = cause.follow(HpoTrial(
        study_name=ctx.study_name, trial_number=trial.number, params=trial.params, dataset_id=ctx.dataset_id,
        model_id=ctx.model_id, arch=ctx.arch, weights_key=ctx.weights_key, manifest_key=ctx.manifest_key,
        classes=ctx.classes, epochs=ctx.trial_epochs, sample_fraction=trial.fraction,
        sample_method=ctx.config.sample_method, sample_seed=ctx.options.seed,
    ))
    return event.model_copy(update={"event_id": _event_id(ctx.study_name, f"trial:{trial.number}")})


@service.handles(Topic.DATASET_UPLOADED)
async def on_dataset_uploaded(event: Event, ctx: HandlerContext[TunerDeps]) -> None:
    """Remember the run, so that its tuning can be set before it reaches the tuner (and unknown runs refused)."""
    p = event.payload
    assert isinstance(p, DatasetUploaded)
    try:
        await ctx.docs.insert(RUNS, {"_id": event.run_id, "dataset_id": p.dataset_id, "project": p.project,
                                     "created_at": now()})
    except Conflict:
        pass  # known already


@service.handles(Topic.MODEL_PROPOSED)
async def on_model_proposed(event: Event, ctx: HandlerContext[TunerDeps]) -> list[Event] | None:
    """Create the run's study and ask its first ``hpo_parallel`` trials."""
    p = event.payload
    assert isinstance(p, ModelProposed)
    chosen = next((c for c in p.ranking if c.model_id == p.chosen_model_id), None)
    if chosen is None:
        raise PoisonMessage(f"the chosen model {p.chosen_model_id!r} is not in the ranking")
    base = study_name_for(event.run_id)
    config = ctx.deps.defaults
    override = await ctx.docs.get(CONFIGS, event.run_id)
    if override is not None:
        try:
            config = TuningOverride.model_validate(override["override"]).apply(config)
        except (ValueError, InvalidInput) as exc:
            raise PoisonMessage(f"the run's tuning override is invalid: {exc}") from exc
    if config.fingerprint is None and p.fingerprint is not None:
        # the proposer's fingerprint of the data set (the run's override, when it gives one, wins)
        config = config.model_copy(update={"fingerprint": p.fingerprint})
    config = await warm_started(ctx.docs, config, study_name=base)
    # a ladder whose top the run's trials cannot reach is not used (dlforge.hpo.coreset.fitted_ladder): the study
    # runs as before the ladder, every trial on a stratified random sample_fraction
    ladder = fitted_ladder(config.fidelity_ladder, p.options.hpo_trials, parallel=p.options.hpo_parallel)
    if ladder != config.fidelity_ladder:
        log.info("run %s: %d trials cannot climb the fidelity ladder %s: every trial trains on a random %.3g",
                 event.run_id, p.options.hpo_trials, config.fidelity_ladder, config.sample_fraction)
        config = config.model_copy(update={"fidelity_ladder": None, "sample_method": "random"})
    # A run's study is `dlforge-<run_id>`. A model.proposed under a new event id after that study failed is a
    # retry (POST /runs/{id}/retry): it gets a study of its own, `<name>-retry<k>` (new Optuna study, trial
    # event ids and trainer job ids, so nothing of the failed attempt is taken for the new one's).
    for attempt in range(1000):
        name = base if attempt == 0 else f"{base}-retry{attempt}"
        study_ctx = StudyContext(
            study_name=name, run_id=event.run_id, storage_url=ctx.deps.storage_url,
            dataset_id=p.dataset_id, model_id=chosen.model_id, arch=chosen.arch, weights_key=chosen.weights_key,
            manifest_key=p.manifest_key, classes=p.classes, spec=p.spec, options=p.options, config=config,
        )
        try:
            await ctx.docs.insert(STUDIES, {
                "_id": name, "run_id": event.run_id, "state": "running", "stop_requested": False,
                "proposed_event_id": event.event_id, "context": study_ctx.model_dump(mode="json"),
                "created_at": now(), "updated_at": now(), "best_value": None, "best_params": None, "n_trials": 0,
                "attempt": attempt,
            })
            break
        except Conflict:
            existing = await ctx.docs.get(STUDIES, name)
            if existing is None:
                raise
            if existing.get("proposed_event_id") == event.event_id:
                study_ctx = StudyContext.model_validate(existing["context"])  # the same event again
                break
            if existing.get("state") == "failed":
                continue  # a retry after this attempt failed: the next attempt's study
            log.warning("run %s is already being tuned (study %s); ignoring another model.proposed", event.run_id,
                        name)
            return None
    else:
        raise PoisonMessage(f"run {event.run_id}: too many tuning attempts")

    def start() -> list[AskedTrial]:
        study = prepare_study(study_ctx)
        return ask_for(study, study_ctx, asked_by=event.event_id)

    asked = await asyncio.to_thread(start)
    log.info("study %s: %d trial(s) started (%s sampler, %s pruner)", name, len(asked), config.sampler.name,
             config.pruner.name)
    return [trial_event(event, study_ctx, t) for t in asked]


@service.handles(Topic.HPO_TRIAL_REPORTED)
async def on_trial_reported(event: Event, ctx: HandlerContext[TunerDeps]) -> Event:
    """Record a trial's intermediate value and answer with the pruner's decision for that step.

    A report of a trial the tuner does not know (no such study or trial) is answered with 'prune', so
    its trainer stops; it does not fail the run.
    """
    p = event.payload
    assert isinstance(p, HpoTrialReported)
    doc = await ctx.docs.get(STUDIES, p.study_name)

    def judge() -> Decision:
        if doc is None:  # deleted, or not this tuner's: the trial has nothing to report to
            return Decision("prune", f"no study {p.study_name!r}")
        study_ctx = StudyContext.model_validate(doc["context"])
        try:
            return decide(load_study(study_ctx), study_ctx, p)
        except InvalidInput as exc:
            return Decision("prune", str(exc))

    decision = await asyncio.to_thread(judge)
    if decision.action == "prune":
        log.info("study %s: pruning trial %d at step %d (%s)", p.study_name, p.trial_number, p.step, decision.reason)
    answer = event.follow(HpoTrialDecision(study_name=p.study_name, trial_number=p.trial_number, step=p.step,
                                           action=decision.action, reason=decision.reason))
    return answer.model_copy(update={"event_id": _event_id(p.study_name, f"decision:{p.trial_number}:{p.step}")})


@dataclass
class _Step:
    asked: list[AskedTrial]
    done: bool
    table: list[TrialRecord]
    best: FrozenTrial | None
    choice: str | None  # why ``best`` when not simply the highest value (chosen_trial)
    failing: list[FrozenTrial]
    failures: list[str]
    top: list[dict[str, Any]]


@service.handles(Topic.HPO_TRIAL_COMPLETED)
async def on_trial_completed(event: Event, ctx: HandlerContext[TunerDeps]) -> list[Event] | None:
    """Tell the study; ask the next trials, or finish with ``hpo.completed`` (or ``run.failed``).

    Whether new trials may be asked (no stop requested, fewer than ``tuner_max_failed_trials``
    failures in a row) is decided on the study document as it is when the telling is recorded in it
    (a versioned write): a stop request that lands in between makes the write conflict and the
    decision is taken again, so a stop is never overtaken by trials asked on a stale copy.
    """
    p = event.payload
    assert isinstance(p, HpoTrialCompleted)
    max_failed = ctx.deps.settings.tuner_max_failed_trials
    told: dict[str, Any] = {}

    async def record(doc: dict[str, Any]) -> dict[str, Any]:
        study_ctx = StudyContext.model_validate(doc["context"])

        def tell_it() -> tuple[list[FrozenTrial], FrozenTrial | None, int]:
            study = load_study(study_ctx)
            tell(study, study_ctx, p)
            chosen = chosen_trial(study, study_ctx.config).trial
            return failed_in_a_row(study), chosen, len(study.get_trials(deepcopy=False))

        failing, best, n = await asyncio.to_thread(tell_it)
        halt = bool(doc.get("stop_requested")) or doc.get("state") != "running" or len(failing) >= max_failed
        told.update(ctx=study_ctx, halt=halt)
        fields: dict[str, Any] = {"n_trials": n}
        if best is not None:
            fields.update(best_value=best.value, best_params=best.params, best_trial=best.number)
        return fields

    try:
        await change_study(ctx.docs, p.study_name, record)
    except NotFound as exc:
        raise PoisonMessage(f"unknown study {p.study_name!r}") from exc
    study_ctx, halt = told["ctx"], told["halt"]

    def ask_next() -> _Step:
        study = load_study(study_ctx)
        if not halt:
            promote_next(study, study_ctx, by=event.event_id)  # enqueued: asked first, below
        asked = ask_for(study, study_ctx, asked_by=event.event_id, stop=halt)
        done = not asked and is_done(study, study_ctx, stop=halt)
        choice = chosen_trial(study, study_ctx.config)
        return _Step(asked, done, trial_table(study), choice.trial, choice.reason, failed_in_a_row(study),
                     failure_reasons(study), best_params(study))

    s = await asyncio.to_thread(ask_next)
    reason: str | None = None
    if s.done and len(s.failing) >= max_failed:
        errors = "; ".join(f"trial {t.number}: {t.user_attrs.get(ERROR, 'failed')}" for t in s.failing)
        reason = f"{len(s.failing)} trials failed in a row ({errors})"
    elif s.done and s.best is None:
        reason = f"no trial produced a value ({'; '.join(s.failures) or 'none ran'})"

    async def finish(doc: dict[str, Any]) -> dict[str, Any]:
        fields: dict[str, Any] = {"n_trials": len(s.table)}
        if s.done:
            fields.update(state="failed" if reason else "completed", failure=reason,
                          finished_at=doc.get("finished_at") or now())
        return fields

    await change_study(ctx.docs, p.study_name, finish)
    if not s.done:
        return [trial_event(event, study_ctx, t) for t in s.asked]
    if reason is not None:
        log.error("study %s failed: %s", p.study_name, reason)
        failed = event.follow(RunFailed(stage="tuner", reason=f"study {p.study_name}: {reason}"))
        return [failed.model_copy(update={"event_id": _event_id(p.study_name, "failed")})]
    best = s.best
    assert best is not None and best.value is not None  # done without a failure reason: a trial has a value
    if study_ctx.config.fingerprint is not None:
        await remember_study(ctx.docs, study_name=p.study_name, dataset_id=study_ctx.dataset_id,
                             fingerprint=study_ctx.config.fingerprint, best=s.top)
    log.info("study %s completed: best value %.4f (trial %d) after %d trials%s", p.study_name, best.value,
             best.number, len(s.table), f"; {s.choice}" if s.choice else "")
    completed = event.follow(HpoCompleted(
        study_name=p.study_name, dataset_id=study_ctx.dataset_id, model_id=study_ctx.model_id, arch=study_ctx.arch,
        weights_key=study_ctx.weights_key, manifest_key=study_ctx.manifest_key, classes=study_ctx.classes,
        best_params=dict(best.params), best_value=float(best.value), trials=s.table, spec=study_ctx.spec,
        options=study_ctx.options, choice=s.choice,
    ))
    return [completed.model_copy(update={"event_id": _event_id(p.study_name, "completed")})]
