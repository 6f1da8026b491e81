"""The tuner's study logic without a broker: ask, tell, redelivery, completion, plug-ins."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from pydantic import ValidationError

from dlforge.common.errors import ConfigError, InvalidInput
from dlforge.common.events import HpoTrialCompleted, HpoTrialReported, PipelineOptions, Spec
from dlforge.common.packed import pack_bools
from dlforge.hpo import PRUNER_ATTR
from dlforge.tuner.handlers import (
    FIDELITY,
    StudyContext,
    TuningConfig,
    TuningOverride,
    ask_for,
    best_trial,
    chosen_trial,
    decide,
    default_config,
    failed_in_a_row,
    is_done,
    load_study,
    prepare_study,
    resolve_storage_url,
    tell,
    trial_table,
)
from dlforge.tuner.plugins import PluginChoice, make_sampler, pruner_spec
from dlforge.tuner.settings import TunerSettings
from dlforge.tuner.space import CategoricalParam, FloatParam, SearchSpace, default_space


def context(tmp_path: Path, *, trials: int = 3, parallel: int = 2, **config: object) -> StudyContext:
    return StudyContext(
        study_name="dlforge-run-1", run_id="run-1", storage_url=resolve_storage_url(f"sqlite:///{tmp_path}/t.db"),
        dataset_id="d", model_id="m", arch="small_cnn", weights_key="w.pt", manifest_key="m.json",
        classes=["a", "b"], spec=Spec(), options=PipelineOptions(hpo_trials=trials, hpo_parallel=parallel, seed=3),
        config=TuningConfig(**config),  # type: ignore[arg-type]
    )


def completed(number: int, state: str = "complete", value: float | None = 0.7,
              val_loss: float | None = None) -> HpoTrialCompleted:
    return HpoTrialCompleted(study_name="dlforge-run-1", trial_number=number, state=state,  # type: ignore[arg-type]
                             value=value, intermediate=[value or 0.0], seconds=1.5, val_loss=val_loss)


def test_ask_is_idempotent_per_event_and_respects_parallel_and_budget(tmp_path: Path) -> None:
    ctx = context(tmp_path, trials=3, parallel=2)
    study = prepare_study(ctx)
    first = ask_for(study, ctx, asked_by="e1")
    assert [t.number for t in first] == [0, 1]
    assert set(first[0].params) == {"lr", "momentum", "weight_decay", "dropout", "unfreeze", "batch_size",
                                    "optimizer"}
    assert first[0].params != first[1].params
    # the same event handled again gets the same trials, not new ones
    assert [t.number for t in ask_for(load_study(ctx), ctx, asked_by="e1")] == [0, 1]
    # a completion frees one slot; the budget (3) allows one more trial
    study = load_study(ctx)
    assert tell(study, ctx, completed(0, value=0.8))
    nxt = ask_for(study, ctx, asked_by="e2")
    assert [t.number for t in nxt] == [2]
    assert not tell(study, ctx, completed(0, value=0.1))  # told twice: ignored, value kept
    assert ask_for(load_study(ctx), ctx, asked_by="e3") == []  # budget spent
    assert not is_done(study, ctx)
    tell(study, ctx, completed(1, "pruned", 0.4))
    tell(study, ctx, completed(2, "failed", None))
    assert is_done(study, ctx)
    table = trial_table(study)
    assert [(t.number, t.state, t.value) for t in table] == [(0, "complete", 0.8), (1, "pruned", 0.4),
                                                              (2, "fail", None)]
    assert table[0].seconds == 1.5
    best = best_trial(study)
    assert best is not None and best.number == 0 and best.value == 0.8


def test_a_complete_trial_without_a_finite_value_counts_as_failed(tmp_path: Path) -> None:
    ctx = context(tmp_path, trials=1, parallel=1)
    study = prepare_study(ctx)
    ask_for(study, ctx, asked_by="e1")
    tell(study, ctx, completed(0, "complete", float("nan")))
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    assert best_trial(study) is None


def test_best_falls_back_to_the_best_pruned_trial(tmp_path: Path) -> None:
    ctx = context(tmp_path, trials=2, parallel=2)
    study = prepare_study(ctx)
    ask_for(study, ctx, asked_by="e1")
    tell(study, ctx, completed(0, "pruned", 0.3))
    tell(study, ctx, completed(1, "pruned", 0.6))
    best = best_trial(study)
    assert best is not None and best.number == 1


def test_equal_values_rank_by_validation_loss_then_by_trial_number(tmp_path: Path) -> None:
    from dlforge.tuner.handlers import promote_next
    from dlforge.tuner.warmstart import best_params

    ctx = context(tmp_path, trials=8, parallel=4, fidelity_ladder=[0.5, 1.0])
    study = prepare_study(ctx)
    ask_for(study, ctx, asked_by="e1")
    # 89 of 109 right in trials 0, 1 and 3: 1 is the surest (lowest loss); 3 reported no loss, 0 a higher one
    for number, value, loss in [(0, 89 / 109, 0.52), (1, 89 / 109, 0.44), (2, 0.75, 0.30), (3, 89 / 109, None)]:
        tell(load_study(ctx), ctx, completed(number, value=value, val_loss=loss))
    study = load_study(ctx)
    best = best_trial(study)
    assert best is not None and best.number == 1
    # the order is the warm start's too, and the table shows the losses
    assert best_params(study) == [study.trials[n].params for n in (1, 0, 3, 2)]
    assert [t.val_loss for t in trial_table(study)] == [0.52, 0.44, 0.30, None]
    # the best third of four at 0.5 is two trials: the two surest of the three tied at the top
    assert promote_next(study, ctx, by="c3") == (1, 1.0)
    assert promote_next(load_study(ctx), ctx, by="c4") == (0, 1.0)
    # a loss that is no loss cannot be sent
    for bad in (float("inf"), float("nan"), -0.1):
        with pytest.raises(ValidationError):
            completed(4, value=0.1, val_loss=bad)


@pytest.mark.parametrize(("state", "values", "losses", "best"), [
    pytest.param("pruned", [0.6, 0.6, 0.6], [0.61, 0.58, None], 1, id="pruned-ties-by-loss"),
    pytest.param("complete", [0.7, 0.8, 0.8], [None, None, None], 1, id="no-losses-earlier-trial"),
])
def test_the_tie_break_holds_for_pruned_trials_and_without_losses(
        tmp_path: Path, state: str, values: list[float], losses: list[float | None], best: int) -> None:
    ctx = context(tmp_path, trials=3, parallel=3)
    ask_for(prepare_study(ctx), ctx, asked_by="e1")
    for number, (value, loss) in enumerate(zip(values, losses, strict=True)):
        tell(load_study(ctx), ctx, completed(number, state, value, val_loss=loss))
    chosen = best_trial(load_study(ctx))
    assert chosen is not None and chosen.number == best


def test_stop_asks_nothing_more(tmp_path: Path) -> None:
    ctx = context(tmp_path, trials=5, parallel=1)
    study = prepare_study(ctx)
    ask_for(study, ctx, asked_by="e1")
    tell(study, ctx, completed(0))
    assert ask_for(study, ctx, asked_by="e2", stop=True) == []
    assert is_done(study, ctx, stop=True)


def test_enqueued_trials_come_first_and_the_pruner_is_stored_with_the_study(tmp_path: Path) -> None:
    fixed = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "dropout": 0.1, "unfreeze": 2, "batch_size": 16,
             "optimizer": "sgd"}
    ctx = context(tmp_path, trials=2, parallel=1, enqueue=[fixed], pruner=PluginChoice(name="patient"))
    study = prepare_study(ctx)
    prepare_study(ctx)  # twice: still one enqueued trial
    assert ask_for(study, ctx, asked_by="e1")[0].params == fixed
    spec = study.user_attrs[PRUNER_ATTR]
    assert spec["factory"] == "optuna.pruners.PatientPruner"
    assert spec["kwargs"]["wrapped_pruner"]["factory"] == "optuna.pruners.MedianPruner"
    # every tuner replica builds the study's pruner from that description
    assert isinstance(load_study(ctx).pruner, optuna.pruners.PatientPruner)


def reported(number: int, step: int, value: float) -> HpoTrialReported:
    return HpoTrialReported(study_name="dlforge-run-1", trial_number=number, step=step, value=value)


def test_reports_are_recorded_and_the_median_pruner_decides(tmp_path: Path) -> None:
    # MedianPruner after one finished trial, from step 1: prune a trial whose value at a step is below the
    # median of the finished trials' values at that step (here: trial 0's own value).
    ctx = context(tmp_path, trials=3, parallel=3, pruner=PluginChoice(name="median", kwargs={"n_startup_trials": 1}))
    study = prepare_study(ctx)
    ask_for(study, ctx, asked_by="e1")
    assert decide(study, ctx, reported(0, 1, 0.7)).action == "continue"  # no finished trial yet: never prunes
    assert decide(study, ctx, reported(0, 2, 0.8)).action == "continue"
    tell(study, ctx, completed(0, value=0.8))
    assert decide(load_study(ctx), ctx, reported(1, 1, 0.75)).action == "continue"  # 0.75 >= 0.7
    low = decide(load_study(ctx), ctx, reported(2, 1, 0.4))  # 0.4 < 0.7
    assert low.action == "prune" and "MedianPruner" in low.reason and "step 1" in low.reason
    assert decide(load_study(ctx), ctx, reported(1, 2, 0.6)).action == "prune"  # 0.6 < 0.8 at step 2
    stored = {t.number: t.intermediate_values for t in load_study(ctx).trials}
    assert stored == {0: {1: 0.7, 2: 0.8}, 1: {1: 0.75, 2: 0.6}, 2: {1: 0.4}}
    # a redelivered report of a step keeps the first value and gets the same answer
    assert decide(load_study(ctx), ctx, reported(2, 1, 0.99)).action == "prune"
    assert load_study(ctx).trials[2].intermediate_values == {1: 0.4}
    # a finished trial is told to stop; an unknown one is refused
    finished = decide(load_study(ctx), ctx, reported(0, 3, 0.9))
    assert finished.action == "prune" and "already complete" in finished.reason
    with pytest.raises(InvalidInput, match="no trial 7"):
        decide(load_study(ctx), ctx, reported(7, 1, 0.5))


def test_the_completion_fills_in_the_steps_whose_report_did_not_arrive(tmp_path: Path) -> None:
    ctx = context(tmp_path, trials=1, parallel=1)
    study = prepare_study(ctx)
    ask_for(study, ctx, asked_by="e1")
    decide(study, ctx, reported(0, 1, 0.5))
    done = HpoTrialCompleted(study_name="dlforge-run-1", trial_number=0, state="complete", value=0.7,
                             intermediate=[0.55, 0.6, 0.7], seconds=1.0)
    tell(study, ctx, done)
    assert load_study(ctx).trials[0].intermediate_values == {1: 0.5, 2: 0.6, 3: 0.7}


def test_failed_in_a_row_counts_the_failures_since_the_last_success(tmp_path: Path) -> None:
    ctx = context(tmp_path, trials=6, parallel=1)
    study = prepare_study(ctx)
    states = ["failed", "failed", "complete", "failed", "pruned", "failed"]
    expected = [1, 2, 0, 1, 0, 1]
    for number, (state, count) in enumerate(zip(states, expected, strict=True)):
        ask_for(study, ctx, asked_by=f"e{number}")
        tell(study, ctx, completed(number, state, None if state == "failed" else 0.5))
        assert [t.number for t in failed_in_a_row(study)] == list(range(number - count + 1, number + 1))


def test_tuning_config_refuses_bad_plugins_and_enqueued_trials_outside_the_space() -> None:
    with pytest.raises(InvalidInput, match="unknown sampler 'annealing'"):
        TuningConfig(sampler=PluginChoice(name="annealing"))
    with pytest.raises(InvalidInput, match="unknown pruner"):
        TuningConfig(pruner=PluginChoice(name="wilcoxonish"))
    with pytest.raises(InvalidInput, match="threshold pruner needs"):
        TuningConfig(pruner=PluginChoice(name="threshold"))
    with pytest.raises(ValidationError, match=r"enqueue\[0\]: lr=5.0"):
        TuningConfig(enqueue=[{"lr": 5.0, "momentum": 0.9, "weight_decay": 1e-4, "dropout": 0.1, "unfreeze": 2,
                               "batch_size": 16, "optimizer": "sgd"}])
    base = TuningConfig()
    changed = TuningOverride(sampler=PluginChoice(name="random"), sample_fraction=0.3).apply(base)
    assert changed.sampler.name == "random" and changed.sample_fraction == 0.3 and changed.space == base.space


def test_samplers_by_name_and_optional_dependencies() -> None:
    assert isinstance(make_sampler(PluginChoice(name="tpe"), seed=1, startup=2), optuna.samplers.TPESampler)
    assert isinstance(make_sampler(PluginChoice(name="random"), seed=1, startup=2), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler(PluginChoice(name="gp"), seed=1, startup=2), optuna.samplers.GPSampler)
    try:
        import cmaes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install cmaes"):
            make_sampler(PluginChoice(name="cmaes"), seed=1, startup=2)
    else:
        assert isinstance(make_sampler(PluginChoice(name="cmaes"), seed=1, startup=2), optuna.samplers.CmaEsSampler)
    assert pruner_spec(PluginChoice(name="none"), startup=2) is None
    with pytest.raises(InvalidInput, match="bad kwargs"):
        pruner_spec(PluginChoice(name="median", kwargs={"bogus": 1}), startup=2)


def test_settings_space_override(tmp_path: Path) -> None:
    path = tmp_path / "space.json"
    path.write_text('{"params": [{"kind": "float", "name": "lr", "low": 0.001, "high": 0.1, "log": true}]}')
    cfg = default_config(TunerSettings(tuner_space=f"@{path}", tuner_sampler="random"))
    assert [p.name for p in cfg.space.params] == ["lr"] and cfg.sampler.name == "random"
    with pytest.raises(ConfigError, match="DLFORGE_TUNER_SPACE"):
        default_config(TunerSettings(tuner_space='{"params": []}'))
    with pytest.raises(ConfigError, match="DLFORGE_TUNER_SAMPLER"):
        default_config(TunerSettings(tuner_sampler="nope"))


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"trial_epochs": 10**9}, "less than or equal to 500"),
        ({"startup_trials": 10**6}, "less than or equal to 200"),
        ({"enqueue": [{}] * 201}, "at most 200 items"),
        ({"sampler": {"name": "x" * 65}}, "at most 64 characters"),
    ],
    ids=["trial-epochs", "startup-trials", "enqueue", "sampler-name"],
)
def test_a_tuning_override_is_bounded(override: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        TuningOverride.model_validate(override)


def test_the_largest_run_seed_gives_valid_sampler_seeds(tmp_path: Path) -> None:
    # numpy takes seeds below 2**32; seed * 100_003 passed it for any options.seed above 42,948
    ctx = context(tmp_path, trials=2, parallel=2)
    ctx = ctx.model_copy(update={"options": ctx.options.model_copy(update={"seed": 2**31 - 1})})
    study = prepare_study(ctx)
    asked = ask_for(load_study(ctx), ctx, asked_by="e1")
    assert [t.number for t in asked] == [0, 1] and asked[0].params != asked[1].params
    assert study.study_name == "dlforge-run-1"


def test_a_fidelity_ladder_is_strictly_increasing_fractions_of_the_train_split() -> None:
    assert TuningConfig(fidelity_ladder=[0.25, 0.5, 1]).fidelity_ladder == [0.25, 0.5, 1.0]
    assert TuningConfig(fidelity_ladder=[]).fidelity_ladder is None and TuningConfig().fidelity_ladder is None
    for ladder, words in (([0.5, 0.25], r"strictly increasing \(0.25 after 0.5\)"),
                          ([0.25, 0.25, 1], r"strictly increasing \(0.25 after 0.25\)"),
                          ([0.0, 0.5], r"0.0 is not a fraction of the train split in \(0, 1\]"),
                          ([0.5, 1.5], r"1.5 is not a fraction")):
        with pytest.raises(ValidationError, match=words):
            TuningConfig(fidelity_ladder=ladder)
        with pytest.raises(ValidationError, match=words):  # a run's override, as PUT /runs/{id}/tuning applies it
            TuningOverride.model_validate({"fidelity_ladder": ladder}).apply(TuningConfig())
    with pytest.raises(ValidationError, match="sample_method"):
        TuningOverride.model_validate({"sample_method": "stratified"})
    # an override's [] turns the defaults' ladder off; None leaves it
    base = TuningConfig(fidelity_ladder=[0.25, 1.0], sample_method="herding")
    assert TuningOverride(fidelity_ladder=[]).apply(base).fidelity_ladder is None
    assert TuningOverride(sample_fraction=0.3).apply(base).fidelity_ladder == [0.25, 1.0]


def test_the_settings_ladder_and_sample_method(tmp_path: Path) -> None:
    cfg = default_config(TunerSettings(tuner_fidelity_ladder=" 0.25, 0.5 ,1", tuner_sample_method="k_center"))
    assert cfg.fidelity_ladder == [0.25, 0.5, 1.0] and cfg.sample_method == "k_center"
    assert cfg.first_fraction == 0.25
    plain = default_config(TunerSettings(tuner_fidelity_ladder="", tuner_sample_method="random"))
    assert plain.fidelity_ladder is None and plain.sample_method == "random" and plain.first_fraction == 0.5
    # the defaults: k-center coresets on the ladder 0.25 -> 0.5 -> 1, no pruner (benchmarks/tuner.py's best)
    default = default_config(TunerSettings())
    assert (default.fidelity_ladder, default.sample_method, default.first_fraction) == ([0.25, 0.5, 1.0],
                                                                                        "k_center", 0.25)
    assert default.pruner.name == "none"
    for text, words in (("0.5,0.25", "strictly increasing"), ("0.25,2", "2.0 is not a fraction"),
                        ("0.25,half", "could not convert")):
        with pytest.raises(ConfigError, match=f"DLFORGE_TUNER_FIDELITY_LADDER='{text}': .*{words}"):
            default_config(TunerSettings(tuner_fidelity_ladder=text))
    from dlforge.common.settings import load_settings

    with pytest.raises(ConfigError, match="DLFORGE_TUNER_SAMPLE_METHOD"):
        load_settings(TunerSettings, tuner_sample_method="kcenter")


def test_a_configuration_promoted_up_the_ladder_is_remembered_once(tmp_path: Path) -> None:
    from dlforge.tuner.handlers import promote_next
    from dlforge.tuner.warmstart import best_params

    ctx = context(tmp_path, trials=5, parallel=1, fidelity_ladder=[0.5, 1.0])
    study = prepare_study(ctx)
    for number, value in enumerate([0.6, 0.7, 0.8]):
        [asked] = ask_for(load_study(ctx), ctx, asked_by=f"e{number}")
        assert asked.fraction == 0.5
        tell(load_study(ctx), ctx, completed(number, value=value))
        if number < 2:
            assert promote_next(load_study(ctx), ctx, by=f"c{number}") is None  # fewer than three completed at 0.5
    # 0.8 is the best third of three; the same event again promotes nothing more, nor does another (0.7 is not
    # the best third of three)
    assert promote_next(load_study(ctx), ctx, by="c2") == (2, 1.0)
    assert promote_next(load_study(ctx), ctx, by="c2") is None
    assert promote_next(load_study(ctx), ctx, by="c2-other") is None
    [again] = ask_for(load_study(ctx), ctx, asked_by="e3")
    assert (again.number, again.fraction) == (3, 1.0)
    tell(load_study(ctx), ctx, completed(3, value=0.85))
    study = load_study(ctx)
    assert promote_next(study, ctx, by="c3") is None  # 3 is at the top rung, 2 was promoted already
    top = best_params(study)
    assert top == [study.trials[2].params, study.trials[1].params, study.trials[0].params]


@pytest.mark.parametrize(("rungs", "parallel"), [(2, 1), (2, 2), (3, 1), (3, 2)])
def test_a_ladder_fitted_to_the_budget_trains_at_its_top_whatever_the_values(
        tmp_path: Path, rungs: int, parallel: int) -> None:
    """The tuner's own ask / tell / promote over a study of exactly climb_cost trials, completions in a random
    order with random (often tied) values, 8 draws: some training always reaches the top rung, and a budget one
    smaller is cut to a shorter ladder."""
    import random

    from dlforge.hpo.coreset import climb_cost, fitted_ladder
    from dlforge.tuner.handlers import FIDELITY, promote_next

    ladder = [0.25, 0.5, 1.0][-rungs:]
    budget = climb_cost(rungs, parallel=parallel)
    assert fitted_ladder(ladder, budget, parallel=parallel) == ladder
    assert fitted_ladder(ladder, budget - 1, parallel=parallel) != ladder
    for draw in range(8):
        rng = random.Random(draw)
        (tmp_path / f"{draw}").mkdir(exist_ok=True)
        ctx = context(tmp_path / f"{draw}", trials=budget, parallel=parallel, fidelity_ladder=ladder)
        prepare_study(ctx)
        running = [t.number for t in ask_for(load_study(ctx), ctx, asked_by="start")]
        events = 0
        while running:
            number = running.pop(rng.randrange(len(running)))
            tell(load_study(ctx), ctx, completed(number, value=rng.choice([0.5, 0.6, 0.6, 0.7, 0.8])))
            events += 1
            promote_next(load_study(ctx), ctx, by=f"e{events}")
            running += [t.number for t in ask_for(load_study(ctx), ctx, asked_by=f"e{events}")]
        study = load_study(ctx)
        assert len(study.trials) == budget and all(t.state.is_finished() for t in study.trials)
        assert max(t.user_attrs[FIDELITY] for t in study.trials) == 1.0, (draw, [
            (t.number, t.user_attrs[FIDELITY], t.value) for t in study.trials])


def test_one_completion_event_promotes_at_most_once_even_when_two_have_earned_it(tmp_path: Path) -> None:
    """Four completions at 0.5 told before any promotion (as when trials run side by side): the best two (ceil(4/3))
    have both earned 1.0. An event promotes one; the same event handled again promotes nothing more; the next
    event promotes the other."""
    from dlforge.tuner.handlers import promote_next

    ctx = context(tmp_path, trials=10, parallel=4, fidelity_ladder=[0.5, 1.0])
    prepare_study(ctx)
    asked = ask_for(load_study(ctx), ctx, asked_by="start")
    assert [(a.number, a.fraction) for a in asked] == [(0, 0.5), (1, 0.5), (2, 0.5), (3, 0.5)]
    for number, value in enumerate([0.9, 0.8, 0.6, 0.7]):
        tell(load_study(ctx), ctx, completed(number, value=value))
    assert promote_next(load_study(ctx), ctx, by="done-3") == (0, 1.0)
    assert promote_next(load_study(ctx), ctx, by="done-3") is None  # redelivered
    assert promote_next(load_study(ctx), ctx, by="done-2") == (1, 1.0)
    assert promote_next(load_study(ctx), ctx, by="done-1") is None  # 0.7 and 0.6 are not in the best two


def test_every_study_starts_with_the_baseline_trial_unless_told_otherwise(tmp_path: Path) -> None:
    expected = {"lr": 0.001, "momentum": 0.9, "weight_decay": 1e-6, "dropout": 0.2, "unfreeze": 3,
                "batch_size": 32, "optimizer": "adam"}
    cfg = default_config(TunerSettings())
    assert cfg.enqueue == [expected]
    ctx = context(tmp_path, trials=2, parallel=1, **{"enqueue": cfg.enqueue})
    assert ask_for(prepare_study(ctx), ctx, asked_by="e1")[0].params == expected
    # a run's own enqueue list replaces it; empty turns it off
    assert TuningOverride(enqueue=[]).apply(cfg).enqueue == []
    assert default_config(TunerSettings(tuner_baseline=" ")).enqueue == []


def test_a_baseline_is_checked_against_the_space(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"DLFORGE_TUNER_BASELINE does not lie in the search space: .*lr=0.5 is "
                                          r"outside \[0.0001, 0.1\]"):
        default_config(TunerSettings(tuner_baseline='{"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-6, '
                                     '"dropout": 0.2, "unfreeze": 3, "batch_size": 32, "optimizer": "adam"}'))
    with pytest.raises(ConfigError, match="DLFORGE_TUNER_BASELINE: not JSON"):
        default_config(TunerSettings(tuner_baseline="{lr: 1}"))
    with pytest.raises(ConfigError, match="a JSON object of parameters is needed, got list"):
        default_config(TunerSettings(tuner_baseline="[1, 2]"))
    # the default baseline under a user's space it does not fit is left out; a given one fitting it is kept
    path = tmp_path / "space.json"
    path.write_text('{"params": [{"kind": "float", "name": "lr", "low": 0.001, "high": 0.1, "log": true}]}')
    assert default_config(TunerSettings(tuner_space=f"@{path}")).enqueue == []
    assert default_config(TunerSettings(tuner_space=f"@{path}", tuner_baseline='{"lr": 0.01}')).enqueue == [
        {"lr": 0.01}]


def test_a_run_that_changes_the_space_keeps_only_the_enqueued_trials_that_fit_it() -> None:
    cfg = default_config(TunerSettings())
    narrow = SearchSpace(params=[FloatParam(name="lr", low=1e-3, high=1e-1, log=True)])
    over = TuningOverride(space=narrow).apply(cfg)  # the baseline has 7 parameters, this space one: left out
    assert over.enqueue == [] and [p.name for p in over.space.params] == ["lr"]
    wide = SearchSpace(params=[*default_space().params, CategoricalParam(name="extra", choices=["a", "b"])])
    assert TuningOverride(space=wide).apply(cfg).enqueue == []  # "extra is missing": left out as well
    same = TuningOverride(space=default_space(), trial_epochs=2).apply(cfg)
    assert same.enqueue == cfg.enqueue and same.trial_epochs == 2  # a space that holds it keeps it
    # an enqueue list the run gives with its space is checked against that space, not filtered
    with pytest.raises(ValidationError, match=r"enqueue\[0\]: lr=0.0001 is outside"):
        TuningOverride(space=narrow, enqueue=[{"lr": 1e-4}]).apply(cfg)


BASELINE = {"lr": 0.001, "momentum": 0.9, "weight_decay": 1e-6, "dropout": 0.2, "unfreeze": 3, "batch_size": 32,
            "optimizer": "adam"}


def _scored(number: int, right: list[bool] | None, value: float | None = None) -> HpoTrialCompleted:
    v = value if value is not None else sum(right or []) / len(right or [1])
    return completed(number, value=v).model_copy(
        update={"val_correct": pack_bools(right) if right is not None else None})


def test_the_baseline_stays_unless_the_best_trial_beats_it_on_the_items_they_disagree_on(tmp_path: Path) -> None:
    ctx = context(tmp_path, trials=4, parallel=4, enqueue=[BASELINE], baseline=BASELINE, baseline_alpha=0.05)
    study = prepare_study(ctx)
    asked = ask_for(study, ctx, asked_by="e1")
    assert asked[0].params == BASELINE
    base = [True] * 80 + [False] * 20  # 0.80 on 100 val items
    # trial 1: right on 3 of the baseline's misses, wrong on 1 of its hits: 0.82, a lead of 3 to 1 (p = 5/16)
    close = base.copy()
    close[80:83] = [True] * 3
    close[0] = False
    # trial 2: right on 12 of its misses, wrong on 1 of its hits: 0.91, 12 to 1 (p = 14/8192)
    far = base.copy()
    far[80:92] = [True] * 12
    far[1] = False
    tell(study, ctx, _scored(0, base))
    tell(study, ctx, _scored(1, close))
    choice = chosen_trial(load_study(ctx), ctx.config)
    assert choice.trial is not None and choice.trial.number == 0 and choice.trial.value == 0.8
    assert choice.reason is not None and choice.reason.startswith("kept the baseline")
    assert choice.reason == ("kept the baseline: of the 4 val items where exactly one of trial 1 (0.820) and the "
                             "baseline (trial 0, 0.800) is right, trial 1 got 3 and the baseline 1 (one-sided sign "
                             "test p = 0.312 > 0.05)")  # 4 of 4 would give 1/16: no count of 4 suffices
    best = best_trial(load_study(ctx))
    assert best is not None and best.number == 1  # the highest value is still trial 1's
    tell(study, ctx, _scored(2, far))
    choice = chosen_trial(load_study(ctx), ctx.config)
    assert choice.trial is not None and choice.trial.number == 2
    assert choice.reason is not None and "trial 2 got 12 and the baseline 1" in choice.reason
    assert choice.reason.endswith("p = 0.00171 <= 0.05): it replaces the baseline")  # 14 / 8192
    # at level 1 the highest value wins whatever the items say; a trial without per-item results is not compared
    assert chosen_trial(load_study(ctx), ctx.config.model_copy(update={"baseline_alpha": 1.0})).trial.number == 2
    tell(study, ctx, _scored(3, None, value=0.95))
    choice = chosen_trial(load_study(ctx), ctx.config)
    assert choice.trial is not None and choice.trial.number == 3
    assert choice.reason == ("the highest value: trials 3 and 0 (the baseline) carry no per-item val results of the "
                             "same items to compare")


def test_a_lead_of_eight_of_nine_is_needed_at_five_percent(tmp_path: Path) -> None:
    ctx = context(tmp_path, trials=2, parallel=2, enqueue=[BASELINE], baseline=BASELINE, baseline_alpha=0.05)
    study = prepare_study(ctx)
    ask_for(study, ctx, asked_by="e1")
    base = [True] * 50 + [False] * 50
    lead = base.copy()
    lead[50:57] = [True] * 7  # 7 wins, 2 losses: P(X >= 7 | 9) = 46 / 512 = 0.0898
    lead[0:2] = [False] * 2
    tell(study, ctx, _scored(0, base))
    tell(study, ctx, _scored(1, lead))
    choice = chosen_trial(load_study(ctx), ctx.config)
    assert choice.trial is not None and choice.trial.number == 0
    assert choice.reason is not None and choice.reason.endswith("p = 0.0898 > 0.05; replacing it takes 8 of 9)")
    # 8 of 9 gives 10 / 512 = 0.0195


def test_with_a_ladder_the_baseline_is_compared_on_the_same_share_of_the_data(tmp_path: Path) -> None:
    ctx = context(tmp_path, trials=8, parallel=2, enqueue=[BASELINE], baseline=BASELINE, baseline_alpha=0.05,
                  fidelity_ladder=[0.5, 1.0])
    study = prepare_study(ctx)
    asked = ask_for(study, ctx, asked_by="e1")
    other = asked[1].params
    base = [True] * 60 + [False] * 40
    close = base.copy()
    close[60:62] = [True] * 2  # on half the data: 2 wins, 0 losses (p = 0.25)
    strong = base.copy()
    strong[60:75] = [True] * 15  # the same configuration on all of it: 15 wins (p = 0.00003)
    tell(study, ctx, _scored(0, base))
    tell(study, ctx, _scored(1, close))
    # trial 1's configuration trained again on all the data (as a promotion would): compared with the baseline's
    # trial on half the data it would replace it; the baseline never reached that share, so both are compared at 0.5
    study.enqueue_trial(other, user_attrs={FIDELITY: 1.0})
    promoted = ask_for(load_study(ctx), ctx, asked_by="e2")
    assert (promoted[0].fraction, asked[0].fraction, asked[1].fraction) == (1.0, 0.5, 0.5)
    assert promoted[0].params == other
    tell(load_study(ctx), ctx, _scored(promoted[0].number, strong))
    choice = chosen_trial(load_study(ctx), ctx.config)
    assert choice.trial is not None and choice.trial.number == 0
    assert choice.reason is not None and "exactly one of trial 1 (0.620)" in choice.reason


def test_the_rule_needs_a_complete_baseline_trial(tmp_path: Path) -> None:
    ctx = context(tmp_path, trials=2, parallel=2, enqueue=[BASELINE], baseline=BASELINE, baseline_alpha=0.05)
    study = prepare_study(ctx)
    ask_for(study, ctx, asked_by="e1")
    tell(study, ctx, completed(0, "failed", None))
    tell(study, ctx, _scored(1, [True, False, True]))
    choice = chosen_trial(load_study(ctx), ctx.config)
    assert choice.trial is not None and choice.trial.number == 1
    assert choice.reason == "the highest value: the baseline configuration has no complete trial to compare with"


def test_the_default_config_names_its_baseline_and_a_space_without_it_drops_it() -> None:
    cfg = default_config(TunerSettings())
    assert cfg.baseline == BASELINE and cfg.baseline_alpha == 0.05
    assert default_config(TunerSettings(tuner_baseline=" ")).baseline is None
    assert default_config(TunerSettings(tuner_baseline_alpha=1.0)).baseline_alpha == 1.0
    narrow = SearchSpace(params=[FloatParam(name="lr", low=1e-3, high=1e-1, log=True)])
    assert TuningOverride(space=narrow).apply(cfg).baseline is None
    assert TuningOverride(baseline_alpha=0.2).apply(cfg).baseline_alpha == 0.2
    with pytest.raises(ValidationError, match=r"baseline: lr=0\.5 is outside"):
        TuningConfig(baseline={**BASELINE, "lr": 0.5})
