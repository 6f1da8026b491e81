"""The seeds' stop rule as an Optuna pruner: a trial's recent curve against the best trials at the same epoch.

Seed 002's rule: stop a trial when a function of its recent epoch values (the mean of the last ``window``
values, or a straight line fitted to them and read at the current epoch, or ``horizon`` epochs ahead) is
worse than the top ``top_fraction`` (20 %) of the other trials' values at that epoch (the same function
of their curves). Smoothing over a
window keeps one noisy epoch from stopping a good trial; comparing with the top fifth rather than the
median stops more of the trials that will not win.

The rule works in either direction of the study: for a loss (minimize) "worse" is larger, for an
accuracy (maximize) it is smaller. It is built from a stored description like Optuna's own pruners
(``{"factory": "dlforge.hpo.pruners.TrendPruner", "kwargs": {...}}``, see :func:`dlforge.hpo.build_pruner`).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

Statistic = Literal["mean", "trend"]


class TrendPruner(optuna.pruners.BasePruner):
    """Prune when the trial's smoothed recent values are worse than the top ``top_fraction`` at that epoch.

    * The statistic of a curve at epoch ``e``, from its last ``window`` values at epochs ``<= e``:
      ``"mean"``, their mean; ``"trend"``, a least-squares line through them read ``horizon`` epochs
      after ``e`` (``horizon=0``: at ``e``).
    * The reference: the same statistic at the trial's last epoch for every finished (complete or
      pruned) trial other than this one that reported that epoch. Like is compared with like, so a
      window's lag (the mean of a falling loss is above its last value) does not count against the
      trial. The best ``ceil(top_fraction * n)`` of them (at least one) pass; the worst of those is the
      bar, and a trial whose statistic is worse than the bar is pruned.
    * Nothing is pruned while fewer than ``min_trials`` such trials exist, nor before epoch
      ``warmup_steps``; a trial whose statistic is NaN is pruned.
    """

    def __init__(self, *, top_fraction: float = 0.2, window: int = 3, statistic: Statistic = "mean",
                 horizon: int = 0, min_trials: int = 3, warmup_steps: int = 0) -> None:
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if statistic not in ("mean", "trend"):
            raise ValueError(f"statistic must be 'mean' or 'trend', got {statistic!r}")
        if statistic == "trend" and window < 2:
            raise ValueError("a trend needs window >= 2")
        if horizon < 0 or (horizon and statistic != "trend"):
            raise ValueError("horizon must be >= 0 and is only for statistic='trend'")
        if min_trials < 1 or warmup_steps < 0:
            raise ValueError("min_trials must be >= 1 and warmup_steps >= 0")
        self.top_fraction = top_fraction
        self.window = window
        self.statistic = statistic
        self.horizon = horizon
        self.min_trials = min_trials
        self.warmup_steps = warmup_steps

    def statistic_at(self, values: dict[int, float], step: int) -> float:
        """The curve's statistic at epoch ``step`` from its last ``window`` values up to it (NaN: none)."""
        steps = sorted(s for s in values if s <= step)[-self.window:]
        if not steps:
            return math.nan
        y = np.array([values[s] for s in steps], dtype=np.float64)
        if self.statistic == "mean" or len(steps) < 2:
            return float(y.mean())
        slope, intercept = np.polyfit(np.array(steps, dtype=np.float64), y, 1)
        return float(slope * (steps[-1] + self.horizon) + intercept)

    def bar(self, study: optuna.Study, trial: FrozenTrial, step: int) -> float | None:
        """The worst statistic among the best ``top_fraction`` of the other finished trials at ``step``."""
        others = [self.statistic_at(t.intermediate_values, step)
                  for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                  if t.number != trial.number and step in t.intermediate_values]
        others = [v for v in others if math.isfinite(v)]
        if len(others) < self.min_trials:
            return None
        best_first = sorted(others, reverse=study.direction == StudyDirection.MAXIMIZE)
        return best_first[max(1, math.ceil(self.top_fraction * len(best_first) - 1e-9)) - 1]

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.warmup_steps:
            return False
        value = self.statistic_at(trial.intermediate_values, step)
        if math.isnan(value):
            return True
        bar = self.bar(study, trial, step)
        if bar is None:
            return False
        return value < bar if study.direction == StudyDirection.MAXIMIZE else value > bar
