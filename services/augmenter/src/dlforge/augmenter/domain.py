"""Domain adaptation through intermediate domains (seed 000): labeled source images, unlabeled target images.

A classifier trained on one domain (ELPV's monocrystalline cells, say) can be worse than chance on
another (polycrystalline cells: their grain looks like damage to it). The seed's remedy is to walk
from the source to the target through domains in between and adapt a little at each step.

**Intermediate domains.** The source's labeled items are carried toward the target at strengths
``0 < lam_1 < ... < lam_K = 1``, their labels kept (the change is one of style, not of content):

* :func:`amplitude_blend`, in pixels (Fourier domain adaptation, Yang & Soatto, CVPR 2020): each
  source image keeps its Fourier phase (where things are) while the low-frequency part of its
  amplitude spectrum (``beta``: the share of the spectrum's side around its centre) moves toward the
  target images' mean amplitude by ``lam``; the restyled images are then embedded like any other.
* :func:`moment_blend`, in features: each source feature vector is standardized with the source's
  per-feature mean and spread and given the moments interpolated ``lam`` of the way to the target's
  (the feature-space counterpart of style interpolation; at ``lam = 1`` it is per-domain
  standardization).

**Gradual self-training** (:class:`GradualSelfTraining`, after Kumar et al., ICML 2020): a linear
classifier is fitted on the source; at step ``k`` source and target both stand at the point ``lam_k``
between them (the source carried ``lam_k`` toward the target, the target ``1 - lam_k`` toward the
source), and the classifier is refitted on the source's labels plus the target items the previous
step's model is most sure of (per predicted class, so that no class swallows the others). Each model
labels items one small step from what it was fitted on; the last one, at ``lam = 1``, labels the target.

Measured on ELPV mono -> poly and digits -> MNIST in ``benchmarks/domain_adaptation.py`` (its JSON has
``gap_closed``: the share of the gap between source-only and in-domain training that adaptation closes).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlforge.common.blas import single_threaded_blas
from dlforge.common.errors import InvalidInput
from dlforge.vision.domains import amplitude_blend, mean_amplitude, moment_blend

__all__ = ["Adapted", "GradualSelfTraining", "amplitude_blend", "mean_amplitude", "moment_blend", "source_only"]

DEFAULT_STEPS = tuple(round(0.1 * k, 1) for k in range(1, 11))  # ten even steps: fewer measured worse


def _check_steps(steps: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(s) for s in steps)
    if not out or any(not 0.0 < s <= 1.0 for s in out) or any(b <= a for a, b in itertools.pairwise(out)) \
            or out[-1] != 1.0:
        raise InvalidInput(f"intermediate-domain strengths must increase within (0, 1] and end at 1, got {list(out)}")
    return out


@dataclass
class Adapted:
    """A classifier adapted to the target: the feature scaling, the last step's model and what each step did."""

    mean: np.ndarray
    scale: np.ndarray
    model: Any
    classes: np.ndarray
    steps: list[dict[str, Any]] = field(default_factory=list)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities over ``classes`` (the source's labels, in order)."""
        return np.asarray(self.model.predict_proba((np.asarray(x, dtype=np.float64) - self.mean) / self.scale))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes[self.predict_proba(x).argmax(axis=1)])


def _confident_per_class(proba: np.ndarray, share: float) -> np.ndarray:
    """Rows to pseudo-label: per predicted class, the most confident ``share`` of the rows predicted so."""
    pred, conf = proba.argmax(axis=1), proba.max(axis=1)
    keep: list[np.ndarray] = []
    for c in np.unique(pred):
        rows = np.flatnonzero(pred == c)
        k = int(np.floor(len(rows) * share))
        if k > 0:
            keep.append(rows[np.argsort(-conf[rows], kind="stable")[:k]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


class GradualSelfTraining:
    """Source -> intermediate domains -> target, one refit per step (see the module docstring).

    At step ``k`` both domains stand at the same point ``lam_k`` between them: the source's items carried
    ``lam_k`` of the way toward the target keep their labels, and the target's items carried ``1 - lam_k``
    of the way toward the source get the previous step's predictions as pseudo-labels (per predicted class,
    the ``share`` most confident). So each model labels items only a small step away from what it was
    fitted on, down to the target itself at ``lam = 1``.

    :meth:`fit` takes the domains as feature arrays (``source_steps[k]``, ``target_steps[k]``: rows aligned
    with the source's and the target's), e.g. embeddings of :func:`amplitude_blend`-ed images; without
    them, :func:`moment_blend` makes them from the features. ``C`` regularizes the logistic regression
    (features standardized over source and target together).
    """

    def __init__(self, *, steps: Sequence[float] = DEFAULT_STEPS, share: float = 0.5, c: float = 0.05,
                 seed: int = 0) -> None:
        if not 0.0 <= share <= 1.0 or c <= 0:
            raise InvalidInput(f"share must be in [0, 1] and C above 0, got {share} and {c}")
        self.steps, self.share, self.c, self.seed = _check_steps(steps), share, c, seed

    def _fit(self, x: np.ndarray, y: np.ndarray) -> Any:
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.c, max_iter=3000, random_state=self.seed).fit(x, y)

    def fit(self, source_x: np.ndarray, source_y: np.ndarray, target_x: np.ndarray, *,
            source_steps: Sequence[np.ndarray] | None = None,
            target_steps: Sequence[np.ndarray] | None = None) -> Adapted:
        xs, xt = np.asarray(source_x, dtype=np.float64), np.asarray(target_x, dtype=np.float64)
        ys = np.asarray(source_y)
        if xs.ndim != 2 or xt.ndim != 2 or xs.shape[1] != xt.shape[1] or len(xs) != len(ys) or len(xt) < 2:
            raise InvalidInput(f"source {xs.shape} (with {len(ys)} labels) and target {xt.shape} features must be "
                               "(rows, dims) alike")
        if len(np.unique(ys)) < 2:
            raise InvalidInput("the source needs labels of at least two classes")
        if source_steps is None:
            source_steps = [moment_blend(xs, xt, lam) for lam in self.steps]
        if target_steps is None:
            target_steps = [moment_blend(xt, xs, 1.0 - lam) for lam in self.steps]
        for name, domains, like in (("source", source_steps, xs), ("target", target_steps, xt)):
            if len(domains) != len(self.steps) or any(np.shape(d) != like.shape for d in domains):
                raise InvalidInput(f"one {name} domain per step ({len(self.steps)}), each shaped like the {name} "
                                   f"{like.shape}")
        both = np.vstack([xs, xt])
        mean, scale = both.mean(axis=0), both.std(axis=0) + 1e-6
        with single_threaded_blas():
            model = self._fit((xs - mean) / scale, ys)
            log: list[dict[str, Any]] = [{"lam": 0.0, "pseudo_labeled": 0}]
            for lam, ds, dt in zip(self.steps, source_steps, target_steps, strict=True):
                s = (np.asarray(ds, dtype=np.float64) - mean) / scale
                t = (np.asarray(dt, dtype=np.float64) - mean) / scale
                proba = model.predict_proba(t)
                rows = _confident_per_class(proba, self.share)
                pseudo = model.classes_[proba.argmax(axis=1)[rows]]
                model = self._fit(np.vstack([s, t[rows]]), np.concatenate([ys, pseudo]))
                log.append({"lam": lam, "pseudo_labeled": len(rows)})
        return Adapted(mean=mean, scale=scale, model=model, classes=np.asarray(model.classes_), steps=log)


def source_only(source_x: np.ndarray, source_y: np.ndarray, target_x: np.ndarray, *, c: float = 0.05,
                seed: int = 0) -> Adapted:
    """The baseline: fitted on the source alone (features standardized over both domains, as adapted models are)."""
    xs, xt = np.asarray(source_x, dtype=np.float64), np.asarray(target_x, dtype=np.float64)
    both = np.vstack([xs, xt])
    mean, scale = both.mean(axis=0), both.std(axis=0) + 1e-6
    from sklearn.linear_model import LogisticRegression

    with single_threaded_blas():
        model = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit((xs - mean) / scale, source_y)
    return Adapted(mean=mean, scale=scale, model=model, classes=np.asarray(model.classes_))
