"""The tuner's plug-ins by name: the seeds' stop rule, ASHA, the basin-hopping sampler, coresets, warm starts."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from dlforge.common.errors import InvalidInput
from dlforge.common.events import HpoTrialCompleted, HpoTrialReported, PipelineOptions, Spec
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
