"""Scoring repository candidates on a target sample: the :class:`Scorer` plug-in interface and its scorers.

A scorer measures one aspect of a candidate on the target data and returns named raw sub-scores.
Each sub-score declares whether larger or smaller is better (:class:`SubScore`); the ranking
(:mod:`dlforge.proposer.handlers`) normalizes every sub-score across the candidates and weights them.

Scorers shipped here, after the seeds' "score = f(feature, accuracy, speed)":

- :class:`LogMEScorer` — LogME evidence of the target labels given the candidate's pooled features;
- :class:`LinearProbeScorer` — balanced accuracy of a logistic regression on those features;
- :class:`DomainDiscriminatorScorer` — how hard source and target features are to tell apart;
- :class:`ShortTermTrainingScorer` — ∫L dt of a short fine-tuning run and the val accuracy after it;
- :class:`SpeedScorer` — measured inference throughput at batch 1 and 32, and at the spec's input size;
- :class:`KNNScorer` — balanced accuracy of a k-nearest-neighbour classifier on the pooled features;
- :class:`SFDAScorer` — SFDA (Shao et al. 2022): a shrunk Fisher discriminant, self-challenged by ConfMix;
- :class:`NCTIScorer` — NCTI (Wang et al. 2023): how near the features are to neural collapse on the target
  (a :class:`CohortScorer`: its three terms are normalized over the candidates);
- :class:`AgreementScorer` — agreement of the candidate's val predictions with the other candidates'
  consensus, and its representational dissimilarity (1 − linear CKA) from them (a :class:`CohortScorer`);
- :class:`ActivationScorer` — PCA of the pooled activations (how much of their dominant variance is the
  target classes') and CAM focus (how concentrated the class evidence is in space).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

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


@dataclass(frozen=True)
class LinearProbe:
    """A logistic regression on a candidate's pooled train features, standardized by their own mean and std."""

    model: Any  # a fitted sklearn LogisticRegression
    mean: np.ndarray
    std: np.ndarray

    def standardize(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) / self.std


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
    _probes: dict[float, LinearProbe] = field(default_factory=dict, repr=False)

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

    def remember(self, name: str, encoded: Encoded) -> None:
        """Use ``encoded`` as this candidate's encoding of the image set ``name`` (e.g. computed earlier)."""
        self._cache[name] = encoded

    def probe(self, target: TargetSample, *, c: float = 1.0) -> LinearProbe:
        """The linear probe on the target train sample's features (fitted once per ``c``, as the encodings are
        cached once per image set: several scorers read it)."""
        hit = self._probes.get(c)
        if hit is not None:
            return hit
        from sklearn.linear_model import LogisticRegression

        train = self.encode("train", target.train_x, contents=target.train_contents).features
        mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
        model = LogisticRegression(C=c, max_iter=2000).fit((train - mean) / std, target.train_y)
        probe = self._probes[c] = LinearProbe(model, mean, std)
        return probe

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


@runtime_checkable
class CohortScorer(Scorer, Protocol):
    """An optional capability of a scorer whose sub-scores compare a candidate with the others.

    :meth:`prepare` sees every candidate of the proposal before any :meth:`Scorer.score` call;
    the scorer keeps what it measured there (keyed by ``model_id``) for ``score`` to read.
    """

    def prepare(self, candidates: Sequence[Candidate], target: TargetSample) -> None:
        """Measure what ``score`` needs about all ``candidates`` on ``target``."""
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
        probe = candidate.probe(target, c=self.c)
        val = candidate.encode("val", target.val_x, contents=target.val_contents).features
        return {"probe_bacc": balanced_accuracy(target.val_y, probe.model.predict(probe.standardize(val)),
                                                target.num_classes)}


class DomainDiscriminatorScorer:
    """The seeds' domain discriminator: a classifier told to separate source from target features.

    Features of the candidate's own source samples and of the target train sample (equal counts)
    are told apart by a logistic regression under stratified k-fold cross-validation. With ε its
    error, ``domain_sim = min(1, 2ε)`` = 1 − PAD/2 (PAD = 2(1 − 2ε), the proxy A-distance of
    Ben-David et al.): 1 when the domains are indistinguishable, 0 when perfectly separable.
    For every candidate that carries a source sample: held-out source images for the networks dlforge
    trained itself; for the ImageNet candidates, whose source images are not available here, crops of
    natural photographs (:func:`dlforge.proposer.sources.natural_image_sample`) stand in for ImageNet.
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
                       min_runs: int = 3, max_runs: int = 200, groups: int = 5, stretch_seconds: float = 0.1,
                       clock: Callable[[], float] = time.perf_counter) -> float:
    """Images per second of ``model`` in inference mode on random input: the median of ``groups`` stretches.

    After one warm-up run (allocations, oneDNN primitive creation), the model runs until ``seconds``
    have passed and at least ``min_runs`` runs are done (at most ``max_runs``), each timed on its own.
    The runs, in order, are cut into ``groups`` stretches of (nearly) equal counts, fewer when there
    are fewer runs or when a stretch would last less than ``stretch_seconds`` on average; each
    stretch's throughput is its images over its seconds, and the result is the median stretch. A stall
    that falls in fewer than half the stretches (another process taking the core for a moment) does
    not move it, where the mean over the whole window would count it in full; the proposer's
    ``min_fps`` gate rests on this figure. A steady load slows every stretch alike, so short runs
    (batch 1, a small network) and long ones (batch 32, a large one) are charged for it alike: a
    stretch lasts several of the scheduler's periods (milliseconds each), so it includes the moments
    its runs were preempted, which the median of single sub-millisecond runs would leave out. A window
    shorter than ``stretch_seconds`` is one stretch: the plain mean.
    """
    if min(batch, max_runs, groups) < 1 or stretch_seconds <= 0:
        raise ValueError(f"batch, max_runs and groups must be >= 1 and stretch_seconds > 0, got {batch}, "
                         f"{max_runs}, {groups}, {stretch_seconds}")
    x = torch.randn(batch, channels, size, size)
    model.eval()
    times: list[float] = []
    with torch.inference_mode():
        model(x)
        start = clock()
        while len(times) < max_runs:
            t0 = clock()
            model(x)
            t1 = clock()
            times.append(t1 - t0)
            if len(times) >= min_runs and t1 - start >= seconds:
                break
    total = float(np.sum(times))
    count = min(groups, len(times), max(1, int(total / stretch_seconds)))
    stretches = np.array_split(np.asarray(times), count)
    return float(np.median([batch * len(t) / max(float(t.sum()), 1e-9) for t in stretches]))


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


# --------------------------------------------------------------------------------------------
# k-NN, SFDA
# --------------------------------------------------------------------------------------------


def knn_predict(train: np.ndarray, train_y: np.ndarray, query: np.ndarray, *, k: int, num_classes: int) -> np.ndarray:
    """Majority vote of the ``k`` nearest train rows by cosine similarity (ties: the nearer neighbours' class).

    Each vote is 1 + a tiny bonus decreasing with the neighbour's rank, so a tied count goes to the
    class whose members are nearer.
    """
    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    k = max(1, min(k, len(train)))
    sims = unit(query) @ unit(train).T
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(query), num_classes))
    bonus = 1e-3 * (k - np.arange(k)) / k
    for j in range(k):
        np.add.at(votes, (np.arange(len(query)), train_y[nearest[:, j]]), 1.0 + bonus[j])
    pred: np.ndarray = votes.argmax(axis=1)
    return pred


class KNNScorer:
    """k-NN evaluation: balanced accuracy on val of a cosine k-nearest-neighbour vote over the train features.

    Features are standardized with the train statistics first. A plain k-NN was found ahead of
    most transferability metrics in a large 2025 study; it needs no training and no tuning beyond k.
    """

    name = "knn"
    sub_scores: tuple[SubScore, ...] = (
        SubScore("knn_bacc", Direction.HIGHER, "k-NN (cosine) balanced accuracy on val", 0.1),
    )

    def __init__(self, k: int = 5) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k

    def score(self, candidate: Candidate, target: TargetSample) -> dict[str, float]:
        train = candidate.encode("train", target.train_x, contents=target.train_contents).features
        val = candidate.encode("val", target.val_x, contents=target.val_contents).features
        if len(train) == 0 or len(val) == 0:
            return {}
        tr, va = _standardize(train, val)
        pred = knn_predict(tr, target.train_y, va, k=self.k, num_classes=target.num_classes)
        return {"knn_bacc": balanced_accuracy(target.val_y, pred, target.num_classes)}


def _lda_proba(x: np.ndarray, y: np.ndarray, *, shrinkage: float | None, num_classes: int,
               dim: int) -> tuple[np.ndarray, float]:
    """Posteriors of a shrunk-covariance LDA fitted on (x, y) and evaluated on x; and the shrinkage used.

    Σ_w = Σ_k π_k Cov_k (ML covariances); shrinkage s = exp(−5 λ_max(Σ_w)) unless given;
    Σ_s = (1 − s) Σ_w + s (tr Σ_w / dim) I; logits_k = xᵀ Σ_s⁻¹ μ_k − ½ μ_kᵀ Σ_s⁻¹ μ_k + ln π_k.
    ``dim`` is the features' original dimension (x may be its lossless projection onto the data span).
    """
    present = np.unique(y)
    priors = np.array([np.mean(y == c) for c in present])
    means = np.stack([x[y == c].mean(axis=0) for c in present])
    sw = np.zeros((x.shape[1], x.shape[1]))
    for p, c in zip(priors, present, strict=True):
        xc = x[y == c] - x[y == c].mean(axis=0)
        sw += p * (xc.T @ xc) / len(xc)
    if shrinkage is None:
        shrinkage = float(np.exp(-5.0 * float(np.linalg.eigvalsh(sw)[-1])))
    mu = float(np.trace(sw)) / dim
    shrunk = (1.0 - shrinkage) * sw
    shrunk.flat[:: shrunk.shape[0] + 1] += max(shrinkage * mu, 1e-9 * max(mu, 1e-12))
    coef = np.linalg.solve(shrunk, means.T).T  # K x d: Σ_s⁻¹ μ_k
    intercept = -0.5 * np.sum(means * coef, axis=1) + np.log(priors)
    logits = x @ coef.T + intercept
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    proba = np.zeros((len(x), num_classes))
    proba[:, present] = p
    return proba, shrinkage


def sfda(features: np.ndarray, labels: np.ndarray) -> float:
    """SFDA: Shao, Zhao, Ge et al., "Not All Models Are Equal: Predicting Model Transferability in a
    Self-challenging Fisher Space", ECCV 2022 (the authors' ``SFDA_Score``).

    1. A Fisher discriminant with the adaptive shrinkage exp(−5 λ_max(Σ_w)) of the within-class
       scatter gives p(y | x) for every train sample (its Bayes posteriors in the Fisher space).
    2. ConfMix, the self-challenge: the posteriors are softened by a softmax over the classes,
       q = softmax(p(· | x)), and every sample moves towards the mean of the *other* classes,
       x ← q_y x + (1 − q_y) μ̄_{≠y} (μ̄_{≠y}: the mean of the other classes' means) — confident
       samples move less, but every one is pulled towards the confusion.
    3. A second discriminant (same shrinkage) on the mixed features; the score is the mean
       posterior of the true class. In [0, 1]; larger is better.

    The LDA posteriors equal the authors' projection onto the generalized eigenvectors of (S_b, Σ_s),
    which span the whole space. Features with D > N are first projected losslessly onto the span of
    the centred data (the shrinkage term's trace is still taken over the D original dimensions).
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if len(x) < 2 or len(np.unique(y)) < 2:
        raise ValueError("SFDA needs at least two samples of at least two classes")
    dim = x.shape[1]
    if dim > len(x):
        centre = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - centre, full_matrices=False)
        basis = vt[s > s[0] * 1e-10]
        x = (x - centre) @ basis.T
    num_classes = int(y.max()) + 1
    proba, shrinkage = _lda_proba(x, y, shrinkage=None, num_classes=num_classes, dim=dim)
    present = np.unique(y)
    soft = np.exp(proba[:, present])
    soft /= soft.sum(axis=1, keepdims=True)
    means = np.stack([x[y == c].mean(axis=0) for c in present])
    mixed = x.copy()
    for j, c in enumerate(present):
        rows = y == c
        others = (means.sum(axis=0) - means[j]) / (len(present) - 1)
        q = soft[rows, j][:, None]
        mixed[rows] = q * x[rows] + (1.0 - q) * others
    proba, _ = _lda_proba(mixed, y, shrinkage=shrinkage, num_classes=num_classes, dim=dim)
    return float(np.mean(proba[np.arange(len(y)), y]))


class SFDAScorer:
    """SFDA of the target train sample's labels given the candidate's pooled features (see :func:`sfda`)."""

    name = "sfda"
    sub_scores: tuple[SubScore, ...] = (
        SubScore("sfda", Direction.HIGHER, "SFDA mean true-class posterior (Shao et al. 2022)", 0.1),
    )

    def score(self, candidate: Candidate, target: TargetSample) -> dict[str, float]:
        feats = candidate.encode("train", target.train_x, contents=target.train_contents).features
        return {"sfda": sfda(feats, target.train_y)}


# --------------------------------------------------------------------------------------------
# NCTI: how far the features are from neural collapse on the target
# --------------------------------------------------------------------------------------------


def ncti_terms(features: np.ndarray, labels: np.ndarray, *, components: int = 64) -> dict[str, float]:
    """The three raw terms of NCTI (Wang, Zhao, Zhou, "How Far Pre-trained Models Are from Neural Collapse
    on the Target Dataset Informs their Transferability", ICCV 2023), after the authors' ``NCTI_Score``:

    the features are centred and reduced by PCA to ``components`` dimensions (fewer when the sample
    has fewer rows or columns); a linear discriminant with shrinkage exp(−Σ of the first 32 components'
    variances) (plain LDA when that is below 1e-10) projects them to at most C − 1 dimensions and
    gives p(y | x) for every train sample. Then, larger is better for each:

    - ``seli``: the nuclear norm of the centred discriminant projection (a higher-rank, more spread
      class structure is nearer the SELI geometry fine-tuning converges to);
    - ``ncc``: the mean posterior of the true class (the nearest-class-centre classifier's fit);
    - ``vc``: −ln Σ_c ‖P_c‖_* with P_c the posteriors of class c's samples (within-class variability
      collapse: a class whose samples share one posterior has a small nuclear norm; alone it also
      favours featureless, near-uniform posteriors, whose rows are short — the sum needs the other terms).
    """
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    present = np.unique(y)
    if len(present) < 2 or len(x) <= len(present):
        raise ValueError("NCTI needs at least two classes and more samples than classes")
    k = max(1, min(components, x.shape[0] - 1, x.shape[1]))
    pca = PCA(n_components=k, svd_solver="full").fit(x)
    reduced = pca.transform(x)
    shrinkage = float(np.exp(-float(pca.explained_variance_[:32].sum())))
    if shrinkage < 1e-10:
        lda = LinearDiscriminantAnalysis(solver="svd")
    else:
        lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage=min(shrinkage, 1.0))
    projected = lda.fit(reduced, y).transform(reduced)
    projected = projected - projected.mean(axis=0, keepdims=True)
    proba = lda.predict_proba(reduced)
    column = {c: j for j, c in enumerate(lda.classes_)}
    true = proba[np.arange(len(y)), [column[c] for c in y]]
    class_nuclear = sum(float(np.linalg.norm(proba[y == c], ord="nuc")) for c in present)
    return {"seli": float(np.linalg.norm(projected, ord="nuc")), "ncc": float(np.mean(true)),
            "vc": -math.log(max(class_nuclear, 1e-300))}


class NCTIScorer:
    """NCTI (see :func:`ncti_terms`): each of its three terms min-max normalized over the proposal's candidates
    and summed, as the authors combine them (their sum subtracts the normalized ln Σ‖P_c‖_*; adding the
    normalized ``vc`` = −ln Σ‖P_c‖_* instead shifts every total by 1 and keeps the order: ``ncti`` is in
    [0, 3]). It depends on the cohort; a single candidate gets no ``ncti``. The raw terms come with it,
    not weighted. A :class:`CohortScorer`; a candidate whose terms fail is recorded as that scorer's error."""

    name = "ncti"
    sub_scores: tuple[SubScore, ...] = (
        SubScore("ncti", Direction.HIGHER, "NCTI: SELI + NCC + within-class collapse, each min-max over the "
                 "candidates (Wang et al. 2023)", 0.3),
        SubScore("ncti_seli", Direction.HIGHER, "NCTI term: nuclear norm of the discriminant projection", 0.0,
                 weighted=False),
        SubScore("ncti_ncc", Direction.HIGHER, "NCTI term: mean true-class posterior of the discriminant", 0.0,
                 weighted=False),
        SubScore("ncti_vc", Direction.HIGHER, "NCTI term: -ln of the per-class posteriors' nuclear norms", 0.0,
                 weighted=False),
    )

    def __init__(self, components: int = 64) -> None:
        self.components = components
        self._terms: dict[str, dict[str, float]] = {}
        self._failed: dict[str, str] = {}
        self._totals: dict[str, float] = {}

    def prepare(self, candidates: Sequence[Candidate], target: TargetSample) -> None:
        self._terms, self._failed, self._totals = {}, {}, {}
        for cand in candidates:
            train = cand.encode("train", target.train_x, contents=target.train_contents).features
            if len(train) == 0:
                continue
            try:
                self._terms[cand.model_id] = ncti_terms(train, target.train_y, components=self.components)
            except (ValueError, np.linalg.LinAlgError) as exc:  # the others are still compared
                self._failed[cand.model_id] = f"{type(exc).__name__}: {exc}"
        if len(self._terms) < 2:
            return
        totals = dict.fromkeys(self._terms, 0.0)
        for term in ("seli", "ncc", "vc"):
            values = {cid: t[term] for cid, t in self._terms.items()}
            lo, hi = min(values.values()), max(values.values())
            for cid, v in values.items():
                totals[cid] += (v - lo) / (hi - lo) if hi > lo else 0.0
        self._totals = totals

    def score(self, candidate: Candidate, target: TargetSample) -> dict[str, float]:
        if candidate.model_id in self._failed:
            raise ValueError(self._failed[candidate.model_id])
        terms = self._terms.get(candidate.model_id)
        if terms is None:
            return {}
        out = {f"ncti_{k}": v for k, v in terms.items()}
        if candidate.model_id in self._totals:
            out["ncti"] = self._totals[candidate.model_id]
        return out


# --------------------------------------------------------------------------------------------
# Agreement across candidates
# --------------------------------------------------------------------------------------------


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear centred kernel alignment of two representations of the same rows (Kornblith et al. 2019):
    ‖B̃ᵀÃ‖_F² / (‖ÃᵀÃ‖_F ‖B̃ᵀB̃‖_F) with Ã, B̃ column-centred. 1 for representations equal up to
    rotation and isotropic scaling, near 0 for unrelated ones."""
    x = np.asarray(a, dtype=np.float64) - np.mean(a, axis=0)
    y = np.asarray(b, dtype=np.float64) - np.mean(b, axis=0)
    # via the n x n Gram matrices: cheap when the feature dimensions exceed the rows
    kx, ky = x @ x.T, y @ y.T
    denom = float(np.linalg.norm(kx) * np.linalg.norm(ky))
    return float(np.sum(kx * ky) / denom) if denom > 0 else 0.0


class AgreementScorer:
    """The seeds' dissimilarity-based evaluation: how a candidate agrees with the other candidates.

    In :meth:`prepare`, every candidate's linear probe (as :class:`LinearProbeScorer`) is fitted on the
    target train sample and predicts class probabilities for the val images. Then per candidate:

    - ``agreement``: the fraction of val images where its prediction equals the consensus of the
      *other* candidates (argmax of their mean probabilities). The val labels are not used: a
      candidate that sees what the others see agrees with them, one whose features carry no class
      information agrees only by chance (1/K-ish).
    - ``dissimilarity``: 1 − the mean linear CKA (:func:`linear_cka`) of its val features with the
      other candidates' — reported, not weighted (different is not better or worse by itself).

    Absent when the proposal has a single candidate.
    """

    name = "agreement"
    sub_scores: tuple[SubScore, ...] = (
        SubScore("agreement", Direction.HIGHER, "val agreement with the other candidates' consensus", 0.1),
        SubScore("dissimilarity", Direction.HIGHER, "1 - mean linear CKA with the other candidates' features",
                 0.1, weighted=False),
    )

    def __init__(self, c: float = 1.0) -> None:
        self.c = c
        self._proba: dict[str, np.ndarray] = {}
        self._features: dict[str, np.ndarray] = {}

    def prepare(self, candidates: Sequence[Candidate], target: TargetSample) -> None:
        self._proba, self._features = {}, {}
        for cand in candidates:
            val = cand.encode("val", target.val_x, contents=target.val_contents).features
            if len(val) == 0:
                continue
            probe = cand.probe(target, c=self.c)
            proba = np.zeros((len(val), target.num_classes))
            proba[:, probe.model.classes_] = probe.model.predict_proba(probe.standardize(val))
            self._proba[cand.model_id] = proba
            self._features[cand.model_id] = val

    def score(self, candidate: Candidate, target: TargetSample) -> dict[str, float]:
        mine = self._proba.get(candidate.model_id)
        others = [k for k in self._proba if k != candidate.model_id]
        if mine is None or not others:
            return {}
        consensus = np.mean([self._proba[k] for k in others], axis=0).argmax(axis=1)
        cka = [linear_cka(self._features[candidate.model_id], self._features[k]) for k in others]
        return {"agreement": float(np.mean(mine.argmax(axis=1) == consensus)),
                "dissimilarity": float(1.0 - np.mean(cka))}


# --------------------------------------------------------------------------------------------
# Activation analysis: PCA and CAM
# --------------------------------------------------------------------------------------------


def pca_class_variance(features: np.ndarray, labels: np.ndarray, *, explained: float = 0.9,
                       max_components: int = 32) -> float:
    """The share of the dominant activation variance that is between-class variance.

    The centred features are projected onto their fewest principal components that explain
    ``explained`` of the total variance (at most ``max_components``); in that subspace the result is
    η² = Σ_k n_k ‖μ_k − μ‖² / Σ_i ‖x_i − μ‖² (between-class over total sum of squares). 1 when the
    network's strongest activation directions are exactly the target classes, 0 when they ignore them.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    var = s**2
    if var.sum() <= 0:
        return 0.0
    k = int(np.searchsorted(np.cumsum(var) / var.sum(), explained) + 1)
    k = max(1, min(k, max_components, len(var)))
    z = x @ vt[:k].T
    total = float(np.sum(z**2))
    between = sum(float(np.sum(y == c)) * float(np.sum(z[y == c].mean(axis=0) ** 2)) for c in np.unique(y))
    return between / total if total > 0 else 0.0


def cam_focus(maps: np.ndarray, weights: np.ndarray, *, top: float = 0.25) -> float:
    """Mean, over images, of the share of |CAM| mass in the ``top`` fraction of spatial positions.

    ``maps``: N x K x h x w last-conv activations; ``weights``: K, a linear discriminant on their
    spatial means, so CAM = Σ_k w_k A_k is where its evidence lies (Zhou et al. 2016). ``top`` for a
    flat map, 1 for evidence concentrated in fewer than ``top`` of the positions.
    """
    cam = np.abs(np.einsum("k,nkhw->nhw", weights, maps)).reshape(len(maps), -1)
    m = max(1, round(top * cam.shape[1]))
    mass = cam.sum(axis=1)
    top_mass = -np.sort(-cam, axis=1)[:, :m].sum(axis=1)
    ok = mass > 0
    return float(np.mean(top_mass[ok] / mass[ok])) if np.any(ok) else float("nan")


class ActivationScorer:
    """The seeds' CAM/PCA activation analysis of the candidate on the target.

    - ``pca_class_var`` (:func:`pca_class_variance`) on the pooled train features: whether the
      candidate's dominant activation directions are the target classes' (weighted).
    - ``cam_focus`` (:func:`cam_focus`) on up to ``cam_images`` val images: the last-conv maps
      (:func:`dlforge.vision.cam.feature_maps`) weighted by the discriminant direction of a linear
      probe on the pooled train features (for K > 2 classes, each class's one-vs-rest direction on
      its own images). Reported, not weighted: whether focused evidence helps depends on the task
      (small defects: yes; textures: no).
    """

    name = "activation"
    sub_scores: tuple[SubScore, ...] = (
        SubScore("pca_class_var", Direction.HIGHER, "between-class share of the top-PC activation variance", 0.1),
        SubScore("cam_focus", Direction.HIGHER, "share of |CAM| mass in the top 25% of positions", 0.1,
                 weighted=False),
    )

    def __init__(self, *, cam_images: int = 32, c: float = 1.0) -> None:
        self.cam_images = cam_images
        self.c = c

    def score(self, candidate: Candidate, target: TargetSample) -> dict[str, float]:
        from dlforge.vision.cam import feature_maps

        train = candidate.encode("train", target.train_x, contents=target.train_contents).features
        out = {"pca_class_var": pca_class_variance(train, target.train_y)}
        n = min(self.cam_images, len(target.val_x))
        if n == 0:
            return out
        probe = candidate.probe(target, c=self.c)
        clf = probe.model
        coef = clf.coef_ / probe.std  # the discriminant in the raw features' coordinates
        candidate.model.eval()
        with torch.inference_mode():
            maps = feature_maps(candidate.model, to_tensor(target.val_x[:n], candidate.spec)).float().numpy()
        if coef.shape[0] == 1:
            out["cam_focus"] = cam_focus(maps, coef[0])
            return out
        val_y = target.val_y[:n]
        focus = [cam_focus(maps[val_y == c], coef[list(clf.classes_).index(c)])
                 for c in np.unique(val_y) if c in clf.classes_]
        focus = [f for f in focus if math.isfinite(f)]
        if focus:
            out["cam_focus"] = float(np.mean(focus))
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
        SFDAScorer(),
        KNNScorer(),
        LinearProbeScorer(),
        DomainDiscriminatorScorer(seed=seed),
        AgreementScorer(),
        NCTIScorer(),
        ActivationScorer(),
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
