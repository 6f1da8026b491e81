"""The trainer's vocabulary: hyperparameters, run configuration, per-epoch metrics."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

OptimizerName = Literal["sgd", "adam", "adamw"]
DeviceName = Literal["auto", "cpu", "cuda"]


class TrainParams(BaseModel):
    """Hyperparameters of one training run (what the tuner searches over)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(default=1e-3, gt=0.0, le=10.0, description="learning rate")
    batch_size: int = Field(default=32, ge=1, le=4096, description="global batch size (split over the workers)")
    optimizer: OptimizerName = "adam"
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD momentum / Adam beta1")
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0, description="dropout before the head")
    unfreeze: int = Field(default=0, ge=0, le=64, description="backbone stages to train (0: head only)")
    body_lr_scale: float = Field(
        default=0.1, gt=0.0, le=1.0, description="learning rate of the unfrozen backbone stages as a share of lr "
        "(the new head's): pretrained units take smaller steps than a head trained from scratch")
    epochs: int = Field(default=3, ge=1, le=1000)
    class_weighting: Literal["none", "balanced"] = Field(
        default="balanced", description="'balanced' weighs the loss by inverse class frequency"
    )
    patience: int = Field(
        default=0, ge=0, le=1000, description="early stopping: stop after this many epochs without a better val "
        "accuracy and keep the best epoch's weights (0: train every epoch, keep the last)",
    )
    max_seconds: float = Field(
        default=0.0, ge=0.0, le=7 * 24 * 3600.0,
        description="time cap: no epoch is started that would end after this many seconds of training (judged "
        "by the last epoch's time; 0: no cap, at most a week). With patience, the best epoch's weights stay",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="'cosine': the learning rate falls from lr to 0 along a half cosine over "
        "every step of the run (stepped once per optimizer step)")
    ema_decay: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="an exponential moving average of the weights, updated after every "
        "optimizer step with this decay (warmed up as min(decay, (1 + n) / (10 + n)) after n steps): validation, "
        "early stopping and the final tail use the averaged weights (0: off, the weights as trained)")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class RunOptions(BaseModel):
    """How a run executes (not what it learns)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    no_of_workers: int = Field(default=1, ge=1, le=64, description="data-parallel training processes")
    checkpoint_every_steps: int = Field(default=0, ge=0, le=1_000_000, description="0: only the final model is saved")
    summary_every_steps: int = Field(default=10, ge=1, le=1_000_000, description="TensorBoard step-loss interval")
    engine: Literal["ddp", "horovod"] = "ddp"
    input_size: int | None = Field(default=None, ge=16, le=1024, description="default: the network's input size")


class EpochMetrics(BaseModel):
    """What rank 0 reports after each epoch."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(description="1-based")
    steps: int = Field(description="optimizer steps so far")
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_recall: dict[str, float] = Field(description="per-class recall on the validation split")
    seconds: float = Field(description="wall time of the epoch's training part")
    images_per_second: float = Field(description="training throughput over all workers")


class EvalSummary(BaseModel):
    """Loss, accuracy and per-class recall on one split."""

    model_config = ConfigDict(extra="forbid")

    split: str
    count: int
    loss: float
    accuracy: float
    recall: dict[str, float]
    confusion: list[list[int]] = Field(description="rows: true class, columns: predicted class")
    correct: str | None = Field(default=None, description="which items were predicted right, in the split's order "
                                "(dlforge.common.packed; None: not kept)")
