"""The seeds' stop rule (TrendPruner) on hand-made learning curves whose answer is worked out by hand."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from dlforge.common.errors import InvalidInput
from dlforge.hpo import build_pruner
from dlforge.hpo.pruners import TrendPruner

STEPS = range(1, 6)


def loss(base: float, step: int) -> float:
    """A converging loss curve: ``base + 1/step``."""
    return base + 1.0 / step


def study_with_ten_finished_curves(direction: str = "minimize") -> optuna.Study:
    """Ten finished trials, losses ``0.1*i + 1/step`` (i = 0..9); as accuracies ``1 - loss`` when maximizing."""
    study = optuna.create_study(direction=direction)
    for i in range(10):
        curve = {s: loss(0.1 * i, s) for s in STEPS}
        if direction == "maximize":
            curve = {s: 1.0 - v for s, v in curve.items()}
        study.add_trial(create_trial(state=TrialState.COMPLETE if i % 2 else TrialState.PRUNED,
                                     value=curve[5], intermediate_values=curve))
    return study


def running(curve: dict[int, float]) -> optuna.trial.FrozenTrial:
    trial = create_trial(state=TrialState.COMPLETE, value=0.0, intermediate_values=curve)
    return trial  # number -1: not one of the study's trials


def decisions(pruner: TrendPruner, study: optuna.Study, values: list[float]) -> list[bool]:
    """The pruner's answer after each epoch of a curve reported one epoch at a time."""
    return [pruner.prune(study, running({s + 1: v for s, v in enumerate(values[:n])})) for n in range(1, 6)]


# Converging: 0.02 + 1/step, better than all ten at every epoch. Diverging: the same for three epochs,
# then 0.6 and 1.0. With ten others the top 20 % are the best two (i = 0, 1): the bar is trial 1's statistic.
CONVERGING = [loss(0.02, s) for s in STEPS]
DIVERGING = [*CONVERGING[:3], 0.6, 1.0]


def test_mean_rule_fires_on_the_diverging_curve_at_the_epoch_it_turns_and_never_on_the_converging_one() -> None:
    # epoch 4, window 3: diverging mean = (0.52 + 0.35333 + 0.6) / 3 = 0.49111;
    # trial 1's mean = 0.1 + (1/2 + 1/3 + 1/4) / 3 = 0.46111 -> 0.49111 > 0.46111: prune.
    # Epochs 1-3: the diverging curve equals the converging one, which is 0.08 below trial 1's at every epoch.
    pruner = TrendPruner(window=3, statistic="mean", min_trials=3)
    study = study_with_ten_finished_curves()
    assert decisions(pruner, study, CONVERGING) == [False] * 5
    assert decisions(pruner, study, DIVERGING) == [False, False, False, True, True]


def test_trend_rule_projects_the_line_through_the_last_epochs() -> None:
    # epoch 4: line through (2, 0.52), (3, 0.35333), (4, 0.6): slope 0.04, at 4: 0.49111 + 0.04 = 0.53111.
    # trial 1: line through (2, 0.6), (3, 0.43333), (4, 0.35): slope -0.125, at 4: 0.46111 - 0.125 = 0.33611.
    pruner = TrendPruner(window=3, statistic="trend", min_trials=3)
    study = study_with_ten_finished_curves()
    assert pruner.statistic_at(dict(enumerate(DIVERGING, start=1)), 4) == pytest.approx(0.531111, abs=1e-5)
    assert decisions(pruner, study, CONVERGING) == [False] * 5
    assert decisions(pruner, study, DIVERGING) == [False, False, False, True, True]


def test_only_the_top_fifth_passes() -> None:
    # With ten others the bar is the second best (base 0.1): a curve of base 0.05 passes, one of base 0.15
    # (third of eleven) does not, at every epoch, although it is better than the median.
    pruner = TrendPruner(window=2, min_trials=3)
    study = study_with_ten_finished_curves()
    assert decisions(pruner, study, [loss(0.05, s) for s in STEPS]) == [False] * 5
    assert decisions(pruner, study, [loss(0.15, s) for s in STEPS]) == [True] * 5
    loose = TrendPruner(window=2, min_trials=3, top_fraction=0.5)  # bar: the fifth best (base 0.4)
    assert decisions(loose, study, [loss(0.15, s) for s in STEPS]) == [False] * 5


def test_maximizing_accuracy_is_the_mirror_image() -> None:
    pruner = TrendPruner(window=3, min_trials=3)
    study = study_with_ten_finished_curves("maximize")
    assert decisions(pruner, study, [1.0 - v for v in CONVERGING]) == [False] * 5
    assert decisions(pruner, study, [1.0 - v for v in DIVERGING]) == [False, False, False, True, True]


def test_too_few_finished_trials_or_warmup_never_prune_and_nan_always_does() -> None:
    study = optuna.create_study(direction="minimize")
    for i in range(2):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.1,
                                     intermediate_values={s: loss(0.1 * i, s) for s in STEPS}))
    assert decisions(TrendPruner(min_trials=3), study, DIVERGING) == [False] * 5
    assert decisions(TrendPruner(min_trials=2), study, DIVERGING)[3]
    assert decisions(TrendPruner(min_trials=2, warmup_steps=5), study, DIVERGING) == [False] * 4 + [True]
    assert TrendPruner(min_trials=2).prune(study, running({1: float("nan")}))


def test_it_is_built_from_a_stored_description_and_bad_kwargs_are_refused() -> None:
    pruner = build_pruner({"factory": "dlforge.hpo.pruners.TrendPruner",
                           "kwargs": {"statistic": "trend", "window": 4, "horizon": 2}})
    assert isinstance(pruner, TrendPruner) and pruner.horizon == 2
    with pytest.raises(InvalidInput, match="bad kwargs"):
        build_pruner({"factory": "dlforge.hpo.pruners.TrendPruner", "kwargs": {"top_fraction": 0}})
    with pytest.raises(InvalidInput, match="no pruner"):
        build_pruner({"factory": "dlforge.hpo.pruners.np"})  # a name in the module that is not a pruner
