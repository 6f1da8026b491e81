"""The search space is data, validated when it is built."""

from __future__ import annotations

import optuna
import pytest
from pydantic import ValidationError

from dlforge.tuner.space import CategoricalParam, FloatParam, IntParam, SearchSpace, default_space


def test_default_space_maps_to_optuna_distributions() -> None:
    dists = default_space().distributions()
    assert set(dists) == {"lr", "momentum", "weight_decay", "dropout", "unfreeze", "batch_size", "optimizer"}
    assert isinstance(dists["lr"], optuna.distributions.FloatDistribution) and dists["lr"].log
    assert isinstance(dists["unfreeze"], optuna.distributions.IntDistribution)
    assert (dists["unfreeze"].low, dists["unfreeze"].high) == (0, 3)
    assert dists["optimizer"].choices == ("sgd", "adam", "adamw")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FloatParam(name="lr", low=0.1, high=0.01), "must be below high"),
        (lambda: FloatParam(name="lr", low=0.0, high=1.0, log=True), "needs low > 0"),
        (lambda: FloatParam(name="lr", low=1e-3, high=1.0, log=True, step=0.1), "cannot be combined"),
        (lambda: FloatParam(name="x", low=0.0, high=1.0, step=2.0), "larger than the range"),
        (lambda: FloatParam(name="x", low=0.0, high=float("inf")), "finite"),
        (lambda: IntParam(name="n", low=3, high=3), "must be below high"),
        (lambda: IntParam(name="n", low=0, high=8, log=True), "needs low >= 1"),
        (lambda: IntParam(name="n", low=1, high=8, log=True, step=2), "needs step 1"),
        (lambda: CategoricalParam(name="o", choices=[]), "at least 1"),
        (lambda: CategoricalParam(name="o", choices=["sgd", "sgd"]), "unique"),
        (lambda: FloatParam(name="bad name", low=0, high=1), "identifier"),
        (lambda: SearchSpace(params=[IntParam(name="a", low=0, high=1), IntParam(name="a", low=0, high=2)]),
         "duplicate parameter names"),
    ],
)
def test_bad_ranges_are_refused_with_a_message(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError, match=message):
        make()


def test_space_round_trips_as_json_and_checks_assignments() -> None:
    space = default_space()
    again = SearchSpace.model_validate_json(space.model_dump_json())
    assert again == space
    ok = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "dropout": 0.2, "unfreeze": 1, "batch_size": 32,
          "optimizer": "adam"}
    assert space.problems(ok) == []
    problems = space.problems({**ok, "lr": 5.0, "unfreeze": 1.5, "extra": 1})
    assert any("lr=5.0" in p for p in problems)
    assert any("unfreeze=1.5" in p for p in problems)
    assert any("extra is not a parameter" in p for p in problems)


def test_an_assignment_must_lie_on_a_steps_grid_and_a_boolean_is_not_a_number() -> None:
    space = SearchSpace(params=[FloatParam(name="x", low=0.0, high=1.0, step=0.25),
                                IntParam(name="n", low=2, high=10, step=4),
                                CategoricalParam(name="c", choices=[0, 1]),
                                CategoricalParam(name="flag", choices=[True, False])])
    assert space.problems({"x": 0.75, "n": 6, "c": 1, "flag": True}) == []
    assert space.problems({"x": 0.5, "n": 10, "c": 0, "flag": False}) == []
    assert space.problems({"x": 0.3, "n": 4, "c": True, "flag": 1}) == [
        "x=0.3 is not on the grid 0.0 + k * 0.25", "n=4 is not on the grid 2 + k * 4",
        "c=True is not one of [0, 1]", "flag=1 is not one of [True, False]"]
