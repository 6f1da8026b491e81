"""The auto-labeler's classifier: logistic regression on embeddings with calibrated confidence.

:func:`fit_calibrated` centres and scales the embeddings, picks the regularization by stratified
cross-validation, and fits a temperature and per-class bias (Platt scaling for two classes) on
the *out-of-fold* logits, so the confidence that decides auto-labeling was never computed on
an item the model trained on. Calibration uses the representative labeled items (random test,
k-means seed and given labels) when there are enough of them: the uncertainty-sampled batches
are the hard cases and would misstate how often the model is right on the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import numpy as np
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

P = ParamSpec("P")
R = TypeVar("R")
DEFAULT_CS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def small_blas(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with single-threaded BLAS: the loop's matrices are small, and on a shared 2-core
    machine BLAS threads only fight each other (and torch) for the cores, 10-40x slower."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


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
    # :func:`fit_calibrated`; NaN rows where no fold held the item out), and which of them are
    # representative: the held-out evidence a selective auto-labeling threshold is chosen on
    heldout_proba: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    heldout_representative: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities, N x n_classes (classes never seen get 0)."""
        full = np.zeros((len(x), self.n_classes))
        if self.model is None:
            full[:, self.present] = 1.0
            return full
        z = _logits(self.model, (x - self.mean) / self.scale)
        full[:, self.present] = self.scaling.apply(z)
        return full

    def summary(self) -> dict[str, float | int | bool | None]:
        return {
            "C": self.c,
            "temperature": self.scaling.temperature,
            "calibrated": self.calibrated,
            "cv_accuracy": self.cv_accuracy,
            "cv_nll_raw": self.cv_nll_raw,
            "cv_nll_calibrated": self.cv_nll_calibrated,
            "calibration_items": self.calibration_items,
        }


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
    mask = np.ones(len(y), dtype=bool)
    if representative is not None and int(np.sum(representative)) >= min_calibration:
        mask = np.asarray(representative, dtype=bool)
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
    if oof is not None:
        heldout[:, present] = scaling.apply(oof[:, present])
    return CalibratedClassifier(mean=mean, scale=scale, model=model, present=present, scaling=scaling,
                                n_classes=n_classes, c=best_c, calibrated=calibrated, cv_accuracy=cv_acc,
                                cv_nll_raw=nll_raw, cv_nll_calibrated=nll_cal, calibration_items=n_cal,
                                heldout_proba=heldout, heldout_representative=mask.copy())
