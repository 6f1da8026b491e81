"""What a training job is made of: the Estimator (model + data), HParams and RunConfig.

All three validate on construction and say what is wrong; names from the Brightics notebooks that
dlforge does not support (``no_of_ps``, ``iterations``, ...) are refused with what to use instead.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dlforge.common.events import TRAIN_PARAMS_LEGACY_VALUES, UniqueClasses

# Seed-notebook names that have no meaning here, and what to say about them.
_UNSUPPORTED_HPARAMS = {
    "iterations": "dlforge counts training in epochs: use HParams(epochs=...)",
    "learning_rate": "use HParams(lr=...)",
}
_UNSUPPORTED_RUN = {
    "no_of_ps": "parameter servers are not used: dlforge trains data-parallel with all-reduce (DDP or Horovod); "
                "set RunConfig(no_of_workers=N)",
    "use_gpu": "GPUs are used automatically (NCCL) when the trainer has one per worker",
}


def _refuse(values: Any, table: dict[str, str], owner: str) -> Any:
    if isinstance(values, dict):
        for name, why in table.items():
            if name in values:
                raise ValueError(f"{owner} has no {name!r}: {why}")
    return values


class Estimator(BaseModel):
    """The model to start from and the data to train on.

    The model is a checkpoint in the object store (``weights_key``, e.g. a candidate of the proposer's
    repository), a model the trainer trained before (``model_id``) or just an architecture with its
    pretrained weights (``arch``). The data is a dlforge manifest (``manifest_key``) with train/val/test
    splits, as the labeler and augmenter write it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest_key: str = Field(min_length=1)
    classes: UniqueClasses = Field(min_length=2)
    arch: str | None = None
    weights_key: str | None = None
    model_id: str | None = None
    sample_fraction: float = Field(default=1.0, gt=0.0, le=1.0, description="stratified share of the train split")

    @model_validator(mode="after")
    def _one_model_source(self) -> Estimator:
        if self.weights_key is not None and self.model_id is not None:
            raise ValueError("give weights_key or model_id, not both")
        if self.weights_key is None and self.model_id is None and self.arch is None:
            raise ValueError("say which model to train: weights_key, model_id or arch")
        return self


class HParams(BaseModel):
    """Hyperparameters (the same names and ranges as the trainer's and the tuner's search space)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    batch_size: int = Field(default=32, ge=1, le=4096, description="global: split over the workers")
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    unfreeze: int = Field(default=0, ge=0, le=64, description="backbone stages to train; 0 trains the head only")
    body_lr_scale: float = Field(default=0.1, gt=0.0, le=1.0,
                                 description="the unfrozen backbone stages' learning rate as a share of lr")
    epochs: int = Field(default=3, ge=1, le=1000)
    class_weighting: Literal["none", "balanced"] = "balanced"
    lr_schedule: Literal["constant", "cosine"] = Field(default="constant",
                                                      description="'cosine': lr falls to 0 over the run's steps")
    ema_decay: float = Field(default=0.0, ge=0.0, lt=1.0, description="an exponential moving average of the "
                             "weights with this decay is what validates and what is kept (0: off)")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _seed_names(cls, values: Any) -> Any:
        return _refuse(values, _UNSUPPORTED_HPARAMS, "HParams")


class RunConfig(BaseModel):
    """How the job runs: data-parallel workers, checkpoints, summaries."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    no_of_workers: int = Field(default=1, ge=1, le=64)
    checkpoint_every_steps: int = Field(default=0, ge=0, alias="checkpoint_frequency_in_steps",
                                        description="0: only the final model")
    summary_every_steps: int = Field(default=10, ge=1, alias="summary_save_frequency")
    engine: Literal["ddp", "horovod"] = "ddp"
    input_size: int | None = Field(default=None, ge=16, le=1024)
    run_eval: bool = Field(default=True, description="evaluate the final model on the test split")

    @model_validator(mode="before")
    @classmethod
    def _seed_names(cls, values: Any) -> Any:
        return _refuse(values, _UNSUPPORTED_RUN, "RunConfig")


def job_request(estimator: Estimator, hparams: HParams, run_config: RunConfig) -> dict[str, Any]:
    """The body of the trainer's ``POST /jobs`` (also what the in-process transport runs).

    A parameter added to the trainer after its first release is left out when its value both trains as the
    versions before it did (:data:`dlforge.common.events.TRAIN_PARAMS_LEGACY_VALUES`) and is the default (so
    the trainer fills in the same value): a trainer of an older version, which refuses a name it does not
    know, then still takes a job that does not use what was added since, and refuses one that does.
    """
    same = {k for k, v in TRAIN_PARAMS_LEGACY_VALUES.items()
            if getattr(hparams, k) == v == HParams.model_fields[k].default}
    body: dict[str, Any] = {
        "manifest_key": estimator.manifest_key,
        "classes": list(estimator.classes),
        "hparams": hparams.model_dump(exclude=same),
        "run_config": run_config.model_dump(exclude={"run_eval"}),
        "sample_fraction": estimator.sample_fraction,
        "evaluate_test": run_config.run_eval,
    }
    for name in ("arch", "weights_key", "model_id"):
        value = getattr(estimator, name)
        if value is not None:
            body[name] = value
    return body
