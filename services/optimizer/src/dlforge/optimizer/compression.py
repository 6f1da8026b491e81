"""Structured compression as an optimizer plug-in: prune, factorize, lower the resolution, recover, INT8.

One :class:`CompressionConfig` names a point of the search space: the channel prune ratio
(:mod:`~dlforge.optimizer.pruning`), the rank fraction of the largest pointwise convs and the head
(:mod:`~dlforge.optimizer.lowrank`), the side the network runs at, and INT8 on top or not.
:func:`compress_model` builds the torch model of a config and recovers it by distillation from the
unpruned model on the run's training images (:mod:`~dlforge.optimizer.recovery`). A lower side is
put *inside* the model, as a bilinear resize in front of the network: the variant takes the same
input as every other variant (the deployed preprocessing does not change), and runs the network on
fewer pixels.

:class:`CompressionSearch` is the :class:`~dlforge.optimizer.compressors.Compressor` plug-in: it builds
every config, measures each one's agreement with the unpruned model's argmax on training images held
out of the recovery, times each at batch 1 interleaved in this process, and returns the fastest whose
disagreement stays within the bound (:func:`choose_trial`) or, when none does, the one that agrees best.
The optimizer then evaluates that variant on validation and test like any other and keeps it only if
it loses at most the allowed accuracy. With few calibration images the held-out share is coarse (16
images: one disagreement is 6 %); the optimizer's test-split check is the one that decides.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dlforge.optimizer.compressors import Need, OrtStaticInt8, Source, Variant, VariantKind

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dlforge.optimizer.recovery import TeacherTargets

PREFIX = "pruned"


class CompressionConfig(BaseModel):
    """One point of the compression search space."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prune_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="share of inner channels removed")
    rank_fraction: float | None = Field(default=None, gt=0.0, le=1.0,
                                        description="rank kept of the largest 1x1 convs and the head; None: none")
    resolution: int | None = Field(default=None, ge=16, le=1024,
                                   description="side the network runs at (resize inside the model); None: input's")
    int8: bool = True

    @property
    def name(self) -> str:
        parts = [PREFIX, f"p{round(self.prune_ratio * 100)}"]
        if self.rank_fraction is not None:
            parts.append(f"r{round(self.rank_fraction * 100)}")
        if self.resolution is not None:
            parts.append(f"s{self.resolution}")
        parts.append("int8" if self.int8 else "fp32")
        return "_".join(parts)


class _Resized:
    """Factory of the resize-then-network wrapper (a torch module, built lazily so torch stays optional)."""

    @staticmethod
    def wrap(net: nn.Module, side: int) -> nn.Module:
        from torch import nn

        class ResizedInput(nn.Module):
            def __init__(self, inner: nn.Module, size: int) -> None:
                super().__init__()
                self.inner = inner
                self.size = size

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
                out: torch.Tensor = self.inner(x)
                return out

        return ResizedInput(net, side)


def compress_model(
    model: nn.Module,
    config: CompressionConfig,
    images: np.ndarray,
    *,
    input_size: int,
    recovery_seconds: float,
    layers: int = 6,
    refit: bool = True,
    targets: TeacherTargets | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The compressed, recovered torch model of ``config`` and what was done (for the variant's details).

    ``images`` are float32 NCHW normalized training images at ``input_size`` (the recovery set). The
    recovery distills for ``recovery_seconds`` and then, with ``refit``, refits the linear head on the
    teacher's logits (one forward pass over ``images``; see :mod:`~dlforge.optimizer.recovery`).
    ``targets`` are the teacher's outputs on ``images`` when already computed (shared by a search).
    """
    import torch

    from dlforge.optimizer.lowrank import factorize
    from dlforge.optimizer.pruning import prune_channels
    from dlforge.optimizer.recovery import distill, refit_head, teacher_targets

    side = config.resolution or input_size
    student, pruned = prune_channels(model, config.prune_ratio, torch.zeros(1, images.shape[1], side, side))
    channels = {k: list(v) for k, v in pruned.channels.items()}
    details: dict[str, Any] = {"prune_ratio": config.prune_ratio, "rank_fraction": config.rank_fraction,
                               "network_input_size": side, "int8": config.int8,
                               "pruning": {**asdict(pruned), "channels": channels}}
    if config.rank_fraction is not None:
        student, fact = factorize(student, rank_fraction=config.rank_fraction, layers=layers)
        details["factorized"] = [asdict(x) for x in fact.layers]
        details["not_factorized"] = fact.skipped
    if side != input_size:
        student = _Resized.wrap(student, side)
        details["resize_inside_model"] = f"bilinear {input_size} -> {side}"
    feature_layer = "inner.head" if side != input_size else "head"
    if config.prune_ratio > 0 or config.rank_fraction is not None or side != input_size:
        targets = targets or teacher_targets(model, images)
        if recovery_seconds > 0:
            details["recovery"] = asdict(distill(student, targets, images, seconds=recovery_seconds,
                                                 feature_layer=feature_layer))
        if refit:
            details["head_refit"] = asdict(refit_head(student, targets, images, head=feature_layer))
    student.eval()
    return student, details


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One measured config: batch-1 latency and the share of held-out images it decides as the reference."""

    name: str
    p50_ms: float
    agreement: float
    size_bytes: int = 0


@dataclass(frozen=True)
class TrialChoice:
    chosen: str | None
    why: str
    rejected: dict[str, str]


def choose_trial(trials: Sequence[Trial], *, max_disagreement: float, max_p50_ms: float | None = None) -> TrialChoice:
    """The fastest trial whose argmax disagrees with the reference on at most ``max_disagreement``.

    Disagreement bounds the accuracy loss: a variant can lose at most the share of images it decides
    differently. ``max_p50_ms`` (from the spec's FPS) rejects trials too slow for it. Ties in latency
    go to the higher agreement, then to the smaller file. None chosen when no trial qualifies.
    """
    rejected: dict[str, str] = {}
    ok: list[Trial] = []
    for t in trials:
        dis = 1.0 - t.agreement
        if dis > max_disagreement + 1e-12:
            rejected[t.name] = f"disagrees on {dis * 100:.2f} % (max {max_disagreement * 100:.2f} %)"
        elif max_p50_ms is not None and t.p50_ms > max_p50_ms:
            rejected[t.name] = f"p50 {t.p50_ms:.2f} ms > {max_p50_ms:.2f} ms the spec's FPS allows"
        else:
            ok.append(t)
    if not ok:
        return TrialChoice(None, "no config keeps the argmax within the bound", rejected)
    best = min(ok, key=lambda t: (t.p50_ms, -t.agreement, t.size_bytes))
    return TrialChoice(best.name, f"fastest of {len(ok)} configs within {max_disagreement * 100:.2f} % "
                                  f"disagreement ({best.p50_ms:.2f} ms, agreement {best.agreement:.4f})", rejected)


def time_interleaved(paths: dict[str, Path], x: np.ndarray, *, threads: int, rounds: int = 5,
                     calls: int = 10) -> dict[str, list[float]]:
    """Batch-1 latency (ms) of each ONNX model: per round, the median of ``calls`` calls.

    All sessions live in this process and take turns, ``calls`` calls each, round after round, so a
    busy spell of the machine slows every model alike; compare models by the ratio within each round.
    """
    import onnxruntime as ort

    from dlforge.optimizer.runners import ort_session_options

    sessions = {k: ort.InferenceSession(str(p), ort_session_options(threads), providers=["CPUExecutionProvider"])
                for k, p in paths.items()}
    name = sessions[next(iter(sessions))].get_inputs()[0].name if sessions else "input"
    per_round: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {name: x})
    for _ in range(rounds):
        for k, s in sessions.items():
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                s.run(None, {name: x})
                times.append(time.perf_counter() - t0)
            per_round[k].append(float(np.median(times)) * 1e3)
    return per_round


def onnx_argmax(path: Path, images: np.ndarray, *, threads: int, batch: int = 32) -> np.ndarray:
    """Argmax of an ONNX model's outputs over float32 NCHW ``images``."""
    from dlforge.optimizer.runners import OrtRunner

    runner = OrtRunner(path, threads=threads)
    return np.concatenate([runner.run(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])


def onnx_features(student: nn.Module, head: str, images: np.ndarray, *, input_size: int, workdir: Path,
                  threads: int = 2, batch: int = 32) -> np.ndarray:
    """The input of ``student``'s ``head`` on ``images``, computed by ONNX Runtime (the model up to the head)."""
    import copy

    from torch import nn

    from dlforge.optimizer.export import export_onnx
    from dlforge.optimizer.runners import OrtRunner

    trunk = copy.deepcopy(student).eval()
    parent_name, _, attr = head.rpartition(".")
    setattr(trunk.get_submodule(parent_name) if parent_name else trunk, attr, nn.Identity())
    path = workdir / "features.tmp.onnx"
    export_onnx(trunk, in_channels=images.shape[1], input_size=input_size, path=path, check_inputs=images[:2],
                tolerance=1e-2)
    runner = OrtRunner(path, threads=threads)
    try:
        return np.concatenate([runner.run(images[i:i + batch]) for i in range(0, len(images), batch)])
    finally:
        del runner
        path.unlink(missing_ok=True)


def build_variant(model: nn.Module, config: CompressionConfig, *, recovery: np.ndarray, calibration: np.ndarray,
                  input_size: int, workdir: Path, recovery_seconds: float, tolerance: float = 1e-3,
                  targets: TeacherTargets | None = None,
                  refit_set: tuple[np.ndarray, TeacherTargets] | None = None) -> Variant:
    """Compress ``model`` per ``config``, export it to ONNX (verified against torch), INT8 on top if asked.

    ``refit_set`` (images and the teacher's logits on them) refits the head on those images, with the
    features computed by ONNX Runtime, instead of on the recovery images in torch: many more images
    for the same time, so the regression of 1000-odd features is well determined.
    """
    from dlforge.optimizer.export import export_onnx
    from dlforge.optimizer.recovery import refit_head

    student, details = compress_model(model, config, recovery, input_size=input_size,
                                      recovery_seconds=recovery_seconds, targets=targets,
                                      refit=refit_set is None)
    changed = "recovery" in details or config.prune_ratio > 0 or config.rank_fraction is not None
    if refit_set is not None and (changed or config.resolution not in (None, input_size)):
        head = "inner.head" if "resize_inside_model" in details else "head"
        images, logits = refit_set
        feats = onnx_features(student, head, images, input_size=input_size, workdir=workdir)
        details["head_refit"] = asdict(refit_head(student, logits, images, head=head, features=feats))
    fp32_path = workdir / f"{config.name}.fp32.onnx" if config.int8 else workdir / f"{config.name}.onnx"
    exported = export_onnx(student, in_channels=recovery.shape[1], input_size=input_size, path=fp32_path,
                           check_inputs=calibration[:4], tolerance=tolerance)
    details["export_max_abs_diff"] = exported.max_abs_diff
    if not config.int8:
        return Variant(config.name, "onnxruntime", "fp32", fp32_path, details=details)
    src = Source(fp32_path, exported.input_name, (recovery.shape[1], input_size, input_size))
    q = OrtStaticInt8(method="minmax", name=config.name).compress(src, calibration, workdir)
    fp32_path.unlink(missing_ok=True)
    return Variant(config.name, "onnxruntime", "int8", q.path, details={**details, "quantization": dict(q.details)})


class CompressionSearch:
    """Compressor plug-in: search prune ratio x rank x resolution x INT8, return the fastest within the bound.

    The calibration (training) images are split: ``holdout`` of them judge agreement with the unpruned
    model (never seen by the recovery), the rest train the recovery and calibrate INT8. Needs the torch
    model (``Source.model``) and torch-pruning.
    """

    name = PREFIX
    # declared for the stage (see compressors.declaration_of): the torch model to prune and factorize, the
    # unlabeled calibration images to distil on and judge agreement with, torch-pruning installed
    kind = VariantKind.COMPRESSED_TORCH
    needs = frozenset({Need.TORCH_MODEL, Need.CALIBRATION_IMAGES})
    libraries: tuple[str, ...] = ("torch_pruning",)
    install = "pip install torch-pruning"
    competes_as: str | None = None  # its own variant, not a candidate of another competition

    def __init__(self, configs: Sequence[CompressionConfig], *, recovery_seconds: float = 30.0,
                 max_disagreement: float = 0.01, holdout: float = 0.25, threads: int = 1) -> None:
        if not configs:
            raise ValueError("the compression search needs at least one config")
        self.configs = list(configs)
        self.recovery_seconds = recovery_seconds
        self.max_disagreement = max_disagreement
        self.holdout = holdout
        self.threads = threads

    def unavailable(self) -> str | None:
        import importlib.util

        if importlib.util.find_spec("torch_pruning") is None:
            return "structured pruning needs torch-pruning: pip install torch-pruning"
        return None

    def compress(self, source: Source, calibration: np.ndarray, workdir: Path) -> Variant:
        if source.model is None:
            raise ValueError("the compression search needs the torch model (Source.model)")
        n_hold = round(len(calibration) * self.holdout)
        if n_hold < 1 or len(calibration) - n_hold < 1:
            raise ValueError(f"{len(calibration)} calibration images are too few to hold {self.holdout:.0%} out")
        held, train = calibration[:n_hold], calibration[n_hold:]
        from dlforge.optimizer.recovery import teacher_targets

        ref = onnx_argmax(source.onnx_path, held, threads=self.threads)
        targets = teacher_targets(source.model, train)
        built: dict[str, Variant] = {}
        for config in self.configs:
            built[config.name] = build_variant(source.model, config, recovery=train, calibration=train,
                                               input_size=source.input_shape[-1], workdir=workdir,
                                               recovery_seconds=self.recovery_seconds, targets=targets)
        speeds = time_interleaved({k: v.path for k, v in built.items()}, calibration[:1], threads=self.threads)
        trials = [Trial(k, float(np.median(speeds[k])),
                        float((onnx_argmax(v.path, held, threads=self.threads) == ref).mean()), v.size_bytes)
                  for k, v in built.items()]
        choice = choose_trial(trials, max_disagreement=self.max_disagreement)
        pick = choice.chosen or max(trials, key=lambda t: (t.agreement, -t.p50_ms)).name
        for k, v in built.items():
            if k != pick:
                v.path.unlink(missing_ok=True)
        chosen = built[pick]
        out = workdir / f"{self.name}{chosen.path.suffix}"
        chosen.path.replace(out)
        by_name = {c.name: c for c in self.configs}
        table = [{**asdict(t), "config": by_name[t.name].model_dump()} for t in trials]
        return Variant(self.name, chosen.runtime, chosen.precision, out, details={
            **chosen.details, "config": pick, "search": table, "search_choice": choice.why,
            "search_rule": (f"fastest config (batch 1, {self.threads} thread, interleaved in one process) whose "
                            f"argmax disagrees with the unpruned model on at most {self.max_disagreement:.2%} of "
                            f"{n_hold} held-out training images"),
            "search_rejected": choice.rejected})
