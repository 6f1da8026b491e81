"""The search space as data: float, int and categorical parameters with bounds, log scale and steps.

The seeds' three kinds of hyperparameter (double, integer, categorical) map to Optuna distributions.
A space is validated when it is built, so a bad range is refused with a message before any trial.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

Choice = str | int | float | bool


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(max_length=64)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"parameter name {v!r} must be an identifier")
        return v


class FloatParam(_Param):
    """A real parameter in ``[low, high]``, optionally log-uniform or on a grid of ``step``."""

    kind: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False
    step: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _bounds(self) -> FloatParam:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"{self.name}: bounds must be finite")
        if self.low >= self.high:
            raise ValueError(f"{self.name}: low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"{self.name}: a log-scale range needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError(f"{self.name}: log scale and step cannot be combined")
        if self.step is not None and self.step > self.high - self.low:
            raise ValueError(f"{self.name}: step {self.step} is larger than the range {self.high - self.low}")
        return self

    def distribution(self) -> optuna.distributions.BaseDistribution:
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def check(self, value: Any) -> str | None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and self.low <= value <= self.high
        if not ok:
            return f"{self.name}={value!r} is outside [{self.low}, {self.high}]"
        if self.step is not None:
            k = (value - self.low) / self.step
            if abs(k - round(k)) > 1e-6:
                return f"{self.name}={value!r} is not on the grid {self.low} + k * {self.step}"
        return None


class IntParam(_Param):
    """An integer parameter in ``[low, high]`` with ``step``, optionally log-uniform."""

    kind: Literal["int"] = "int"
    low: int
    high: int
    step: int = Field(default=1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> IntParam:
        if self.low >= self.high:
            raise ValueError(f"{self.name}: low ({self.low}) must be below high ({self.high})")
        if self.log and self.low < 1:
            raise ValueError(f"{self.name}: a log-scale range needs low >= 1 (got {self.low})")
        if self.log and self.step != 1:
            raise ValueError(f"{self.name}: log scale needs step 1")
        if self.step > self.high - self.low:
            raise ValueError(f"{self.name}: step {self.step} is larger than the range {self.high - self.low}")
        return self

    def distribution(self) -> optuna.distributions.BaseDistribution:
        return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def check(self, value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high
        if not ok:
            return f"{self.name}={value!r} is not an integer in [{self.low}, {self.high}]"
        if (value - self.low) % self.step:
            return f"{self.name}={value!r} is not on the grid {self.low} + k * {self.step}"
        return None


class CategoricalParam(_Param):
    """One of ``choices`` (strings, numbers or booleans)."""

    kind: Literal["categorical"] = "categorical"
    choices: list[Choice] = Field(min_length=1, max_length=256)

    @field_validator("choices")
    @classmethod
    def _unique(cls, v: list[Choice]) -> list[Choice]:
        if len({(type(c), c) for c in v}) != len(v):
            raise ValueError(f"choices must be unique, got {v}")
        return v

    def distribution(self) -> optuna.distributions.BaseDistribution:
        return optuna.distributions.CategoricalDistribution(tuple(self.choices))

    def check(self, value: Any) -> str | None:
        # a boolean matches only a boolean (True == 1 in Python, but not as a choice)
        ok = any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices)
        return None if ok else f"{self.name}={value!r} is not one of {self.choices}"


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="kind")]


class SearchSpace(BaseModel):
    """The parameters a study searches over (names must be unique)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: list[Param] = Field(min_length=1, max_length=64)

    @field_validator("params")
    @classmethod
    def _unique_names(cls, v: list[Param]) -> list[Param]:
        names = [p.name for p in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate parameter names: {dupes}")
        return v

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {p.name: p.distribution() for p in self.params}

    def problems(self, values: dict[str, Any]) -> list[str]:
        """What is wrong with a full assignment ``values`` (empty when it lies in the space)."""
        by_name = {p.name: p for p in self.params}
        out = [f"{k} is not a parameter of the space" for k in values if k not in by_name]
        out += [f"{name} is missing" for name in by_name if name not in values]
        out += [msg for name, p in by_name.items() if name in values and (msg := p.check(values[name]))]
        return out


def default_space() -> SearchSpace:
    """Learning rate, momentum, weight decay, dropout, unfrozen stages, batch size and optimizer."""
    return SearchSpace(params=[
        FloatParam(name="lr", low=1e-4, high=1e-1, log=True),
        FloatParam(name="momentum", low=0.5, high=0.99),
        FloatParam(name="weight_decay", low=1e-6, high=1e-2, log=True),
        FloatParam(name="dropout", low=0.0, high=0.5),
        IntParam(name="unfreeze", low=0, high=3),
        CategoricalParam(name="batch_size", choices=[16, 32, 64]),
        CategoricalParam(name="optimizer", choices=["sgd", "adam", "adamw"]),
    ])
