"""Reporting a trial's intermediate values to its Optuna study and asking the study's pruner.

Optuna does not persist a study's pruner, so the tuner stores a description of it in the study's
user attribute ``dlforge.pruner``: ``{"factory": "optuna.pruners.MedianPruner", "kwargs": {...}}``
(a nested ``{"factory": ...}`` in the kwargs builds a wrapped pruner). Only factories from
``optuna.pruners`` are accepted.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import warnings
from typing import Any

import optuna

from dlforge.common.errors import PoisonMessage, RetryableError

log = logging.getLogger(__name__)

PRUNER_ATTR = "dlforge.pruner"
_ALLOWED = "optuna.pruners."
_STORAGES: dict[str, optuna.storages.BaseStorage] = {}
_LOCK = threading.Lock()


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """One RDB storage per URL and process (SQLite gets a generous lock timeout)."""
    with _LOCK:
        storage = _STORAGES.get(url)
        if storage is None:
            kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
            try:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            except Exception as exc:  # the driver's own errors: unreachable server, bad URL
                raise RetryableError(f"cannot open the Optuna storage {url!r}: {exc}") from exc
            _STORAGES[url] = storage
        return storage


def build_pruner(spec: dict[str, Any] | None) -> optuna.pruners.BasePruner:
    """The pruner a ``{"factory": ..., "kwargs": ...}`` description names (NopPruner for None)."""
    if not spec:
        return optuna.pruners.NopPruner()
    factory = str(spec.get("factory", ""))
    if not factory.startswith(_ALLOWED):
        raise PoisonMessage(f"pruner factory {factory!r} is not in {_ALLOWED}*")
    module, _, name = factory.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if cls is None:
        raise PoisonMessage(f"no pruner {factory!r} in this Optuna version ({optuna.__version__})")
    kwargs = {k: build_pruner(v) if isinstance(v, dict) and "factory" in v else v
              for k, v in dict(spec.get("kwargs", {})).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        pruner: optuna.pruners.BasePruner = cls(**kwargs)
    return pruner


class TrialReporter:
    """One trial of a stored study, as the worker that trains it sees it."""

    def __init__(self, storage_url: str, study_name: str, trial_number: int) -> None:
        self.storage = open_storage(storage_url)
        try:
            study_id = self.storage.get_study_id_from_name(study_name)
            self.trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial_number)
        except KeyError as exc:
            raise PoisonMessage(f"study {study_name!r} has no trial {trial_number}: {exc}") from exc
        pruner = build_pruner(self.storage.get_study_user_attrs(study_id).get(PRUNER_ATTR))
        self.study = optuna.load_study(study_name=study_name, storage=self.storage, pruner=pruner)
        self.trial = optuna.trial.Trial(self.study, self.trial_id)
        self.intermediate: list[float] = []

    def is_finished(self) -> bool:
        return self.storage.get_trial(self.trial_id).state.is_finished()

    def report(self, value: float, step: int) -> bool:
        """Record ``value`` at ``step``; False if the pruner says stop (or the trial was already told)."""
        self.intermediate.append(value)
        if self.is_finished():
            log.warning("trial %d is already finished; stopping its training", self.trial.number)
            return False
        if not math.isfinite(value):
            return False
        self.trial.report(value, step)
        return not self.trial.should_prune()


class DetachedReporter:
    """Stands in when the study's storage cannot be reached from here: no pruning, values still collected.

    The intermediate values travel in ``hpo.trial.completed`` and the tuner records them when it tells
    the study, so the study stays complete; only the early stop is lost.
    """

    def __init__(self) -> None:
        self.intermediate: list[float] = []

    def is_finished(self) -> bool:
        return False

    def report(self, value: float, step: int) -> bool:
        self.intermediate.append(value)
        return math.isfinite(value)


def connect(storage_url: str, study_name: str, trial_number: int) -> TrialReporter | DetachedReporter:
    """A reporter on the study, or a detached one (with a warning) if the storage or the trial is not there."""
    try:
        return TrialReporter(storage_url, study_name, trial_number)
    except (PoisonMessage, RetryableError) as exc:
        log.warning("cannot report trial %d of %s to %s (%s): training without pruning", trial_number, study_name,
                    storage_url, exc)
        return DetachedReporter()
