"""Short recovery of a pruned or factorized model: BatchNorm re-estimation, then distillation.

The compressed model (the student) learns to compute what the unpruned model (the teacher) computes
on the run's training images; no labels are needed, so every training image counts, and the student
is pulled toward the teacher's decisions (whose accuracy is the reference) rather than toward labels
that may be the labeler's own guesses. Steps:

1. optionally (``recalibrate_bn``), BatchNorm statistics re-estimated on the images: a cumulative
   average over one pass, no gradients;
2. distillation with Adam: KL divergence between temperature-softened logits plus, when the model
   has a ``feature_layer`` (the head's input: the pooled features), the mean squared error between the
   student's and teacher's features of that layer. BatchNorm layers stay in eval mode (small batches
   would make their batch statistics noisy). Bounded by ``seconds`` of wall time;
3. :func:`refit_head`: the linear head refitted in closed form (ridge regression of the teacher's
   logits on the student's features), one forward pass over the images. On a CPU a few seconds of
   distillation are a few dozen steps; the refit is what puts a linear head back on features that
   compression moved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class RecoveryReport:
    """How the recovery went: steps taken, images seen, the distillation loss at its start and end."""

    seconds: float
    bn_images: int
    steps: int
    images_seen: int
    loss_first: float | None
    loss_last: float | None
    stopped_by: str


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, *, batch: int = 32) -> int:
    """Re-estimate every BatchNorm's running mean/var on ``images`` (cumulative average); returns images used."""
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(images) == 0:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
        m.train()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            model(images[i:i + batch])
    for m, (momentum, training) in zip(bns, saved, strict=True):
        m.momentum = momentum
        m.train(training)
    return len(images)


def _feature_hook(model: nn.Module, name: str | None, store: dict[str, torch.Tensor]) -> object | None:
    if name is None:
        return None
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        return None

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        store["x"] = args[0]

    return layer.register_forward_pre_hook(hook)


@dataclass(frozen=True)
class TeacherTargets:
    """What the unpruned model computes on the recovery images: logits and the features its head reads."""

    logits: torch.Tensor
    features: torch.Tensor | None


def teacher_targets(teacher: nn.Module, images: np.ndarray, *, feature_layer: str | None = "head",
                    batch: int = 32) -> TeacherTargets:
    """The teacher's logits and ``feature_layer`` inputs for every image, computed once (shared by every
    compressed variant distilled from the same teacher on the same images)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    teacher.eval()
    store: dict[str, torch.Tensor] = {}
    handle = _feature_hook(teacher, feature_layer, store)
    logits, feats = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                logits.append(teacher(x[i:i + batch]))
                if "x" in store:
                    feats.append(store.pop("x").flatten(1))
    finally:
        if handle is not None:
            handle.remove()  # type: ignore[attr-defined]
    return TeacherTargets(torch.cat(logits), torch.cat(feats) if feats and len(feats) == len(logits) else None)


def distill(
    student: nn.Module,
    targets: TeacherTargets,
    images: np.ndarray,
    *,
    seconds: float,
    max_steps: int | None = None,
    batch: int = 16,
    lr: float = 1e-4,
    temperature: float = 2.0,
    feature_layer: str | None = "head",
    feature_weight: float = 1.0,  # weight of the feature MSE divided by the teacher features' mean square
    recalibrate_bn: bool = False,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> RecoveryReport:
    """Recover ``student`` in place toward the teacher's ``targets`` on ``images`` (float32 NCHW, normalized).

    Adam steps on random batches until ``seconds`` of
    wall time (checked before each step, so the overrun is at most one step) or ``max_steps``.
    ``recalibrate_bn`` re-estimates the student's BatchNorm statistics first; it is off by default
    because a pretrained teacher's statistics come from its pretraining data, and re-estimating them
    on the run's images moves even the untouched channels away from what the head was fitted on.
    ``feature_layer`` names the student's layer whose input is matched to ``targets.features``.
    Leaves the student in eval mode. ``clock`` tells the seconds (tests give one of their own).
    """
    import torch
    import torch.nn.functional as F

    started = clock()
    deadline = started + seconds
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    student.eval()
    bn_images = recalibrate_batchnorm(student, x_all) if recalibrate_bn and clock() < deadline else 0
    t_logits_all, t_feats_all = targets.logits, targets.features
    feature_power = float((t_feats_all ** 2).mean()) + 1e-12 if t_feats_all is not None else 1.0
    s_store: dict[str, torch.Tensor] = {}
    handle = _feature_hook(student, feature_layer, s_store) if t_feats_all is not None else None
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    steps = seen = 0
    first: float | None = None
    last: float | None = None
    stopped_by = "seconds"
    try:
        while True:
            if max_steps is not None and steps >= max_steps:
                stopped_by = "max_steps"
                break
            if clock() >= deadline or len(x_all) == 0:
                break
            idx = torch.from_numpy(rng.choice(len(x_all), size=min(batch, len(x_all)), replace=False))
            s_logits = student(x_all[idx])
            loss = F.kl_div(F.log_softmax(s_logits / temperature, 1),
                            F.softmax(t_logits_all[idx] / temperature, 1),
                            reduction="batchmean") * temperature ** 2
            if t_feats_all is not None and "x" in s_store and s_store["x"][0].numel() == t_feats_all.shape[1]:
                target = t_feats_all[idx]
                # relative to the features' power, so that the weight means the same for any layer's scale
                loss = loss + feature_weight * F.mse_loss(s_store.pop("x").flatten(1), target) / feature_power
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            value = float(loss.detach())
            first = value if first is None else first
            last = value
            steps += 1
            seen += len(idx)
    finally:
        if handle is not None:
            handle.remove()  # type: ignore[attr-defined]
        student.eval()
        for p in student.parameters():
            p.grad = None
    return RecoveryReport(clock() - started, bn_images, steps, seen, first, last, stopped_by)


@dataclass(frozen=True)
class HeadRefit:
    """The head refitted by ridge regression of the teacher's logits on the student's features."""

    images: int
    features: int
    ridge: float  # chosen ridge strength, relative to the mean feature power (0: the head was kept)
    holdout_agreement: float = 0.0  # argmax agreement with the teacher on the held-out share, at that ridge
    holdout_agreement_before: float = 0.0  # the same with the head as it was
    seconds: float = 0.0


def _features_and_logits(student: nn.Module, x: torch.Tensor, head: str,
                         *, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Student features (the ``head`` layer's input) and student logits, float64."""
    import torch

    store: dict[str, torch.Tensor] = {}
    handle = _feature_hook(student, head, store)
    if handle is None:
        raise ValueError(f"the student has no layer {head!r} to refit")
    feats, s_logits = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                s_logits.append(student(x[i:i + batch]).double().numpy())
                feats.append(store.pop("x").flatten(1).double().numpy())
    finally:
        handle.remove()  # type: ignore[attr-defined]
    return np.concatenate(feats), np.concatenate(s_logits)


def _ridge(f: np.ndarray, t: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """``W, b`` minimizing ``|f W + b - t|^2 + lam * mean(f^2) * d * |W|^2`` (closed form, centred)."""
    mu_f, mu_t = f.mean(0), t.mean(0)
    fc, tc = f - mu_f, t - mu_t
    d = f.shape[1]
    gram = fc.T @ fc
    reg = lam * float(np.trace(gram)) / d
    w = np.linalg.solve(gram + reg * np.eye(d), fc.T @ tc)
    return w, mu_t - mu_f @ w


def refit_head(
    student: nn.Module,
    targets: TeacherTargets,
    images: np.ndarray,
    *,
    head: str = "head",
    ridges: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
    holdout: float = 0.25,
    batch: int = 32,
    features: np.ndarray | None = None,
) -> HeadRefit:
    """Refit ``student``'s linear ``head`` in place so that its logits match the teacher's ``targets`` (no labels).

    Compression changes the features a linear head reads, and a head fitted on small differences
    between features (a linear probe) turns that into wrong decisions even where the features still
    carry the information. The refit is ridge regression of the teacher's logits on the student's
    features of ``images``: the ridge strength is chosen by argmax agreement with the teacher on
    ``holdout`` of the images (ties: the smallest logit error), then the head is fitted on all of them.
    The head is kept as it was when no ridge does better on the held-out images than it does.
    ``features`` are the student's ``head`` inputs on ``images`` when computed elsewhere (an ONNX
    Runtime pass over many images is far cheaper than torch eager); ``images`` may then be empty.
    """
    import torch
    from torch import nn

    started = time.perf_counter()
    if features is None:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        f, s_logits = _features_and_logits(student, x, head, batch=batch)
    else:
        f = np.asarray(features, dtype=np.float64)
        layer_now = student.get_submodule(head)
        with torch.no_grad():
            s_logits = layer_now(torch.from_numpy(f).float()).double().numpy()
    t = targets.logits.double().numpy()
    if len(f) != len(t):
        raise ValueError(f"{len(f)} feature rows for {len(t)} teacher logits")
    n_hold = max(1, round(len(f) * holdout))
    fit, held = slice(n_hold, None), slice(0, n_hold)
    def score(logits: np.ndarray) -> tuple[float, float]:  # argmax agreement first, then closeness
        return (float((logits.argmax(1) == t[held].argmax(1)).mean()), -float(((logits - t[held]) ** 2).mean()))

    before = score(s_logits[held])
    best: tuple[tuple[float, float], float, np.ndarray | None] = (before, 0.0, None)
    for lam in ridges:
        w, b = _ridge(f[fit], t[fit], lam)
        sc = score(f[held] @ w + b)
        if sc > best[0]:
            best = (sc, lam, w)
    (agree, _), lam, chosen = best
    if chosen is not None:
        w, b = _ridge(f, t, lam)
        layer = nn.Linear(f.shape[1], t.shape[1])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w.T))
            layer.bias.copy_(torch.from_numpy(b))
        parent_name, _, attr = head.rpartition(".")
        setattr(student.get_submodule(parent_name) if parent_name else student, attr, layer.eval())
    return HeadRefit(len(f), f.shape[1], lam, agree, before[0], time.perf_counter() - started)
