"""The optimizer's logic: trained checkpoint + labeled images in, variants + report out. No bus, no store.

:func:`optimize` runs the whole stage on local files and arrays:

1. export the torch Classifier to ONNX at its network's input size and verify it against torch;
2. build the variants through :class:`~dlforge.optimizer.compressors.Compressor` plug-ins: ONNX Runtime
   FP32, INT8 static QDQ (each calibration method tried on the held-out calibration images, the one that
   agrees best with FP32 on validation kept), and the GPU variants where a GPU and its libraries exist;
3. evaluate every variant, PyTorch eager FP32 included, on the validation and test splits;
4. per variant, choose the decision threshold on the positive class's probability that meets the spec's
   recall on validation (the highest such threshold) — on all validation items and on those labeled by
   people, the lower of the two (auto-labels flatter the model that learned from them) — then report
   test accuracy/recall at it;
5. benchmark every variant in its own process (latency p50/p99 and throughput at batch 1 and 32, the
   spec's frame pipeline FPS, peak RSS) and check the spec;
6. choose the fastest variant that meets the spec and loses at most one accuracy point vs ONNX FP32
   (at the argmax, the same measure as ``int8_accuracy_drop``: each variant's own threshold moves with a
   few low-scoring positives, which would swamp the loss the compression itself causes); an INT8 variant
   whose argmax disagrees with FP32 on more than 2 % of the test images is never chosen, and when no
   variant meets the spec the one closest to it is kept, never one missing a recall another meets
   (:func:`~dlforge.optimizer.evaluation.choose_variant`).

Test figures rest on the test items labeled by people, with exact 95 % intervals, per-class figures,
the operating curve and the three-way verdict (:mod:`dlforge.optimizer.evidence`).
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dlforge.common.errors import InvalidInput
from dlforge.common.events import Spec
from dlforge.common.intervals import Interval
from dlforge.optimizer.compression import CompressionConfig
from dlforge.optimizer.compressors import (
    Compressor,
    OrtGpuProvider,
    Source,
    TensorRTEngine,
    Variant,
    default_compressors,
)
from dlforge.optimizer.evaluation import (
    Candidate,
    Metrics,
    SpecCheck,
    ThresholdChoice,
    VariantChoice,
    check_spec,
    choose_threshold_views,
    choose_variant,
    decide,
    metrics,
    softmax,
)
from dlforge.optimizer.evidence import (
    AtRecall,
    OperatingCurve,
    SpecVerdict,
    SplitFigures,
    accuracy_at_recall,
    operating_curve,
    spec_verdict,
    split_figures,
)
from dlforge.optimizer.export import ExportResult, export_onnx
from dlforge.optimizer.measure import best_of, probe
from dlforge.optimizer.preprocess import InputFormat, normalize
from dlforge.optimizer.probe import ProbeJob, ProbeResult
from dlforge.optimizer.runners import Runner, open_runner
from dlforge.optimizer.settings import OptimizerSettings

log = logging.getLogger(__name__)

REFERENCE = "onnx_fp32"
BASELINE = "torch_fp32"
INT8 = "onnx_int8"


# ----------------------------------------------------------------------------------------------
# Inputs and options
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabeledImages:
    """uint8 ``N x S x S x C`` images at the network's input size and their class indices.

    ``people`` marks the items whose label a person gave (uploaded or answered), as opposed to the
    labeler's auto-labels; None means every label is a person's.
    """

    images: np.ndarray
    labels: np.ndarray
    people: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.people is not None and self.people.shape != (len(self.labels),):
            raise ValueError(f"people mask of shape {self.people.shape} for {len(self.labels)} labels")

    def positive_views(self, scores: np.ndarray, positive: int) -> dict[str, np.ndarray]:
        """Positive-class scores of the true positives: of all items, and of those labeled by people."""
        is_pos = self.labels == positive
        views = {"all": scores[is_pos]}
        if self.people is not None and not self.people.all():
            views["people"] = scores[is_pos & self.people]
        return views


@dataclass(frozen=True)
class OptimizeInput:
    """A trained checkpoint and the images to calibrate (training split), tune (val) and report (test) on."""

    checkpoint_path: Path
    classes: list[str]
    spec: Spec
    calibration: np.ndarray  # uint8 training images at the network's input size, never val/test ones
    val: LabeledImages
    test: LabeledImages
    dataset_id: str = ""
    model_id: str = ""


class OptimizeOptions(BaseModel):
    """The knobs of one optimization (see :class:`~dlforge.optimizer.settings.OptimizerSettings`)."""

    model_config = ConfigDict(extra="forbid")

    opset: int = 17
    export_tolerance: float = 1e-3
    calibration_methods: list[str] = ["minmax", "percentile", "entropy"]
    calibration_batch: int = 8
    threads: int = 2
    batch_sizes: list[int] = [1, 32]
    warmup: int = 5
    iterations: int = 60
    iterations_large_batch: int = 6
    rounds: int = 3
    max_accuracy_drop: float = 0.01
    max_int8_disagreement: float = Field(default=0.02, ge=0.0, le=1.0)
    recall_margin: float = 0.0
    threshold_min_positives: int = 10
    eval_batch: int = 32
    gpu: bool = True
    benchmark_torch: bool = True
    probe_timeout: float = 900.0
    compression: list[CompressionConfig] = Field(
        default=[], description="structured-compression configs to search (prune, rank, resolution, INT8); [] = none")
    compression_recovery_seconds: float = Field(default=20.0, ge=0.0, le=3600.0)

    @classmethod
    def from_settings(cls, s: OptimizerSettings) -> OptimizeOptions:
        return cls(
            opset=s.optimizer_opset, export_tolerance=s.optimizer_export_tolerance,
            calibration_methods=list(s.optimizer_calibration_methods), calibration_batch=s.optimizer_calibration_batch,
            threads=s.optimizer_threads, batch_sizes=list(s.optimizer_batch_sizes), warmup=s.optimizer_warmup,
            iterations=s.optimizer_iterations, iterations_large_batch=s.optimizer_iterations_large_batch,
            rounds=s.optimizer_rounds, max_accuracy_drop=s.optimizer_max_accuracy_drop,
            max_int8_disagreement=s.optimizer_max_int8_disagreement,
            recall_margin=s.optimizer_recall_margin, threshold_min_positives=s.optimizer_threshold_min_positives,
            eval_batch=s.optimizer_eval_batch, gpu=s.optimizer_gpu,
            benchmark_torch=s.optimizer_benchmark_torch, probe_timeout=s.optimizer_probe_timeout,
            compression=list(s.optimizer_compression),
            compression_recovery_seconds=s.optimizer_compression_recovery_seconds,
        )


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


class VariantReport(BaseModel):
    """Every number measured for one variant."""

    model_config = ConfigDict(extra="forbid")

    name: str
    runtime: str
    precision: str
    providers: list[str] = Field(description="ONNX Runtime execution providers, in order of preference")
    file_name: str
    key: str | None = Field(default=None, description="object key of the model file (set when stored)")
    size_bytes: int
    size_mb: float
    details: dict[str, Any]
    deployable: bool = Field(description="False for the torch baseline (not a candidate for deployment)")
    # speed
    speed: ProbeResult
    fps: float = Field(description="pipeline images/s at the spec's frame size, batch 1 (spec FPS)")
    throughput_b1_ips: float
    latency_b1_p50_ms: float
    latency_b1_p99_ms: float
    peak_rss_mb: float
    # quality
    val_argmax: Metrics
    test_argmax: Metrics
    threshold: ThresholdChoice
    val: Metrics = Field(description="validation metrics at the threshold")
    test: Metrics = Field(description="test metrics at the threshold")
    test_accuracy: float = Field(description="test accuracy at the threshold")
    test_positive_recall: float | None = Field(description="test recall of spec.positive_class at the threshold")
    accuracy_drop_vs_onnx_fp32: float = Field(
        description="test accuracy lost vs ONNX FP32, each at its own recall-first threshold (the deployed decision)")
    accuracy_drop_argmax_vs_onnx_fp32: float = Field(description="test accuracy lost vs ONNX FP32 at the argmax")
    test_agreement_vs_onnx_fp32: float = Field(description="share of test images whose argmax equals ONNX FP32's")
    spec_check: SpecCheck
    test_figures: SplitFigures | None = Field(
        default=None, description="test figures at the threshold with 95 % intervals, per class, confusion matrix")
    test_figures_argmax: SplitFigures | None = Field(default=None, description="the same at the argmax")
    accuracy_at_spec_recall: AtRecall | None = Field(
        default=None, description="test accuracy at the highest threshold whose TEST recall reaches the spec's")
    verdict: SpecVerdict | None = Field(default=None, description="the spec check with 95 % confidence")


class CalibrationCandidate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    val_accuracy: float
    val_agreement: float = Field(description="share of validation images decided as ONNX FP32 decides them")
    val_mean_abs_diff: float = Field(description="mean |p_int8 - p_fp32| over validation images and classes")
    seconds: float


class CalibrationReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: int
    source: str
    candidates: list[CalibrationCandidate]
    chosen: str | None
    rule: str


class OptimizationReport(BaseModel):
    """Everything the optimizer measured and decided for one trained model (stored as JSON)."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str
    model_id: str
    arch: str
    classes: list[str]
    positive_class: str | None
    spec: Spec
    input: dict[str, Any]
    pipeline: str
    speedup_rule: str
    export: ExportResult
    calibration: CalibrationReport
    variants: dict[str, VariantReport]
    skipped: dict[str, str] = Field(description="variant -> why it was not built here")
    choice: VariantChoice
    chosen_variant: str
    spec_met: bool
    threshold: float
    test_accuracy: float
    test_positive_recall: float | None
    fps: float
    int8_speedup_vs_onnx_fp32: float | None
    int8_speedup_vs_torch_eager: float | None
    int8_speedup_vs_onnx_fp32_batch32: float | None
    int8_speedup_vs_torch_eager_batch32: float | None
    int8_accuracy_drop: float | None = Field(
        description="test accuracy INT8 loses vs ONNX FP32 at the same decision rule (argmax): the quantization loss")
    int8_accuracy_drop_at_threshold: float | None = Field(
        description="test accuracy INT8 loses vs ONNX FP32, each at its own recall-first threshold (the deployed "
                    "decisions; a few low-scoring positives move each threshold, so this swings more than the "
                    "quantization itself)")
    int8_test_agreement: float | None = Field(description="share of test images INT8 decides as FP32 (argmax)")
    int8_size_ratio: float | None
    environment: dict[str, Any]
    seconds: dict[str, float]
    source_event_id: str | None = None
    # the honest spec check (all on the test items labeled by people; see dlforge.optimizer.evidence)
    test_split: dict[str, Any] | None = Field(
        default=None, description="test items, how many people labeled, how many the figures rest on, positives")
    test_accuracy_argmax: float | None = Field(default=None, description="chosen variant's test accuracy at the argmax")
    test_accuracy_interval: Interval | None = Field(
        default=None, description="chosen variant's test accuracy at its threshold, exact 95 % interval")
    test_accuracy_argmax_interval: Interval | None = None
    positive_recall_interval: Interval | None = Field(
        default=None, description="chosen variant's test recall of spec.positive_class at its threshold, 95 % interval")
    test_figures: SplitFigures | None = Field(default=None, description="chosen variant at its threshold")
    operating_curve: OperatingCurve | None = Field(
        default=None, description="chosen variant: test accuracy against test recall over thresholds")
    accuracy_at_spec_recall: AtRecall | None = None
    spec_verdict: SpecVerdict | None = None


@dataclass
class OptimizeResult:
    report: OptimizationReport
    files: dict[str, Path]


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------


def pick_calibration(candidates: Sequence[str], *, n: int, seed: int) -> list[int]:
    """Indices of ``n`` of ``candidates`` (item ids), drawn reproducibly: same ids + seed -> same pick."""
    if n >= len(candidates):
        return list(range(len(candidates)))
    order = sorted(range(len(candidates)), key=lambda i: candidates[i])
    rng = np.random.default_rng(seed)
    return sorted(order[i] for i in rng.choice(len(order), size=n, replace=False))


def input_format(arch: str, extra: Any = None) -> InputFormat:
    """What the network was trained on: its arch's channels/mean/std, and the checkpoint's input size.

    The trainer may train at another side than the arch's default (``extra["input_size"]`` in the
    checkpoint); the model is exported and evaluated at the size it was trained at.
    """
    from dlforge.vision.networks import spec_of

    net = spec_of(arch)
    size = extra.get("input_size") if isinstance(extra, dict) else None
    return InputFormat(net.in_channels, int(size or net.input_size), tuple(net.mean), tuple(net.std))


def checkpoint_format(path: Path) -> InputFormat:
    """:func:`input_format` of a checkpoint file (read without building the network)."""
    import torch

    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    return input_format(str(ckpt["arch"]), ckpt.get("extra"))


def probabilities(runner: Runner, images: np.ndarray, fmt: InputFormat, *, batch: int) -> np.ndarray:
    """Softmax probabilities of uint8 images, normalized and run ``batch`` at a time."""
    outs = [softmax(runner.run(normalize(images[i:i + batch], fmt))) for i in range(0, len(images), batch)]
    return np.concatenate(outs) if outs else np.zeros((0, 0))


def environment(threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    import onnxruntime
    import torch

    cpu, flags = platform.processor() or "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", "unknown", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "avx512_vnni": " avx512_vnni" in flags,
        "avx_vnni": " avx_vnni" in flags,
        "amx_int8": " amx_int8" in flags,
        "threads": threads,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _speedup(slow: VariantReport | None, fast: VariantReport | None, batch: str) -> float | None:
    if slow is None or fast is None or batch not in slow.speed.batches or batch not in fast.speed.batches:
        return None
    return slow.speed.batches[batch].p50_ms / fast.speed.batches[batch].p50_ms


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def optimize(
    inp: OptimizeInput,
    *,
    workdir: Path,
    options: OptimizeOptions | None = None,
    compressors: Sequence[Compressor] | None = None,
) -> OptimizeResult:
    """Export, compress, evaluate, benchmark and choose (see the module docstring).

    ``compressors`` replaces the standard plug-ins (ONNX FP32, one INT8 per calibration method, the
    GPU ones); INT8 candidates (names ``onnx_int8_*``) compete on agreement with FP32 on validation and
    the winner is renamed ``onnx_int8``. Raises InvalidInput for inputs that cannot be optimized (classes that do
    not match the checkpoint, a positive class the model does not know, no images to evaluate).
    """
    from dlforge.vision.networks import load_checkpoint

    opts = options or OptimizeOptions()
    workdir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    model, ckpt = load_checkpoint(str(inp.checkpoint_path))
    model.eval()
    arch = str(ckpt["arch"])
    if list(ckpt["classes"]) != list(inp.classes):  # type: ignore[call-overload]
        raise InvalidInput(f"checkpoint classes {ckpt['classes']} differ from the event's classes {inp.classes}")
    spec = inp.spec
    positive = None
    if spec.positive_class is not None:
        if spec.positive_class not in inp.classes:
            raise InvalidInput(f"spec.positive_class {spec.positive_class!r} is not one of the classes {inp.classes}")
        positive = inp.classes.index(spec.positive_class)
    if len(inp.test.images) == 0 or len(inp.val.images) == 0:
        raise InvalidInput(f"need validation and test images (got {len(inp.val.images)} val, "
                           f"{len(inp.test.images)} test)")
    if len(inp.calibration) == 0:
        raise InvalidInput("need calibration (training) images for INT8 quantization")
    fmt = input_format(arch, ckpt.get("extra"))
    for what, arr in (("calibration", inp.calibration), ("val", inp.val.images), ("test", inp.test.images)):
        if arr.shape[1:] != (fmt.input_size, fmt.input_size, fmt.in_channels):
            raise InvalidInput(f"{what} images are {arr.shape[1:]}, the network takes "
                               f"{(fmt.input_size, fmt.input_size, fmt.in_channels)}")
    calibration = normalize(inp.calibration, fmt)

    # 1. export ------------------------------------------------------------------------------
    exported = export_onnx(model, in_channels=fmt.in_channels, input_size=fmt.input_size,
                           path=workdir / "exported.onnx", check_inputs=normalize(inp.val.images[:8], fmt),
                           opset=opts.opset, tolerance=opts.export_tolerance)
    seconds["export"] = time.perf_counter() - t0

    # 2. variants ----------------------------------------------------------------------------
    if compressors is None:
        fp32s, int8s, gpus = default_compressors(
            calibration_methods=tuple(opts.calibration_methods),  # type: ignore[arg-type]
            calibration_batch=opts.calibration_batch)
        compressors = [*fp32s, *int8s, *(gpus if opts.gpu else [])]
        if opts.compression:
            from dlforge.optimizer.compression import CompressionSearch

            compressors.append(CompressionSearch(opts.compression, recovery_seconds=opts.compression_recovery_seconds,
                                                 max_disagreement=opts.max_accuracy_drop, threads=opts.threads))
    source = Source(Path(exported.path), exported.input_name, (fmt.in_channels, fmt.input_size, fmt.input_size),
                    model=model)
    variants: dict[str, Variant] = {}
    skipped: dict[str, str] = {}
    cal_candidates: list[CalibrationCandidate] = []
    int8_trials: list[tuple[Variant, CalibrationCandidate]] = []
    later: list[Compressor] = []
    val_probs: dict[Path, np.ndarray] = {}  # model file -> validation probabilities (computed once)

    def val_probabilities(path: Path) -> np.ndarray:
        if path not in val_probs:
            val_probs[path] = probabilities(open_runner("onnxruntime", path, threads=opts.threads), inp.val.images,
                                            fmt, batch=opts.eval_batch)
        return val_probs[path]

    for comp in compressors:
        reason = comp.unavailable()
        if reason is not None:
            skipped[comp.name] = reason
            continue
        if isinstance(comp, OrtGpuProvider | TensorRTEngine) and comp.precision == "int8":
            later.append(comp)  # built from the INT8 QDQ model, once it is chosen
            continue
        started = time.perf_counter()
        try:
            variant = comp.compress(source, calibration, workdir)
        except Exception as exc:  # one failing plug-in must not sink the others; it is reported
            log.exception("compressor %s failed", comp.name)
            skipped[comp.name] = f"failed: {type(exc).__name__}: {exc}"
            continue
        took = time.perf_counter() - started
        if variant.name.startswith(INT8 + "_"):
            ref, pv = val_probabilities(source.onnx_path), val_probabilities(variant.path)
            candidate = CalibrationCandidate(
                method=str(variant.details.get("calibration", variant.name)),
                val_accuracy=float((decide(pv) == inp.val.labels).mean()),
                val_agreement=float((decide(pv) == decide(ref)).mean()),
                val_mean_abs_diff=float(np.abs(pv - ref).mean()), seconds=took)
            cal_candidates.append(candidate)
            int8_trials.append((variant, candidate))
        else:
            variants[variant.name] = variant
    chosen_cal: str | None = None
    if int8_trials:
        # the one that decides validation images most often as FP32 does; ties go to the closest
        # probabilities, then to the first listed (agreement measures the quantization alone, whereas
        # accuracy against the mostly auto-labeled validation split adds the auto-labels' noise)
        best, _ = max(int8_trials, key=lambda vc: (vc[1].val_agreement, -vc[1].val_mean_abs_diff))
        for v, _ in int8_trials:
            if v is not best:
                v.path.unlink(missing_ok=True)
                val_probs.pop(v.path, None)
        final = workdir / f"{INT8}{best.path.suffix}"
        shutil.move(best.path, final)
        val_probs[final] = val_probs.pop(best.path)
        variants[INT8] = replace(best, name=INT8, path=final)
        chosen_cal = str(best.details.get("calibration"))
        source = replace(source, int8_onnx_path=final)
    for comp in later:
        try:
            variant = comp.compress(source, calibration, workdir)
            variants[variant.name] = variant
        except Exception as exc:
            log.exception("compressor %s failed", comp.name)
            skipped[comp.name] = f"failed: {type(exc).__name__}: {exc}"
    if opts.benchmark_torch:
        variants = {BASELINE: Variant(BASELINE, "torch", "fp32", inp.checkpoint_path,
                                      details={"note": "PyTorch eager, the training checkpoint"}), **variants}
    if REFERENCE not in variants:
        raise RuntimeError(f"the reference variant {REFERENCE} was not built: {skipped.get(REFERENCE)}")
    seconds["compress"] = time.perf_counter() - t0 - sum(seconds.values())

    # 3-4. quality at the recall-first threshold -------------------------------------------------
    # test figures rest on the items people labeled: an auto-label is the labeler's guess, and scoring
    # a model (which learned from such guesses) against them flatters it
    people = inp.test.people
    from_people = people is None or bool(people.any())
    judged = people if people is not None and people.any() else np.ones(len(inp.test.labels), dtype=bool)
    test_labels = inp.test.labels[judged]
    test_split = {
        "items": len(inp.test.labels),
        "labeled_by_people": int(people.sum()) if people is not None else len(inp.test.labels),
        "used": int(judged.sum()),
        "positives": int((test_labels == positive).sum()) if positive is not None else None,
        "evidence": ("labels given by people" if from_people
                     else "auto-labels only (no test item labeled by people): the spec cannot be checked"),
    }
    if not from_people:
        log.warning("optimizer: no test item is labeled by people; test figures compare with auto-labels")
    quality: dict[str, dict[str, Any]] = {}
    test_probs: dict[str, np.ndarray] = {}
    for name, v in variants.items():
        runner = open_runner(v.runtime, v.path, providers=v.providers, provider_options=v.provider_options,
                             threads=opts.threads)
        cached = None
        if v.providers == ("CPUExecutionProvider",):  # the FP32 variant is a copy of the exported model
            cached = val_probs.get(v.path, val_probs.get(source.onnx_path) if name == REFERENCE else None)
        pv = cached if cached is not None else probabilities(runner, inp.val.images, fmt, batch=opts.eval_batch)
        pt = probabilities(runner, inp.test.images, fmt, batch=opts.eval_batch)
        del runner
        test_probs[name] = pt
        if positive is not None:
            choice = choose_threshold_views(inp.val.positive_views(pv[:, positive], positive),
                                            min_recall=spec.min_recall, margin=opts.recall_margin,
                                            min_positives=opts.threshold_min_positives)
            threshold: float | None = choice.threshold
        else:
            choice = ThresholdChoice(threshold=0.5, target_recall=0.0, val_recall=None, val_positives=0,
                                     met_on_val=True, rule="no positive class in the spec: argmax decision")
            threshold = None
        pj = pt[judged]
        at_thr = decide(pj, positive=positive, threshold=threshold)
        curve = (operating_curve(test_labels, pj, positive=positive, classes=inp.classes)
                 if positive is not None else None)
        quality[name] = {
            "val_argmax": metrics(inp.val.labels, decide(pv), inp.classes),
            "test_argmax": metrics(test_labels, decide(pj), inp.classes),
            "threshold": choice,
            "val": metrics(inp.val.labels, decide(pv, positive=positive, threshold=threshold), inp.classes),
            "test": metrics(test_labels, at_thr, inp.classes),
            "figures": split_figures(test_labels, at_thr, inp.classes, positive=positive),
            "figures_argmax": split_figures(test_labels, decide(pj), inp.classes, positive=positive),
            "curve": curve,
            "at_spec_recall": (accuracy_at_recall(curve, spec.min_recall)
                               if curve is not None and spec.min_recall > 0 else None),
        }
    seconds["evaluate"] = time.perf_counter() - t0 - sum(seconds.values())

    # 5. speed and memory, each variant in its own process ---------------------------------------
    speed: dict[str, list[ProbeResult]] = {name: [] for name in variants}
    for _ in range(opts.rounds):
        for name, v in variants.items():
            job = ProbeJob(
                runtime=v.runtime, path=str(v.path), providers=list(v.providers),
                provider_options=[dict(o) for o in v.provider_options] if v.provider_options else None,
                threads=opts.threads, in_channels=fmt.in_channels, input_size=fmt.input_size,
                mean=list(fmt.mean), std=list(fmt.std), frame_size=spec.input_size, batches=opts.batch_sizes,
                warmup={b: (opts.warmup if b == 1 else max(1, opts.warmup // 3)) for b in opts.batch_sizes},
                iterations={b: (opts.iterations if b == 1 else opts.iterations_large_batch) for b in opts.batch_sizes},
                pipeline_iterations=opts.iterations,
            )
            speed[name].append(probe(job, timeout=opts.probe_timeout))
    seconds["benchmark"] = time.perf_counter() - t0 - sum(seconds.values())

    # 6. reports, spec check, choice -------------------------------------------------------------
    reports: dict[str, VariantReport] = {}
    ref_acc = quality[REFERENCE]["test_argmax"].accuracy
    ref_at = quality[REFERENCE]["test"].accuracy
    for name, v in variants.items():
        sp = best_of(speed[name])
        q = quality[name]
        test_at: Metrics = q["test"]
        recall = test_at.recall.get(spec.positive_class) if spec.positive_class is not None else None
        if spec.positive_class is None and spec.min_recall > 0 and test_at.recall:
            recall = min(test_at.recall.values())  # no positive class: every class must reach the recall
        b1 = sp.batches.get("1") or next(iter(sp.batches.values()))
        figures: SplitFigures = q["figures"]
        if figures.positive_recall is not None:
            recalls = {figures.positive_class or "": figures.positive_recall}
        else:  # no positive class: every class with test items must reach the recall
            recalls = {c: f.recall for c, f in figures.per_class.items() if f.items > 0}
        th: ThresholdChoice = q["threshold"]
        verdict = spec_verdict(
            spec, accuracy=figures.accuracy, recall=recalls, fps=sp.pipeline.throughput_ips,
            threshold_positives=th.val_positives if positive is not None else None,
            threshold_recall_lower_bound=th.val_recall_lower_bound, evidence_from_people=from_people)
        reports[name] = VariantReport(
            name=name, runtime=v.runtime, precision=v.precision, providers=list(v.providers),
            file_name=v.path.name, size_bytes=v.size_bytes, size_mb=v.size_bytes / 2**20, details=dict(v.details),
            deployable=name != BASELINE, speed=sp,
            fps=sp.pipeline.throughput_ips, throughput_b1_ips=b1.throughput_ips, latency_b1_p50_ms=b1.p50_ms,
            latency_b1_p99_ms=b1.p99_ms, peak_rss_mb=sp.peak_rss_mb,
            val_argmax=q["val_argmax"], test_argmax=q["test_argmax"], threshold=q["threshold"], val=q["val"],
            test=test_at, test_accuracy=test_at.accuracy, test_positive_recall=recall,
            accuracy_drop_vs_onnx_fp32=ref_at - test_at.accuracy,
            accuracy_drop_argmax_vs_onnx_fp32=ref_acc - q["test_argmax"].accuracy,
            test_agreement_vs_onnx_fp32=float((decide(test_probs[name]) == decide(test_probs[REFERENCE])).mean()),
            spec_check=check_spec(spec, recall=recall, accuracy=test_at.accuracy, fps=sp.pipeline.throughput_ips),
            test_figures=figures, test_figures_argmax=q["figures_argmax"],
            accuracy_at_spec_recall=q["at_spec_recall"], verdict=verdict,
        )
    candidates = [Candidate(name=r.name, fps=r.fps, accuracy=r.test_argmax.accuracy, spec=r.spec_check,
                            precision=r.precision, agreement=r.test_agreement_vs_onnx_fp32,
                            confident=r.verdict is not None and r.verdict.verdict == "met")
                  for r in reports.values() if r.deployable]
    choice_made = choose_variant(candidates, reference=REFERENCE, max_accuracy_drop=opts.max_accuracy_drop,
                                 max_int8_disagreement=opts.max_int8_disagreement, spec=spec)
    chosen = reports[choice_made.chosen]
    chosen_curve: OperatingCurve | None = quality[chosen.name]["curve"]
    if chosen_curve is not None:
        keep = [chosen.accuracy_at_spec_recall.threshold] if chosen.accuracy_at_spec_recall else []
        chosen_curve = chosen_curve.thin(300, keep=keep)
    int8, fp32, torch_r = reports.get(INT8), reports[REFERENCE], reports.get(BASELINE)
    big = str(max(opts.batch_sizes))
    seconds["total"] = time.perf_counter() - t0

    report = OptimizationReport(
        dataset_id=inp.dataset_id, model_id=inp.model_id, arch=arch, classes=list(inp.classes),
        positive_class=spec.positive_class, spec=spec,
        input={"in_channels": fmt.in_channels, "input_size": fmt.input_size, "mean": list(fmt.mean),
               "std": list(fmt.std), "frame_size": spec.input_size},
        pipeline=(f"FPS = batch-1 images/s of the deployed pipeline on a {spec.input_size}x{spec.input_size} uint8 "
                  f"frame: PIL bilinear resize to the network's {fmt.input_size}x{fmt.input_size} input, "
                  f"normalization and inference ({opts.threads} intra-op threads; image decoding excluded). The "
                  f"network runs at the input size it was trained at, so the accuracy measured at "
                  f"{fmt.input_size} is the accuracy of the pipeline whose FPS is measured."),
        speedup_rule=("speedups are ratios of median (p50) per-call latencies at the given batch size, each "
                      "variant benchmarked in its own process; robust to other processes on a shared machine"),
        export=exported,
        calibration=CalibrationReport(
            images=len(calibration), source="training split (real images first), never validation or test",
            candidates=cal_candidates, chosen=chosen_cal,
            rule=("highest agreement with ONNX FP32's argmax decisions on validation; ties go to the smallest "
                  "mean |p_int8 - p_fp32| on validation, then to the first method listed")),
        variants=reports, skipped=skipped, choice=choice_made, chosen_variant=chosen.name,
        spec_met=choice_made.spec_met, threshold=chosen.threshold.threshold, test_accuracy=chosen.test_accuracy,
        test_positive_recall=chosen.test_positive_recall, fps=chosen.fps,
        int8_speedup_vs_onnx_fp32=_speedup(fp32, int8, "1"),
        int8_speedup_vs_torch_eager=_speedup(torch_r, int8, "1"),
        int8_speedup_vs_onnx_fp32_batch32=_speedup(fp32, int8, big),
        int8_speedup_vs_torch_eager_batch32=_speedup(torch_r, int8, big),
        int8_accuracy_drop=int8.accuracy_drop_argmax_vs_onnx_fp32 if int8 is not None else None,
        int8_accuracy_drop_at_threshold=int8.accuracy_drop_vs_onnx_fp32 if int8 is not None else None,
        int8_test_agreement=int8.test_agreement_vs_onnx_fp32 if int8 is not None else None,
        int8_size_ratio=(fp32.size_bytes / int8.size_bytes) if int8 is not None else None,
        environment=environment(opts.threads), seconds=seconds,
        test_split=test_split, test_accuracy_argmax=chosen.test_argmax.accuracy,
        test_accuracy_interval=chosen.test_figures.accuracy if chosen.test_figures else None,
        test_accuracy_argmax_interval=chosen.test_figures_argmax.accuracy if chosen.test_figures_argmax else None,
        positive_recall_interval=chosen.test_figures.positive_recall if chosen.test_figures else None,
        test_figures=chosen.test_figures, operating_curve=chosen_curve,
        accuracy_at_spec_recall=chosen.accuracy_at_spec_recall, spec_verdict=chosen.verdict,
    )
    files = {name: v.path for name, v in variants.items() if name != BASELINE}
    return OptimizeResult(report=report, files=files)
