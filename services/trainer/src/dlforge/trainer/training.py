"""The training loop over cached activations: one process, or one rank of a data-parallel group.

``fit`` is the same code on every rank; a :class:`Collective` hides what differs between running
alone, under DDP and under Horovod (wrapping the model/optimizer, agreeing on "go on").
Rank 0 evaluates on the validation split after each epoch and tells its :class:`FitListener`, whose
answer (go on, or stop: e.g. the trial was pruned) every rank follows.

What the loss sees (each behind :class:`TrainParams` or :class:`TrainData`, see :func:`weighted_loss`):
class weights (``class_weighting``), a weight per row (``TrainData.train_w``: the confidence of an
auto-label, 1 for a person's), optionally soft targets (``TrainData.train_soft``: measured by
benchmarks/trainer_learning.py, not used by the pipeline), and one of the row's cached views per epoch
(``TrainData.train_views``).
With ``patience`` > 0 training stops when validation has not improved for that many epochs, and the
tail ends with the weights of its best epoch (highest val accuracy; lower val loss breaks ties).
``max_seconds`` caps the time: no epoch starts that would end past it (by the mean epoch time so far).
With ``ema_decay`` > 0 an exponential moving average of the weights (:class:`WeightAverage`) follows the
steps; validation, early stopping's best weights and the tail at the end are the averaged weights.

Resuming: after every epoch but the last, and at every checkpoint step inside an epoch, rank 0
hands a :class:`FitState` (the tail's, the optimizer's and the learning-rate schedule's state, the
epochs so far, the position in the current epoch, early stopping's best epoch and weights, the time
spent) to ``on_state``; ``fit(..., resume=state)`` goes on from there. Nothing else is needed to
train the same steps an uninterrupted run would:

* an epoch's order is one global permutation of the train rows (from the seed and the epoch) and its
  views are drawn from the seed and the epoch; global step ``j`` of an epoch trains the rows at
  positions ``[j * batch_size, (j + 1) * batch_size)`` of that order, rank ``r`` of ``world`` the
  ``r``-th of every ``world`` of them. The position is counted in samples, so a run resumes on
  another number of workers at the same place of the same order;
* the loss of a step is normalized by the weights of the whole global batch (every rank has every
  row's label and weight, so this needs no communication), so the averaged gradient is the
  single-process gradient of that batch whatever the number of workers; the ranks' parts of the
  loss are summed where they are read (logged steps, checkpoint steps, the epoch's end);
* the torch RNG (dropout) is seeded at every step from the seed, the global step and the rank, so a
  resumed run draws the masks the interrupted one would have drawn.

Devices: :func:`resolve_device` turns the setting (``auto | cpu | cuda``) into the device a process
trains on, failing with what is missing when ``cuda`` is asked for and absent. On CUDA the forward
pass and the loss run under ``torch.autocast`` (float16) with a ``GradScaler`` (:class:`Precision`);
on the CPU both are off and the loop is the float32 loop it always was.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from dlforge.common.errors import ConfigError
from dlforge.common.packed import pack_bools
from dlforge.trainer.params import DeviceName, EpochMetrics, EvalSummary, TrainParams
from dlforge.trainer.stages import Tail

DEVICES: tuple[DeviceName, ...] = ("auto", "cpu", "cuda")


def resolve_device(requested: str, *, local_rank: int = 0, cuda_available: bool | None = None) -> torch.device:
    """The device a training process uses: ``auto`` -> ``cuda:<local_rank>`` when CUDA has a GPU, else the CPU.

    ``cuda`` without a usable GPU raises :class:`ConfigError` saying so (``cuda_available`` defaults to
    ``torch.cuda.is_available()``).
    """
    if requested not in DEVICES:
        raise ConfigError(f"DLFORGE_TRAINER_DEVICE: {requested!r} is not one of {', '.join(DEVICES)}")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "cuda" and not available:
        raise ConfigError("DLFORGE_TRAINER_DEVICE=cuda, but torch sees no CUDA device (torch.cuda.is_available() "
                          f"is False; torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}): "
                          "install a CUDA build of torch and the NVIDIA driver, or set the device to auto or cpu")
    if requested == "cpu" or not available:
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def workers_device(requested: str, workers: int, *, cuda_count: int | None = None) -> str:
    """``cuda`` or ``cpu``: where ``workers`` data-parallel processes on one machine train (one GPU each).

    ``auto`` uses CUDA only when there is a GPU per worker; ``cuda`` with fewer GPUs than workers raises
    :class:`ConfigError`.
    """
    resolve_device(requested, cuda_available=None if cuda_count is None else cuda_count > 0)
    count = (torch.cuda.device_count() if torch.cuda.is_available() else 0) if cuda_count is None else cuda_count
    if requested == "cpu" or count == 0:
        return "cpu"
    if count >= workers:
        return "cuda"
    if requested == "cuda":
        raise ConfigError(f"DLFORGE_TRAINER_DEVICE=cuda: {workers} workers need one GPU each, this machine has "
                          f"{count}; train on at most {count} workers or set the device to auto")
    return "cpu"


class Precision:
    """Mixed precision of the training step: float16 autocast and a ``GradScaler`` on CUDA, off on the CPU.

    Off, :meth:`autocast` is a null context and the scaler is disabled (``scale`` returns the loss,
    ``step`` calls ``optimizer.step()``), so a CPU run computes exactly the float32 steps.
    """

    def __init__(self, device: torch.device, *, enabled: bool | None = None) -> None:
        self.device = device
        self.enabled = device.type == "cuda" if enabled is None else enabled
        if self.enabled and device.type != "cuda":
            raise ConfigError(f"mixed precision (float16 autocast, GradScaler) is for CUDA, not {device}")
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.enabled)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.float16)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()`` and ``optimizer.step()``, through the scaler when it is on."""
        if not self.enabled:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()


@dataclass
class TrainData:
    """Cached activations (float16 or float32) and class indices of the train and val rows.

    ``train_w``: a loss weight per train row (None: all 1). ``train_soft``: per train row, the probability its
    target puts on its label ``train_y`` (the rest shared evenly among the other classes; None: all 1, one-hot
    targets). ``train_views``: the train rows under other
    label-preserving views (same row order as ``train_x``); each epoch a row is seen under one view
    (the identity included) drawn uniformly. ``val_views``: the val rows under the same views (for
    checking them and test-time averaging; training does not read them).
    """

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    classes: list[str]
    train_w: np.ndarray | None = None
    train_soft: np.ndarray | None = None
    train_views: list[np.ndarray] = field(default_factory=list)
    val_views: dict[str, np.ndarray] = field(default_factory=dict)  # val rows under the other views, by name

    def __post_init__(self) -> None:
        if self.train_w is not None and len(self.train_w) != len(self.train_y):
            raise ValueError(f"train_w has {len(self.train_w)} rows, train_y {len(self.train_y)}")
        if self.train_soft is not None:
            soft = np.asarray(self.train_soft)
            if soft.ndim != 1 or len(soft) != len(self.train_y):
                raise ValueError(f"train_soft must be one probability per train row: shape {soft.shape}, "
                                 f"{len(self.train_y)} rows")
            if not (np.isfinite(soft).all() and (soft >= 0).all() and (soft <= 1).all()):
                raise ValueError("train_soft must lie in [0, 1]")
        for v in self.train_views:
            if v.shape != self.train_x.shape:
                raise ValueError(f"a train view has shape {v.shape}, train_x {self.train_x.shape}")


@dataclass
class FitResult:
    epochs: list[EpochMetrics] = field(default_factory=list)
    steps: int = 0
    stopped: bool = False  # the listener said stop (pruned, cancelled), possibly after the last epoch
    diverged: bool = False
    seconds: float = 0.0
    early_stopped: bool = False  # validation did not improve for ``patience`` epochs
    out_of_time: bool = False  # another epoch would have passed ``max_seconds``
    best_epoch: int = 0  # with patience: the epoch whose weights the tail holds at the end (0: the last)
    device: str = "cpu"  # where rank 0 trained: cpu | cuda
    amp: bool = False  # float16 autocast with a GradScaler


@dataclass
class FitState:
    """Where a run stood after ``epoch`` whole epochs and ``position`` samples of the next one (0: at the
    epoch's end): enough to train on as if it had not stopped."""

    epoch: int
    steps: int
    tail: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    epochs: list[EpochMetrics]
    elapsed: float
    best: EpochMetrics | None = None
    best_state: dict[str, torch.Tensor] | None = None
    scheduler: dict[str, Any] | None = None
    position: int = 0  # samples of epoch ``epoch + 1`` already trained
    loss_sum: float = 0.0  # that partial epoch's sum of (batch loss x batch rows)
    seconds: float = 0.0  # that partial epoch's training time so far
    scaler: dict[str, Any] | None = None  # the GradScaler's state (CUDA mixed precision)
    average: dict[str, Any] | None = None  # the weight average's state (``ema_decay`` > 0)

    def to_dict(self) -> dict[str, Any]:
        """A ``torch.save``-able form (the metrics as plain dicts)."""
        return {"epoch": self.epoch, "steps": self.steps, "tail": self.tail, "optimizer": self.optimizer,
                "epochs": [m.model_dump() for m in self.epochs], "elapsed": self.elapsed,
                "best": self.best.model_dump() if self.best else None, "best_state": self.best_state,
                "scheduler": self.scheduler, "position": self.position, "loss_sum": self.loss_sum,
                "seconds": self.seconds, "scaler": self.scaler, "average": self.average}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FitState:
        best = raw.get("best")
        return cls(epoch=int(raw["epoch"]), steps=int(raw["steps"]), tail=raw["tail"], optimizer=raw["optimizer"],
                   epochs=[EpochMetrics.model_validate(m) for m in raw["epochs"]],
                   elapsed=float(raw["elapsed"]), best=EpochMetrics.model_validate(best) if best else None,
                   best_state=raw.get("best_state"), scheduler=raw.get("scheduler"),
                   position=int(raw.get("position", 0)), loss_sum=float(raw.get("loss_sum", 0.0)),
                   seconds=float(raw.get("seconds", 0.0)), scaler=raw.get("scaler"), average=raw.get("average"))


StateHook = Callable[[FitState], None]


class FitListener(Protocol):
    """What rank 0 tells the outside world while training."""

    def on_step(self, step: int, loss: float) -> None:
        """A training loss (every ``summary_every_steps`` steps)."""

    def on_epoch(self, metrics: EpochMetrics) -> bool:
        """An epoch's metrics; return False to stop training (pruned, diverged, cancelled)."""

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        """Time to save a checkpoint; ``state`` is the tail's state dict, or None if the caller's tail is live."""


class Collective:
    """Single-process behaviour; subclasses implement the data-parallel engines."""

    rank: int = 0
    world: int = 1

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        return optimizer

    def agree(self, go_on: bool) -> bool:
        """Rank 0's decision, on every rank."""
        return go_on

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks."""
        return values


def param_groups(tail: nn.Module, hp: TrainParams) -> list[dict[str, Any]]:
    """The trainable parameters of ``tail``: the head's at ``hp.lr``, the backbone stages' at ``lr * body_lr_scale``.

    ``tail`` is a :class:`Tail` (``body``: the unfrozen stages, ``dropout``, ``head``); any other module is
    one group at ``lr``. Groups without a trainable parameter are left out.
    """
    trainable = [p for p in tail.parameters() if p.requires_grad]
    if not isinstance(tail, Tail) or hp.body_lr_scale == 1.0:
        return [{"params": trainable}]
    in_body = {id(p) for p in tail.body.parameters()}
    groups: list[dict[str, Any]] = [
        {"params": [p for p in trainable if id(p) not in in_body]},
        {"params": [p for p in trainable if id(p) in in_body], "lr": hp.lr * hp.body_lr_scale}]
    return [g for g in groups if g["params"]]


def make_optimizer(params: Any, hp: TrainParams) -> torch.optim.Optimizer:
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=False)
    betas = (hp.momentum, 0.999)
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, betas=betas, weight_decay=hp.weight_decay)
    return torch.optim.AdamW(params, lr=hp.lr, betas=betas, weight_decay=hp.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, hp: TrainParams, total_steps: int,
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of ``hp.lr_schedule`` over ``total_steps`` optimizer steps."""
    if hp.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def epoch_order(n_rows: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order in which ``epoch`` visits the train rows: one permutation for every number of workers."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n_rows, generator=g).numpy()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of global step ``step`` on ``rank`` (dropout masks follow the step, not the process)."""
    return ((seed * 1_000_003 + step) * 1024 + rank) % (2**63 - 1)


def _seed_step(seed: int, device: torch.device) -> None:
    """Seed the generator dropout draws from on ``device`` (``torch.manual_seed`` costs ~100 us a call: it
    seeds every device type)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
    torch.default_generator.manual_seed(seed)


def class_weights(y: np.ndarray, n_classes: int, mode: str, row_weights: np.ndarray | None = None,
                  ) -> torch.Tensor | None:
    """Inverse-frequency weights ``n / (k * count_c)`` (absent classes get weight 0), or None.

    With ``row_weights`` the counts are weighted (``count_c = sum of the row weights of class c``,
    ``n`` their total): a row that weighs nothing in the loss does not count towards its class.
    """
    if mode == "none" or len(y) == 0:
        return None
    counts = np.bincount(y, weights=row_weights, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def weighted_loss(logits: torch.Tensor, y: torch.Tensor, *, class_weight: torch.Tensor | None = None,
                  row_weight: torch.Tensor | None = None, row_soft: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy weighted per row by ``class_weight[y_i] * row_weight_i``, normalized by the weights' sum.

    ``sum_i c_{y_i} w_i CE_i / sum_i c_{y_i} w_i`` -- with ``row_weight`` None this is exactly
    ``nn.CrossEntropyLoss(weight=class_weight)``; a batch whose weights are all 0 has loss 0. ``row_soft``:
    soft targets, see :func:`weighted_sums`.
    """
    weighted, total = weighted_sums(logits, y, class_weight=class_weight, row_weight=row_weight, row_soft=row_soft)
    return weighted / total.clamp_min(torch.finfo(logits.dtype).tiny) if float(total) > 0 else weighted * 0.0


def weighted_sums(logits: torch.Tensor, y: torch.Tensor, *, class_weight: torch.Tensor | None = None,
                  row_weight: torch.Tensor | None = None,
                  row_soft: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``sum_i c_{y_i} w_i CE_i``, ``sum_i c_{y_i} w_i``): :func:`weighted_loss` is their ratio.

    ``row_soft``: row ``i``'s target puts ``s_i`` on ``y_i`` and ``(1 - s_i) / (K - 1)`` on each other class,
    so ``CE_i = -s_i log p_{y_i} - (1 - s_i) / (K - 1) sum_{k != y_i} log p_k``.
    """
    if row_soft is None:
        ce = nn.functional.cross_entropy(logits, y, reduction="none")
    else:
        logp = nn.functional.log_softmax(logits.float(), dim=1)
        own = -logp.gather(1, y[:, None])[:, 0]
        others = (-logp.sum(1) - own) / max(logits.shape[1] - 1, 1)
        ce = row_soft * own + (1.0 - row_soft) * others
    w = torch.ones_like(ce)
    if class_weight is not None:
        w = w * class_weight[y]
    if row_weight is not None:
        w = w * row_weight
    return (w * ce).sum(), w.sum()


def _weights_of(rows: np.ndarray, y: np.ndarray, class_weight: np.ndarray | None,
                row_weights: np.ndarray | None) -> np.ndarray:
    """The loss weight ``c_{y_i} w_i`` of each of ``rows`` (as :func:`weighted_sums` weighs them)."""
    w = np.ones(len(rows), dtype=np.float64)
    if class_weight is not None:
        w = w * class_weight[np.asarray(y[rows], dtype=np.int64)]
    if row_weights is not None:
        w = w * row_weights[rows]
    return w


class EarlyStopping:
    """Tracks the best epoch (highest val accuracy; lower val loss breaks a tie) and when to stop.

    ``update`` returns True when ``patience`` epochs have passed since the best one.
    """

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.best: EpochMetrics | None = None

    def improves(self, metrics: EpochMetrics) -> bool:
        best = self.best
        if not math.isfinite(metrics.val_accuracy):
            return False
        if best is None or not math.isfinite(best.val_accuracy) or metrics.val_accuracy > best.val_accuracy:
            return True
        return metrics.val_accuracy == best.val_accuracy and metrics.val_loss < best.val_loss

    def update(self, metrics: EpochMetrics) -> bool:
        """Record an epoch; True: stop now."""
        if self.improves(metrics):
            self.best = metrics
            return False
        return self.best is not None and metrics.epoch - self.best.epoch >= self.patience


def view_choice(n_rows: int, n_views: int, *, seed: int, epoch: int) -> np.ndarray:
    """The view (0: identity, k: ``train_views[k - 1]``) of each train row in ``epoch``; the same on every rank."""
    if n_views <= 1:
        return np.zeros(n_rows, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).integers(0, n_views, size=n_rows)


def stratified_sample(labels: np.ndarray, fraction: float, *, seed: int) -> np.ndarray:
    """Sorted row indices: ``fraction`` of each class (at least one row of every present class).

    The same ``seed`` gives the same subset, so every trial of a study sees the same representative data.
    """
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = max(1, round(len(rows) * fraction))
        chosen.append(rng.choice(rows, size=k, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def stratified_split(labels: np.ndarray, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) row indices with ``fraction`` of each class held out (classes of >= 2 rows)."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) >= 2:
            held.append(rng.choice(rows, size=max(1, round(len(rows) * fraction)), replace=False))
    held_out = np.sort(np.concatenate(held)) if held else np.arange(0)
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    return kept, held_out


def _rows(data: TrainData, idx: np.ndarray, views: np.ndarray) -> np.ndarray:
    """Train rows ``idx`` (sorted), each under its view, as float32."""
    if not data.train_views:
        return np.asarray(data.train_x[idx], dtype=np.float32)
    out = np.empty((len(idx), *data.train_x.shape[1:]), dtype=np.float32)
    sources = [data.train_x, *data.train_views]
    chosen = views[idx]
    for k in np.unique(chosen):
        mask = chosen == k
        out[mask] = sources[k][idx[mask]]
    return out


def float_batches(x: np.ndarray, size: int) -> Iterator[torch.Tensor]:
    """``x`` (float16 or float32 rows, possibly memory-mapped) as float32 tensors of ``size`` rows."""
    for lo in range(0, len(x), size):
        yield torch.from_numpy(np.asarray(x[lo:lo + size], dtype=np.float32))


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, classes: list[str], *, split: str = "val",
             batch_size: int = 256, device: torch.device | None = None, per_item: bool = False) -> EvalSummary:
    """Mean cross-entropy, accuracy, per-class recall and the confusion matrix of ``model`` on ``x``; with
    ``per_item`` also which rows it predicted right (``EvalSummary.correct``)."""
    device = device or torch.device("cpu")
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    right: list[np.ndarray] = []
    loss_sum = 0.0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for lo, xb in zip(range(0, len(x), batch_size), float_batches(x, batch_size), strict=True):
            yb = torch.from_numpy(np.array(y[lo:lo + batch_size], dtype=np.int64))  # a copy: y may be read-only
            logits = model(xb.to(device)).float().cpu()
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            pred = logits.argmax(1).numpy()
            np.add.at(confusion, (yb.numpy(), pred), 1)
            right.append(pred == yb.numpy())
    model.train(was_training)
    n = int(confusion.sum())
    support = confusion.sum(1)
    recall = {c: float(confusion[i, i] / support[i]) if support[i] else float("nan") for i, c in enumerate(classes)}
    return EvalSummary(
        split=split,
        count=n,
        loss=loss_sum / n if n else float("nan"),
        accuracy=float(np.trace(confusion) / n) if n else float("nan"),
        recall=recall,
        confusion=confusion.tolist(),
        correct=pack_bools(np.concatenate(right) if right else np.zeros(0, dtype=bool)) if per_item else None,
    )


class WeightAverage:
    """An exponential moving average of a tail's trainable parameters.

    After the ``n``-th update the average moves towards the weights by ``1 - d`` with
    ``d = min(decay, (1 + n) / (10 + n))`` (the warm-up of TensorFlow's ``ExponentialMovingAverage``), so
    the first epochs' average is not held back by the pretrained start. Buffers (batch norm's statistics,
    frozen while training: :func:`_freeze_batchnorm_statistics`) and frozen parameters are the tail's own,
    as in ``torch.optim.swa_utils.AveragedModel``. Every optimizer step is an update, also one that a
    mixed-precision scaler skipped (the weights did not move, the average moves towards them all the same).
    """

    def __init__(self, tail: nn.Module, decay: float, state: dict[str, Any] | None = None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        if state is not None:
            self.updates = int(state["updates"])
            self.shadow = {k: v.detach().clone().to(self._device(tail)) for k, v in state["shadow"].items()}
        else:
            self.updates = 0
            self.shadow = {k: p.detach().clone() for k, p in tail.named_parameters() if p.requires_grad}

    @staticmethod
    def _device(tail: nn.Module) -> torch.device:
        return next((p.device for p in tail.parameters()), torch.device("cpu"))

    @torch.no_grad()
    def update(self, tail: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in tail.named_parameters():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(p.detach(), alpha=1.0 - d)

    def averaged_state(self, tail: nn.Module) -> dict[str, torch.Tensor]:
        """The tail's state dict with the averaged tensors in place of the trained ones (copies)."""
        return {k: self.shadow.get(k, v).detach().clone() for k, v in tail.state_dict().items()}

    @contextlib.contextmanager
    def applied(self, tail: nn.Module) -> Iterator[None]:
        """The averaged weights in ``tail`` inside the block, the trained ones again after it."""
        trained = {k: v.detach().clone() for k, v in tail.state_dict().items()}
        tail.load_state_dict(self.averaged_state(tail))
        try:
            yield
        finally:
            tail.load_state_dict(trained)

    def state(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": {k: v.detach().cpu().clone() for k, v in self.shadow.items()}}


def _freeze_batchnorm_statistics(model: nn.Module) -> None:
    """Batch norm layers normalize with their running statistics and only learn their affine part.

    The usual fine-tuning practice (e.g. Keras' EfficientNet guide): with small batches and few steps,
    re-estimating the statistics hurts far more than it helps.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def fit(
    tail: nn.Module,
    data: TrainData,
    hp: TrainParams,
    *,
    listener: FitListener,
    collective: Collective | None = None,
    checkpoint_every_steps: int = 0,
    summary_every_steps: int = 10,
    device: torch.device | None = None,
    resume: FitState | None = None,
    on_state: StateHook | None = None,
    amp: bool | None = None,
) -> FitResult:
    """Train ``tail`` on ``data`` for ``hp.epochs`` epochs (or until the listener says stop, early stopping, time).

    With ``resume`` training goes on from the state's epoch and position; ``on_state`` (rank 0) receives
    the state after each epoch that is followed by another and at each checkpoint step inside an epoch
    (see the module docstring).

    ``hp.batch_size`` is global: each of ``world`` ranks takes every ``world``-th row of a step's batch, so
    a run has the same ``ceil(rows / batch_size)`` optimizer steps per epoch whatever the number of workers. With
    ``hp.patience`` > 0, rank 0 keeps a copy of the best epoch's weights and loads it at the end.

    ``device`` (default: the CPU) is where the tail trains; ``amp`` (default: on for CUDA, off for the
    CPU) runs the step in float16 autocast with a gradient scaler (see :class:`Precision`).
    """
    coll = collective or Collective()
    device = device or torch.device("cpu")
    precision = Precision(device, enabled=amp)
    torch.manual_seed(hp.seed)
    tail = tail.to(device)
    if resume is not None:
        tail.load_state_dict(resume.tail)  # before wrapping: DDP broadcasts rank 0's weights when it wraps
    model = coll.wrap_model(tail)
    base_optimizer = make_optimizer(param_groups(tail, hp), hp)
    n_rows = len(data.train_y)
    scheduler = make_scheduler(base_optimizer, hp, hp.epochs * math.ceil(n_rows / hp.batch_size))
    if resume is not None:  # after the schedule is made: making it resets the optimizer's learning rates
        base_optimizer.load_state_dict(resume.optimizer)
        if resume.scheduler is not None:
            scheduler.load_state_dict(resume.scheduler)
        if resume.scaler is not None and precision.enabled:
            precision.scaler.load_state_dict(resume.scaler)
    optimizer = coll.wrap_optimizer(base_optimizer, tail)
    average = WeightAverage(tail, hp.ema_decay, resume.average if resume is not None else None) \
        if hp.ema_decay else None
    row_weights = None if data.train_w is None else np.asarray(data.train_w, dtype=np.float32)
    row_soft = None if data.train_soft is None else np.asarray(data.train_soft, dtype=np.float32)
    weights = class_weights(data.train_y, len(data.classes), hp.class_weighting, row_weights)
    class_weight = weights.to(device) if weights is not None else None
    class_weight_np = weights.numpy().astype(np.float64) if weights is not None else None
    n_views = 1 + len(data.train_views)
    stopping = EarlyStopping(hp.patience) if hp.patience else None
    best_state: dict[str, torch.Tensor] | None = None
    result = FitResult(device=device.type, amp=precision.enabled)
    started = time.perf_counter()
    first, position, loss_sum, seconds_before = 1, 0, 0.0, 0.0
    if resume is not None:
        first, position = resume.epoch + 1, resume.position
        loss_sum = resume.loss_sum if coll.rank == 0 else 0.0  # the ranks' parts are summed at the epoch's end
        seconds_before = resume.seconds
        result.epochs = list(resume.epochs)
        result.steps = resume.steps
        started -= resume.elapsed
        if stopping is not None:
            stopping.best = resume.best
        best_state = resume.best_state

    def state(epoch_done: int, at: int, partial_loss: float, partial_seconds: float) -> FitState:
        return FitState(
            epoch=epoch_done, steps=result.steps,
            tail={k: v.detach().cpu().clone() for k, v in tail.state_dict().items()},
            optimizer=copy.deepcopy(base_optimizer.state_dict()), scheduler=scheduler.state_dict(),
            epochs=list(result.epochs), elapsed=time.perf_counter() - started,
            best=stopping.best if stopping is not None else None,
            best_state={k: v.cpu() for k, v in best_state.items()} if best_state is not None else None,
            position=at, loss_sum=partial_loss, seconds=partial_seconds,
            scaler=precision.scaler.state_dict() if precision.enabled else None,
            average=average.state() if average is not None else None,
        )

    for epoch in range(first, hp.epochs + 1):
        order = epoch_order(n_rows, seed=hp.seed, epoch=epoch)
        views = view_choice(n_rows, n_views, seed=hp.seed, epoch=epoch)
        model.train()
        _freeze_batchnorm_statistics(tail)
        t0 = time.perf_counter() - seconds_before
        for lo in range(position, n_rows, hp.batch_size):
            block = order[lo:lo + hp.batch_size]
            idx = np.sort(block[coll.rank::coll.world])  # sorted: contiguous reads from the memory-mapped cache
            _seed_step(step_seed(hp.seed, result.steps, coll.rank), device)
            xb = torch.from_numpy(_rows(data, idx, views)).to(device)
            yb = torch.from_numpy(data.train_y[idx].astype(np.int64)).to(device)
            wb = None if row_weights is None else torch.from_numpy(row_weights[idx]).to(device)
            sb = None if row_soft is None else torch.from_numpy(row_soft[idx]).to(device)
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                weighted, _ = weighted_sums(model(xb), yb, class_weight=class_weight, row_weight=wb, row_soft=sb)
            # every rank knows the whole batch's rows, so its weight needs no communication; DDP averages the
            # ranks' gradients, so each rank's share of the batch's loss is scaled by the world
            block_weight = float(_weights_of(block, data.train_y, class_weight_np, row_weights).sum())
            share = float(weighted.detach()) / block_weight if block_weight > 0 else 0.0
            loss = weighted * (coll.world / block_weight) if block_weight > 0 else weighted * 0.0
            precision.backward_step(loss, optimizer)
            scheduler.step()
            if average is not None:  # on every rank: their weights are the same after each step
                average.update(tail)
            result.steps += 1
            loss_sum += share * len(block)  # this rank's part; the ranks' parts are summed when they are read
            position = lo + len(block)
            if result.steps % summary_every_steps == 0:  # the same steps on every rank (a collective)
                value = coll.sum([share])[0]
                if coll.rank == 0:
                    listener.on_step(result.steps, value)
            if checkpoint_every_steps and result.steps % checkpoint_every_steps == 0:
                partial = coll.sum([loss_sum])[0] if position < n_rows else 0.0
                if coll.rank == 0:  # the checkpoint holds what validates (the average, when there is one)
                    with average.applied(tail) if average is not None else contextlib.nullcontext():
                        listener.on_checkpoint(result.steps, epoch, None)
                    if on_state is not None and position < n_rows:
                        on_state(state(epoch - 1, position, partial, time.perf_counter() - t0))
        seconds = time.perf_counter() - t0
        loss_sum = coll.sum([loss_sum])[0]
        go_on = True
        if coll.rank == 0:
            train_loss = loss_sum / max(n_rows, 1)
            with average.applied(tail) if average is not None else contextlib.nullcontext():
                val = evaluate(tail, data.val_x, data.val_y, data.classes, device=device)
            metrics = EpochMetrics(
                epoch=epoch,
                steps=result.steps,
                train_loss=train_loss,
                val_loss=val.loss,
                val_accuracy=val.accuracy,
                val_recall=val.recall,
                seconds=seconds,
                images_per_second=n_rows / seconds if seconds > 0 else 0.0,
            )
            result.epochs.append(metrics)
            if not math.isfinite(train_loss):
                result.diverged = True
            go_on = listener.on_epoch(metrics) and not result.diverged
            if stopping is not None and go_on:
                result.early_stopped = stopping.update(metrics)
                if stopping.best is metrics:
                    best_state = average.averaged_state(tail) if average is not None else \
                        {k: v.detach().clone() for k, v in tail.state_dict().items()}
            if hp.max_seconds and go_on and epoch < hp.epochs:
                elapsed = time.perf_counter() - started
                result.out_of_time = elapsed + (elapsed / epoch) > hp.max_seconds
        finished = result.early_stopped or result.out_of_time
        go_on = coll.agree(go_on and not finished)
        diverged_here = not math.isfinite(loss_sum)
        position, loss_sum, seconds_before = 0, 0.0, 0.0
        if go_on and on_state is not None and coll.rank == 0 and epoch < hp.epochs:
            on_state(state(epoch, 0, 0.0, 0.0))
        if not go_on:
            result.stopped = not finished
            result.diverged = result.diverged or (coll.rank != 0 and diverged_here)
            break
    if coll.rank == 0 and stopping is not None and stopping.best is not None and best_state is not None \
            and not result.diverged:
        tail.load_state_dict(best_state)
        result.best_epoch = stopping.best.epoch
    elif coll.rank == 0 and average is not None and not result.diverged:
        tail.load_state_dict(average.averaged_state(tail))
    result.seconds = time.perf_counter() - started
    return result
