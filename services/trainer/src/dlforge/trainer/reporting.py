"""Reporting a trial's intermediate values to its Optuna study and asking the study's pruner.

The study's storage and its pruner (a description the tuner stores in the study) are opened and
built as the tuner does, by :mod:`dlforge.hpo`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna

from dlforge.common.errors import InvalidInput, PoisonMessage, RetryableError
from dlforge.hpo import PRUNER_ATTR, open_storage
from dlforge.hpo import build_pruner as _build_pruner

log = logging.getLogger(__name__)


def build_pruner(spec: dict[str, Any] | None) -> optuna.pruners.BasePruner:
    """The study's pruner from its stored description; a bad description is a PoisonMessage here."""
    try:
        return _build_pruner(spec)
    except InvalidInput as exc:
        raise PoisonMessage(str(exc)) from exc


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
