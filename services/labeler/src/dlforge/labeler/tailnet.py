"""``finetune_top``: the ImageNet trunk's last units fine-tuned inside the loop on people's labels.

The ``linear`` plug-in fits a logistic regression on frozen EfficientNet-Lite0 features, so what the
trunk's top units pooled is the ceiling. This plug-in trains those units: a copy of the trunk's last
:data:`dlforge.vision.staged.SHARED_UNFREEZE` units (``block14``, ``block15`` and the 1x1 head conv of
EfficientNet-Lite0, then global average pooling) and a new linear layer, from the activation at
their input, which the labeler's embedding pass already stored in the feature store (the trunk's
*shared* boundary: :class:`dlforge.vision.trunk.TrunkFeatures` keeps it with every pass). No image
is decoded or run through the trunk again; a step costs the three units only.

Training: ``steps`` AdamW steps of ``batch`` labeled items drawn at random, the loss weighted by the
inverse class frequency (the units at ``lr``, the new layer at ten times it; the learning rate rises
linearly from 0 over the first tenth of the steps, then falls to 0 along a cosine), label smoothing
0.1, BatchNorm kept at ImageNet's statistics (the units train in eval mode: a few hundred labels
estimate them worse).

**Held-out evidence** as in :mod:`dlforge.labeler.pixelnet`: the labeled items are split into
``folds`` stratified folds and one network is trained per fold without that fold's labels; each
labeled item's held-out logits come from the network that never saw it, the temperature and per-class
bias are fitted on them (each row's own calibration without that row), and the other items get the
average of the fold networks' calibrated probabilities (an ensemble; the evidence the auto-label
threshold rests on understates it). With fewer than two labels in some class: one network, no
held-out evidence, nothing auto-labeled under the guarantee.

Cost: ``folds`` trainings of ``steps`` steps on ``threads`` torch threads per round, and one pass of
the units over every item per fold network; ``time_budget_s`` caps the trainings (each fold network an
equal share of what is left, at least a second, and never below ``min_steps`` steps; the pass over the
items to predict them comes on top). Measured in ``benchmarks/labeler.py --classifier finetune_top``
(see README, "Labels people can trust").
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from dlforge.labeler.classifier import (
    FittedClassifier,
    FoldEnsemble,
    Scaling,
    calibration_rows,
)

_CHUNK = 256  # activations through the units at once when predicting


def _tail_and_width(shape: tuple[int, ...]) -> tuple[Any, int]:
    """A trainable copy of the shared trunk's last units (with GAP) for activations of ``shape``
    (C x H x W) and the width of what they output."""
    import torch

    from dlforge.vision.staged import SHARED_UNFREEZE, imagenet_trunk

    trunk = imagenet_trunk()
    tail = copy.deepcopy(trunk.tail(trunk.boundary(SHARED_UNFREEZE))).eval()
    with torch.inference_mode():
        width = int(tail(torch.zeros(1, *shape)).shape[1])
    return tail, width


class _Net:
    """The units and the new layer, as one callable on float16 activations."""

    def __init__(self, tail: Any, head: Any) -> None:
        self.tail, self.head = tail, head

    def __call__(self, x: Any) -> Any:
        return self.head(self.tail(x))

    def parameters(self) -> list[Any]:
        return [*self.tail.parameters(), *self.head.parameters()]


def _logits(net: _Net, x: np.ndarray, *, threads: int) -> np.ndarray:
    import torch

    n_out = int(net.head.out_features)
    if len(x) == 0:
        return np.zeros((0, n_out))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net.tail.eval()
        out = []
        with torch.inference_mode():
            for s in range(0, len(x), _CHUNK):
                out.append(net(torch.from_numpy(np.asarray(x[s:s + _CHUNK], dtype=np.float32))).numpy())
        return np.concatenate(out).astype(np.float64)
    finally:
        torch.set_num_threads(previous)


@dataclass(kw_only=True)
class FittedTail(FoldEnsemble):
    """A fitted :class:`TailFinetune`: the fold networks on N x C x H x W activations, and their calibration."""

    def logits(self, net: Any, x: np.ndarray) -> np.ndarray:
        return _logits(net, x, threads=self.threads)


class TailFinetune:
    """The trunk's last units and a new layer, fine-tuned on people's labels (see the module docstring)."""

    name = "finetune_top"
    inputs = "activations"

    def __init__(self, *, steps: int = 450, batch: int = 32, lr: float = 1e-3, weight_decay: float = 1e-4,
                 label_smoothing: float = 0.1, folds: int = 3, threads: int = 2,
                 time_budget_s: float | None = None, min_steps: int = 100) -> None:
        if min(steps, batch, threads) < 1 or min_steps < 0 or folds < 2:
            raise ValueError("steps, batch, threads >= 1, min_steps >= 0, folds >= 2")
        if not lr > 0 or weight_decay < 0 or not 0 <= label_smoothing < 1:
            raise ValueError("lr > 0, weight_decay >= 0, 0 <= label_smoothing < 1")
        if time_budget_s is not None and time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be positive, got {time_budget_s}")
        self.steps, self.batch, self.lr, self.weight_decay = steps, batch, lr, weight_decay
        self.label_smoothing, self.folds, self.threads = label_smoothing, folds, threads
        self.time_budget_s, self.min_steps = time_budget_s, min_steps

    def fit(self, x_all: np.ndarray, labeled: np.ndarray, y: np.ndarray, *, n_classes: int,
            representative: np.ndarray | None = None, seed: int = 0) -> FittedClassifier:
        import torch

        if x_all.ndim != 4 or not np.issubdtype(x_all.dtype, np.floating):
            raise ValueError(f"finetune_top needs float N x C x H x W activations, got {x_all.dtype} {x_all.shape}")
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.random.fork_rng():
                return self._fit(x_all, labeled, y, n_classes=n_classes, representative=representative, seed=seed)
        finally:
            torch.set_num_threads(threads)

    def _train(self, x_all: np.ndarray, rows: np.ndarray, y: np.ndarray, n_out: int, *, seed: int,
               deadline: float | None) -> tuple[_Net, int]:
        import torch
        from torch import nn

        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        tail, width = _tail_and_width(tuple(x_all.shape[1:]))  # eval: BatchNorm keeps ImageNet's statistics
        head = nn.Linear(width, n_out)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        net = _Net(tail, head)
        counts = np.bincount(y, minlength=n_out).astype(np.float32)
        weight = torch.from_numpy(counts.sum() / np.maximum(counts, 1) / n_out)
        opt = torch.optim.AdamW([{"params": list(tail.parameters()), "lr": self.lr},
                                 {"params": list(head.parameters()), "lr": self.lr * 10}],
                                weight_decay=self.weight_decay)
        loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=self.label_smoothing)
        targets = torch.from_numpy(np.asarray(y, dtype=np.int64))
        x = x_all[rows]  # the fold's labeled activations, float16
        planned, started, step = self.steps, time.monotonic(), 0
        while step < planned:
            # a tenth of the planned steps rising linearly from 0, then a cosine down to 0
            frac = step / max(planned, 1)
            scale = frac / 0.1 if frac < 0.1 else 0.5 * (1 + math.cos(math.pi * (frac - 0.1) / 0.9))
            opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = self.lr * scale, self.lr * 10 * scale
            i = torch.randint(0, len(rows), (min(self.batch, len(rows)),), generator=g)
            batch = torch.from_numpy(np.asarray(x[i.numpy()], dtype=np.float32))
            loss = loss_fn(net(batch), targets[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if deadline is not None and step <= 20:
                elapsed = time.monotonic() - started
                fits = int((deadline - started) / max(elapsed / step, 1e-6))
                planned = max(step, min(self.steps, max(fits, self.min_steps))) if step == 20 or fits < 20 \
                    else self.steps
        return net, planned

    def _fit(self, x_all: np.ndarray, labeled: np.ndarray, y: np.ndarray, *, n_classes: int,
             representative: np.ndarray | None, seed: int) -> FittedClassifier:
        started = time.monotonic()
        labeled = np.asarray(labeled, dtype=np.int64)
        y = np.asarray(y, dtype=np.int64)
        present, counts = np.unique(y, return_counts=True)
        local = np.searchsorted(present, y)
        heldout = np.full((len(y), n_classes), np.nan)
        mask, rep = calibration_rows(representative, len(y))
        figures: dict[str, float | int | bool | str | None] = {
            "classifier": self.name, "activation_shape": "x".join(str(d) for d in x_all.shape[1:])}
        fitted = FittedTail(nets=[], present=present, scaling=Scaling(), n_classes=n_classes, calibrated=False,
                            heldout_proba=heldout, heldout_representative=rep, heldout_labels=y,
                            threads=self.threads, figures=figures)
        if len(present) < 2:
            return fitted
        k = int(min(self.folds, counts.min()))
        folds = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(labeled, local)) \
            if k >= 2 else [(np.arange(len(y)), np.zeros(0, dtype=np.int64))]
        oof = np.zeros((len(y), len(present)))
        steps_run = []
        for f, (tr, te) in enumerate(folds):
            deadline = None
            if self.time_budget_s is not None:
                share = (self.time_budget_s - (time.monotonic() - started)) / (len(folds) - f)
                deadline = time.monotonic() + max(share, 1.0)
            net, ran = self._train(x_all, labeled[tr], local[tr], len(present), seed=seed * 100 + f + 1,
                                   deadline=deadline)
            fitted.nets.append(net)
            fitted.model = fitted.nets
            steps_run.append(ran)
            if len(te):
                oof[te] = _logits(net, x_all[labeled[te]], threads=self.threads)
        figures.update({"fold_networks": len(folds), "steps": int(min(steps_run)),
                        "fit_seconds": round(time.monotonic() - started, 1)})
        if k >= 2:
            fitted.calibrate(oof, local, mask, seed=seed)
        return fitted
