"""The tuner's plug-ins by name: the seeds' stop rule, ASHA, the basin-hopping sampler, coresets, warm starts."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from pydantic import ValidationError

from dlforge.common.docs import DocumentStore
from dlforge.common.errors import InvalidInput
from dlforge.common.events import HpoTrialCompleted, HpoTrialReported, PipelineOptions, Spec
from dlforge.common.runtime import Backends
from dlforge.hpo import PRUNER_ATTR, build_pruner
from dlforge.hpo.pruners import TrendPruner
from dlforge.hpo.samplers import PARENT, BasinHoppingSampler
from dlforge.tuner.handlers import (
    StudyContext,
    TuningConfig,
    ask_for,
    decide,
    load_study,
    prepare_study,
    resolve_storage_url,
    tell,
)
from dlforge.tuner.plugins import PluginChoice, make_sampler, pruner_spec
from dlforge.tuner.warmstart import best_params, remember_study, warm_started


def context(tmp_path: Path, *, trials: int, parallel: int, **config: object) -> StudyContext:
    return StudyContext(
        study_name="dlforge-run-1", run_id="run-1", storage_url=resolve_storage_url(f"sqlite:///{tmp_path}/t.db"),
        dataset_id="d", model_id="m", arch="small_cnn", weights_key="w.pt", manifest_key="m.json",
        classes=["a", "b"], spec=Spec(), options=PipelineOptions(hpo_trials=trials, hpo_parallel=parallel, seed=3),
        config=TuningConfig(**config),  # type: ignore[arg-type]
    )


def test_the_trend_pruner_by_name_is_stored_with_the_study_and_decides_reports(tmp_path: Path) -> None:
    # Three finished trials with val accuracy 0.5, 0.6, 0.7 at epochs 1 and 2; window 1, top 20 % of three
    # is the best one: a report below 0.7 at epoch 1 is pruned, one at 0.75 is not.
    ctx = context(tmp_path, trials=5, parallel=5,
                  pruner=PluginChoice(name="trend", kwargs={"window": 1, "min_trials": 3}))
    study = prepare_study(ctx)
    assert study.user_attrs[PRUNER_ATTR]["factory"] == "dlforge.hpo.pruners.TrendPruner"
    ask_for(study, ctx, asked_by="e1")
    for number, acc in enumerate([0.5, 0.6, 0.7]):
        tell(study, ctx, HpoTrialCompleted(study_name=ctx.study_name, trial_number=number, state="complete",
                                           value=acc, intermediate=[acc, acc], seconds=1.0))
    study = load_study(ctx)
    assert isinstance(study.pruner, TrendPruner)
    report = HpoTrialReported(study_name=ctx.study_name, trial_number=3, step=1, value=0.65)
    assert decide(study, ctx, report).action == "prune"
    report = HpoTrialReported(study_name=ctx.study_name, trial_number=4, step=1, value=0.75)
    assert decide(study, ctx, report).action == "continue"


def test_asha_is_optunas_asynchronous_successive_halving() -> None:
    spec = pruner_spec(PluginChoice(name="asha"), startup=2)
    assert spec is not None and spec["factory"] == "optuna.pruners.SuccessiveHalvingPruner"
    assert isinstance(build_pruner(spec), optuna.pruners.SuccessiveHalvingPruner)


def test_the_basin_hopping_sampler_by_name_asks_trials_inside_the_tuners_space(tmp_path: Path) -> None:
    # the tuner rebuilds the sampler for every event; trials after the two start-up ones come from the chain
    ctx = context(tmp_path, trials=12, parallel=1, sampler=PluginChoice(name="basin_hopping",
                                                                         kwargs={"jump_probability": 0.3}))
    assert isinstance(make_sampler(ctx.config.sampler, seed=1, startup=2), BasinHoppingSampler)
    prepare_study(ctx)
    for n in range(12):
        study = load_study(ctx)
        (asked,) = ask_for(study, ctx, asked_by=f"e{n}")
        assert ctx.config.space.problems(asked.params) == []
        tell(study, ctx, HpoTrialCompleted(study_name=ctx.study_name, trial_number=asked.number, state="complete",
                                           value=asked.params["momentum"], intermediate=[0.5], seconds=1.0))
    chain = [t for t in load_study(ctx).trials if PARENT in t.system_attrs]
    assert [t.number for t in chain] == list(range(2, 12))
    with pytest.raises(InvalidInput, match="basin_hopping"):
        make_sampler(PluginChoice(name="basin_hopping", kwargs={"step_size": 0}), seed=1, startup=2)


PARAMS = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "dropout": 0.1, "unfreeze": 2, "batch_size": 16,
          "optimizer": "sgd"}


async def test_a_new_study_enqueues_the_nearest_past_studys_best_first(tmp_path: Path, backends: Backends) -> None:
    docs = backends.docs
    bests = {name: [{**PARAMS, "lr": lr}] for name, lr in (("elpv", 0.001), ("digits", 0.03), ("fashion", 0.07))}
    fps = {"elpv": [0.0, 0.0, 1.0, 1.0], "digits": [1.0, 0.0, 0.2, 0.2], "fashion": [1.0, 1.0, 0.5, 0.5]}
    for name in bests:
        await remember_study(docs, study_name=name, dataset_id=name, fingerprint=fps[name], best=bests[name])
    # the new data set's fingerprint is nearest digits (distance 0.2), then fashion (~0.9), then elpv (~1.3)
    config = TuningConfig(fingerprint=[0.9, 0.1, 0.3, 0.3], enqueue=[PARAMS])
    warm = await warmed(docs, config)
    assert [p["lr"] for p in warm.enqueue] == [0.03, 0.07, 0.001, 0.01]
    ctx = context(tmp_path, trials=4, parallel=1).model_copy(update={"config": warm})
    study = prepare_study(ctx)
    assert ask_for(study, ctx, asked_by="e1")[0].params == bests["digits"][0]
    # without a fingerprint, or with warm starts off, nothing changes
    assert (await warmed(docs, TuningConfig(enqueue=[PARAMS]))).enqueue == [PARAMS]
    off = TuningConfig(fingerprint=[0.9, 0.1, 0.3, 0.3], warm_start_studies=0)
    assert (await warmed(docs, off)).enqueue == []


async def warmed(docs: DocumentStore, config: TuningConfig) -> TuningConfig:
    return await warm_started(docs, config, study_name="dlforge-new")


def test_best_params_are_the_best_complete_trials_in_order(tmp_path: Path) -> None:
    ctx = context(tmp_path, trials=4, parallel=4)
    study = prepare_study(ctx)
    asked = ask_for(study, ctx, asked_by="e1")
    for t, (state, value) in zip(asked, [("complete", 0.6), ("pruned", 0.9), ("complete", 0.8), ("complete", 0.7)],
                                 strict=True):
        tell(study, ctx, HpoTrialCompleted(study_name=ctx.study_name, trial_number=t.number, state=state,
                                           value=value, intermediate=[value], seconds=1.0))
    assert best_params(load_study(ctx), keep=2) == [asked[2].params, asked[3].params]


def test_a_fingerprint_must_be_finite() -> None:
    with pytest.raises(ValidationError, match="finite"):
        TuningConfig(fingerprint=[0.0, float("nan")])
