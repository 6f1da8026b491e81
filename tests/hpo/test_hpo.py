"""dlforge.hpo: the tuner's study storage and the stored pruner description."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from dlforge.common.errors import InvalidInput, RetryableError
from dlforge.hpo import build_pruner, open_storage


def test_nested_pruner_description_builds_the_wrapped_pruner() -> None:
    spec = {"factory": "optuna.pruners.PatientPruner",
            "kwargs": {"patience": 2, "wrapped_pruner": {"factory": "optuna.pruners.MedianPruner",
                                                         "kwargs": {"n_startup_trials": 3}}}}
    pruner = build_pruner(spec)
    assert isinstance(pruner, optuna.pruners.PatientPruner)
    assert isinstance(build_pruner(None), optuna.pruners.NopPruner)


@pytest.mark.parametrize(("spec", "says"), [
    ({"factory": "os.system", "kwargs": {"command": "true"}}, "is not in optuna.pruners"),
    ({"factory": "optuna.pruners.NoSuchPruner"}, "no pruner"),
    ({"factory": "optuna.pruners.MedianPruner", "kwargs": {"n_startup_trials": -1}}, "bad kwargs"),
    ({"factory": "optuna.pruners.MedianPruner", "kwargs": {"colour": "blue"}}, "bad kwargs"),
])
def test_bad_descriptions_are_refused_with_the_reason(spec: dict, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        build_pruner(spec)


def test_storage_is_one_per_url_and_an_unreachable_one_is_retryable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/study.db"
    assert open_storage(url) is open_storage(url)
    with pytest.raises(RetryableError, match="cannot open the Optuna storage"):
        open_storage(f"sqlite:///{tmp_path}/no/such/dir/study.db")
