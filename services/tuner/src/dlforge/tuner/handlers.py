"""The tuner's logic on an Optuna study: create, ask, tell, decide what comes next. No bus here.

Every decision is derived from the study's stored state, which makes the handlers idempotent:

* trials are asked *by* an event (user attribute ``dlforge.asked_by``); handling the same event again
  returns the trials it asked before instead of asking new ones;
* telling a trial that is already finished is a no-op (``skip_if_finished``);
* how many trials to ask is ``min(parallel - running, budget - asked)`` counted without the current
  event's own trials, so a redelivery asks nothing twice;
* with a fidelity ladder, the rungs are ranked again at every completion and a trial is promoted once
  (user attribute ``dlforge.promoted_from`` of its promotion), so handling a completion again promotes
  nothing twice.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dlforge.common.errors import ConfigError, InvalidInput, RetryableError
from dlforge.common.events import (
    MAX_HPO_TRIALS,
    MAX_TRAIN_EPOCHS,
    HpoTrialCompleted,
    HpoTrialReported,
    PipelineOptions,
    SampleMethod,
    Spec,
    TrialRecord,
)
from dlforge.common.packed import unpack_bools
from dlforge.hpo import PRUNER_ATTR, build_pruner, open_storage
from dlforge.hpo.coreset import next_fidelity, promotable
from dlforge.hpo.selection import replaces, wins_needed
from dlforge.tuner.plugins import PluginChoice, make_sampler, pruner_spec
from dlforge.tuner.settings import TunerSettings
from dlforge.tuner.space import SearchSpace, default_space

log = logging.getLogger(__name__)

ASKED_BY = "dlforge.asked_by"
SECONDS = "dlforge.seconds"
ERROR = "dlforge.error"
INTERMEDIATE = "dlforge.intermediate"
FIDELITY = "fidelity"  # the share of the train split a trial trains on
PROMOTED_FROM = "dlforge.promoted_from"  # the trial whose parameters a promoted trial trains again
PROMOTED_BY = "dlforge.promoted_by"  # the completion event that promoted it
VAL_LOSS = "dlforge.val_loss"  # the validation loss at the epoch of the trial's value: the tie-break
VAL_CORRECT = "dlforge.val_correct"  # which val items the trial's model got right (packed): the paired comparison
OBJECTIVE = "val_accuracy"
MAX_FINGERPRINT = 8192
MAX_RUNGS = 10
MIN_RUNG_TRIALS = 3  # completed trials at a rung before any of them is promoted from it


def checked_ladder(ladder: Sequence[float] | None) -> list[float] | None:
    """``ladder`` if it is a fidelity ladder: fractions of the train split in (0, 1], strictly increasing.

    Empty or None: no ladder (every trial trains on ``sample_fraction``). Raises ValueError naming the
    offending rung.
    """
    if not ladder:
        return None
    rungs = [float(v) for v in ladder]
    outside = [v for v in rungs if not 0.0 < v <= 1.0]  # NaN included
    if outside:
        raise ValueError(f"fidelity_ladder {rungs}: {outside[0]} is not a fraction of the train split in (0, 1]")
    flat = [(a, b) for a, b in pairwise(rungs) if b <= a]
    if flat:
        raise ValueError(f"fidelity_ladder {rungs}: the rungs must be strictly increasing ({flat[0][1]} after "
                         f"{flat[0][0]})")
    return rungs


def parse_ladder(text: str | None) -> list[float] | None:
    """``DLFORGE_TUNER_FIDELITY_LADDER`` (comma-separated fractions) as a ladder; ConfigError naming it if not one."""
    try:
        return checked_ladder([float(part) for part in (text or "").split(",") if part.strip()])
    except ValueError as exc:
        raise ConfigError(f"DLFORGE_TUNER_FIDELITY_LADDER={text!r}: {exc}") from exc



class TuningConfig(BaseModel):
    """How a study searches: the space, the sampler, the pruner, the data share and epochs of a trial.

    With a ``fidelity_ladder``, a trial's data share is its rung instead of ``sample_fraction``
    (asynchronous successive halving on data, see :func:`promote_next`).

    The field defaults are the bare model's. A study starts from the tuner's settings instead
    (:func:`default_config`, ``GET /tuning/defaults``: k-center coresets on the ladder 0.25, 0.5, 1, no
    pruner and the baseline configuration as the first trial), with the run's override
    (``PUT /runs/{id}/tuning``) on top.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: SearchSpace = Field(default_factory=default_space)
    sampler: PluginChoice = PluginChoice(name="tpe")
    pruner: PluginChoice = PluginChoice(name="median")
    startup_trials: int = Field(default=2, ge=0, le=MAX_HPO_TRIALS)
    sample_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    sample_method: SampleMethod = Field(default="random", description="how a trial's share of the train split is "
                                        "chosen: random, or the k_center / herding coreset (nested across shares)")
    fidelity_ladder: list[float] | None = Field(
        default=None, max_length=MAX_RUNGS, description="strictly increasing shares in (0, 1]: a new trial trains "
        "on the first; after each completion, one complete trial among the best third of its rung (once 3 completed "
        "there) not promoted yet trains again on the next; every training counts toward hpo_trials. A ladder the "
        "run's hpo_trials cannot climb to its top is not used (dlforge.hpo.coreset.fitted_ladder). None: every "
        "trial on sample_fraction")
    trial_epochs: int | None = Field(default=None, ge=1, le=MAX_TRAIN_EPOCHS)
    enqueue: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_HPO_TRIALS,
                                          description="parameters of the first trials")
    fingerprint: list[float] | None = Field(default=None, min_length=2, max_length=MAX_FINGERPRINT,
                                            description="the data set's fingerprint (dlforge.hpo.warmstart."
                                            "fingerprint of its embeddings): the study is remembered with it "
                                            "and warm-started from the studies nearest to it")
    warm_start_studies: int = Field(default=3, ge=0, le=50, description="past studies to warm-start from "
                                    "(0: none)")
    warm_start_per_study: int = Field(default=1, ge=1, le=20, description="best configurations enqueued from "
                                      "each past study")
    baseline: dict[str, Any] | None = Field(
        default=None, description="the reference configuration (the tuner's baseline trial, also in enqueue): "
        "with baseline_alpha < 1 the study's result stays this configuration unless its best trial beats it on "
        "the val items significantly (dlforge.hpo.selection). None: no reference")
    baseline_alpha: float = Field(
        default=1.0, ge=0.0, le=1.0, description="the one-sided level of the exact sign test on the val items "
        "where the best trial and the baseline disagree: the best trial replaces the baseline only when its lead "
        "has a p-value at most this. 1: the highest value wins, as without a baseline")

    @field_validator("fidelity_ladder")
    @classmethod
    def _ladder(cls, v: list[float] | None) -> list[float] | None:
        return checked_ladder(v)

    @property
    def first_fraction(self) -> float:
        """The share of the train split a newly asked trial trains on."""
        return self.fidelity_ladder[0] if self.fidelity_ladder else self.sample_fraction

    @model_validator(mode="after")
    def _check(self) -> TuningConfig:
        if self.fingerprint is not None and not all(math.isfinite(v) for v in self.fingerprint):
            raise ValueError("fingerprint: every value must be finite")
        make_sampler(self.sampler, seed=0, startup=self.startup_trials)
        pruner_spec(self.pruner, startup=self.startup_trials)
        for i, params in enumerate(self.enqueue):
            problems = self.space.problems(params)
            if problems:
                raise ValueError(f"enqueue[{i}]: {'; '.join(problems)}")
        if self.baseline is not None and self.space.problems(self.baseline):
            raise ValueError(f"baseline: {'; '.join(self.space.problems(self.baseline))}")
        return self


class TuningOverride(BaseModel):
    """A run's changes to the defaults (every field optional)."""

    model_config = ConfigDict(extra="forbid")

    space: SearchSpace | None = None
    sampler: PluginChoice | None = None
    pruner: PluginChoice | None = None
    startup_trials: int | None = Field(default=None, ge=0, le=MAX_HPO_TRIALS)
    sample_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    sample_method: SampleMethod | None = None
    fidelity_ladder: list[float] | None = Field(default=None, max_length=MAX_RUNGS,
                                                description="[] turns the defaults' ladder off")
    trial_epochs: int | None = Field(default=None, ge=1, le=MAX_TRAIN_EPOCHS,
                                     description="epochs per trial, within the run options' bound")
    enqueue: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_HPO_TRIALS)
    fingerprint: list[float] | None = Field(default=None, min_length=2, max_length=MAX_FINGERPRINT)
    warm_start_studies: int | None = Field(default=None, ge=0, le=50)
    warm_start_per_study: int | None = Field(default=None, ge=1, le=20)
    baseline_alpha: float | None = Field(default=None, ge=0.0, le=1.0)

    def apply(self, base: TuningConfig) -> TuningConfig:
        """``base`` with this override's fields; a new ``space`` without an ``enqueue`` of its own keeps only the
        defaults' enqueued trials that lie in it (the baseline trial was written for the default space)."""
        changes = {k: v for k, v in self.model_dump(exclude_none=True).items()}
        if self.space is not None and self.enqueue is None:
            changes["enqueue"] = [params for params in base.enqueue if not self.space.problems(params)]
            if len(changes["enqueue"]) < len(base.enqueue):
                log.info("%d of the defaults' enqueued trials (the baseline) left out: they do not lie in the "
                         "run's search space", len(base.enqueue) - len(changes["enqueue"]))
        if self.space is not None and base.baseline is not None and self.space.problems(base.baseline):
            changes["baseline"] = None
        return TuningConfig.model_validate({**base.model_dump(), **changes})


def parse_baseline(settings: TunerSettings, space: SearchSpace) -> dict[str, Any] | None:
    """``DLFORGE_TUNER_BASELINE`` as the parameters of a study's first trial (None: empty).

    A value the user set must be a JSON object in ``space`` (ConfigError naming what is wrong); the
    default is left out when a user's space does not hold it (logged), since it was written for the
    default space.
    """
    text = settings.tuner_baseline.strip()
    if not text:
        return None
    given = "tuner_baseline" in settings.model_fields_set
    try:
        params = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"DLFORGE_TUNER_BASELINE: not JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"DLFORGE_TUNER_BASELINE: a JSON object of parameters is needed, got {type(params).__name__}")
    problems = space.problems(params)
    if problems and given:
        raise ConfigError(f"DLFORGE_TUNER_BASELINE does not lie in the search space: {'; '.join(problems)}")
    if problems:
        log.info("the default baseline trial is left out: it does not lie in DLFORGE_TUNER_SPACE (%s)",
                 "; ".join(problems))
        return None
    return dict(params)


def default_config(settings: TunerSettings) -> TuningConfig:
    """The settings' defaults (``DLFORGE_TUNER_SPACE`` may hold a space as JSON or ``@file.json``)."""
    space = default_space()
    if settings.tuner_space:
        raw = settings.tuner_space
        try:
            text = Path(raw[1:]).read_text() if raw.startswith("@") else raw
            space = SearchSpace.model_validate_json(text)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"DLFORGE_TUNER_SPACE: not a valid search space: {exc}") from exc
    ladder = parse_ladder(settings.tuner_fidelity_ladder)
    baseline = parse_baseline(settings, space)
    try:
        return TuningConfig(space=space, sampler=PluginChoice(name=settings.tuner_sampler),
                            pruner=PluginChoice(name=settings.tuner_pruner),
                            startup_trials=settings.tuner_startup_trials,
                            sample_fraction=settings.tuner_sample_fraction, trial_epochs=settings.tuner_trial_epochs,
                            sample_method=settings.tuner_sample_method, fidelity_ladder=ladder,
                            enqueue=[baseline] if baseline else [], baseline=baseline,
                            baseline_alpha=settings.tuner_baseline_alpha)
    except (ValueError, InvalidInput) as exc:
        raise ConfigError(f"DLFORGE_TUNER_SAMPLER/DLFORGE_TUNER_PRUNER: {exc}") from exc


class StudyContext(BaseModel):
    """What a study needs to build its trials' and its completion's events (stored in ``tuner_studies``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_name: str
    run_id: str
    storage_url: str
    dataset_id: str
    model_id: str
    arch: str
    weights_key: str
    manifest_key: str
    classes: list[str]
    spec: Spec
    options: PipelineOptions
    config: TuningConfig

    @property
    def trial_epochs(self) -> int:
        return self.config.trial_epochs or self.options.train_epochs


def study_name_for(run_id: str) -> str:
    return f"dlforge-{run_id}"


def resolve_storage_url(url: str) -> str:
    """SQLite paths made absolute (the URL travels to trainer workers), their folder created."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and ":memory:" not in url:
        path = Path(url[len("sqlite:///"):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if url.startswith("sqlite:////"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return url


def load_study(ctx: StudyContext) -> optuna.Study:
    """The study with a sampler seeded by the run's seed and the number of trials so far, and its pruner.

    A fresh seed per ask keeps the random start-up trials distinct although the sampler object is
    rebuilt for every event. The pruner is the one described in the study (:data:`PRUNER_ATTR`,
    written when the study was created), else the config's.
    """
    storage = open_storage(ctx.storage_url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(study_name=ctx.study_name, storage=storage, direction="maximize",
                                    load_if_exists=True)
        n = len(study.get_trials(deepcopy=False))
        # numpy (and so every Optuna sampler) takes seeds below 2**32; options.seed goes up to 2**31 - 1
        sampler = make_sampler(ctx.config.sampler, seed=(ctx.options.seed * 100_003 + n) % 2**32,
                               startup=ctx.config.startup_trials)
        attrs = study.user_attrs
        spec = attrs[PRUNER_ATTR] if PRUNER_ATTR in attrs else pruner_spec(ctx.config.pruner,
                                                                           startup=ctx.config.startup_trials)
        return optuna.load_study(study_name=ctx.study_name, storage=storage, sampler=sampler,
                                 pruner=build_pruner(spec))


def prepare_study(ctx: StudyContext) -> optuna.Study:
    """Create the study if needed: pruner description, space and config as user attributes; enqueued trials."""
    study = load_study(ctx)
    attrs = study.user_attrs
    if "dlforge.config" not in attrs:
        study.set_user_attr(PRUNER_ATTR, pruner_spec(ctx.config.pruner, startup=ctx.config.startup_trials))
        study.set_user_attr("dlforge.objective", OBJECTIVE)
        study.set_user_attr("dlforge.run_id", ctx.run_id)
        if not study.get_trials(deepcopy=False):
            for params in ctx.config.enqueue:
                study.enqueue_trial(params, skip_if_exists=True)
        study.set_user_attr("dlforge.config", json.loads(ctx.config.model_dump_json()))
    return study


@dataclass(frozen=True)
class AskedTrial:
    number: int
    params: dict[str, Any]
    fraction: float  # the share of the train split it trains on


def _is_open(t: FrozenTrial) -> bool:
    return t.state in (TrialState.RUNNING, TrialState.WAITING)


def ask_for(study: optuna.Study, ctx: StudyContext, *, asked_by: str, stop: bool = False) -> list[AskedTrial]:
    """Ask the trials event ``asked_by`` should start; returns its still-running trials (old and new)."""
    trials = study.get_trials(deepcopy=False)
    mine = [t for t in trials if t.user_attrs.get(ASKED_BY) == asked_by]
    others = [t for t in trials if t.user_attrs.get(ASKED_BY) != asked_by and t.state != TrialState.WAITING]
    running_others = sum(1 for t in others if t.state == TrialState.RUNNING)
    budget = 0 if stop else ctx.options.hpo_trials - len(others)
    want = max(0, min(ctx.options.hpo_parallel - running_others, budget))
    distributions = ctx.config.space.distributions()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for _ in range(want - len(mine)):
            trial = study.ask(distributions)  # a waiting (enqueued or promoted) trial first
            trial.set_user_attr(ASKED_BY, asked_by)
            if FIDELITY not in trial.user_attrs:  # a promoted trial was enqueued with its rung
                trial.set_user_attr(FIDELITY, ctx.config.first_fraction)
    return [AskedTrial(t.number, dict(t.params), float(t.user_attrs.get(FIDELITY, ctx.config.sample_fraction)))
            for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get(ASKED_BY) == asked_by and t.state == TrialState.RUNNING]


def promote_next(study: optuna.Study, ctx: StudyContext, *, by: str) -> tuple[int, float] | None:
    """Asynchronous successive halving on data: enqueue the parameters of one trial that earned the next rung of
    the ladder, for the completion event ``by``; returns ``(trial number, rung)`` (None: none earned it, the
    event promoted one already, or no ladder).

    The rungs are ranked again at every completion, the highest first (ASHA's job order): a trial earns the
    next rung while it is among the best third of the trials completed at its rung, once at least
    :data:`MIN_RUNG_TRIALS` completed there (:func:`dlforge.hpo.coreset.promotable`, the rule
    ``benchmarks/tuner.py`` measured), and is promoted once (the promotion's ``dlforge.promoted_from``). So an
    early trial that stays among the best is promoted when enough others have finished. One promotion per
    completion event (the promotion's ``dlforge.promoted_by``): handling the same event again promotes nothing
    more. The promotion waits in the study and is asked before any new configuration the sampler would draw
    (after configurations enqueued earlier, such as warm starts). A promotion is a training and counts toward
    the run's ``hpo_trials``: none is enqueued once the study holds that many trials, which would leave it
    waiting for ever.
    """
    ladder = ctx.config.fidelity_ladder
    if not ladder:
        return None
    trials = study.get_trials(deepcopy=False)
    if len(trials) >= ctx.options.hpo_trials or any(t.user_attrs.get(PROMOTED_BY) == by for t in trials):
        return None
    promoted = {int(t.user_attrs[PROMOTED_FROM]) for t in trials if PROMOTED_FROM in t.user_attrs}
    for rung in sorted(ladder, reverse=True):
        higher = next_fidelity(rung, ladder)
        if higher is None:
            continue
        # equal values rank in the tie-break's order (promotable keeps the order given between them)
        done = [(t.number, float(t.value)) for t in sorted(trials, key=tie_break)
                if t.state == TrialState.COMPLETE and t.value is not None
                and math.isclose(float(t.user_attrs.get(FIDELITY, -1.0)), rung, abs_tol=1e-9)]
        ready = promotable(done, promoted, min_trials=MIN_RUNG_TRIALS)
        if ready:
            number = ready[0]
            params = next(t.params for t in trials if t.number == number)
            study.enqueue_trial(dict(params), user_attrs={FIDELITY: higher, PROMOTED_FROM: number, PROMOTED_BY: by})
            log.info("study %s: trial %d (one of the best third of %d at %.3g) trains again at %.3g",
                     study.study_name, number, len(done), rung, higher)
            return number, higher
    return None


def tell(study: optuna.Study, ctx: StudyContext, done: HpoTrialCompleted) -> bool:
    """Record a trial's end; False if the study already had it (a redelivery) or does not know it."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(done.trial_number)
    if trial is None:
        log.warning("study %s has no trial %d; ignoring its completion", study.study_name, done.trial_number)
        return False
    if trial.state.is_finished():
        log.info("trial %d of %s was told already (%s)", done.trial_number, study.study_name, trial.state.name)
        return False
    storage = open_storage(ctx.storage_url)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                                done.trial_number)
    storage.set_trial_user_attr(trial_id, SECONDS, done.seconds)
    storage.set_trial_user_attr(trial_id, INTERMEDIATE, [v if math.isfinite(v) else None for v in done.intermediate])
    if done.error:
        storage.set_trial_user_attr(trial_id, ERROR, done.error[:2000])
    if done.val_loss is not None:  # finite: the event's schema says so
        storage.set_trial_user_attr(trial_id, VAL_LOSS, done.val_loss)
    if done.val_correct is not None:  # its length checked by the event's schema
        storage.set_trial_user_attr(trial_id, VAL_CORRECT, done.val_correct)
    for step, v in enumerate(done.intermediate, start=1):  # the steps whose report did not arrive (in time)
        if step not in trial.intermediate_values and math.isfinite(v):
            storage.set_trial_intermediate_value(trial_id, step, v)
    value_ok = done.value is not None and math.isfinite(done.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if done.state == "complete" and value_ok:
            study.tell(done.trial_number, done.value, skip_if_finished=True)
        elif done.state == "pruned":
            study.tell(done.trial_number, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            study.tell(done.trial_number, state=TrialState.FAIL, skip_if_finished=True)
    return True


@dataclass(frozen=True)
class Decision:
    """What the tuner answers a trial's report: ``continue`` or ``prune``, and why."""

    action: Literal["continue", "prune"]
    reason: str = ""


def decide(study: optuna.Study, ctx: StudyContext, reported: HpoTrialReported) -> Decision:
    """Record a reported intermediate value in the study and ask the study's pruner about the trial.

    A repeated report of a step (a redelivery) is not recorded twice; the pruner answers from the
    stored values either way. A trial the study already finished is told to stop.
    """
    storage = open_storage(ctx.storage_url)
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                                    reported.trial_number)
    except KeyError as exc:
        raise InvalidInput(f"study {study.study_name} has no trial {reported.trial_number}") from exc
    state = storage.get_trial(trial_id).state
    if state.is_finished():
        return Decision("prune", f"the trial is already {state.name.lower()}")
    live = optuna.trial.Trial(study, trial_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "step already reported" on a redelivery
        try:
            live.report(reported.value, reported.step)
        except (RuntimeError, ValueError) as exc:  # told meanwhile by another member of the group
            state = storage.get_trial(trial_id).state
            if state.is_finished():
                return Decision("prune", f"the trial is already {state.name.lower()}")
            raise RetryableError(f"cannot record the report of trial {reported.trial_number}: {exc}") from exc
        if live.should_prune():
            return Decision("prune", f"{type(study.pruner).__name__}: {reported.value:.4f} at step "
                            f"{reported.step} is not promising")
    return Decision("continue")


def failed_in_a_row(study: optuna.Study) -> list[FrozenTrial]:
    """The failed trials since the last one that did not fail (in the order they finished)."""
    finished = sorted((t for t in study.get_trials(deepcopy=False) if t.state.is_finished()),
                      key=lambda t: (t.datetime_complete or datetime.min, t.number))
    out: list[FrozenTrial] = []
    for t in reversed(finished):
        if t.state != TrialState.FAIL:
            break
        out.append(t)
    return out[::-1]


def is_done(study: optuna.Study, ctx: StudyContext, *, stop: bool = False) -> bool:
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    running = any(_is_open(t) for t in trials)
    return not running and (stop or len(trials) >= ctx.options.hpo_trials)


def trial_table(study: optuna.Study) -> list[TrialRecord]:
    return [
        TrialRecord(number=t.number, state=t.state.name.lower(),
                    value=t.value if t.value is not None and math.isfinite(t.value) else None,
                    params=dict(t.params), seconds=t.user_attrs.get(SECONDS), fidelity=t.user_attrs.get(FIDELITY),
                    promoted_from=t.user_attrs.get(PROMOTED_FROM), val_loss=reported_loss(t))
        for t in study.get_trials(deepcopy=False)
    ]


def reported_loss(trial: FrozenTrial) -> float | None:
    """The validation loss the trainer reported with the trial's value (None: none was)."""
    loss = trial.user_attrs.get(VAL_LOSS)
    return float(loss) if isinstance(loss, int | float) and math.isfinite(loss) else None


def tie_break(trial: FrozenTrial) -> tuple[float, int]:
    """The order between trials of equal value, first first: the lower reported validation loss (a trial
    without one after those with one), then the earlier trial."""
    loss = reported_loss(trial)
    return (math.inf if loss is None else loss, trial.number)


def rank(trial: FrozenTrial) -> tuple[float, float, int]:
    """The order of trials, best first: the higher value, then :func:`tie_break`."""
    return (-float(trial.value or 0.0), *tie_break(trial))


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial; failing that, the pruned trial with the best last value; else None.

    The value (validation accuracy) counts items, so on a small validation split trials often tie: between
    equal values the lower validation loss wins (it also rewards confidence on the items both get right and
    on those both get wrong), then the earlier trial.
    """
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if complete:
        return min(complete, key=rank)
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.value is not None and math.isfinite(t.value)]
    if pruned:
        log.warning("study %s: no trial completed; using the best pruned trial", study.study_name)
        return min(pruned, key=rank)
    return None


def failure_reasons(study: optuna.Study) -> list[str]:
    return [f"trial {t.number}: {t.user_attrs.get(ERROR, t.state.name.lower())}"
            for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]


@dataclass(frozen=True)
class Choice:
    """The study's result: the trial whose parameters the final training gets, and why, when that is not
    simply the highest value (``reason``; None: it is)."""

    trial: FrozenTrial | None
    reason: str | None = None


def _complete(trials: Sequence[FrozenTrial], params: dict[str, Any], fidelity: float | None = None
              ) -> list[FrozenTrial]:
    """The complete trials with a finite value of the configuration ``params`` (at ``fidelity``, if given)."""
    return [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
            and t.params == params
            and (fidelity is None or math.isclose(float(t.user_attrs.get(FIDELITY, -1.0)), fidelity, abs_tol=1e-9))]


def _correct(trial: FrozenTrial) -> Any:
    text = trial.user_attrs.get(VAL_CORRECT)
    try:
        return unpack_bools(text) if isinstance(text, str) else None
    except ValueError:  # the event's schema checks it with the same code: stored by another version
        return None


def chosen_trial(study: optuna.Study, config: TuningConfig) -> Choice:
    """:func:`best_trial`, unless the study has a baseline configuration and a level below 1: then the best
    trial replaces the baseline only when it beats it on the val items significantly.

    Both were scored on the same val items, so the comparison is paired (dlforge.hpo.selection): on the items
    exactly one of the two got right, the best trial must win so many more that a one-sided exact sign test
    gives p <= ``baseline_alpha``. Otherwise the baseline is kept: a lead of an item or two on a hundred val
    items is as likely noise as a better configuration, and the baseline is the configuration that trained
    well across data sets. The two are compared trained on the same share of the data: with a fidelity
    ladder, at the highest rung both configurations reached. When the baseline has no complete trial, or a
    trial carries no per-item results (from a trainer before them), the highest value wins, and the reason
    says why.
    """
    best = best_trial(study)
    if best is None or config.baseline is None or config.baseline_alpha >= 1.0 or best.params == config.baseline:
        return Choice(best)
    trials = study.get_trials(deepcopy=False)
    mine = _complete(trials, config.baseline)
    if not mine:
        return Choice(best, "the highest value: the baseline configuration has no complete trial to compare with")
    fidelities = [float(t.user_attrs.get(FIDELITY, -1.0)) for t in (*mine, best)]
    rung = min(max(fidelities[:-1]), fidelities[-1])  # the highest share both were trained on
    base_at, best_at = _complete(trials, config.baseline, rung), _complete(trials, dict(best.params), rung)
    if not base_at or not best_at:
        return Choice(best, "the highest value: the baseline and the best configuration have no trials on the "
                      "same share of the data to compare")
    base, challenger = min(base_at, key=rank), min(best_at, key=rank)
    a, b = _correct(challenger), _correct(base)
    if a is None or b is None or len(a) != len(b):
        return Choice(best, f"the highest value: trials {challenger.number} and {base.number} (the baseline) carry "
                      "no per-item val results of the same items to compare")
    better, test = replaces(a, b, config.baseline_alpha)
    verdict = (f"of the {test.items} val items where exactly one of trial {challenger.number} "
               f"({float(challenger.value or 0.0):.3f}) and the baseline (trial {base.number}, "
               f"{float(base.value or 0.0):.3f}) is right, trial {challenger.number} got {test.wins} and the "
               f"baseline {test.losses} (one-sided sign test p = {test.p_value:.3g}")
    if better:
        return Choice(best, f"{verdict} <= {config.baseline_alpha:g}): it replaces the baseline")
    needed = wins_needed(test.items, config.baseline_alpha)  # only for the reason when the baseline is kept
    need = f"; replacing it takes {needed} of {test.items}" if needed is not None else ""
    return Choice(base, f"kept the baseline: {verdict} > {config.baseline_alpha:g}{need})")
