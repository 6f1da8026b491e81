"""The auto-labeler's classifiers: the ``LabelClassifier`` plug-in interface and its two plug-ins.

A plug-in fits on the labeled rows of the embeddings and returns a :class:`FittedClassifier`:
calibrated probabilities for every item, and the calibrated *out-of-fold* probabilities of the
labeled rows (``heldout_proba``), the held-out evidence that the selective auto-labeling threshold
and the learning curve rest on.

* :class:`LinearProbe` (``linear``): :func:`fit_calibrated`, below.
* :class:`SemiSupervisedMLP` (``mlp_ssl``): a small MLP on the embeddings trained on people's
  labels *and* on the unlabeled items' confident pseudo-labels (consistency between the clean and a
  dropout-noised prediction), calibrated the same way on out-of-fold logits (see its docstring).

The linear probe:

:func:`fit_calibrated` centres and scales the embeddings, picks the regularization by stratified
cross-validation, and fits a temperature and per-class bias (Platt scaling for two classes) on
the *out-of-fold* logits, so the confidence that decides auto-labeling was never computed on
an item the model trained on. Calibration uses the representative labeled items (random test,
k-means seed and given labels) when there are enough of them: the uncertainty-sampled batches
are the hard cases and would misstate how often the model is right on the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from dlforge.common.blas import small_blas

DEFAULT_CS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def _logits(model: LogisticRegression, x: np.ndarray) -> np.ndarray:
    z = model.decision_function(x)
    if z.ndim == 1:  # binary: the score of class 1 against class 0
        z = np.stack([np.zeros_like(z), z], axis=1)
    return np.asarray(z, dtype=np.float64)


@dataclass
class Scaling:
    """Calibration of logits: ``softmax(z / temperature + bias)``."""

    temperature: float = 1.0
    bias: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def apply(self, logits: np.ndarray) -> np.ndarray:
        b = self.bias if len(self.bias) == logits.shape[1] else 0.0
        return _softmax(logits / self.temperature + b)


def fit_scaling(logits: np.ndarray, y: np.ndarray, *, bias: bool = True) -> Scaling:
    """Temperature (and per-class bias) minimizing the negative log-likelihood of ``y``."""
    n, c = logits.shape
    onehot = np.eye(c)[y]

    def nll(params: np.ndarray) -> float:
        t = np.exp(params[0])
        b = np.concatenate([[0.0], params[1:]]) if bias else np.zeros(c)
        z = logits / t + b
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-(onehot * logp).sum() / n + 1e-3 * (params[1:] ** 2).sum())

    x0 = np.zeros(1 + (c - 1 if bias else 0))
    res = minimize(nll, x0, method="L-BFGS-B", bounds=[(-4.0, 4.0)] + [(-5.0, 5.0)] * (len(x0) - 1))
    t = float(np.exp(res.x[0]))
    b = np.concatenate([[0.0], res.x[1:]]) if bias else np.zeros(c)
    return Scaling(temperature=t, bias=b)


def crossfit_scaled(logits: np.ndarray, y: np.ndarray, mask: np.ndarray, *, folds: int = 5,
                    seed: int = 0) -> np.ndarray:
    """Calibrated probabilities of every row of ``logits`` (out-of-fold logits), each row scaled by a
    temperature and bias fitted WITHOUT that row (on the other folds' ``mask`` rows).

    The held-out probabilities are the evidence the auto-label guarantee is computed on; scaled by
    a calibration fitted on those very rows, their confidences (and, through the bias, their
    argmax) would depend on the labels they are then checked against.
    """
    n = len(y)
    out = np.zeros_like(logits, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(n)
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[order] = np.arange(n) % max(2, folds)
    for f in range(max(2, folds)):
        rows = fold_of == f
        fit_rows = mask & ~rows
        scaling = fit_scaling(logits[fit_rows], y[fit_rows], bias=True) if fit_rows.sum() >= 2 else Scaling()
        out[rows] = scaling.apply(logits[rows])
    return out


@dataclass(kw_only=True)
class HeldOutCalibrated:
    """What a fitted network plug-in keeps beside its model: the classes people labeled (its outputs),
    the calibration of its logits, each labeled row's held-out probabilities and the round's figures."""

    present: np.ndarray  # the classes people labeled: the model's outputs
    scaling: Scaling
    n_classes: int
    calibrated: bool
    heldout_proba: np.ndarray
    heldout_representative: np.ndarray
    heldout_labels: np.ndarray
    figures: dict[str, float | int | bool | str | None] = field(default_factory=dict)

    def summary(self) -> dict[str, float | int | bool | str | None]:
        return {**self.figures, "temperature": self.scaling.temperature, "calibrated": self.calibrated,
                **heldout_accuracy(self.heldout_proba, self.heldout_labels, self.heldout_representative)}


@dataclass(kw_only=True)
class FoldEnsemble(HeldOutCalibrated, ABC):
    """Fold networks, each trained without one fold of the labels, and their calibration: the fitted
    classifier of the plug-ins that train networks (``cnn_ssl``, ``finetune_top``). An item's
    probabilities are the average of the networks' calibrated ones; ``heldout_proba`` holds each labeled
    row's from the network that did not train on it (:func:`calibrate_out_of_fold`)."""

    nets: list[Any]
    threads: int
    model: object | None = None  # the fold networks once trained (None: fewer than two classes known)

    @abstractmethod
    def logits(self, net: Any, x: Any) -> np.ndarray:
        """One network's logits for the rows of ``x`` (N x len(present))."""

    def calibrate(self, oof: np.ndarray, y: np.ndarray, mask: np.ndarray, *, seed: int = 0) -> None:
        """With every labeled row held out by one fold network (``oof``: its logits, ``y``: class indices
        among ``present``): the calibration, the held-out probabilities (classes nobody labeled get 0)
        and the round's figures, from :func:`calibrate_out_of_fold`."""
        self.scaling, held, cv = calibrate_out_of_fold(oof, y, mask, seed=seed)
        self.heldout_proba[:] = 0.0
        self.heldout_proba[:, self.present] = held
        self.calibrated = True
        self.figures.update(cv)

    def predict_proba(self, x: Any) -> np.ndarray:
        full = np.zeros((len(x), self.n_classes))
        if not self.nets:
            full[:, self.present] = 1.0
            return full
        full[:, self.present] = np.mean([self.scaling.apply(self.logits(net, x)) for net in self.nets], axis=0)
        return full


def calibrate_out_of_fold(oof: np.ndarray, y: np.ndarray, mask: np.ndarray, *, seed: int = 0
                          ) -> tuple[Scaling, np.ndarray, dict[str, float | int | bool | str | None]]:
    """For fold networks' out-of-fold logits ``oof`` of every labeled row (class indices ``y``): the
    temperature and bias fitted on the ``mask`` rows (what the other items' probabilities get), every
    row's held-out probabilities calibrated without that row (:func:`crossfit_scaled`), and the figures
    of the round's record."""
    scaling = fit_scaling(oof[mask], y[mask], bias=True)
    figures: dict[str, float | int | bool | str | None] = {
        "cv_accuracy": float((oof.argmax(axis=1) == y).mean()),
        "cv_nll_raw": _nll(_softmax(oof[mask]), y[mask]),
        "cv_nll_calibrated": _nll(scaling.apply(oof[mask]), y[mask]),
        "calibration_items": int(mask.sum())}
    return scaling, crossfit_scaled(oof, y, mask, seed=seed), figures


@dataclass
class CalibratedClassifier:
    """A fitted model: standardization, logistic regression and the calibration of its logits."""

    mean: np.ndarray
    scale: np.ndarray
    model: LogisticRegression | None
    present: np.ndarray
    scaling: Scaling
    n_classes: int
    c: float
    calibrated: bool
    cv_accuracy: float | None
    cv_nll_raw: float | None
    cv_nll_calibrated: float | None
    calibration_items: int
    # calibrated out-of-fold probabilities of the labeled rows (aligned with ``labeled`` as passed to
    # :func:`fit_calibrated`; NaN rows where no fold held the item out, 0 for classes nobody
    # labeled; each row's calibration fitted without it, :func:`crossfit_scaled`), and which of
    # them are representative: the held-out evidence a selective auto-labeling threshold is chosen on
    heldout_proba: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    heldout_representative: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    heldout_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities, N x n_classes (classes never seen get 0)."""
        full = np.zeros((len(x), self.n_classes))
        if self.model is None:
            full[:, self.present] = 1.0
            return full
        z = _logits(self.model, (x - self.mean) / self.scale)
        full[:, self.present] = self.scaling.apply(z)
        return full

    def subsample_curve(self, x_labeled: np.ndarray, y: np.ndarray, *, representative: np.ndarray,
                        always: np.ndarray | None = None, seed: int = 0) -> list[tuple[float, float, int]]:
        """:func:`subsample_curve` of the labeled embeddings, centred and scaled as this probe was, at its C."""
        return subsample_curve((x_labeled - self.mean) / self.scale, y, representative=representative, c=self.c,
                               always=always, seed=seed)

    def summary(self) -> dict[str, float | int | bool | str | None]:
        return {
            "classifier": "linear",
            "C": self.c,
            "temperature": self.scaling.temperature,
            "calibrated": self.calibrated,
            "cv_accuracy": self.cv_accuracy,
            "cv_nll_raw": self.cv_nll_raw,
            "cv_nll_calibrated": self.cv_nll_calibrated,
            "calibration_items": self.calibration_items,
            **heldout_accuracy(self.heldout_proba, self.heldout_labels, self.heldout_representative),
        }


def calibration_rows(representative: np.ndarray | None, n: int, *,
                     min_calibration: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """``(calibrate, representative)`` masks over ``n`` labeled rows: the confidence is calibrated on the
    representative rows when there are at least ``min_calibration`` of them, else on every row."""
    rep = np.ones(n, dtype=bool) if representative is None else np.asarray(representative, dtype=bool)
    return (rep.copy() if int(rep.sum()) >= min_calibration else np.ones(n, dtype=bool)), rep


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)).mean())


@small_blas
def fit_calibrated(
    x_all: np.ndarray,
    labeled: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    representative: np.ndarray | None = None,
    seed: int = 0,
    folds: int = 5,
    cs: tuple[float, ...] = DEFAULT_CS,
    min_calibration: int = 40,
) -> CalibratedClassifier:
    """Fit on rows ``labeled`` of ``x_all`` with class indices ``y``.

    ``x_all`` (every item) sets the centring and scale; ``representative`` (a boolean mask over the
    labeled rows) says which labels may calibrate the confidence (all if too few of them).
    """
    # centred and scaled by one global factor: per-feature scaling would blow up near-constant
    # (noise) features to the weight of the informative ones
    mean = x_all.mean(axis=0)
    scale = np.full(x_all.shape[1], float(np.sqrt(((x_all - mean) ** 2).mean())) + 1e-12)
    x = (x_all[labeled] - mean) / scale
    y = np.asarray(y, dtype=np.int64)
    present, counts = np.unique(y, return_counts=True)
    k = int(min(folds, counts.min())) if len(present) > 1 else 0

    def new(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=2000)

    # the representative labels (random test, k-means seed, given) stand for the unlabeled items;
    # the uncertainty-sampled ones are the hard cases: calibrate on the former (tried selecting C on
    # them too: no better on ELPV, and noisier)
    mask, rep = calibration_rows(representative, len(y), min_calibration=min_calibration)
    best_c = cs[len(cs) // 2]
    oof: np.ndarray | None = None
    cv_acc: float | None = None
    if k >= 2:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = list(splitter.split(x, y))
        best: tuple[float, float] | None = None
        # one warm-started model per fold walks the grid from strong to weak regularization
        fold_models = [LogisticRegression(C=cs[0], max_iter=2000, warm_start=True) for _ in splits]
        for c in sorted(cs):
            z = np.full((len(y), n_classes), -1e9)
            for m, (tr, te) in zip(fold_models, splits, strict=True):
                m.set_params(C=c).fit(x[tr], y[tr])
                z[te[:, None], m.classes_[None, :]] = _logits(m, x[te])
            acc = float((z.argmax(axis=1) == y).mean())
            nll = _nll(_softmax(z), y)
            if best is None or (acc, -nll) > best:
                best, best_c, oof, cv_acc = (acc, -nll), c, z, acc
    # one known class: no model, every item is that class
    model = new(best_c).fit(x, y) if len(present) > 1 else None
    scaling = Scaling()
    calibrated = False
    nll_raw = nll_cal = None
    n_cal = 0
    if oof is not None:
        z_cal = oof[mask][:, present]
        y_cal = np.searchsorted(present, y[mask])
        scaling = fit_scaling(z_cal, y_cal, bias=True)
        nll_raw = _nll(_softmax(z_cal), y_cal)
        nll_cal = _nll(scaling.apply(z_cal), y_cal)
        calibrated = True
        n_cal = int(mask.sum())
    heldout = np.full((len(y), n_classes), np.nan)
    if oof is not None:  # every row held out once; classes nobody labeled get probability 0
        heldout[:] = 0.0
        heldout[:, present] = crossfit_scaled(oof[:, present], np.searchsorted(present, y), mask, seed=seed)
    return CalibratedClassifier(mean=mean, scale=scale, model=model, present=present, scaling=scaling,
                                n_classes=n_classes, c=best_c, calibrated=calibrated, cv_accuracy=cv_acc,
                                cv_nll_raw=nll_raw, cv_nll_calibrated=nll_cal, calibration_items=n_cal,
                                heldout_proba=heldout, heldout_representative=rep, heldout_labels=y.copy())


SUBSAMPLE_SHARES = (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)


@small_blas
def subsample_curve(x: np.ndarray, y: np.ndarray, *, representative: np.ndarray, c: float,
                    always: np.ndarray | None = None, shares: tuple[float, ...] = SUBSAMPLE_SHARES, folds: int = 5,
                    seed: int = 0) -> list[tuple[float, float, int]]:
    """A learning curve from one labeled set: the linear probe's held-out accuracy trained on nested shares of it.

    The labeled rows ``x`` (as the probe sees them: :meth:`CalibratedClassifier.subsample_curve` centres
    and scales them) with classes ``y`` are split in ``folds`` stratified folds. Each fold's training rows
    are shuffled once (a fixed order, so a larger share holds every smaller one); the first ``share`` of
    them, with every ``always`` row of the fold's training rows (labels that came with the upload: they do
    not grow with the budget), train a logistic regression with the regularization ``c`` (chosen on the
    whole set), which predicts the fold's ``representative`` rows (random test and val items, the k-means
    seed: the rows that stand for the unlabeled ones). Returns ``(share, accuracy over every
    representative row, training rows per fold at that share)`` for each share whose every fold trains on
    at least two classes; ``[]`` without two folds or representative rows.
    """
    y = np.asarray(y, dtype=np.int64)
    rep = np.asarray(representative, dtype=bool)
    _, counts = np.unique(y, return_counts=True)
    k = int(min(folds, counts.min())) if len(counts) > 1 else 0
    if k < 2 or not rep.any():
        return []
    fixed = np.zeros(len(y), dtype=bool) if always is None else np.asarray(always, dtype=bool)
    rng = np.random.default_rng(seed)
    splits = [(tr[fixed[tr]], rng.permutation(tr[~fixed[tr]]), te) for tr, te in
              StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y)]
    out = []
    for share in sorted(shares):
        correct = np.zeros(len(y), dtype=bool)
        sizes = []
        for kept, order, te in splits:
            tr = np.concatenate([kept, order[:max(2, round(share * len(order)))]])
            if len(np.unique(y[tr])) < 2:
                break
            sizes.append(len(tr))
            model = LogisticRegression(C=c, max_iter=2000).fit(x[tr], y[tr])
            rows = te[rep[te]]
            if len(rows):
                correct[rows] = model.predict(x[rows]) == y[rows]
        else:
            out.append((float(share), float(correct[rep].mean()), int(np.median(sizes))))
    return out


def heldout_accuracy(proba: np.ndarray, y: np.ndarray, representative: np.ndarray) -> dict[str, float | int | None]:
    """Out-of-fold accuracy on the representative labeled rows (random test, k-means seed, given).

    Unlike ``cv_accuracy`` (every labeled row, most of them the hard items active learning asked),
    this estimates how often the classifier is right on the items it has not seen: the learning
    curve of the report is drawn from it round by round.
    """
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or len(proba) == 0 or len(proba) != len(y):
        return {"heldout_accuracy": None, "heldout_items": 0}
    rows = np.asarray(representative, dtype=bool) & ~np.isnan(proba).any(axis=1)
    if not rows.any():
        return {"heldout_accuracy": None, "heldout_items": 0}
    correct = proba[rows].argmax(axis=1) == np.asarray(y)[rows]
    return {"heldout_accuracy": float(correct.mean()), "heldout_items": int(rows.sum())}


class FittedClassifier(Protocol):
    """What a classifier plug-in returns: calibrated probabilities and its held-out evidence."""

    model: object | None  # None: fewer than two classes known, every item gets the one known class
    calibrated: bool
    heldout_proba: np.ndarray  # labeled rows x n_classes, calibrated out-of-fold (NaN: not held out)
    heldout_representative: np.ndarray  # which labeled rows are representative

    def predict_proba(self, x: Any) -> np.ndarray:
        """Calibrated class probabilities of the rows of ``x`` (inputs of the plug-in's kind: embeddings,
        pixels, :class:`dlforge.labeler.pixelnet.Both`, or the trunk's activations), N x n_classes."""
        ...

    def summary(self) -> dict[str, float | int | bool | str | None]:
        """Figures for the labeler's round record (JSON-serializable)."""
        ...


class LabelClassifier(Protocol):
    """The classifier that decides auto-labels, fitted anew after every batch people answer."""

    name: str

    def fit(
        self,
        x_all: Any,
        labeled: np.ndarray,
        y: np.ndarray,
        *,
        n_classes: int,
        representative: np.ndarray | None = None,
        seed: int = 0,
    ) -> FittedClassifier:
        """Fit on rows ``labeled`` of ``x_all`` (every item's input of the plug-in's ``inputs`` kind, the
        embeddings unless it says otherwise) with class indices ``y``;
        ``representative`` masks the labeled rows that may calibrate the confidence."""
        ...


class LinearProbe:
    """Calibrated logistic regression on the embeddings (:func:`fit_calibrated`)."""

    name = "linear"

    def fit(self, x_all: np.ndarray, labeled: np.ndarray, y: np.ndarray, *, n_classes: int,
            representative: np.ndarray | None = None, seed: int = 0) -> FittedClassifier:
        return fit_calibrated(x_all, labeled, y, n_classes=n_classes, representative=representative, seed=seed)


@dataclass(kw_only=True)
class FittedMLP(HeldOutCalibrated):
    """A fitted :class:`SemiSupervisedMLP`: the network, its input scaling and its calibration."""

    mean: np.ndarray
    scale: float
    model: Any

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        full = np.zeros((len(x), self.n_classes))
        if self.model is None:
            full[:, self.present] = 1.0
            return full
        full[:, self.present] = self.scaling.apply(_mlp_logits(self.model, (x - self.mean) / self.scale))
        return full


def _mlp_logits(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), 4096):
            out.append(model(torch.from_numpy(np.ascontiguousarray(x[s:s + 4096], dtype=np.float32))).numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


class SemiSupervisedMLP:
    """A one-hidden-layer MLP on the embeddings that also learns from the unlabeled items.

    Each step takes a batch of people's labels (class-balanced cross-entropy) and, after the first
    quarter of the epochs, a batch of unlabeled items: those the network, in eval mode, gives a
    class with probability >= ``pseudo_threshold`` are trained towards that class through the
    dropout-noised network (pseudo-labels with consistency, FixMatch's idea on embeddings, where
    dropout is the strong view). The confidence is calibrated like the linear probe's: temperature
    and per-class bias fitted on the out-of-fold logits of ``folds`` fold models, each trained
    without its fold's labels (it still sees those items unlabeled, as the final model sees the
    items it auto-labels), so the held-out evidence is honest about the final model.

    Measured against the linear probe in ``benchmarks/labeler.py`` (see its results); torch runs on
    ``threads`` threads.
    """

    name = "mlp_ssl"

    def __init__(self, *, hidden: int = 256, epochs: int = 60, batch: int = 64, unlabeled_ratio: int = 3,
                 pseudo_threshold: float = 0.95, weight_decay: float = 1e-3, lr: float = 1e-3, folds: int = 3,
                 threads: int = 1) -> None:
        if hidden < 1 or epochs < 1 or batch < 1 or unlabeled_ratio < 0 or folds < 2 or threads < 1:
            raise ValueError("hidden, epochs, batch, threads >= 1, unlabeled_ratio >= 0 and folds >= 2")
        if not 0.5 <= pseudo_threshold < 1.0:
            raise ValueError(f"pseudo_threshold must be in [0.5, 1), got {pseudo_threshold}")
        self.hidden, self.epochs, self.batch = hidden, epochs, batch
        self.unlabeled_ratio, self.pseudo_threshold = unlabeled_ratio, pseudo_threshold
        self.weight_decay, self.lr, self.folds, self.threads = weight_decay, lr, folds, threads

    def _train(self, x: np.ndarray, rows: np.ndarray, y: np.ndarray, unlabeled: np.ndarray, n_out: int,
               seed: int) -> Any:
        import torch

        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        d = x.shape[1]
        net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(d, self.hidden), torch.nn.GELU(),
                                  torch.nn.Dropout(0.3), torch.nn.Linear(self.hidden, n_out))
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        rows_t = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        y_t = torch.from_numpy(np.asarray(y, dtype=np.int64))
        un_t = torch.from_numpy(np.asarray(unlabeled, dtype=np.int64))
        counts = np.bincount(y, minlength=n_out).astype(np.float64)
        weight = torch.tensor(len(y) / (n_out * np.maximum(counts, 1.0)), dtype=torch.float32)
        ce = torch.nn.functional.cross_entropy
        for epoch in range(self.epochs):
            net.train()
            perm = torch.randperm(len(rows_t), generator=gen)
            for s in range(0, len(perm), self.batch):
                i = perm[s:s + self.batch]
                loss = ce(net(xt[rows_t[i]]), y_t[i], weight=weight)
                if self.unlabeled_ratio and len(un_t) and epoch >= self.epochs // 4:
                    u = un_t[torch.randint(0, len(un_t), (self.batch * self.unlabeled_ratio,), generator=gen)]
                    net.eval()
                    with torch.no_grad():
                        conf, target = torch.softmax(net(xt[u]), dim=1).max(dim=1)
                    net.train()
                    keep = (conf >= self.pseudo_threshold).float()
                    if keep.sum() > 0:
                        loss = loss + (ce(net(xt[u]), target, reduction="none") * keep).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return net.eval()

    def fit(self, x_all: np.ndarray, labeled: np.ndarray, y: np.ndarray, *, n_classes: int,
            representative: np.ndarray | None = None, seed: int = 0) -> FittedClassifier:
        import torch

        # the default runs every service in one process: leave torch's threads and RNG as found
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.random.fork_rng():
                return self._fit(x_all, labeled, y, n_classes=n_classes, representative=representative, seed=seed)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, x_all: np.ndarray, labeled: np.ndarray, y: np.ndarray, *, n_classes: int,
             representative: np.ndarray | None, seed: int) -> FittedClassifier:
        labeled = np.asarray(labeled, dtype=np.int64)
        y = np.asarray(y, dtype=np.int64)
        mean = x_all.mean(axis=0)
        scale = float(np.sqrt(((x_all - mean) ** 2).mean())) + 1e-12
        x = (x_all - mean) / scale
        present, counts = np.unique(y, return_counts=True)
        local = np.searchsorted(present, y)
        heldout = np.full((len(y), n_classes), np.nan)
        mask, rep = calibration_rows(representative, len(y))
        empty = FittedMLP(mean=mean, scale=scale, model=None, present=present, scaling=Scaling(),
                          n_classes=n_classes, calibrated=False, heldout_proba=heldout, heldout_representative=rep,
                          heldout_labels=y, figures={"classifier": self.name})
        if len(present) < 2:
            return empty
        unlabeled = np.setdiff1d(np.arange(len(x)), labeled)
        k = int(min(self.folds, counts.min()))
        scaling, calibrated = Scaling(), False
        figures: dict[str, float | int | bool | str | None] = {"classifier": self.name}
        if k >= 2:
            oof = np.zeros((len(y), len(present)))
            splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(labeled, local)
            for f, (tr, te) in enumerate(splits):
                # the fold's held-out labeled items stay in the unlabeled pool, as auto-labeled items do
                pool = np.concatenate([unlabeled, labeled[te]])
                net = self._train(x, labeled[tr], local[tr], pool, len(present), seed * 100 + f + 1)
                oof[te] = _mlp_logits(net, x[labeled[te]])
            scaling = fit_scaling(oof[mask], local[mask], bias=True)
            heldout[:] = 0.0  # every row held out once; classes nobody labeled get probability 0
            heldout[:, present] = crossfit_scaled(oof, local, mask, seed=seed)
            calibrated = True
            figures.update({"cv_accuracy": float((oof.argmax(axis=1) == local).mean()),
                            "cv_nll_raw": _nll(_softmax(oof[mask]), local[mask]),
                            "cv_nll_calibrated": _nll(scaling.apply(oof[mask]), local[mask]),
                            "calibration_items": int(mask.sum())})
        net = self._train(x, labeled, local, unlabeled, len(present), seed * 100)
        return FittedMLP(mean=mean, scale=scale, model=net, present=present, scaling=scaling, n_classes=n_classes,
                         calibrated=calibrated, heldout_proba=heldout, heldout_representative=rep,
                         heldout_labels=y, figures=figures)


class BestHeldout:
    """Fits every candidate plug-in and keeps the one with the best held-out evidence.

    The choice is made on the representative people-labeled rows' out-of-fold predictions:
    higher accuracy, then lower log-loss. Those rows include the random sample the auto-label
    threshold is then tested on, so choosing the better of two on them weakens the guarantee's
    95 % to about 90 % (a union bound over the two candidates): an option, not the default.
    """

    name = "best"

    def __init__(self, candidates: list[LabelClassifier] | None = None, *, threads: int = 1) -> None:
        self.candidates = candidates or [LinearProbe(), SemiSupervisedMLP(threads=threads)]

    def fit(self, x_all: np.ndarray, labeled: np.ndarray, y: np.ndarray, *, n_classes: int,
            representative: np.ndarray | None = None, seed: int = 0) -> FittedClassifier:
        best: tuple[tuple[float, float], FittedClassifier] | None = None
        scores: dict[str, float | None] = {}
        y = np.asarray(y, dtype=np.int64)
        for plugin in self.candidates:
            fitted = plugin.fit(x_all, labeled, y, n_classes=n_classes, representative=representative, seed=seed)
            proba = np.asarray(fitted.heldout_proba, dtype=np.float64)
            rows = np.asarray(fitted.heldout_representative, dtype=bool)
            if proba.ndim == 2 and len(proba) == len(y):
                rows = rows & ~np.isnan(proba).any(axis=1)
            else:
                rows = np.zeros(len(y), dtype=bool)
            key = (-1.0, -np.inf)
            if rows.any():
                acc = float((proba[rows].argmax(axis=1) == y[rows]).mean())
                key = (acc, -_nll(proba[rows], y[rows]))
            scores[plugin.name] = key[0] if rows.any() else None
            if best is None or key > best[0]:
                best = (key, fitted)
        assert best is not None
        return _Chosen(best[1], scores)


class _Chosen:
    """A fitted classifier chosen by :class:`BestHeldout`; its summary says which and why."""

    def __init__(self, inner: FittedClassifier, scores: dict[str, float | None]) -> None:
        self.inner = inner
        self.scores = scores
        self.model = inner.model
        self.calibrated = inner.calibrated
        self.heldout_proba = inner.heldout_proba
        self.heldout_representative = inner.heldout_representative

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.inner.predict_proba(x)

    def summary(self) -> dict[str, float | int | bool | str | None]:
        out = dict(self.inner.summary())
        out.update({f"heldout_accuracy_{name}": acc for name, acc in self.scores.items()})
        return out


def _pixel_ssl(**options: Any) -> LabelClassifier:
    from dlforge.labeler.pixelnet import PixelSSL  # imports this module

    return PixelSSL(**options)


def _blend(**options: Any) -> LabelClassifier:
    from dlforge.labeler.pixelnet import Blend  # imports this module

    return Blend(**options)


def _tail(**options: Any) -> LabelClassifier:
    from dlforge.labeler.tailnet import TailFinetune  # imports this module

    return TailFinetune(**options)


CLASSIFIERS: dict[str, Callable[..., LabelClassifier]] = {
    "linear": LinearProbe, "mlp_ssl": SemiSupervisedMLP, "cnn_ssl": _pixel_ssl, "blend": _blend, "best": BestHeldout,
    "finetune_top": _tail,
}


def make_classifier(name: str, **options: Any) -> LabelClassifier:
    """The classifier plug-in called ``name`` (``DLFORGE_LABELER_CLASSIFIER``)."""
    from dlforge.common.errors import ConfigError

    try:
        factory = CLASSIFIERS[name]
    except KeyError as exc:
        raise ConfigError(f"DLFORGE_LABELER_CLASSIFIER: unknown classifier {name!r}; known: "
                          f"{', '.join(CLASSIFIERS)}") from exc
    return factory() if name == "linear" else factory(**options)
