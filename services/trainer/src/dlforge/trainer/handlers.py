"""The trainer's logic: one training job from a checkpoint, a manifest and hyperparameters.

:func:`run_training` is what the worker (HPO trials, final training), the REST jobs and the SDK's
in-process transport all call: load the base checkpoint (fresh head for the target classes), get
the cached activations at the freeze boundary, train the tail on the chosen engine, evaluate.
No bus and no document store here: progress leaves through the ``on_epoch`` hook.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dlforge.common.errors import InvalidInput, NotFound
from dlforge.common.events import TRAIN_PARAMS_LEGACY_VALUES as LEGACY
from dlforge.common.events import SampleMethod, UniqueClasses
from dlforge.common.objects import ObjectStore
from dlforge.trainer.cache import ActivationCache, CachedActivations, digest_file, manifest_digest, prefix_runner
from dlforge.trainer.engines import FitJob, engine_for
from dlforge.trainer.launcher import KubernetesConfig, KubernetesEngine
from dlforge.trainer.monitor import EpochHook, JobMonitor
from dlforge.trainer.params import EpochMetrics, EvalSummary, RunOptions, TrainParams
from dlforge.trainer.settings import TrainerSettings
from dlforge.trainer.stages import Tail, staged
from dlforge.trainer.training import (
    FitResult,
    FitState,
    TrainData,
    evaluate,
    fit,
    float_batches,
    stratified_sample,
    stratified_split,
)
from dlforge.trainer.views import IDENTITY, checked_views, parse_views
from dlforge.vision.manifest import Manifest
from dlforge.vision.networks import Classifier, build_network, load_checkpoint, save_checkpoint, spec_of

if TYPE_CHECKING:
    from dlforge.hpo.coreset import Coreset  # dlforge.hpo imports optuna: only a coreset's first use loads it

log = logging.getLogger(__name__)

VAL_FALLBACK_FRACTION = 0.15


class TrainingRequest(BaseModel):
    """One training job: the model, the data, the hyperparameters and how to run it."""

    model_config = ConfigDict(extra="forbid")

    arch: str | None = Field(default=None, description="architecture; with no weights: its ImageNet/initial weights")
    weights_key: str | None = Field(default=None, description="object key of a save_checkpoint() file")
    manifest_key: str = Field(description="object key of the training manifest (train/val/test splits)")
    classes: UniqueClasses = Field(min_length=2, description="target classes, in output order")
    hparams: TrainParams = TrainParams()
    run_config: RunOptions = RunOptions()
    sample_fraction: float = Field(default=1.0, gt=0.0, le=1.0, description="stratified share of the train split")
    sample_method: SampleMethod = Field(
        default="random", description="how a share below 1 is chosen: 'random' (stratified, by sample_seed), or "
        "'k_center' / 'herding', the class-stratified coreset of the cached activations (dlforge.hpo.coreset; the "
        "share at a smaller fraction is contained in the one at a larger)")
    sample_seed: int = 0
    evaluate_test: bool = True
    views: str = Field(default="none", description="label-preserving views to train on: none | flips | dihedral "
                       "| a comma list of identity, hflip, vflip, rot90, rot180, rot270, transpose, antitranspose. "
                       "Only for data whose labels survive them (defect cells yes, digits no)")
    check_views: bool = Field(default=False, description="keep only the declared views that a probe trained "
                              "without them (a head on the frozen units when units train, else the model "
                              "itself) still classifies on the val items (see train_tail)")
    label_weighting: Literal["confidence", "none"] = Field(
        default="confidence", description="'confidence': an auto-label's loss weight is its confidence, a "
        "person's label weighs 1; 'none': every label weighs 1")

    @field_validator("views")
    @classmethod
    def _known_views(cls, value: str) -> str:
        return checked_views(value)

    @model_validator(mode="after")
    def _model_source(self) -> TrainingRequest:
        if self.arch is None and self.weights_key is None:
            raise ValueError("give weights_key (a checkpoint) or arch (its pretrained weights)")
        if self.arch is not None:
            spec_of_or_invalid(self.arch)
        return self


def spec_of_or_invalid(arch: str) -> Any:
    try:
        return spec_of(arch)
    except Exception as exc:
        raise ValueError(str(exc)) from exc


@dataclass
class TrainingOutcome:
    """What a job produced. ``model`` holds the trained weights (not serializable: use save_model)."""

    job_id: str
    arch: str
    classes: list[str]
    state: str  # completed | stopped | diverged
    epochs: list[EpochMetrics]
    steps: int
    model: Classifier
    input_size: int
    checkpoints: list[str] = field(default_factory=list)
    logs_prefix: str = ""
    cache_source: str = ""
    cache_seconds: float = 0.0
    train_seconds: float = 0.0
    train_rows: int = 0
    val: EvalSummary | None = None
    test: EvalSummary | None = None
    no_of_workers: int = 1
    val_source: str = "all"
    best_epoch: int = 0  # with early stopping: the epoch whose weights the model holds (0: the last)
    early_stopped: bool = False
    out_of_time: bool = False
    views: list[str] = field(default_factory=lambda: [IDENTITY])  # the views the model was trained on
    view_check: dict[str, float] = field(default_factory=dict)  # val accuracy per declared view of the probe
    view_allowed_cost: float | None = None  # the val accuracy a view was allowed to cost the probe
    view_probe: Literal["frozen", "model", ""] = ""  # the check's probe: a head on the frozen units | the model
    probe_kept: bool = False  # the model is the check's probe (trained without views), not a later training
    resumed_from: dict[str, int] | None = None  # went on in this epoch, this many samples in, after this step
    device: str = "cpu"  # where the model trained: cpu | cuda
    amp: bool = False  # in float16 autocast with a gradient scaler

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (no weights)."""
        return {
            "job_id": self.job_id,
            "arch": self.arch,
            "classes": self.classes,
            "state": self.state,
            "epochs": [m.model_dump() for m in self.epochs],
            "steps": self.steps,
            "input_size": self.input_size,
            "checkpoints": self.checkpoints,
            "logs_prefix": self.logs_prefix,
            "cache_source": self.cache_source,
            "cache_seconds": self.cache_seconds,
            "train_seconds": self.train_seconds,
            "train_rows": self.train_rows,
            "val": self.val.model_dump() if self.val else None,
            "test": self.test.model_dump() if self.test else None,
            "no_of_workers": self.no_of_workers,
            "val_source": self.val_source,
            "best_epoch": self.best_epoch,
            "early_stopped": self.early_stopped,
            "out_of_time": self.out_of_time,
            "views": self.views,
            "view_check": self.view_check,
            "view_allowed_cost": self.view_allowed_cost,
            "view_probe": self.view_probe,
            "probe_kept": self.probe_kept,
            "resumed_from": self.resumed_from,
            "device": self.device,
            "amp": self.amp,
            "metrics": flat_metrics(self),
        }


def flat_metrics(outcome: TrainingOutcome) -> dict[str, float]:
    """The outcome as ``{name: number}`` (what ``model.trained`` carries); undefined values are left out."""
    out: dict[str, float] = {
        "epochs": float(len(outcome.epochs)),
        "steps": float(outcome.steps),
        "train_seconds": outcome.train_seconds,
        "cache_seconds": outcome.cache_seconds,
        "train_rows": float(outcome.train_rows),
        "no_of_workers": float(outcome.no_of_workers),
        "views": float(len(outcome.views)),
    }
    # the view check: the probe's val accuracy under each declared view, and what a view could cost
    out.update({f"view_check_{view}": acc for view, acc in outcome.view_check.items()})
    if outcome.view_allowed_cost is not None:
        out["view_allowed_cost"] = outcome.view_allowed_cost
    if outcome.view_probe:  # 1: a head on the frozen units, 0: the model itself
        out["view_probe_frozen"] = float(outcome.view_probe == "frozen")
        out["view_probe_kept"] = float(outcome.probe_kept)
    if outcome.best_epoch:
        out["best_epoch"] = float(outcome.best_epoch)
    if outcome.epochs:
        last = outcome.epochs[-1]
        out["train_loss"] = last.train_loss
        out["images_per_second"] = last.images_per_second
    for summary in (outcome.val, outcome.test):
        if summary is None:
            continue
        s = summary.split
        out[f"{s}_loss"] = summary.loss
        out[f"{s}_accuracy"] = summary.accuracy
        out[f"{s}_count"] = float(summary.count)
        for cls, r in summary.recall.items():
            out[f"{s}_recall_{cls}"] = r
    return {k: v for k, v in out.items() if math.isfinite(v)}


class CoresetCache:
    """The coreset orders this process computed, so a trial promoted to a larger fraction does not order again.

    A coreset's order depends only on the train rows' features and labels, so an entry is keyed by the
    activation cache entry (its key holds the manifest, weights, arch, input size and boundary), the
    method and, when val is carved from train, the seed that carved it. An order computed up to one
    fraction serves every smaller one; a larger fraction orders again, further: the greedy order's
    prefix is the same, so the subsets stay nested. Safe to share between threads (one orders at a time).
    """

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[float, Coreset]] = OrderedDict()
        self._lock = threading.Lock()

    def rows(self, key: Hashable | None, *, features: Callable[[], np.ndarray], labels: np.ndarray,
             method: SampleMethod, fraction: float) -> np.ndarray:
        """Sorted train rows of the ``method`` coreset at ``fraction``; ``features()`` is called only to order.

        ``key`` None: nothing identifies the rows (no cache entry), so the order is computed and not kept.
        """
        if method == "random":
            raise InvalidInput("a coreset method is k_center or herding, not random")
        with self._lock:
            entry = None if key is None else self._entries.get(key)
            if entry is None or entry[0] < fraction:
                started = time.perf_counter()
                from dlforge.hpo.coreset import build_coreset

                entry = (fraction, build_coreset(features(), labels, method=method, max_fraction=fraction))
                log.info("%s coreset of %d train rows ordered up to %.3g in %.1fs", method, len(labels), fraction,
                         time.perf_counter() - started)
                if key is not None:
                    self._entries[key] = entry
            if key is not None:
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            return entry[1].rows(fraction)


@dataclass(frozen=True)
class TrainerConfig:
    """The process-level knobs :func:`run_training` needs (from :class:`TrainerSettings`), and the process's
    coreset orders (shared by every copy of the config)."""

    work_dir: Path
    threads: int = 2
    train_threads: int = 1
    prefix_runner: str = "onnxruntime"
    cache_from_unfreeze: int = 3
    cache_batch_size: int = 32
    cache_max_mb: int = 2048
    input_size: int | None = None
    val_people_min: int = 30
    view_tolerance: float = 0.02
    view_error_share: float = 0.5
    kubernetes: KubernetesConfig | None = None  # runs of several workers go to Kubernetes (see launcher.py)
    device: str = "auto"  # auto | cpu | cuda (see dlforge.trainer.training.resolve_device)
    coresets: CoresetCache = field(default_factory=CoresetCache, compare=False, repr=False)

    @classmethod
    def from_settings(cls, s: TrainerSettings) -> TrainerConfig:
        kubernetes = None
        if s.trainer_launcher == "kubernetes":
            assert s.trainer_k8s_image is not None  # the settings' validator
            kubernetes = KubernetesConfig(
                image=s.trainer_k8s_image, namespace=s.trainer_k8s_namespace, api_url=s.trainer_k8s_api_url,
                token_file=s.trainer_k8s_token_file, ca_file=s.trainer_k8s_ca_file, cpu=s.trainer_k8s_cpu,
                memory=s.trainer_k8s_memory, gpus_per_worker=s.trainer_k8s_gpus_per_worker,
                env_from=tuple(p.strip() for p in s.trainer_k8s_env_from.split(",") if p.strip()),
                threads=s.trainer_train_threads)
        return cls(
            kubernetes=kubernetes,
            device=s.trainer_device,
            work_dir=Path(s.work_dir) / "trainer",
            threads=s.trainer_threads,
            train_threads=s.trainer_train_threads,
            prefix_runner=s.trainer_prefix_runner,
            cache_from_unfreeze=s.trainer_cache_from_unfreeze,
            cache_batch_size=s.trainer_cache_batch_size,
            cache_max_mb=s.trainer_cache_max_mb,
            input_size=s.trainer_input_size,
            val_people_min=s.trainer_val_people_min,
            view_tolerance=s.trainer_view_tolerance,
            view_error_share=s.trainer_view_error_share,
        )


def load_base_model(objects: ObjectStore, request: TrainingRequest, work_dir: Path) -> tuple[Classifier, str, str]:
    """(model with a head for ``request.classes``, arch, weights digest)."""
    n = len(request.classes)
    if request.weights_key is None:
        assert request.arch is not None
        with torch.random.fork_rng():
            torch.manual_seed(request.hparams.seed)
            model = build_network(request.arch, n, pretrained=True)
        return model, request.arch, f"pretrained-{request.arch}"
    try:
        local = objects.get_file(request.weights_key, work_dir / "weights" / request.weights_key)
    except NotFound as exc:
        raise InvalidInput(f"weights_key {request.weights_key!r}: no such object") from exc
    model, ckpt = load_checkpoint(str(local))
    arch = str(ckpt["arch"])
    if request.arch is not None and request.arch != arch:
        raise InvalidInput(f"arch {request.arch!r} does not match the checkpoint's arch {arch!r}")
    if list(ckpt.get("classes", [])) != list(request.classes):  # type: ignore[call-overload]
        with torch.random.fork_rng():
            torch.manual_seed(request.hparams.seed)
            model.head = torch.nn.Linear(model.head.in_features, n)  # a fresh head for the target classes
    return model, arch, digest_file(local)


def _indices(labels: list[str], classes: list[str], split: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown:
        raise InvalidInput(f"the manifest's {split} split has labels {unknown} that are not among the classes "
                           f"{classes}")
    return np.array([index[lab] for lab in labels], dtype=np.int64)


def row_weights(manifest: Manifest, *, mode: str) -> dict[str, float] | None:
    """The loss weight of each labeled item: 1 for a person's label, the confidence of any other (None: all 1).

    ``mode`` ``"confidence"`` weighs auto-labels (and generated items that carry one) by their
    confidence, clipped to [0, 1]; a label without a confidence weighs 1. ``"none"``: no weights.
    """
    if mode == "none":
        return None
    if mode != "confidence":
        raise InvalidInput(f"label weighting {mode!r}: give 'confidence' or 'none'")
    out: dict[str, float] = {}
    for item in manifest.items:
        if item.label is None:
            continue
        if item.labeled_by_people or item.confidence is None:
            out[item.item_id] = 1.0
        else:
            out[item.item_id] = min(1.0, max(0.0, float(item.confidence)))
    return out


def pooled(x: np.ndarray) -> np.ndarray:
    """One float32 vector per row: activation maps ``(rows, channels, *positions)`` averaged over their positions."""
    if x.ndim > 2:
        return x.mean(axis=tuple(range(2, x.ndim)), dtype=np.float32)
    return np.asarray(x, dtype=np.float32)


def build_data(acts: CachedActivations, classes: list[str], *, sample_fraction: float, sample_seed: int,
               val_people: set[str] | None = None, val_people_min: int = 0,
               weights: dict[str, float] | None = None, sample_method: SampleMethod = "random",
               coresets: CoresetCache | None = None,
               ) -> tuple[TrainData, tuple[np.ndarray, np.ndarray] | None, str]:
    """Train/val arrays from the cache (stratified train sample; val carved from train if absent), test, val source.

    Below ``sample_fraction`` 1 the train rows are a stratified random sample (``sample_method``
    ``"random"``, by ``sample_seed``) or the class-stratified coreset of the train rows' activations,
    pooled to one vector each (``"k_center"``, ``"herding"``; see :mod:`dlforge.hpo.coreset`), its order
    kept in ``coresets`` for the next trial on the same rows.

    ``val_people`` are the item ids whose label a person gave. The labeler auto-labels most of the val
    split with a classifier on pretrained embeddings; a model that copies that classifier scores well on
    those labels whatever it is worth, and the tuner would prefer it. So when at least ``val_people_min``
    val items were labeled by people and they cover every val class, validation (and with it the tuner's
    objective and early stopping) uses only them; the third value says which: ``"people"`` or ``"all"``.

    ``weights`` (item id -> loss weight, see :func:`row_weights`) become ``train_w``; the other views of
    ``acts`` become ``train_views`` and ``val_views`` with the same rows as ``train_x`` and ``val_x``.
    """
    train, val, test = acts.splits["train"], acts.splits["val"], acts.splits["test"]
    view_names = list(acts.views)
    train_y = _indices(train.labels, classes, "train")
    train_x: np.ndarray = train.x
    train_v: list[np.ndarray] = [acts.views[v]["train"].x for v in view_names]
    train_w = None if weights is None else np.array([weights.get(i, 1.0) for i in train.item_ids], dtype=np.float32)
    source = "all"
    if len(val) == 0:
        kept, held = stratified_split(train_y, VAL_FALLBACK_FRACTION, seed=sample_seed)
        if len(held) == 0:
            raise InvalidInput("the manifest has no val split and too few train items to hold some out")
        log.warning("no val split in the manifest: holding out %d train items for validation", len(held))
        val_x, val_y = np.asarray(train_x[held]), train_y[held]
        val_v = [np.asarray(v[held]) for v in train_v]
        train_x, train_y = np.asarray(train_x[kept]), train_y[kept]
        train_v = [np.asarray(v[kept]) for v in train_v]
        train_w = None if train_w is None else train_w[kept]
    else:
        val_x, val_y = val.x, _indices(val.labels, classes, "val")
        val_v = [acts.views[v]["val"].x for v in view_names]
        if val_people is not None and val_people_min > 0:
            rows = np.array([i for i, item in enumerate(val.item_ids) if item in val_people], dtype=np.int64)
            if (val_people_min <= len(rows) < len(val_y)
                    and set(val_y[rows].tolist()) == set(val_y.tolist())):
                val_x, val_y, source = np.asarray(val_x[rows]), val_y[rows], "people"
                val_v = [np.asarray(v[rows]) for v in val_v]
    if len(train_y) == 0:
        raise InvalidInput("the manifest has no labeled train items")
    if sample_fraction < 1.0:
        if sample_method == "random":
            rows = stratified_sample(train_y, sample_fraction, seed=sample_seed)
        else:
            # the train rows are the cache entry's, less the val rows sample_seed carved out when there was no val
            key = ((acts.keys[0], acts.boundary, sample_method, sample_seed if len(val) == 0 else None)
                   if acts.keys else None)
            rows = (coresets or CoresetCache()).rows(key, features=lambda: pooled(train_x), labels=train_y,
                                                     method=sample_method, fraction=sample_fraction)
        train_x, train_y = np.asarray(train_x[rows]), train_y[rows]
        train_v = [np.asarray(v[rows]) for v in train_v]
        train_w = None if train_w is None else train_w[rows]
    test_xy = (test.x, _indices(test.labels, classes, "test")) if len(test) else None
    data = TrainData(train_x, train_y, val_x, val_y, list(classes), train_w=train_w, train_views=train_v,
                     val_views=dict(zip(view_names, val_v, strict=True)))
    return data, test_xy, source


@dataclass
class ViewCheck:
    """Which declared views a model trained without them still classifies the people-labeled val items under."""

    val_accuracy: dict[str, float]  # per view, the identity included
    kept: list[str]  # views within the tolerance of the identity's accuracy (the identity first)
    tolerance: float  # the accuracy a view was allowed to cost
    count: int  # val items the check rests on


def check_views(tail: torch.nn.Module, data: TrainData, *, tolerance: float, error_share: float = 0.0) -> ViewCheck:
    """Keep a declared view if ``tail``, trained on the identity only, loses little val accuracy under it.

    "Little" is ``max(tolerance, error_share * (1 - identity accuracy))``. A view that changes the
    label (a quarter turn of a "6", a mirrored "2") costs a probe far more than its own error rate; a
    label-preserving one mostly moves the items the probe already finds hard, so its cost scales with
    that error (measured: flipped ELPV cells cost probes 0.5-4.3 points at 9.5-12 % error; mirrored
    digits 5 points at 5 % error).
    """
    base = evaluate(tail, data.val_x, data.val_y, data.classes).accuracy
    allowed = max(tolerance, error_share * (1.0 - base))
    acc = {IDENTITY: base}
    kept = [IDENTITY]
    for view, x in data.val_views.items():
        acc[view] = evaluate(tail, x, data.val_y, data.classes).accuracy
        if acc[view] >= base - allowed - 1e-9:  # at the tolerance: kept (not lost to rounding)
            kept.append(view)
    return ViewCheck(val_accuracy=acc, kept=kept, tolerance=allowed, count=len(data.val_y))


class _QuietListener:
    """Listens to the view check's probe training: nothing is reported, nothing stops it."""

    def on_step(self, step: int, loss: float) -> None:
        """Probe steps are not reported."""

    def on_epoch(self, metrics: EpochMetrics) -> bool:
        return True

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        """The probe is not checkpointed."""


def with_views(data: TrainData, names: list[str], kept: list[str]) -> TrainData:
    """``data`` with only the train views whose names (in ``names`` order) are in ``kept``."""
    chosen = [v for name, v in zip(names, data.train_views, strict=True) if name in kept]
    return replace(data, train_views=chosen, val_views={k: v for k, v in data.val_views.items() if k in kept})


@dataclass
class TailTraining:
    """What :func:`train_tail` did: the run whose weights the tail holds, its views and the view check."""

    result: FitResult
    views: list[str]
    check: ViewCheck | None
    probe_kept: bool  # the probe trained without views was kept (it scored higher on val; or, being the
    # model itself, no view passed the check)
    views_val_accuracy: float | None = None  # val accuracy of the model trained after the check (None: none was)
    frozen_probe: bool = False  # the check's probe was a head on the frozen units


# The share of a time cap the view check's probe gets when it is a head on the frozen units' features
# (the units' forward pass once and a linear head: seconds, where the rest trains the units).
FROZEN_PROBE_SHARE = 0.1


def _frozen_probe(tail: Tail, data: TrainData, batch_size: int = 256) -> tuple[Tail, TrainData]:
    """A head-only copy of ``tail`` (its dropout and its head as they are now) and ``data`` as the
    pooled features of ``tail``'s units at their present weights (evaluation mode, views included):
    training the copy on them is training ``tail``'s head with its units frozen."""
    body = tail.body
    was_training = body.training
    body.eval()

    def features_of(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            parts = [body(xb).float().numpy() for xb in float_batches(x, batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)

    try:
        features = replace(data, train_x=features_of(data.train_x), val_x=features_of(data.val_x), train_views=[],
                           val_views={k: features_of(v) for k, v in data.val_views.items()})
    finally:
        body.train(was_training)
    probe = Tail([], copy.deepcopy(tail.dropout), copy.deepcopy(tail.head))
    for p in probe.parameters():
        p.requires_grad_(True)
    return probe, features


def train_tail(tail: torch.nn.Module, data: TrainData, hparams: TrainParams, *,
               run: Callable[[TrainData, TrainParams], FitResult], check: bool, tolerance: float,
               error_share: float = 0.0, threads: int = 1) -> TailTraining:
    """Train ``tail`` on ``data`` with ``run`` (the engine); with ``check`` and views, check them first.

    The check trains a probe without views (in this process, on ``threads`` threads, reporting nothing)
    and keeps the views within the allowed cost of its val accuracy (:func:`check_views` with
    ``tolerance`` and ``error_share``); then ``tail`` trains afresh with those (or, none kept, without
    views when the probe is not ``tail`` itself). The probe's weights are kept when they beat the model
    trained afterwards by more than that allowed cost on val (or, the probe being ``tail``, when no view
    passes). Without ``check`` the declared views are trusted.

    The probe: for a :class:`Tail` whose units train, a head on the units' pooled features at their
    starting weights (what the check was measured with: flipped ELPV cells, mirrored digits), which
    gets :data:`FROZEN_PROBE_SHARE` of a time cap (``hparams.max_seconds``) and leaves the rest to the
    units' training (a second training of the units would take half: measured in `make demo`, 10
    epochs of the last three units cut by the cap, the best the last); otherwise ``tail`` itself,
    the cap shared half and half. Kept, a frozen probe's weights are the starting units with its head.
    """
    view_names = list(data.val_views) if data.train_views else []
    if len(view_names) != len(data.train_views):
        raise ValueError("train_views and val_views name different views")
    if not (check and view_names):
        return TailTraining(run(data, hparams), [IDENTITY, *view_names], None, False)
    initial = {k: v.detach().clone() for k, v in tail.state_dict().items()}
    torch.set_num_threads(threads)
    probe, probe_data, probe_head = tail, data, None  # probe_head: a frozen probe's head
    if isinstance(tail, Tail) and any(p.requires_grad for p in tail.body.parameters()):
        probe, probe_data = _frozen_probe(tail, data)
        probe_head = probe.head
    frozen = probe_head is not None
    probe_hp = hparams.model_copy(update={"max_seconds": hparams.max_seconds * (FROZEN_PROBE_SHARE if frozen else 0.5)})
    hparams = hparams.model_copy(update={"max_seconds": hparams.max_seconds - probe_hp.max_seconds})
    probe_result = fit(probe, replace(probe_data, train_views=[], val_views={}), probe_hp, listener=_QuietListener())
    views = check_views(probe, probe_data, tolerance=tolerance, error_share=error_share)
    log.info("view check (%s) on %d val items: accuracy %s; kept %s", "head on the frozen units" if frozen
             else "the model itself", views.count, {k: round(v, 4) for k, v in views.val_accuracy.items()},
             views.kept)
    if len(views.kept) == 1 and not frozen:
        return TailTraining(probe_result, [IDENTITY], views, True)
    if probe_head is not None:  # the starting units with the probe's head
        probe_state = {**initial, **{f"head.{k}": v.detach().clone() for k, v in probe_head.state_dict().items()}}
    else:
        probe_state = {k: v.detach().clone() for k, v in tail.state_dict().items()}
    tail.load_state_dict(initial)
    chosen = with_views(data, view_names, views.kept)
    result = run(chosen, hparams)
    if result.stopped or result.diverged:
        return TailTraining(result, views.kept, views, False, frozen_probe=frozen)
    with_acc = evaluate(tail, data.val_x, data.val_y, data.classes).accuracy
    if views.val_accuracy[IDENTITY] > with_acc + views.tolerance + 1e-9:
        log.info("the probe trained without views scores higher on val (%.4f > %.4f + %.3f): keeping it",
                 views.val_accuracy[IDENTITY], with_acc, views.tolerance)
        tail.load_state_dict(probe_state)
        return TailTraining(probe_result, [IDENTITY], views, True, with_acc, frozen)
    return TailTraining(result, views.kept, views, False, with_acc, frozen)


def run_training(
    objects: ObjectStore,
    request: TrainingRequest,
    *,
    job_id: str,
    key_prefix: str,
    config: TrainerConfig,
    on_epoch: EpochHook | None = None,
    resumable: bool = False,
    handed_over: Callable[[], bool] | None = None,
) -> TrainingOutcome:
    """Train one job (see the module docstring); raises InvalidInput for a request that cannot work.

    With views declared (``request.views``) and ``request.check_views``, they are checked first
    (see :func:`train_tail`). With ``resumable`` the state after each epoch is kept at
    :func:`resume_key` and a rerun of the same job goes on from it (removed when the job ends,
    unless ``handed_over()`` then says another trainer took the job over and trains on from it).
    """
    torch.set_num_threads(config.threads)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    try:
        raw_manifest = objects.get_bytes(request.manifest_key)
    except NotFound as exc:
        raise InvalidInput(f"manifest_key {request.manifest_key!r}: no such object") from exc
    manifest = Manifest.model_validate_json(raw_manifest)
    model, arch, weights_digest = load_base_model(objects, request, config.work_dir)
    model.dropout.p = request.hparams.dropout
    spec = spec_of(arch)
    input_size = request.run_config.input_size or config.input_size or spec.input_size
    net = staged(model)
    boundary = net.boundary(request.hparams.unfreeze)
    from_unfreeze = min(max(config.cache_from_unfreeze, request.hparams.unfreeze), net.max_unfreeze)
    cache = ActivationCache(objects, work_dir=config.work_dir, runner=prefix_runner(config.prefix_runner,
                            threads=config.threads), batch_size=config.cache_batch_size,
                            max_bytes=config.cache_max_mb << 20)
    views = parse_views(request.views)
    acts = cache.get(net=net, spec=spec, manifest=manifest, manifest_digest=manifest_digest(raw_manifest),
                     weights_digest=weights_digest, input_size=input_size, boundary=boundary,
                     from_boundary=net.boundary(from_unfreeze), views=views)
    val_people = {i.item_id for i in manifest.by_split("val") if i.labeled_by_people}
    data, test_xy, val_source = build_data(acts, request.classes, sample_fraction=request.sample_fraction,
                                           sample_seed=request.sample_seed, val_people=val_people,
                                           val_people_min=config.val_people_min,
                                           weights=row_weights(manifest, mode=request.label_weighting),
                                           sample_method=request.sample_method, coresets=config.coresets)
    if val_source == "people":
        log.info("validating on the %d val items labeled by people (of %d)", len(data.val_y), len(acts.splits["val"]))
    tail = net.tail(request.hparams.unfreeze)
    with tempfile.TemporaryDirectory(dir=config.work_dir, prefix=f"job-{job_id[:40]}-") as tmp:
        monitor = JobMonitor(objects=objects, key_prefix=key_prefix, log_dir=Path(tmp) / "tensorboard", model=model,
                             tail=tail, arch=arch, classes=request.classes, on_epoch=on_epoch,
                             extra={"input_size": input_size, "params": request.hparams.model_dump()})

        resumed_from: dict[str, int] | None = None

        def run(train_data: TrainData, hparams: TrainParams) -> FitResult:
            nonlocal resumed_from
            resume, on_state = None, None
            if resumable:
                stored, store = resume_point(objects, resume_key(key_prefix), work_dir=Path(tmp), data=train_data,
                                             hparams=hparams)

                def on_state(state: FitState) -> None:
                    store(state, [(s, v) for s, v in monitor.step_losses if s <= state.steps])

                if stored is not None:
                    resume = stored.state
                    resumed_from = {"epoch": resume.epoch + 1, "position": resume.position, "step": resume.steps}
                    log.info("job %s: resuming after epoch %d, %d samples into the next, at step %d", job_id,
                             resume.epoch, resume.position, resume.steps)
                    monitor.replay(resume.epochs, stored.step_losses)
            job = FitJob(tail=tail, data=train_data, hparams=hparams,
                         no_of_workers=request.run_config.no_of_workers,
                         checkpoint_every_steps=request.run_config.checkpoint_every_steps,
                         summary_every_steps=request.run_config.summary_every_steps, threads=config.train_threads,
                         work_dir=Path(tmp), resume=resume, on_state=on_state, device=config.device)
            engine = engine_for(request.run_config.engine)
            if config.kubernetes is not None and job.no_of_workers > 1:
                engine = KubernetesEngine(config.kubernetes, objects=objects, key_prefix=key_prefix, job_id=job_id)
            return engine.run(job, monitor)

        started = time.perf_counter()
        try:
            trained = train_tail(tail, data, request.hparams, run=run, check=request.check_views,
                                 tolerance=config.view_tolerance, error_share=config.view_error_share,
                                 threads=config.train_threads)
            if trained.probe_kept and trained.views_val_accuracy is None:
                for m in trained.result.epochs:  # the probe reported nothing while it trained, nothing else did
                    monitor.on_epoch(m)
        finally:
            monitor.close()
        if resumable and not (handed_over is not None and handed_over()):
            objects.delete(resume_key(key_prefix))
        train_seconds = time.perf_counter() - started
    torch.set_num_threads(config.threads)
    result = trained.result
    state = "diverged" if result.diverged else "stopped" if result.stopped else "completed"
    val = evaluate(tail, data.val_x, data.val_y, request.classes, split="val", per_item=True)
    test = None
    if request.evaluate_test and test_xy is not None:
        test = evaluate(tail, test_xy[0], test_xy[1], request.classes, split="test")
    return TrainingOutcome(
        job_id=job_id, arch=arch, classes=list(request.classes), state=state, epochs=result.epochs,
        steps=result.steps, model=model, input_size=input_size, checkpoints=monitor.checkpoints,
        logs_prefix=monitor.logs_prefix, cache_source=acts.source, cache_seconds=acts.seconds,
        train_seconds=train_seconds, train_rows=len(data.train_y), val=val, test=test,
        no_of_workers=request.run_config.no_of_workers, val_source=val_source,
        best_epoch=result.best_epoch, early_stopped=result.early_stopped, out_of_time=result.out_of_time,
        views=trained.views,
        view_check=trained.check.val_accuracy if trained.check else {},
        view_allowed_cost=trained.check.tolerance if trained.check else None,
        view_probe=("frozen" if trained.frozen_probe else "model") if trained.check else "",
        probe_kept=trained.probe_kept,
        resumed_from=resumed_from,
        device=result.device,
        amp=result.amp,
    )


def resume_key(key_prefix: str) -> str:
    """Where a job keeps the state after its last finished epoch while it trains."""
    return f"{key_prefix}/resume/state.pt"


def _shape(data: TrainData) -> list[int]:
    return [len(data.train_y), len(data.val_y), len(data.train_views), *(int(d) for d in data.train_x.shape[1:])]


def _resume_tag(data: TrainData, hparams: TrainParams, *, exclude: frozenset[str] = frozenset()) -> str:
    """The older record of what a state was trained on: a hash of every parameter and the data's shape."""
    dump = hparams.model_dump_json(exclude=set(exclude)) if exclude else hparams.model_dump_json()
    return hashlib.sha256(f"{dump}|{_shape(data)}".encode()).hexdigest()[:16]


def resume_identity(data: TrainData, hparams: TrainParams) -> dict[str, Any]:
    """What a stored state must have been trained on to be resumed: the parameters and the data's shape."""
    return {"hparams": hparams.model_dump(mode="json"), "shape": _shape(data)}


def resume_matches(stored: dict[str, Any], data: TrainData, hparams: TrainParams) -> bool:
    """Whether a stored state was trained on these parameters and data, so that going on from it trains what
    an uninterrupted run would.

    A state records its parameters (``identity``). A parameter it does not name was added by a later
    version; the state matches only if that parameter is at the value that trains as the versions before it
    did (:data:`dlforge.common.events.TRAIN_PARAMS_LEGACY_VALUES`). A parameter the state names that this
    version does not know (a downgrade) never matches. States stored before the record carry only a hash
    (``tag``) of every parameter of their version and the shape: one of today's parameters, or of the
    versions before each addition, newest first, with the parameters added since left out (they must be at
    their legacy values).
    """
    identity = stored.get("identity")
    now = resume_identity(data, hparams)
    if isinstance(identity, dict):
        then = identity.get("hparams")
        if identity.get("shape") != now["shape"] or not isinstance(then, dict) or set(then) - set(now["hparams"]):
            return False
        return all(then[k] == v if k in then else (k in LEGACY and v == LEGACY[k])
                   for k, v in now["hparams"].items())
    tag, added = stored.get("tag"), list(LEGACY)
    for n in range(len(added) + 1):
        left_out = added[len(added) - n:]
        if any(getattr(hparams, k) != LEGACY[k] for k in left_out):
            return False  # no version before this addition trained with these parameters
        if tag == _resume_tag(data, hparams, exclude=frozenset(left_out)):
            return True
    return False


@dataclass
class StoredState:
    """A state an earlier attempt of a job stored, and the step losses it had logged up to it."""

    state: FitState
    step_losses: list[tuple[int, float]]


StoreState = Callable[[FitState, list[tuple[int, float]]], None]


def resume_point(objects: ObjectStore, key: str, *, work_dir: Path, data: TrainData,
                 hparams: TrainParams) -> tuple[StoredState | None, StoreState]:
    """(the stored state to go on from, if it was trained on the same parameters and data (see
    :func:`resume_matches`); the hook that stores the next)."""
    resume = None
    identity, tag = resume_identity(data, hparams), _resume_tag(data, hparams)  # the tag: for older versions
    try:
        local = objects.get_file(key, work_dir / "resume-in.pt")
    except NotFound:
        local = None
    if local is not None:
        raw = torch.load(local, map_location="cpu", weights_only=False)  # a state trained on CUDA, too
        local.unlink(missing_ok=True)
        if resume_matches(raw, data, hparams):
            resume = StoredState(FitState.from_dict(raw), [(int(s), float(v)) for s, v in raw.get("step_losses", [])])
        else:
            log.info("%s was trained on other data or parameters: starting afresh", key)

    def store(state: FitState, step_losses: list[tuple[int, float]]) -> None:
        path = work_dir / "resume-out.pt"
        torch.save({**state.to_dict(), "identity": identity, "tag": tag, "step_losses": step_losses}, path)
        objects.put_file(key, path)
        path.unlink(missing_ok=True)

    return resume, store


def save_model(objects: ObjectStore, outcome: TrainingOutcome, key: str, *, work_dir: Path,
               extra: dict[str, object] | None = None) -> str:
    """Write the trained model with save_checkpoint to ``key``; returns the key."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = Path(tmp) / "model.pt"
        save_checkpoint(outcome.model, arch=outcome.arch, classes=outcome.classes, path=str(path),
                        extra={"input_size": outcome.input_size, "metrics": flat_metrics(outcome),
                               # the label-preserving views it was trained on (the optimizer may average over them)
                               "views": list(outcome.views), **(extra or {})})
        objects.put_file(key, path)
    return key
