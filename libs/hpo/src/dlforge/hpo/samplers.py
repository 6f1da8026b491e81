"""A basin-hopping sampler for Optuna: local moves around the chain's current point, occasional jumps, Metropolis.

Each trial the sampler proposes is, with probability ``jump_probability``, a *jump*: a uniform draw from
the whole space; otherwise a *local move*: the current point perturbed by a Gaussian of standard
deviation ``step_size`` in the unit cube (log-scaled for log parameters), each categorical changed to
another choice with probability ``categorical_change``. When a proposal has finished it is accepted as
the new current point if it is better, or, if worse by ``delta``, with the Metropolis probability
``exp(-delta / (temperature * spread))``, ``spread`` being the standard deviation of the values so far
(so the temperature is in units of the objective's own scale). Pruned and failed proposals are rejected.
The chain starts at the best of the first trials (``n_startup_trials`` random ones, or enqueued ones).

The tuner rebuilds its sampler for every event, so nothing lives in the sampler object: each trial it
proposes carries, in its system attributes, the trial it moved from and the chain's state when it was
asked (the current trial and the proposals already decided), and the next ask continues from there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

PARENT = "dlforge.basin.parent"  # the trial a proposal moved from (absent: not the chain's proposal)
JUMP = "dlforge.basin.jump"
CURRENT = "dlforge.basin.current"  # the chain's current trial when this trial was asked
DECIDED = "dlforge.basin.decided"  # the proposals decided by then (accepted or rejected)


def _unit_of(dist: FloatDistribution | IntDistribution, value: float) -> float:
    low, high = float(dist.low), float(dist.high)
    if dist.log:
        return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return (value - low) / (high - low)


def _value_of(dist: FloatDistribution | IntDistribution, u: float) -> float | int:
    """The value at position ``u`` of the unit interval, on the distribution's grid and inside its bounds."""
    u = min(1.0, max(0.0, u))
    low, high = float(dist.low), float(dist.high)
    raw = math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if dist.log else low + u * (high - low)
    if isinstance(dist, IntDistribution):
        s = int(dist.step or 1)
        last = int(dist.low) + (int(dist.high) - int(dist.low)) // s * s
        return int(min(last, max(int(dist.low), int(dist.low) + round((raw - low) / s) * s)))
    if dist.step is not None:
        fs = float(dist.step)
        top = low + math.floor((high - low) / fs + 1e-9) * fs
        return float(min(top, max(low, low + round((raw - low) / fs) * fs)))
    return float(min(high, max(low, raw)))


class BasinHoppingSampler(optuna.samplers.BaseSampler):
    """Basin hopping over an Optuna search space (floats, log floats, stepped floats, ints, categoricals)."""

    def __init__(self, *, seed: int | None = None, n_startup_trials: int = 5, step_size: float = 0.1,
                 jump_probability: float = 0.2, temperature: float = 0.5, categorical_change: float = 0.2) -> None:
        if not 0.0 < step_size <= 1.0:
            raise ValueError(f"step_size must be in (0, 1], got {step_size}")
        for name, p in (("jump_probability", jump_probability), ("categorical_change", categorical_change)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if temperature < 0 or n_startup_trials < 0:
            raise ValueError("temperature and n_startup_trials must be >= 0")
        self._rng = np.random.default_rng(seed)
        self._random = optuna.samplers.RandomSampler(seed=None if seed is None else seed + 1)
        self.n_startup_trials = n_startup_trials
        self.step_size = step_size
        self.jump_probability = jump_probability
        self.temperature = temperature
        self.categorical_change = categorical_change
        self._space = optuna.search_space.IntersectionSearchSpace()

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()
        self._random.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {name: dist for name, dist in self._space.calculate(study).items() if not dist.single()}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    # -- the chain ------------------------------------------------------------------------------------

    def _better(self, study: optuna.Study, a: float, b: float) -> bool:
        return a > b if study.direction == StudyDirection.MAXIMIZE else a < b

    def _accept(self, study: optuna.Study, proposal: FrozenTrial, current: FrozenTrial, spread: float) -> bool:
        if proposal.state != TrialState.COMPLETE or proposal.value is None or not math.isfinite(proposal.value):
            return False
        assert current.value is not None
        if not self._better(study, current.value, proposal.value):
            return True  # at least as good
        if self.temperature == 0:
            return False
        delta = abs(proposal.value - current.value)
        return bool(self._rng.random() < math.exp(-delta / (self.temperature * spread)))

    def current(self, study: optuna.Study, trials: list[FrozenTrial]) -> tuple[FrozenTrial | None, list[int]]:
        """The chain's current trial after deciding every finished proposal, and the proposals decided."""
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
                    and math.isfinite(t.value)]
        if not complete:
            return None, []
        by_number = {t.number: t for t in trials}
        last = max((t for t in trials if CURRENT in t.system_attrs), key=lambda t: t.number, default=None)
        if last is None:  # the chain starts at the best trial so far
            pick = max if study.direction == StudyDirection.MAXIMIZE else min
            start = pick(complete, key=lambda t: (t.value, -t.number) if pick is max else (t.value, t.number))
            return start, []
        current = by_number[int(last.system_attrs[CURRENT])]
        decided = list(last.system_attrs.get(DECIDED, []))
        seen = set(decided)
        values = [float(t.value) for t in complete if t.value is not None]
        spread = float(np.std(values)) or 1.0
        for t in sorted(trials, key=lambda t: t.number):
            if PARENT in t.system_attrs and t.state.is_finished() and t.number not in seen:
                if self._accept(study, t, current, spread):
                    current = t
                decided.append(t.number)
        return current, decided

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space or "fixed_params" in trial.system_attrs:
            return {}  # nothing known yet, or an enqueued trial
        trials = study.get_trials(deepcopy=False)
        n_complete = sum(1 for t in trials if t.state == TrialState.COMPLETE)
        if n_complete < self.n_startup_trials:
            return {}
        current, decided = self.current(study, trials)
        if current is None:
            return {}
        jump = bool(self._rng.random() < self.jump_probability)
        params = {}
        for name, dist in search_space.items():
            params[name] = self._draw(dist) if jump or name not in current.params else \
                self._move(dist, current.params[name])
        storage = study._storage
        storage.set_trial_system_attr(trial._trial_id, PARENT, current.number)
        storage.set_trial_system_attr(trial._trial_id, JUMP, jump)
        storage.set_trial_system_attr(trial._trial_id, CURRENT, current.number)
        storage.set_trial_system_attr(trial._trial_id, DECIDED, decided)
        return params

    def _draw(self, dist: BaseDistribution) -> Any:
        if isinstance(dist, CategoricalDistribution):
            return dist.choices[int(self._rng.integers(len(dist.choices)))]
        assert isinstance(dist, FloatDistribution | IntDistribution)
        return _value_of(dist, float(self._rng.random()))

    def _move(self, dist: BaseDistribution, value: Any) -> Any:
        if isinstance(dist, CategoricalDistribution):
            if len(dist.choices) > 1 and self._rng.random() < self.categorical_change:
                others = [c for c in dist.choices if c != value]
                return others[int(self._rng.integers(len(others)))]
            return value
        assert isinstance(dist, FloatDistribution | IntDistribution)
        u = _unit_of(dist, value) + float(self._rng.normal(0.0, self.step_size))
        u = -u if u < 0 else (2.0 - u if u > 1 else u)  # reflected at the bounds
        return _value_of(dist, u)
