"""Samplers and pruners by name: the tuner's plug-in registries.

A sampler decides the next trial's parameters (Optuna's ``BaseSampler``: ``sample_relative`` /
``sample_independent``); a pruner decides whether a trial stops early (``BasePruner.prune``).
Both are chosen by name with keyword arguments from the fixed tables :data:`SAMPLERS` and
:data:`PRUNERS`. Optional dependencies (``cmaes``) are imported only when their sampler is chosen.

Optuna keeps neither in the storage, so a pruner is described as ``{"factory": "optuna.pruners.<Class>",
"kwargs": {...}}`` (or ``dlforge.hpo.pruners.<Class>``, the seeds' stop rule) and that description is
stored with the study (user attribute ``dlforge.pruner``): whichever tuner replica handles a trial's
report builds the same pruner from it. Nested
``{"factory": ...}`` values in the kwargs are built too (a wrapped pruner).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import optuna
from pydantic import BaseModel, ConfigDict, Field

from dlforge.common.backends import optional_import
from dlforge.common.errors import InvalidInput
from dlforge.hpo import build_pruner
from dlforge.hpo.samplers import BasinHoppingSampler


class PluginChoice(BaseModel):
    """A sampler or pruner: its registry name and keyword arguments (merged over the defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(max_length=64)
    kwargs: dict[str, Any] = Field(default_factory=dict, max_length=32)


SamplerFactory = Callable[[int | None, dict[str, Any], int], optuna.samplers.BaseSampler]
PrunerFactory = Callable[[dict[str, Any], int], dict[str, Any] | None]


def _tpe(seed: int | None, kwargs: dict[str, Any], startup: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(**{"n_startup_trials": startup, "multivariate": True, "seed": seed, **kwargs})


def _random(seed: int | None, kwargs: dict[str, Any], startup: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(**{"seed": seed, **kwargs})


def _gp(seed: int | None, kwargs: dict[str, Any], startup: int) -> optuna.samplers.BaseSampler:
    optional_import("scipy", install="pip install scipy", purpose="the gp sampler")
    return optuna.samplers.GPSampler(**{"n_startup_trials": startup, "seed": seed, **kwargs})


def _qmc(seed: int | None, kwargs: dict[str, Any], startup: int) -> optuna.samplers.BaseSampler:
    optional_import("scipy", install="pip install scipy", purpose="the qmc sampler")
    return optuna.samplers.QMCSampler(**{"seed": seed, **kwargs})


def _cmaes(seed: int | None, kwargs: dict[str, Any], startup: int) -> optuna.samplers.BaseSampler:
    optional_import("cmaes", install="pip install cmaes (or dlforge-tuner[cmaes])", purpose="the cmaes sampler")
    return optuna.samplers.CmaEsSampler(**{"n_startup_trials": startup, "seed": seed, **kwargs})


def _basin_hopping(seed: int | None, kwargs: dict[str, Any], startup: int) -> optuna.samplers.BaseSampler:
    try:
        return BasinHoppingSampler(**{"n_startup_trials": startup, "seed": seed, **kwargs})
    except ValueError as exc:
        raise InvalidInput(f"sampler 'basin_hopping': {exc}") from exc


SAMPLERS: dict[str, SamplerFactory] = {"tpe": _tpe, "random": _random, "gp": _gp, "qmc": _qmc, "cmaes": _cmaes,
                                       "basin_hopping": _basin_hopping}


def _spec(cls: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"factory": f"optuna.pruners.{cls}", "kwargs": kwargs}


def _median(kwargs: dict[str, Any], startup: int) -> dict[str, Any]:
    return _spec("MedianPruner", {"n_startup_trials": max(1, startup // 2), "n_warmup_steps": 0, **kwargs})


def _percentile(kwargs: dict[str, Any], startup: int) -> dict[str, Any]:
    return _spec("PercentilePruner", {"percentile": 25.0, "n_startup_trials": max(1, startup // 2),
                                      "n_warmup_steps": 0, **kwargs})


def _successive_halving(kwargs: dict[str, Any], startup: int) -> dict[str, Any]:
    return _spec("SuccessiveHalvingPruner", {"min_resource": 1, "reduction_factor": 2, **kwargs})


def _hyperband(kwargs: dict[str, Any], startup: int) -> dict[str, Any]:
    return _spec("HyperbandPruner", {"min_resource": 1, "reduction_factor": 2, **kwargs})


def _threshold(kwargs: dict[str, Any], startup: int) -> dict[str, Any]:
    if "lower" not in kwargs and "upper" not in kwargs:
        raise InvalidInput("the threshold pruner needs kwargs 'lower' and/or 'upper'")
    return _spec("ThresholdPruner", kwargs)


def _patient(kwargs: dict[str, Any], startup: int) -> dict[str, Any]:
    """The seeds' early-stopping rule: stop when the last ``patience`` epochs brought no improvement."""
    kwargs = dict(kwargs)
    wrapped = kwargs.pop("wrapped", "median")
    inner = pruner_spec(PluginChoice(name=str(wrapped)), startup=startup) if wrapped != "none" else None
    return _spec("PatientPruner", {"wrapped_pruner": inner, "patience": 1, **kwargs})


def _trend(kwargs: dict[str, Any], startup: int) -> dict[str, Any]:
    """The seeds' stop rule (:class:`dlforge.hpo.pruners.TrendPruner`): recent values vs the top 20 % at that epoch."""
    return {"factory": "dlforge.hpo.pruners.TrendPruner",
            "kwargs": {"top_fraction": 0.2, "window": 3, "statistic": "mean", "min_trials": max(2, startup),
                       **kwargs}}


def _none(kwargs: dict[str, Any], startup: int) -> dict[str, Any] | None:
    return None


PRUNERS: dict[str, PrunerFactory] = {
    "median": _median,
    "percentile": _percentile,
    "successive_halving": _successive_halving,
    "asha": _successive_halving,  # Optuna's SuccessiveHalvingPruner is the asynchronous variant (ASHA)
    "hyperband": _hyperband,
    "threshold": _threshold,
    "patient": _patient,
    "trend": _trend,
    "none": _none,
}


def make_sampler(choice: PluginChoice, *, seed: int | None, startup: int) -> optuna.samplers.BaseSampler:
    factory = SAMPLERS.get(choice.name)
    if factory is None:
        raise InvalidInput(f"unknown sampler {choice.name!r}; known: {', '.join(sorted(SAMPLERS))}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return factory(seed, dict(choice.kwargs), startup)
    except TypeError as exc:
        raise InvalidInput(f"sampler {choice.name!r}: bad kwargs {choice.kwargs}: {exc}") from exc


def pruner_spec(choice: PluginChoice, *, startup: int) -> dict[str, Any] | None:
    """The stored description of a pruner (validated by building it once)."""
    factory = PRUNERS.get(choice.name)
    if factory is None:
        raise InvalidInput(f"unknown pruner {choice.name!r}; known: {', '.join(sorted(PRUNERS))}")
    spec = factory(dict(choice.kwargs), startup)
    build_pruner(spec)
    return spec
