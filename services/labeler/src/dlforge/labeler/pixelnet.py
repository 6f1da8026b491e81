"""``cnn_ssl``: a small convolutional network trained inside the labeling loop, on the pixels.

The other classifier plug-ins learn on frozen ImageNet features, and those features are the
ceiling (see ``benchmarks/labeler.py``'s results): on handwritten digits they reach about 89 %
whatever sits on top of them. This plug-in learns the features too. It trains a small CNN at the
data's own resolution (capped at ``max_size``) on people's labels *and* on the unlabeled items,
FixMatch-style (Sohn et al., NeurIPS 2020): each step, an unlabeled item's prediction on a weakly
augmented view (a small shift, plus the label-preserving symmetries that passed the check below)
becomes its pseudo-label when the network is sure enough of it (at least ``threshold`` with
``thresholds="fixed"``, a per-class share of it with ``"flex"``, below), and the network is
trained to give that label to a strongly augmented view (rotation, scaling, shift, contrast and
brightness changes, a cut-out square). The weights used for predictions are an exponential moving
average of the trained ones.

**Per-class thresholds** (``thresholds="flex"``, an option; FlexMatch: Zhang et al., NeurIPS 2021). With one
fixed ``threshold`` (0.95), a class the network is slow to learn (few labels, or look-alikes such as
handwritten 1s and 7s) rarely clears it, so its unlabeled items sit out exactly when they would help
most. FlexMatch scales each class's threshold by how many unlabeled items the network already predicts
as that class with at least ``threshold`` confidence (:func:`flex_thresholds`), with a warm-up that
keeps every threshold low while most items are still unlearned. ``"fixed"`` keeps FixMatch's single
threshold and is the default: on random labels (``benchmarks/labeler_cnn.py``) flex lifted digits
(180 labels) by 0.7 to 1.5 points in each of three seeds at 1,500 and at 3,000 steps, the class the
fixed threshold left at 0.85-0.91 to 0.96-1.0, but in the labeling loop on digits (whose first labels
cover every class) they reached 0.9966 and 0.9959, and on MNIST, Fashion-MNIST and ELPV flex moved the accuracy
by a few tenths, mostly down.

**Held-out evidence, honestly.** The labeled items are split into ``folds`` stratified folds and
one network is trained per fold *without* that fold's labels (its items stay in the unlabeled
pool, as the items the classifier will auto-label are). Each labeled item's held-out prediction
comes from the network that never saw its label; the temperature and per-class bias are fitted on
those out-of-fold logits (each row's own calibration without that row, :func:`crossfit_scaled`).
The probabilities for the other items are the average of the fold networks' calibrated
probabilities: an ensemble, usually a little better than any one member, so the evidence the
auto-labeling threshold rests on understates the final classifier rather than flattering it.
With fewer than two labels in some class there are no folds: one network on every label, and no
held-out evidence (nothing can be auto-labeled under the guarantee).

**Label-preserving views, checked.** Horizontal and vertical flips and the quarter turn are
label-preserving for some data (solar cells, textures) and not for others (digits). Before the
main training, a short supervised probe (no views) is trained on the first fold's training labels
and tested on its held-out labels under each of the square's eight symmetries; the views used are the
largest set all of whose compositions (what the augmentation draws: :func:`generated`) score no
more than ``max(0.02, half the probe's error)`` below the untouched images (:func:`choose_views`).
The result is in the round's classifier summary (``views``).

Cost: ``steps`` optimizer steps of ``batch`` labeled + ``batch * unlabeled_ratio`` unlabeled items
(two views each) per fold network, on ``threads`` torch threads; ``time_budget_s`` caps one fit
(the view probe a tenth of it, each fold network an equal share of the rest; a network's
learning-rate schedule is fitted to the steps it is measured, after 20 steps, to have time for), but
never below ``min_steps`` (the probe: 50, or ``min_steps`` if fewer; 0 makes the budget a hard cap):
on a machine so busy that the budget buys almost nothing, a round overruns its budget rather than
returning a network that has hardly trained (seen: 21 steps and a held-out accuracy of 0.58 on MNIST
at load 8).
The default of 3,000 steps is twice the former default of 1,500: on random labels it bought +0.5 points on MNIST
(250 labels), +0.8 on Fashion-MNIST (500) and +0.1 on digits (180), at twice the time
(``benchmarks/labeler_cnn.py``).
"""

from __future__ import annotations

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
    _nll,
    calibration_rows,
    heldout_accuracy,
)

VIEWS = ("hflip", "vflip", "rot90")
THRESHOLDS = ("fixed", "flex")


def flex_thresholds(learned: Any, n_out: int, threshold: float) -> Any:
    """FlexMatch's per-class pseudo-label thresholds (Zhang et al., NeurIPS 2021, with its warm-up):
    ``learned`` holds, per unlabeled item, the class the network last predicted for it with confidence
    at least ``threshold`` (-1: none yet). A class's learning effect is the count of items learned as it,
    over the largest of those counts and the count of items not learned yet; its threshold is
    ``threshold`` x M(effect) with M(b) = b / (2 - b). Classes the network has barely learned get low
    thresholds, so their unlabeled items train it early instead of waiting for 95 % confidence."""
    import torch

    counts = torch.bincount(learned[learned >= 0], minlength=n_out).float()
    norm = max(float(counts.max()), float((learned < 0).sum()), 1.0)
    effect = counts / norm
    return threshold * effect / (2.0 - effect)


@dataclass(frozen=True)
class PixelInput:
    """What the plug-in needs from the worker: square uint8 images of this size and channel count."""

    size: int
    channels: int


def _net(c_in: int, n_out: int, *, width: int, size: int) -> Any:
    import torch.nn as nn

    def block(a: int, b: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True))

    w = width
    layers: list[nn.Module] = []
    c = c_in
    # a strided stem per doubling above 32 px keeps the per-image cost near that of a 32 px image
    while size > 40:
        layers += [nn.Conv2d(c, w // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w // 2),
                   nn.ReLU(inplace=True)]
        c, size = w // 2, (size + 1) // 2
    layers += [block(c, w), block(w, w), nn.MaxPool2d(2), block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),
               block(2 * w, 4 * w)]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.drop = nn.Dropout(0.3)
            self.fc = nn.Linear(4 * w, n_out)

        def forward(self, x: Any) -> Any:
            return self.fc(self.drop(self.features(x).mean((2, 3))))

    return Net()


class _Augment:
    """Batched augmentations on N x C x H x W float tensors (torch generator ``g``)."""

    def __init__(self, views: tuple[str, ...], *, pad_border: bool) -> None:
        self.views = views
        self.padding = "border" if pad_border else "zeros"

    def symmetric(self, x: Any, g: Any) -> Any:
        import torch

        n = x.shape[0]
        if "rot90" in self.views:
            k = torch.randint(0, 4, (n,), generator=g)
            x = torch.stack([torch.rot90(x[i], int(k[i]), (1, 2)) for i in range(n)]) if n else x
        for name, dim in (("hflip", 3), ("vflip", 2)):
            if name in self.views:
                flip = torch.rand(n, generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(dim), x)
        return x

    def affine(self, x: Any, g: Any, *, rotate: float, shift: float, scale: float) -> Any:
        import torch
        import torch.nn.functional as F

        n = x.shape[0]
        a = (torch.rand(n, generator=g) * 2 - 1) * rotate * math.pi / 180
        s = 1 + (torch.rand(n, generator=g) * 2 - 1) * scale
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = torch.cos(a) / s
        theta[:, 0, 1] = -torch.sin(a) / s
        theta[:, 1, 0] = torch.sin(a) / s
        theta[:, 1, 1] = torch.cos(a) / s
        theta[:, :, 2] = (torch.rand(n, 2, generator=g) * 2 - 1) * shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, padding_mode=self.padding, align_corners=False)

    def weak(self, x: Any, g: Any) -> Any:
        return self.affine(self.symmetric(x, g), g, rotate=0.0, shift=0.125, scale=0.0)

    def strong(self, x: Any, g: Any) -> Any:
        import torch

        x = self.affine(self.symmetric(x, g), g, rotate=20.0, shift=0.15, scale=0.15)
        n, h = x.shape[0], x.shape[-1]
        x = x * (1 + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.8) \
            + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.8
        half = max(1, h // 6)
        cy = torch.randint(0, h, (n,), generator=g)
        cx = torch.randint(0, h, (n,), generator=g)
        ys = torch.arange(h)[None, :, None]
        xs = torch.arange(h)[None, None, :]
        cut = ((ys - cy[:, None, None]).abs() < half) & ((xs - cx[:, None, None]).abs() < half)
        return x.masked_fill(cut[:, None], 0.0)


def view_of(x: Any, view: str) -> Any:
    """The deterministic view ``view`` of a batch (for the view check)."""
    if view == "hflip":
        return x.flip(3)
    if view == "vflip":
        return x.flip(2)
    if view == "rot90":
        import torch

        return torch.rot90(x, 1, (2, 3))
    raise ValueError(f"unknown view {view!r}")


# the eight symmetries of a square: a left-right flip (or not), then k quarter turns
DIHEDRAL: dict[str, tuple[int, bool]] = {
    "identity": (0, False), "rot90": (1, False), "rot180": (2, False), "rot270": (3, False),
    "hflip": (0, True), "hflip_rot90": (1, True), "vflip": (2, True), "hflip_rot270": (3, True)}


def _dihedral(x: Any, k: int, flip: bool) -> Any:
    import torch

    x = x.flip(3) if flip else x
    return torch.rot90(x, k, (2, 3)) if k else x


def generated(views: tuple[str, ...]) -> set[str]:
    """The symmetries the augmentation draws with ``views`` on: every composition of them (a quarter
    turn drawn 0-3 times, flips together: ``hflip`` and ``rot90`` make all eight, ``vflip`` among them)."""
    import torch

    grid = torch.arange(16).reshape(1, 1, 4, 4)
    name_of = {_dihedral(grid, k, f).numpy().tobytes(): n for n, (k, f) in DIHEDRAL.items()}
    seen = {grid.numpy().tobytes(): grid}
    frontier = [grid]
    while frontier:
        nxt = []
        for g in frontier:
            for v in views:
                h = view_of(g, v)
                if h.numpy().tobytes() not in seen:
                    seen[h.numpy().tobytes()] = h
                    nxt.append(h)
        frontier = nxt
    return {name_of[key] for key in seen}


def choose_views(scores: dict[str, float]) -> tuple[str, ...]:
    """The views to augment with, from the probe's accuracy under each symmetry (``scores``, keyed as
    :data:`DIHEDRAL`): the largest set of :data:`VIEWS` all of whose compositions score no more than
    ``max(0.02, half the probe's error)`` below the untouched images. Checking the views one by one
    is not enough: a probe can keep its answers under one quarter turn by chance, and with it and
    ``hflip`` the augmentation also draws ``vflip`` and the half turn, whatever their scores."""
    base = scores["identity"]
    allowed = max(0.02, (1.0 - base) / 2)
    best: tuple[str, ...] = ()
    best_key = (1, base)
    for mask in range(1, 1 << len(VIEWS)):
        views = tuple(v for i, v in enumerate(VIEWS) if mask >> i & 1)
        group = generated(views)
        worst = min(scores[g] for g in group)
        if worst >= base - allowed and (len(group), worst) > best_key:
            best, best_key = views, (len(group), worst)
    return best


@dataclass(kw_only=True)
class FittedPixelNet(FoldEnsemble):
    """A fitted :class:`PixelSSL`: the fold networks (EMA weights) on uint8 N x H x W x C images, their
    input scaling and calibration."""

    mean: float
    std: float

    def logits(self, net: Any, x: np.ndarray) -> np.ndarray:
        return _logits(net, x, mean=self.mean, std=self.std, threads=self.threads)


def _pixel_stats(x: np.ndarray, *, chunk_values: int = 1 << 18) -> tuple[float, float]:
    """Mean and standard deviation of uint8 images' pixel values, a chunk of images at a time:
    ``x.std()`` on uint8 makes a float64 copy of them all (8 bytes a pixel: 2 GB for 20,000 RGB
    images of 64 px), on top of the float32 tensor the network trains from."""
    n = x.size
    if n == 0:
        return 0.0, 0.0
    chunk = max(1, chunk_values // max(1, x[0].size))  # images per chunk: 2 MB of float64
    total = sum(float(x[s:s + chunk].sum(dtype=np.float64)) for s in range(0, len(x), chunk))
    mean = total / n
    squares = 0.0
    for s in range(0, len(x), chunk):
        d = x[s:s + chunk].astype(np.float64)
        d -= mean
        squares += float(np.vdot(d, d))
    return mean, math.sqrt(squares / n)


def _tensor(x: np.ndarray, *, mean: float, std: float) -> Any:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.uint8).transpose(0, 3, 1, 2)))
    return t.float().div_(255.0).sub_(mean).div_(std)  # in place: one float copy, not three


def _logits(net: Any, x: np.ndarray, *, mean: float, std: float, threads: int) -> np.ndarray:
    import torch

    if len(x) == 0:
        return np.zeros((0, net.fc.out_features))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net.eval()
        out = []
        with torch.inference_mode():
            for s in range(0, len(x), 512):
                out.append(net(_tensor(x[s:s + 512], mean=mean, std=std)).numpy())
        return np.concatenate(out).astype(np.float64)
    finally:
        torch.set_num_threads(previous)


class PixelSSL:
    """Semi-supervised small CNN on the pixels, trained in the loop (see the module docstring)."""

    name = "cnn_ssl"
    inputs = "pixels"

    def __init__(self, *, max_size: int = 64, width: int = 16, steps: int = 3000, batch: int = 32,
                 unlabeled_ratio: int = 4, threshold: float = 0.95, lr: float = 0.03, weight_decay: float = 5e-4,
                 folds: int = 2, probe_steps: int = 200, ema: float = 0.999, time_budget_s: float | None = None,
                 min_steps: int = 300, threads: int = 1, thresholds: str = "fixed") -> None:
        if min(max_size, width, steps, batch, threads) < 1 or min(unlabeled_ratio, probe_steps, min_steps) < 0 \
                or folds < 2:
            raise ValueError("max_size, width, steps, batch, threads >= 1, unlabeled_ratio, probe_steps, min_steps "
                             ">= 0, folds >= 2")
        if not 0.5 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0.5, 1), got {threshold}")
        if thresholds not in THRESHOLDS:
            raise ValueError(f"thresholds must be one of {', '.join(THRESHOLDS)}, got {thresholds!r}")
        if time_budget_s is not None and time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be positive, got {time_budget_s}")
        self.max_size, self.width, self.steps, self.batch = max_size, width, steps, batch
        self.unlabeled_ratio, self.threshold, self.lr, self.weight_decay = unlabeled_ratio, threshold, lr, weight_decay
        self.folds, self.probe_steps, self.ema, self.time_budget_s = folds, probe_steps, ema, time_budget_s
        self.threads, self.min_steps, self.thresholds = threads, min_steps, thresholds

    def pixel_input(self, *, native_size: int, gray: bool) -> PixelInput:
        """The image size and channels to ask the worker for, from the data's own (median) size."""
        return PixelInput(size=max(8, min(int(native_size), self.max_size)), channels=1 if gray else 3)

    def fit(self, x_all: np.ndarray, labeled: np.ndarray, y: np.ndarray, *, n_classes: int,
            representative: np.ndarray | None = None, seed: int = 0) -> FittedClassifier:
        import torch

        if x_all.ndim != 4 or x_all.dtype != np.uint8:
            raise ValueError(f"cnn_ssl needs uint8 N x H x W x C images, got {x_all.dtype} {x_all.shape}")
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.random.fork_rng():
                return self._fit(x_all, labeled, y, n_classes=n_classes, representative=representative, seed=seed)
        finally:
            torch.set_num_threads(threads)

    # -- training ---------------------------------------------------------------------------------

    def _train(self, xt: Any, rows: np.ndarray, y: np.ndarray, pool: np.ndarray, n_out: int, *, seed: int,
               steps: int, augment: _Augment, semi: bool, deadline: float | None,
               floor: int = 0) -> tuple[Any, int]:
        import torch
        import torch.nn.functional as F

        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        net = _net(xt.shape[1], n_out, width=self.width, size=xt.shape[-1])
        ema = _net(xt.shape[1], n_out, width=self.width, size=xt.shape[-1])
        ema.load_state_dict(net.state_dict())
        for p in ema.parameters():
            p.requires_grad_(False)
        opt = torch.optim.SGD(net.parameters(), lr=self.lr, momentum=0.9, nesterov=True,
                              weight_decay=self.weight_decay)
        rows_t = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        y_t = torch.from_numpy(np.asarray(y, dtype=np.int64))
        pool_t = torch.from_numpy(np.asarray(pool, dtype=np.int64))
        counts = torch.bincount(y_t, minlength=n_out).float()
        pick = 1.0 / counts[y_t]  # class-balanced batches of people's labels
        mu = self.unlabeled_ratio if semi and len(pool_t) else 0
        # FlexMatch's per-item record: the class each pool item was last predicted as with confidence >= threshold
        learned = torch.full((len(pool_t) if self.thresholds == "flex" else 0,), -1, dtype=torch.int64)
        planned, started = steps, time.monotonic()
        step = 0
        while step < planned:
            lr = self.lr * math.cos(7 * math.pi * step / (16 * planned))  # FixMatch's cosine decay
            for group in opt.param_groups:
                group["lr"] = lr
            i = torch.multinomial(pick, self.batch, replacement=True, generator=g)
            xl = augment.weak(xt[rows_t[i]], g)
            net.train()
            if mu:
                ui = torch.randint(0, len(pool_t), (self.batch * mu,), generator=g)
                u = xt[pool_t[ui]]
                out = net(torch.cat([xl, augment.weak(u, g), augment.strong(u, g)]))
                b, m = self.batch, self.batch * mu
                loss = F.cross_entropy(out[:b], y_t[i])
                with torch.no_grad():
                    conf, target = out[b:b + m].softmax(1).max(1)
                    if self.thresholds == "flex":
                        keep = (conf >= flex_thresholds(learned, n_out, self.threshold)[target]).float()
                        sure = conf >= self.threshold  # TorchSSL's ge(p_cutoff)
                        learned[ui[sure]] = target[sure]
                    else:
                        keep = (conf >= self.threshold).float()
                loss = loss + (F.cross_entropy(out[b + m:], target, reduction="none") * keep).mean()
            else:
                loss = F.cross_entropy(net(xl), y_t[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay = min(self.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.state_dict().values(), net.state_dict().values(), strict=True):
                    if e.dtype.is_floating_point:
                        e.mul_(decay).add_(p, alpha=1 - decay)
                    else:
                        e.copy_(p)
            step += 1
            if deadline is not None and step <= 20:
                # shrink the schedule to the steps that fit in this network's share of the budget, never below
                # the floor: planned at step 20 on the mean step time, and before it at every step whose mean
                # projects 20 steps past the deadline (a short budget caps from the first step)
                elapsed = time.monotonic() - started
                fits = int((deadline - started) / max(elapsed / step, 1e-6))
                planned = max(step, min(steps, max(fits, floor))) if step == 20 or fits < 20 else steps
        return ema.eval(), planned

    def _check_views(self, xt: Any, rows: np.ndarray, y: np.ndarray, held: np.ndarray, y_held: np.ndarray,
                     n_out: int, *, seed: int, pad_border: bool, deadline: float | None
                     ) -> tuple[tuple[str, ...], dict[str, float]]:
        import torch

        if self.probe_steps == 0 or len(held) == 0:
            return (), {}
        probe, _ = self._train(xt, rows, y, np.zeros(0, dtype=np.int64), n_out, seed=seed, steps=self.probe_steps,
                               augment=_Augment((), pad_border=pad_border), semi=False, deadline=deadline,
                               floor=min(self.probe_steps, 50, self.min_steps))
        scores: dict[str, float] = {}
        with torch.inference_mode():
            x = xt[torch.from_numpy(np.asarray(held, dtype=np.int64))]
            for name, (k, flip) in DIHEDRAL.items():
                scores[name] = float((probe(_dihedral(x, k, flip)).argmax(1).numpy() == y_held).mean())
        return choose_views(scores), scores

    def _fit(self, x_all: np.ndarray, labeled: np.ndarray, y: np.ndarray, *, n_classes: int,
             representative: np.ndarray | None, seed: int) -> FittedClassifier:
        started = time.monotonic()
        labeled = np.asarray(labeled, dtype=np.int64)
        y = np.asarray(y, dtype=np.int64)
        raw_mean, raw_std = _pixel_stats(x_all)
        mean, std = raw_mean / 255.0, raw_std / 255.0 + 1e-6
        xt = _tensor(x_all, mean=mean, std=std)
        present, counts = np.unique(y, return_counts=True)
        local = np.searchsorted(present, y)
        heldout = np.full((len(y), n_classes), np.nan)
        mask, rep = calibration_rows(representative, len(y))
        figures: dict[str, float | int | bool | str | None] = {
            "classifier": self.name, "input_size": int(x_all.shape[1]), "channels": int(x_all.shape[3])}
        fitted = FittedPixelNet(nets=[], mean=mean, std=std, present=present, scaling=Scaling(), n_classes=n_classes,
                                calibrated=False, heldout_proba=heldout, heldout_representative=rep, heldout_labels=y,
                                threads=self.threads, figures=figures)
        if len(present) < 2:
            return fitted
        unlabeled = np.setdiff1d(np.arange(len(x_all)), labeled)
        # images that fill the frame (cells, textures) are padded with their border, digits with black
        edge = np.concatenate([x_all[:, 0].ravel(), x_all[:, -1].ravel()]).astype(np.float32)
        pad_border = bool(abs(edge.mean() - raw_mean) < 0.5 * raw_std)
        k = int(min(self.folds, counts.min()))
        folds = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(labeled, local)) \
            if k >= 2 else [(np.arange(len(y)), np.zeros(0, dtype=np.int64))]
        tr0, te0 = folds[0]
        # the probe's share of the time budget: a tenth
        probe_deadline = started + 0.1 * self.time_budget_s if self.time_budget_s is not None else None
        views, view_scores = self._check_views(xt, labeled[tr0], local[tr0], labeled[te0], local[te0], len(present),
                                               seed=seed * 100, pad_border=pad_border, deadline=probe_deadline)
        figures["views"] = ",".join(views) or "none"
        figures["thresholds"] = self.thresholds
        for name, acc in view_scores.items():
            figures[f"view_check_{name}"] = round(acc, 4)
        augment = _Augment(views, pad_border=pad_border)
        oof = np.zeros((len(y), len(present)))
        steps_run = []
        for f, (tr, te) in enumerate(folds):
            deadline = None
            if self.time_budget_s is not None:
                share = (self.time_budget_s - (time.monotonic() - started)) / (len(folds) - f)
                deadline = time.monotonic() + max(share, 1.0)
            pool = np.concatenate([unlabeled, labeled[te]])  # held-out labeled items stay unlabeled for it
            net, ran = self._train(xt, labeled[tr], local[tr], pool, len(present), seed=seed * 100 + f + 1,
                                   steps=self.steps, augment=augment, semi=True, deadline=deadline,
                                   floor=min(self.steps, self.min_steps))
            fitted.nets.append(net)
            fitted.model = fitted.nets
            steps_run.append(ran)
            if len(te):
                oof[te] = fitted.logits(net, x_all[labeled[te]])
        figures.update({"fold_networks": len(folds), "steps": int(min(steps_run)),
                        "fit_seconds": round(time.monotonic() - started, 1)})
        if k >= 2:
            fitted.calibrate(oof, local, mask, seed=seed)
        return fitted


@dataclass(frozen=True)
class Both:
    """Embeddings and pixels of the same items, row-aligned: what a ``"both"`` plug-in learns on."""

    embeddings: np.ndarray
    pixels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.embeddings) != len(self.pixels):
            raise ValueError(f"{len(self.embeddings)} embeddings but {len(self.pixels)} images")

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, rows: Any) -> Both:
        return Both(self.embeddings[rows], self.pixels[rows])


@dataclass
class FittedBlend:
    """A fitted :class:`Blend`: ``weight`` x the CNN's probabilities + (1 - ``weight``) x the linear probe's."""

    linear: FittedClassifier
    cnn: FittedClassifier
    weight: float
    n_classes: int
    heldout_proba: np.ndarray
    heldout_representative: np.ndarray
    heldout_labels: np.ndarray
    figures: dict[str, float | int | bool | str | None]
    model: object | None = None
    calibrated: bool = False

    def predict_proba(self, x: Both) -> np.ndarray:
        out = np.zeros((len(x), self.n_classes))
        if self.weight > 0:
            out += self.weight * self.cnn.predict_proba(x.pixels)
        if self.weight < 1:
            out += (1 - self.weight) * self.linear.predict_proba(x.embeddings)
        return out

    def summary(self) -> dict[str, float | int | bool | str | None]:
        out: dict[str, float | int | bool | str | None] = dict(self.figures)
        out.update({f"cnn_{k}": v for k, v in self.cnn.summary().items() if k != "classifier"})
        out.update({f"linear_{k}": v for k, v in self.linear.summary().items() if k != "classifier"})
        out.update({"calibrated": self.calibrated, "cnn_weight": self.weight,
                    **heldout_accuracy(self.heldout_proba, self.heldout_labels, self.heldout_representative)})
        return out


class Blend:
    """The linear probe on the ImageNet embeddings and :class:`PixelSSL` on the pixels, averaged.

    Frozen ImageNet features suit photographs and textures; a CNN learned on the pixels suits data
    far from ImageNet (digits, line drawings). Which one a user's data needs is not known in advance,
    so both are fitted and their calibrated probabilities mixed, with the CNN's weight (from
    ``weights``) the one whose held-out predictions have the lowest log-loss on people's representative
    labels. Both plug-ins' held-out predictions come from models that never saw the row's label;
    the mixture's held-out prediction of a row uses a weight chosen *without* that row's fold (as
    :func:`crossfit_scaled` does for calibration), so choosing the weight does not flatter the
    evidence the auto-labeling threshold rests on.
    """

    name = "blend"
    inputs = "both"

    def __init__(self, *, threads: int = 1, weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
                 folds: int = 5, **cnn_options: Any) -> None:
        if not weights or any(not 0.0 <= w <= 1.0 for w in weights) or folds < 2:
            raise ValueError("weights must lie in [0, 1] and folds be >= 2")
        from dlforge.labeler.classifier import LinearProbe

        self.linear = LinearProbe()
        self.cnn = PixelSSL(threads=threads, **cnn_options)
        self.weights, self.folds = tuple(weights), folds

    def pixel_input(self, *, native_size: int, gray: bool) -> PixelInput:
        return self.cnn.pixel_input(native_size=native_size, gray=gray)

    def _choose(self, lin: np.ndarray, cnn: np.ndarray, y: np.ndarray) -> float:
        return min(self.weights, key=lambda w: (_nll(w * cnn + (1 - w) * lin, y), abs(w - 0.5)))

    def fit(self, x_all: Both, labeled: np.ndarray, y: np.ndarray, *, n_classes: int,
            representative: np.ndarray | None = None, seed: int = 0) -> FittedClassifier:
        if not isinstance(x_all, Both):
            raise ValueError("the blend classifier needs the items' embeddings and pixels (Both)")
        y = np.asarray(y, dtype=np.int64)
        lin = self.linear.fit(x_all.embeddings, labeled, y, n_classes=n_classes, representative=representative,
                              seed=seed)
        cnn = self.cnn.fit(x_all.pixels, labeled, y, n_classes=n_classes, representative=representative, seed=seed)
        hl = np.asarray(lin.heldout_proba, dtype=np.float64)
        hc = np.asarray(cnn.heldout_proba, dtype=np.float64)
        rep = np.asarray(lin.heldout_representative, dtype=bool)
        both = np.isfinite(hl).all(axis=1) & np.isfinite(hc).all(axis=1)
        rows = both & rep
        weight = self._choose(hl[rows], hc[rows], y[rows]) if rows.any() else 0.5
        heldout = np.full((len(y), n_classes), np.nan)
        fold_of = np.random.default_rng(seed).permutation(len(y)) % self.folds
        for f in range(self.folds):
            mine = both & (fold_of == f)
            fit_rows = rows & (fold_of != f)
            w = self._choose(hl[fit_rows], hc[fit_rows], y[fit_rows]) if fit_rows.any() else 0.5
            heldout[mine] = w * hc[mine] + (1 - w) * hl[mine]
        models = (lin.model, cnn.model)
        return FittedBlend(linear=lin, cnn=cnn, weight=float(weight), n_classes=n_classes, heldout_proba=heldout,
                           heldout_representative=rep, heldout_labels=y, figures={"classifier": self.name},
                           model=models if all(m is not None for m in models) else None,
                           calibrated=bool(lin.calibrated and cnn.calibrated))
