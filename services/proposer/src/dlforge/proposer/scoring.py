"""Scoring repository candidates on a target sample: the :class:`Scorer` plug-in interface and its scorers.

A scorer measures one aspect of a candidate on the target data and returns named raw sub-scores.
Each sub-score declares whether larger or smaller is better (:class:`SubScore`); the ranking
(:mod:`dlforge.proposer.handlers`) normalizes every sub-score across the candidates and weights them.

Scorers shipped here, after the seeds' "score = f(feature, accuracy, speed)":

- :class:`LogMEScorer` — LogME evidence of the target labels given the candidate's pooled features;
- :class:`LinearProbeScorer` — balanced accuracy of a logistic regression on those features;
- :class:`DomainDiscriminatorScorer` — how hard source and target features are to tell apart;
- :class:`ShortTermTrainingScorer` — ∫L dt of a short fine-tuning run and the val accuracy after it;
- :class:`SpeedScorer` — measured inference throughput at batch 1 and 32, and at the spec's input size.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from dlforge.proposer.backbone import BackboneSplit, split_backbone
from dlforge.vision.features import FeatureStore
from dlforge.vision.images import to_tensor
from dlforge.vision.networks import Classifier, NetworkSpec, spec_of
from dlforge.vision.staged import StagedNetwork
from dlforge.vision.trunk import TrunkFeatures

# --------------------------------------------------------------------------------------------
# Inputs of a scorer
# --------------------------------------------------------------------------------------------


@dataclass
class TargetSample:
    """The target data a proposal scores on: uint8 N x S x S x C images and class indices."""

    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    train_contents: list[str] | None = None
    """sha256 of each train image's bytes (when known): lets candidates read stored features."""
    val_contents: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Encoded:
    """One image set through a candidate's frozen prefix: boundary activations and pooled features."""

    boundary: torch.Tensor
    features: np.ndarray


@dataclass
class Candidate:
    """A repository model loaded for scoring, with a cache of its encodings of the target sample."""

    model_id: str
    arch: str
    source_dataset: str
    weights_key: str
    model: Classifier
    spec: NetworkSpec
    split: BackboneSplit
    source_sample: np.ndarray | None = None
    features: TrunkFeatures | None = None
    """Set for the pretrained trunk: target encodings go through the feature store."""
    _cache: dict[str, Encoded] = field(default_factory=dict, repr=False)

    @classmethod
    def from_model(
        cls,
        model: Classifier,
        *,
        model_id: str,
        arch: str,
        source_dataset: str,
        weights_key: str,
        input_size: int | None = None,
        unfreeze_last: int = 1,
        source_sample: np.ndarray | None = None,
        store: FeatureStore | None = None,
    ) -> Candidate:
        """A candidate; with ``store``, an EfficientNet-Lite0 candidate reads and writes its encodings of
        target images there (keyed by its own prefix weights, so the ImageNet one shares the labeler's)."""
        spec = spec_of(arch)
        if input_size is not None and input_size != spec.input_size:
            spec = replace(spec, input_size=input_size)
        model.eval()
        split = split_backbone(model, unfreeze_last=unfreeze_last)
        features = None
        if store is not None and arch == "efficientnet_lite0":
            features = TrunkFeatures(store, StagedNetwork(model, arch=arch).eval(), threads=torch.get_num_threads())
        return cls(model_id=model_id, arch=arch, source_dataset=source_dataset, weights_key=weights_key,
                   model=model, spec=spec, split=split, source_sample=source_sample, features=features)

    def encode(self, name: str, images: np.ndarray, *, batch_size: int = 32,
               contents: Sequence[str] | None = None) -> Encoded:
        """Prefix activations and pooled features of ``images`` (cached under ``name``).

        With ``contents`` (the images' sha256) and a feature store, both come from the store when
        another stage computed them (a pass from pixels happens at most once per image and size).
        """
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        usable = (self.features is not None and contents is not None and len(images) > 0
                  and images.shape[1] == images.shape[2] == self.spec.input_size and images.shape[3] == 3)
        if usable:
            assert self.features is not None and contents is not None
            load = lambda rows: images[rows]  # noqa: E731
            pooled = self.features.pooled(contents, size=self.spec.input_size, stages=["head"], load=load)["head"]
            if self.split.boundary is None:
                boundary = torch.from_numpy(np.asarray(pooled, dtype=np.float32))
            else:
                acts = self.features.activations(contents, size=self.spec.input_size, boundary=self.split.boundary,
                                                 load=load)
                boundary = torch.from_numpy(np.asarray(acts, dtype=np.float32))
            enc = Encoded(boundary, np.asarray(pooled, dtype=np.float64))
            self._cache[name] = enc
            return enc
        self.model.eval()
        boundaries: list[torch.Tensor] = []
        feats: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = to_tensor(images[start:start + batch_size], self.spec)
                b = self.split.prefix(x)
                boundaries.append(b.clone())
                feats.append(self.split.tail(b).float().numpy())
        if boundaries:
            enc = Encoded(torch.cat(boundaries), np.concatenate(feats).astype(np.float64))
        else:
            enc = Encoded(torch.zeros(0), np.zeros((0, self.spec.feature_dim)))
        self._cache[name] = enc
        return enc


# --------------------------------------------------------------------------------------------
# The plug-in interface
# --------------------------------------------------------------------------------------------


class Direction(StrEnum):
    """How a raw sub-score is compared across candidates."""

    HIGHER = "higher"  # larger is better
    LOWER = "lower"  # smaller is better
    HIGHER_LOG = "higher_log"  # larger is better, compared on a log scale (throughputs)


@dataclass(frozen=True)
class SubScore:
    """A named raw measurement a scorer returns and how the ranking reads it.

    ``min_range``: the spread across candidates (on the compared scale) that counts as a decisive
    difference. Normalization divides by max(spread, min_range), so differences smaller than it —
    e.g. a few points of accuracy on a 200-image val sample, within its noise — move the normalized
    value only in proportion instead of across the whole [0, 1].
    ``weighted=False`` marks a value that is reported (and may gate) but never weighted.
    """

    name: str
    direction: Direction
    description: str
    min_range: float = 0.0
    weighted: bool = True


@runtime_checkable
class Scorer(Protocol):
    """Scores one candidate on the target sample.

    ``sub_scores`` declares every value :meth:`score` may return. :meth:`score` returns raw values
    keyed by those names; a value that does not apply to a candidate (e.g. the domain
    discriminator for a network without source samples) is simply absent.
    """

    name: str
    sub_scores: tuple[SubScore, ...]

    def score(self, candidate: Candidate, target: TargetSample) -> dict[str, float]:
        """Raw sub-scores of ``candidate`` on ``target``."""
        ...


# --------------------------------------------------------------------------------------------
# LogME
# --------------------------------------------------------------------------------------------


_LOGME_EPS = 1e-5


def logme(features: np.ndarray, labels: np.ndarray, *, max_iter: int = 100, tol: float = 1e-4) -> float:
    """LogME: the mean per-class log marginal evidence of a Bayesian linear model on ``features``.

    You, Liu, Wang, Long: "LogME: Practical Assessment of Pre-trained Models for Transfer
    Learning", ICML 2021 (Algorithm 1). For each class k the one-vs-rest target y_k is modelled as
    y = F w + noise with prior w ~ N(0, α⁻¹ I) and noise ~ N(0, β⁻¹); α and β are set by the
    fixed-point evidence maximization (MacKay)

        γ = Σ_i β σ_i / (α + β σ_i),  m = β (α I + β FᵀF)⁻¹ Fᵀ y,  α ← γ / mᵀm,  β ← (n − γ) / ‖F m − y‖²

    with σ_i the eigenvalues of FᵀF, and the evidence per sample is

        L/n = [D/2 log α + n/2 log β − n/2 log 2π − β/2 ‖Fm − y‖² − α/2 mᵀm − 1/2 Σ_i log(α + β σ_i)] / n.

    The result is the mean over classes. Computed from the thin SVD of F (n x D), so D > n costs
    nothing extra: the D − r zero eigenvalues add (D − r) log α to Σ log(α + β σ_i). Larger is better.
    """
    f = np.asarray(features, dtype=np.float64)
    y_idx = np.asarray(labels).astype(np.int64)
    n, d = f.shape
    if n < 2:
        raise ValueError("LogME needs at least two samples")
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2  # eigenvalues of FᵀF (r of them; the other d - r are zero)
    r = len(sigma)
    classes = np.unique(y_idx)
    if len(classes) < 2:
        raise ValueError("LogME needs at least two classes")
    evidences = []
    for k in classes:
        y = (y_idx == k).astype(np.float64)
        uty = u.T @ y  # coordinates of y in the column space of F
        y_out = float(y @ y - uty @ uty)  # part of y outside that space: always a residual
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            denom = alpha + beta * sigma
            gamma = float(np.sum(beta * sigma / denom))
            # m = V diag(β s / (α + β σ)) Uᵀy  ->  mᵀm = Σ (β s uty / denom)², F m = U diag(β σ / denom) Uᵀy
            mm = float(np.sum((beta * s * uty / denom) ** 2))
            res = float(np.sum((uty * alpha / denom) ** 2)) + y_out
            # ε as in the authors' code: keeps the update finite when F interpolates y (n <= D)
            new_alpha = gamma / (mm + _LOGME_EPS)
            new_beta = max(n - gamma, _LOGME_EPS) / (res + _LOGME_EPS)
            converged = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
            alpha, beta = new_alpha, new_beta
            if converged:
                break
        denom = alpha + beta * sigma
        mm = float(np.sum((beta * s * uty / denom) ** 2))
        res = float(np.sum((uty * alpha / denom) ** 2)) + y_out
        evidence = (
            d / 2.0 * math.log(alpha)
            + n / 2.0 * math.log(beta)
            - n / 2.0 * math.log(2 * math.pi)
            - beta / 2.0 * res
            - alpha / 2.0 * mm
            - 0.5 * (float(np.sum(np.log(denom))) + (d - r) * math.log(alpha))
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in range(num_classes) if np.any(y_true == c)]
    return float(np.mean(recalls)) if recalls else 0.0


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0) + 1e-6
    return [(a - mean) / std for a in (train, *others)]


class LogMEScorer:
    """LogME of the target train sample's labels given the candidate's pooled features."""

    name = "logme"
    sub_scores: tuple[SubScore, ...] = (
        SubScore("logme", Direction.HIGHER, "LogME evidence per sample (You et al. 2021)", 0.1),
    )

    def score(self, candidate: Candidate, target: TargetSample) -> dict[str, float]:
        feats = candidate.encode("train", target.train_x, contents=target.train_contents).features
        return {"logme": logme(feats, target.train_y)}


class LinearProbeScorer:
    """A logistic regression on standardized pooled features: balanced accuracy on the val sample."""

    name = "probe"
    sub_scores: tuple[SubScore, ...] = (
        SubScore("probe_bacc", Direction.HIGHER, "linear-probe balanced accuracy on val", 0.1),
    )

    def __init__(self, c: float = 1.0) -> None:
        self.c = c

    def score(self, candidate: Candidate, target: TargetSample) -> dict[str, float]:
        from sklearn.linear_model import LogisticRegression

        train = candidate.encode("train", target.train_x, contents=target.train_contents).features
        val = candidate.encode("val", target.val_x, contents=target.val_contents).features
        tr, va = _standardize(train, val)
        clf = LogisticRegression(C=self.c, max_iter=2000)
        clf.fit(tr, target.train_y)
        return {"probe_bacc": balanced_accuracy(target.val_y, clf.predict(va), target.num_classes)}


class DomainDiscriminatorScorer:
    """The seeds' domain discriminator: a classifier told to separate source from target features.

    Features of the candidate's own source samples and of the target train sample (equal counts)
    are told apart by a logistic regression under stratified k-fold cross-validation. With ε its
    error, ``domain_sim = min(1, 2ε)`` = 1 − PAD/2 (PAD = 2(1 − 2ε), the proxy A-distance of
    Ben-David et al.): 1 when the domains are indistinguishable, 0 when perfectly separable.
    Only for candidates that carry a source sample (the networks dlforge trained itself).
    """

    name = "domain"
    sub_scores: tuple[SubScore, ...] = (
        SubScore("domain_sim", Direction.HIGHER, "1 - PAD/2 between source and target features", 0.2),
    )

    def __init__(self, folds: int = 5, max_per_domain: int = 300, seed: int = 0) -> None:
        self.folds = folds
        self.max_per_domain = max_per_domain
        self.seed = seed

    def score(self, candidate: Candidate, target: TargetSample) -> dict[str, float]:
        if candidate.source_sample is None or len(candidate.source_sample) == 0:
            return {}
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_score

        tgt = candidate.encode("train", target.train_x, contents=target.train_contents).features
        src = candidate.encode("source", candidate.source_sample).features
        n = min(len(tgt), len(src), self.max_per_domain)
        if n < self.folds:
            return {}
        rng = np.random.default_rng(self.seed)
        x = np.concatenate([src[rng.choice(len(src), n, replace=False)], tgt[rng.choice(len(tgt), n, replace=False)]])
        y = np.concatenate([np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)])
        (x,) = _standardize(x)
        cv = StratifiedKFold(self.folds, shuffle=True, random_state=self.seed)
        clf = LogisticRegression(C=1.0, solver="liblinear", max_iter=1000)
        acc = float(np.mean(cross_val_score(clf, x, y, cv=cv)))
        return {"domain_sim": float(min(1.0, 2.0 * (1.0 - acc)))}


def loss_curve_integral(losses: list[float] | np.ndarray, *, num_classes: int) -> float:
    """∫₀¹ L(t) dt / ln K over training progress t ∈ [0, 1] (trapezoid rule over the steps).

    Dividing by ln K — the loss of a uniform guess — makes 1.0 "learned nothing" for any number of
    classes; lower means the candidate absorbed the new data faster.
    """
    values = np.asarray(losses, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no losses to integrate")
    # trapezoid rule with dt = 1 / (steps - 1); a single step is its own average
    area = float(values[0]) if values.size == 1 else float(np.sum(values[1:] + values[:-1]) / 2.0 / (values.size - 1))
    return area / math.log(max(num_classes, 2))


class ShortTermTrainingScorer:
    """The seeds' short-term training: fine-tune tail + new head briefly, integrate the loss curve.

    The frozen prefix's activations are cached (:meth:`Candidate.encode`), so each step runs only
    the tail (the last ``unfreeze_last`` backbone stages, see :mod:`dlforge.proposer.backbone`) and
    a fresh linear head. ``loss_auc`` is :func:`loss_curve_integral` of the per-step training losses;
    ``finetune_bacc`` the balanced accuracy on the val sample afterwards.
    """

    name = "short_term"
    sub_scores: tuple[SubScore, ...] = (
        SubScore("loss_auc", Direction.LOWER, "∫L dt / ln K of the short training run", 0.1),
        SubScore("finetune_bacc", Direction.HIGHER, "val balanced accuracy after the short run", 0.1),
    )

    def __init__(self, *, steps: int = 100, batch_size: int = 32, lr: float = 1e-3, seed: int = 0) -> None:
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.last_curve: dict[str, list[float]] = {}

    def score(self, candidate: Candidate, target: TargetSample) -> dict[str, float]:
        train = candidate.encode("train", target.train_x, contents=target.train_contents)
        val = candidate.encode("val", target.val_x, contents=target.val_contents)
        losses, pred = self.train(candidate.split, train, val, target.train_y, num_classes=target.num_classes,
                                  feature_dim=candidate.spec.feature_dim)
        self.last_curve[candidate.model_id] = losses
        return {
            "loss_auc": loss_curve_integral(losses, num_classes=target.num_classes),
            "finetune_bacc": balanced_accuracy(target.val_y, pred, target.num_classes),
        }

    def train(
        self,
        split: BackboneSplit,
        train: Encoded,
        val: Encoded,
        train_y: np.ndarray,
        *,
        num_classes: int,
        feature_dim: int,
    ) -> tuple[list[float], np.ndarray]:
        """Per-step training losses and the val predictions after training."""
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        tail = copy.deepcopy(split.tail)  # the candidate's own modules stay untouched
        for p in tail.parameters():
            p.requires_grad_(True)
        head = nn.Linear(feature_dim, num_classes)
        params = [p for p in (*tail.parameters(), *head.parameters()) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=1e-4)
        y = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
        x_train = train.boundary.detach()
        n = len(y)
        bs = min(self.batch_size, n)
        losses: list[float] = []
        tail.train()
        for _ in range(self.steps):
            idx = torch.randint(0, n, (bs,), generator=gen)
            xb = x_train[idx]
            if bs == 1 and tail.training:
                tail.eval()  # BatchNorm cannot train on one sample
            loss = nn.functional.cross_entropy(head(tail(xb)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        tail.eval()
        with torch.inference_mode():
            preds = [head(tail(val.boundary[i:i + 64])).argmax(1) for i in range(0, len(val.boundary), 64)]
        pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
        return losses, pred


def measure_throughput(model: nn.Module, *, batch: int, size: int, channels: int, seconds: float,
                       min_runs: int = 2, max_runs: int = 200) -> float:
    """Images per second of ``model`` in inference mode on random input (after one warm-up run)."""
    x = torch.randn(batch, channels, size, size)
    model.eval()
    with torch.inference_mode():
        model(x)  # warm-up: allocations, oneDNN primitive creation
        runs = 0
        start = time.perf_counter()
        while runs < max_runs:
            model(x)
            runs += 1
            elapsed = time.perf_counter() - start
            if runs >= min_runs and elapsed >= seconds:
                break
    return batch * runs / max(time.perf_counter() - start, 1e-9)


_LN4 = math.log(4.0)  # a 4x throughput difference is decisive


class SpeedScorer:
    """Measured PyTorch eager FP32 throughput (images/s) of the whole classifier.

    ``fps_b1``/``fps_b32`` at the candidate's own input size are weighted; ``fps_spec_b1`` at the
    spec's input size only feeds the min_fps gate (left out when the network cannot take that size).
    Dense inference costs the same whatever the weights, so one measurement per (architecture,
    input size, channels, batch) serves every candidate of that architecture: two candidates of one
    architecture never differ by measurement noise.
    """

    name = "speed"
    sub_scores: tuple[SubScore, ...] = (
        SubScore("fps_b1", Direction.HIGHER_LOG, "images/s at batch 1, own input size", _LN4),
        SubScore("fps_b32", Direction.HIGHER_LOG, "images/s at batch 32, own input size", _LN4),
        SubScore("fps_spec_b1", Direction.HIGHER_LOG, "images/s at batch 1 at spec.input_size", _LN4,
                 weighted=False),
    )

    def __init__(self, *, seconds: float = 1.0, spec_input_size: int | None = None) -> None:
        self.seconds = seconds
        self.spec_input_size = spec_input_size
        self._measured: dict[tuple[str, int, int, int], float] = {}

    def _fps(self, candidate: Candidate, *, batch: int, size: int, seconds: float, min_runs: int) -> float:
        key = (candidate.arch, size, candidate.spec.in_channels, batch)
        if key not in self._measured:
            self._measured[key] = measure_throughput(candidate.model, batch=batch, size=size,
                                                     channels=candidate.spec.in_channels, seconds=seconds,
                                                     min_runs=min_runs)
        return self._measured[key]

    def score(self, candidate: Candidate, target: TargetSample) -> dict[str, float]:
        size = candidate.spec.input_size
        out = {
            "fps_b1": self._fps(candidate, batch=1, size=size, seconds=self.seconds, min_runs=3),
            "fps_b32": self._fps(candidate, batch=32, size=size, seconds=self.seconds, min_runs=1),
        }
        if self.spec_input_size:
            try:
                out["fps_spec_b1"] = self._fps(candidate, batch=1, size=self.spec_input_size,
                                               seconds=self.seconds / 2, min_runs=3)
            except RuntimeError:
                pass  # the network cannot take that size: the gate does not apply
        return out


def default_scorers(
    *,
    steps: int = 100,
    batch_size: int = 32,
    lr: float = 1e-3,
    speed_seconds: float = 1.0,
    spec_input_size: int | None = None,
    seed: int = 0,
) -> list[Scorer]:
    """The scorers a proposal runs by default, cheapest first."""
    return [
        LogMEScorer(),
        LinearProbeScorer(),
        DomainDiscriminatorScorer(seed=seed),
        ShortTermTrainingScorer(steps=steps, batch_size=batch_size, lr=lr, seed=seed),
        SpeedScorer(seconds=speed_seconds, spec_input_size=spec_input_size),
    ]


def sub_score_specs(scorers: list[Scorer]) -> Mapping[str, SubScore]:
    """Every sub-score the scorers declare, by name (a name declared twice is a configuration error)."""
    specs: dict[str, SubScore] = {}
    for scorer in scorers:
        for sub in scorer.sub_scores:
            if sub.name in specs:
                raise ValueError(f"sub-score {sub.name!r} declared by two scorers")
            specs[sub.name] = sub
    return specs
