"""The optimizer's logic: trained checkpoint + labeled images in, variants + report out. No bus, no store.

:func:`optimize` runs the whole stage on local files and arrays, one step function each, every step
returning its result as a value (:func:`prepare`, :func:`views_step`, :func:`export_step`,
:func:`build_variants`, :func:`evaluate`, :func:`benchmark`, :func:`choose`):

0. test-time views (opt-in, ``test_views="trained"``): a model trained on label-preserving views
   (flips, quarter turns; the checkpoint names them) is wrapped so that it averages its class
   probabilities over them, inside the exported graph, when that is more accurate on the validation
   items people labeled (at the argmax or at the spec's recall, and no worse at the other) and the
   averaging network reaches the spec's FPS in eager PyTorch; every variant (the torch baseline
   included), its speed and its test figures are then those of the averaging model;
1. export the torch Classifier to ONNX at its network's input size and verify it against torch;
2. build the variants through :class:`~dlforge.optimizer.compressors.Compressor` plug-ins, each used
   by what it declares it needs and makes: ONNX Runtime FP32, INT8 static QDQ (calibration methods tried
   in turn on the held-out calibration images until one agrees with FP32 on validation well enough;
   the best kept), and the GPU variants where a GPU and its libraries exist;
3. evaluate every variant on the validation and test splits (the PyTorch eager baseline with ONNX
   FP32's outputs unless ``evaluate_torch``);
4. per variant, choose the decision threshold on the positive class's probability that meets the spec's
   recall on validation (the highest such threshold) — on all validation items and on those labeled by
   people, the lower of the two (auto-labels flatter the model that learned from them) — then report
   test accuracy/recall at it;
5. benchmark every variant in its own process (latency p50/p99 and throughput at batch 1 and 32, the
   spec's frame pipeline FPS, peak RSS) in interleaved rounds that stop once the speed ratios are
   steady, and check the spec;
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

import contextlib
import logging
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dlforge.common.errors import InvalidInput
from dlforge.common.events import Spec
from dlforge.common.intervals import Interval
from dlforge.optimizer.compression import CompressionConfig
from dlforge.optimizer.compressors import (
    Capabilities,
    Compressor,
    Source,
    Variant,
    build_order,
    declaration_of,
    default_compressors,
    missing,
)
from dlforge.optimizer.evaluation import (
    Candidate,
    Metrics,
    SpecCheck,
    ThresholdChoice,
    VariantChoice,
    check_spec,
    choose_threshold,
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
from dlforge.optimizer.measure import (
    ProbeWorker,
    RatioEstimate,
    StopDecision,
    StopRule,
    combine,
    decide_stop,
    speed_ratios,
)
from dlforge.optimizer.preprocess import InputFormat, normalize
from dlforge.optimizer.probe import Measure, Measurement, ProbeJob, ProbeResult
from dlforge.optimizer.runners import Runner, TorchRunner, averaging_checkpoint, open_runner
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
    train: LabeledImages | None = None  # labeled training images, for plug-ins that need them (Need.TRAINING_IMAGES)


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
    rounds: int = Field(default=8, ge=1, description="most interleaved benchmark rounds (the cap)")
    min_rounds: int = Field(default=3, ge=1, description="fewest rounds before the stop rule may end them")
    ratio_tolerance: float = Field(
        default=0.05, gt=0, description="rounds stop once every batch-1 speed ratio to ONNX FP32 is known within "
                                        "this share of itself (95 % interval half-width)")
    baseline_rounds: int = Field(default=1, ge=1, description="rounds the torch baseline takes part in (the first)")
    calibration_stop_agreement: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="stop trying INT8 calibrations once one agrees with FP32 on this share of validation images "
                    "(None: try every method listed)")
    max_accuracy_drop: float = 0.01
    max_int8_disagreement: float = Field(default=0.02, ge=0.0, le=1.0)
    recall_margin: float = 0.0
    threshold_min_positives: int = 10
    eval_batch: int = 8
    gpu: bool = True
    benchmark_torch: bool = True
    evaluate_torch: bool = Field(
        default=False, description="run eager PyTorch over validation and test too (else the torch baseline is "
                                   "scored with ONNX FP32's outputs, which the export check ties to torch's)")
    probe_timeout: float = 900.0
    compression: list[CompressionConfig] = Field(
        default=[], description="structured-compression configs to search (prune, rank, resolution, INT8); [] = none")
    compression_recovery_seconds: float = Field(default=20.0, ge=0.0, le=3600.0)
    # test-time views (views_step; OptimizerSettings.optimizer_test_views says each value)
    test_views: Literal["trained", "forced", "none"] = "none"

    @classmethod
    def from_settings(cls, s: OptimizerSettings) -> OptimizeOptions:
        return cls(
            opset=s.optimizer_opset, export_tolerance=s.optimizer_export_tolerance,
            calibration_methods=list(s.optimizer_calibration_methods), calibration_batch=s.optimizer_calibration_batch,
            threads=s.optimizer_threads, batch_sizes=list(s.optimizer_batch_sizes), warmup=s.optimizer_warmup,
            iterations=s.optimizer_iterations, iterations_large_batch=s.optimizer_iterations_large_batch,
            rounds=s.optimizer_rounds, min_rounds=s.optimizer_min_rounds, ratio_tolerance=s.optimizer_ratio_tolerance,
            baseline_rounds=s.optimizer_baseline_rounds,
            calibration_stop_agreement=s.optimizer_calibration_stop_agreement,
            evaluate_torch=s.optimizer_evaluate_torch, max_accuracy_drop=s.optimizer_max_accuracy_drop,
            max_int8_disagreement=s.optimizer_max_int8_disagreement,
            recall_margin=s.optimizer_recall_margin, threshold_min_positives=s.optimizer_threshold_min_positives,
            eval_batch=s.optimizer_eval_batch, gpu=s.optimizer_gpu,
            benchmark_torch=s.optimizer_benchmark_torch, probe_timeout=s.optimizer_probe_timeout,
            compression=list(s.optimizer_compression),
            compression_recovery_seconds=s.optimizer_compression_recovery_seconds,
            test_views=s.optimizer_test_views,
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
    untried: list[str] = Field(
        default_factory=list, description="candidates not built: an earlier one already agreed well enough")


class BenchmarkSummary(BaseModel):
    """How the interleaved benchmark rounds went and why they stopped."""

    model_config = ConfigDict(extra="forbid")

    rounds: int
    stop_rule: StopRule
    stop_reason: str
    speed_ratios_vs_onnx_fp32: dict[str, RatioEstimate] = Field(
        description="per variant: onnx_fp32's batch-1 p50 / the variant's, round by round, their median and spread")
    round_p50_ms: dict[str, list[float]] = Field(description="per variant: its batch-1 p50 latency in each round")


class ViewAveraging(BaseModel):
    """Whether the deployed model averages over the label-preserving views it was trained on, and why."""

    model_config = ConfigDict(extra="forbid")

    trained_views: list[str] = Field(description="the views the trainer kept (identity first)")
    used: bool
    views: list[str] = Field(description="the views the exported model averages over (['identity']: none)")
    val_items: int = Field(description="validation items labeled by people that the decision rests on")
    val_accuracy_plain: float | None = Field(default=None, description="at the argmax")
    val_accuracy_averaged: float | None = None
    val_accuracy_at_recall_plain: float | None = Field(
        default=None, description="at the highest threshold meeting the spec's recall on those items (None: no "
        "recall in the spec, or no positive among them)")
    val_accuracy_at_recall_averaged: float | None = None
    torch_fps_averaged: float | None = Field(
        default=None, description="batch-1 images/s of the averaging network in eager PyTorch at the optimizer's "
        "threads (no resize): a guard, below the spec's FPS the views are not used; the variants' FPS is measured "
        "by the benchmark")
    reason: str


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
    benchmark: BenchmarkSummary | None = Field(default=None, description="the interleaved rounds and why they stopped")
    test_views: ViewAveraging | None = Field(
        default=None, description="test-time views: whether every variant averages over the trained views, and why")


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


@dataclass(frozen=True)
class Prepared:
    """The validated inputs of one optimization: the torch model, its input format, the positive class."""

    model: Any
    arch: str
    fmt: InputFormat
    positive: int | None
    calibration: np.ndarray  # normalized float32 NCHW calibration images
    trained_views: tuple[str, ...] = ("identity",)  # the label-preserving views the checkpoint was trained on
    test_views: ViewAveraging | None = None


def prepare(inp: OptimizeInput) -> Prepared:
    """Load the checkpoint and check the inputs against it; InvalidInput says what does not fit."""
    from dlforge.vision.networks import load_checkpoint

    model, ckpt = load_checkpoint(str(inp.checkpoint_path))
    model.eval()
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
    fmt = input_format(str(ckpt["arch"]), ckpt.get("extra"))
    arrays = [("calibration", inp.calibration), ("val", inp.val.images), ("test", inp.test.images)]
    if inp.train is not None:
        arrays.append(("train", inp.train.images))
    for what, arr in arrays:
        if arr.shape[1:] != (fmt.input_size, fmt.input_size, fmt.in_channels):
            raise InvalidInput(f"{what} images are {arr.shape[1:]}, the network takes "
                               f"{(fmt.input_size, fmt.input_size, fmt.in_channels)}")
    extra = ckpt.get("extra")
    views = extra.get("views") if isinstance(extra, dict) else None
    trained = tuple(str(v) for v in views) if isinstance(views, list) and views else ("identity",)
    return Prepared(model=model, arch=str(ckpt["arch"]), fmt=fmt, positive=positive,
                    calibration=normalize(inp.calibration, fmt), trained_views=trained)


def val_figures(probs: np.ndarray, labels: np.ndarray, *, positive: int | None,
                 min_recall: float) -> tuple[float, float | None]:
    """Accuracy at the argmax, and at the highest threshold meeting ``min_recall`` on these items (or None)."""
    argmax = float((probs.argmax(1) == labels).mean())
    if positive is None or min_recall <= 0 or not (labels == positive).any():
        return argmax, None
    t = choose_threshold(probs[labels == positive, positive], min_recall=min_recall).threshold
    return argmax, float((decide(probs, positive=positive, threshold=t) == labels).mean())


def averaging_gain(plain: tuple[float, float | None], averaged: tuple[float, float | None]) -> str:
    """What averaging over views does to :func:`val_figures`' figures: ``"lower"`` when it lowers one of
    them, ``"same"`` when it raises none, ``"higher"`` when it raises one and lowers none (the figure at the
    spec's recall counts only when both have it)."""
    pairs = [(plain[0], averaged[0])]
    if plain[1] is not None and averaged[1] is not None:
        pairs.append((plain[1], averaged[1]))
    if any(a < p for p, a in pairs):
        return "lower"
    return "higher" if any(a > p for p, a in pairs) else "same"


def _torch_fps(model: Any, fmt: InputFormat, *, threads: int, calls: int = 5) -> float:
    """Batch-1 calls per second of ``model`` in eager PyTorch on ``threads`` threads: the median of ``calls``
    after one warm-up."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.zeros(1, fmt.in_channels, fmt.input_size, fmt.input_size)
    times = []
    try:
        with torch.inference_mode():
            model(x)
            for _ in range(calls):
                t = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return float(1.0 / np.median(times))


def views_step(prep: Prepared, inp: OptimizeInput, *, opts: OptimizeOptions) -> Prepared:
    """Step 0: with ``test_views="trained"``, the model every variant is made from averages its class
    probabilities over the views it was trained on, when on the validation items people labeled that is
    at least as accurate at the argmax and at the spec's recall, and more accurate at one of them (a tie
    keeps the plain network: the average costs k times the inference), and the averaging network in eager
    PyTorch (a guard: it is usually the slowest runtime) reaches the spec's FPS. The structured-compression
    search prunes the plain network, so with it the views are left out. ``test_views="forced"`` averages
    without the validation check (the figures are reported; the FPS guard stays)."""
    from dlforge.vision.images import ViewAveraged

    trained = list(prep.trained_views)
    people = inp.val.people if inp.val.people is not None else np.ones(len(inp.val.labels), dtype=bool)
    figures: dict[str, float | None] = {}

    def report(used: bool, reason: str, fps: float | None = None) -> Prepared:
        tv = ViewAveraging(trained_views=trained, used=used, views=trained if used else ["identity"],
                       val_items=int(people.sum()), torch_fps_averaged=fps, reason=reason, **figures)
        model = ViewAveraged(prep.model, trained).eval() if used else prep.model
        return replace(prep, model=model, test_views=tv)

    if len(trained) < 2:
        return report(False, "the model was trained on no view but the identity")
    if opts.test_views == "none":
        return report(False, f"off (test_views=none; 'trained' would average over {', '.join(trained)} after "
                             "checking it on the validation items people labeled)")
    if opts.compression:
        return report(False, "the structured-compression search prunes the plain network")
    if not people.any():
        return report(False, "no validation item labeled by people to check the average on")
    x, y = inp.val.images[people], inp.val.labels[people]
    wrapped = ViewAveraged(prep.model, trained).eval()
    spec = inp.spec
    plain, averaged = (val_figures(probabilities(TorchRunner.of(m), x, prep.fmt, batch=opts.eval_batch), y,
                                    positive=prep.positive, min_recall=spec.min_recall) for m in (prep.model, wrapped))
    figures.update(val_accuracy_plain=plain[0], val_accuracy_averaged=averaged[0],
                   val_accuracy_at_recall_plain=plain[1], val_accuracy_at_recall_averaged=averaged[1])
    shown = (f"accuracy on {len(y)} people-labeled validation items {plain[0]:.3f} -> {averaged[0]:.3f} at the "
             "argmax" + (f", {plain[1]:.3f} -> {averaged[1]:.3f} at the spec's recall {spec.min_recall:g}"
                         if plain[1] is not None and averaged[1] is not None else ""))
    gain = averaging_gain(plain, averaged)
    if opts.test_views == "trained" and gain == "lower":
        return report(False, f"averaging lowers the {shown}")
    if opts.test_views == "trained" and gain == "same":
        return report(False, f"averaging adds nothing for its {len(trained)}x inference: {shown}")
    if opts.test_views == "forced":
        shown += " (not checked: test_views=forced)"
    fps = _torch_fps(wrapped, prep.fmt, threads=opts.threads)
    if fps < spec.min_fps:
        return report(False, f"the averaging network runs {fps:.1f} images/s in eager PyTorch, below the spec's "
                             f"{spec.min_fps:g} FPS ({shown})", fps)
    return report(True, f"averaged over {', '.join(trained)}: {shown}", fps)


def export_step(prep: Prepared, inp: OptimizeInput, *, workdir: Path, opts: OptimizeOptions) -> ExportResult:
    """Step 1: the torch model to ONNX at its input size, verified against torch on validation images."""
    return export_onnx(prep.model, in_channels=prep.fmt.in_channels, input_size=prep.fmt.input_size,
                       path=workdir / "exported.onnx", check_inputs=normalize(inp.val.images[:8], prep.fmt),
                       opset=opts.opset, tolerance=opts.export_tolerance)


@dataclass
class Built:
    """Step 2's result: the variants, what was skipped and why, the INT8 competition, the source they came from."""

    variants: dict[str, Variant]
    skipped: dict[str, str]
    calibration: CalibrationReport
    source: Source
    val_probs: dict[Path, np.ndarray]  # model file -> validation probabilities (computed once)


class _ValProbs:
    """Validation probabilities of ONNX CPU model files, each computed once."""

    def __init__(self, inp: OptimizeInput, fmt: InputFormat, opts: OptimizeOptions) -> None:
        self.inp, self.fmt, self.opts = inp, fmt, opts
        self.cache: dict[Path, np.ndarray] = {}

    def __call__(self, path: Path) -> np.ndarray:
        if path not in self.cache:
            self.cache[path] = probabilities(open_runner("onnxruntime", path, threads=self.opts.threads),
                                             self.inp.val.images, self.fmt, batch=self.opts.eval_batch)
        return self.cache[path]


def _compress(comp: Compressor, source: Source, calibration: np.ndarray, workdir: Path,
              skipped: dict[str, str]) -> tuple[Variant | None, float]:
    """One plug-in's variant and the seconds it took, or None (the failure is reported, not raised)."""
    started = time.perf_counter()
    try:
        variant = comp.compress(source, calibration, workdir)
    except Exception as exc:  # one failing plug-in must not sink the others; it is reported
        log.exception("compressor %s failed", comp.name)
        skipped[comp.name] = f"failed: {type(exc).__name__}: {exc}"
        return None, time.perf_counter() - started
    return variant, time.perf_counter() - started


def build_variants(
    prep: Prepared, inp: OptimizeInput, exported: ExportResult, *, compressors: Sequence[Compressor], workdir: Path,
    opts: OptimizeOptions,
) -> Built:
    """Step 2: every plug-in whose declared needs are met makes its variant.

    Plug-ins needing the INT8 model come last (:func:`~dlforge.optimizer.compressors.build_order`).
    Candidates declaring the same ``competes_as`` are tried in turn (in the order given); each is scored
    on validation against ONNX FP32 (argmax agreement, then mean |Δp|), and the tries stop early once one
    agrees on at least ``calibration_stop_agreement`` of the validation images — another calibration could
    then only win by less than the INT8 disagreement the choice tolerates. The best takes the
    competition's name; the others' files are removed.
    """
    fmt = prep.fmt
    caps = Capabilities.detect(torch_model=True, training_images=inp.train is not None,
                               calibration_images=len(prep.calibration) > 0, gpu_wanted=opts.gpu)
    source = Source(Path(exported.path), exported.input_name, (fmt.in_channels, fmt.input_size, fmt.input_size),
                    model=prep.model,
                    train_images=normalize(inp.train.images, fmt) if inp.train is not None else None,
                    train_labels=inp.train.labels if inp.train is not None else None)
    val_probs = _ValProbs(inp, fmt, opts)
    variants: dict[str, Variant] = {}
    skipped: dict[str, str] = {}
    trials: dict[str, list[tuple[Variant, CalibrationCandidate]]] = {}
    untried: list[str] = []
    first, later = build_order(compressors)
    for comp in first:
        decl = declaration_of(comp)
        reason = missing(decl, caps) or comp.unavailable()
        if reason is not None:
            skipped[comp.name] = reason
            continue
        group = decl.competes_as
        if group is not None and opts.calibration_stop_agreement is not None and any(
                c.val_agreement >= opts.calibration_stop_agreement for _, c in trials.get(group, [])):
            untried.append(comp.name)
            continue
        variant, took = _compress(comp, source, prep.calibration, workdir, skipped)
        if variant is None:
            continue
        if group is None:
            variants[variant.name] = variant
            continue
        ref, pv = val_probs(source.onnx_path), val_probs(variant.path)
        candidate = CalibrationCandidate(
            method=str(variant.details.get("calibration", variant.name)),
            val_accuracy=float((decide(pv) == inp.val.labels).mean()),
            val_agreement=float((decide(pv) == decide(ref)).mean()),
            val_mean_abs_diff=float(np.abs(pv - ref).mean()), seconds=took)
        trials.setdefault(group, []).append((variant, candidate))
    chosen_cal: str | None = None
    for group, tried in trials.items():
        # the one that decides validation images most often as FP32 does; ties go to the closest
        # probabilities, then to the first listed (agreement measures the quantization alone, whereas
        # accuracy against the mostly auto-labeled validation split adds the auto-labels' noise)
        best, _ = max(tried, key=lambda vc: (vc[1].val_agreement, -vc[1].val_mean_abs_diff))
        for v, _ in tried:
            if v is not best:
                v.path.unlink(missing_ok=True)
                val_probs.cache.pop(v.path, None)
        final = workdir / f"{group}{best.path.suffix}"
        shutil.move(best.path, final)
        val_probs.cache[final] = val_probs.cache.pop(best.path)
        variants[group] = replace(best, name=group, path=final)
        if best.precision == "int8" and source.int8_onnx_path is None:
            chosen_cal = str(best.details.get("calibration"))
            source = replace(source, int8_onnx_path=final)
    int8_model = source.int8_onnx_path is not None
    for comp in later:
        reason = missing(declaration_of(comp), caps, int8_model=int8_model) or comp.unavailable()
        if reason is not None:
            skipped[comp.name] = reason
            continue
        variant, _ = _compress(comp, source, prep.calibration, workdir, skipped)
        if variant is not None:
            variants[variant.name] = variant
    if opts.benchmark_torch:
        path, note = inp.checkpoint_path, "PyTorch eager, the training checkpoint"
        tv = prep.test_views
        if tv is not None and tv.used:  # the baseline is the averaging model too
            path = workdir / "torch_baseline.pt"
            averaging_checkpoint(inp.checkpoint_path, path, tv.views)
            note += f", averaged over {', '.join(tv.views)}"
        variants = {BASELINE: Variant(BASELINE, "torch", "fp32", path, details={"note": note}), **variants}
    if REFERENCE not in variants:
        raise RuntimeError(f"the reference variant {REFERENCE} was not built: {skipped.get(REFERENCE)}")
    candidates = [c for tried in trials.values() for _, c in tried]
    stop = opts.calibration_stop_agreement
    calibration = CalibrationReport(
        images=len(prep.calibration), source="training split (real images first), never validation or test",
        candidates=candidates, chosen=chosen_cal, untried=untried,
        rule=("highest agreement with ONNX FP32's argmax decisions on validation; ties go to the smallest "
              "mean |p_int8 - p_fp32| on validation, then to the first method listed"
              + (f"; methods are tried in the order listed and the tries stop once one agrees on >= "
                 f"{stop * 100:.1f} % of validation images" if stop is not None else "")))
    return Built(variants=variants, skipped=skipped, calibration=calibration, source=source,
                 val_probs=val_probs.cache)


@dataclass
class Evaluated:
    """Step 3-4's result: per variant its quality at the argmax and at its recall-first threshold."""

    quality: dict[str, dict[str, Any]]
    test_probs: dict[str, np.ndarray]
    test_split: dict[str, Any]
    from_people: bool
    test_labels: np.ndarray


def evaluate(prep: Prepared, inp: OptimizeInput, built: Built, exported: ExportResult, *,
             opts: OptimizeOptions) -> Evaluated:
    """Steps 3-4: every variant on validation and test; its threshold on validation, its figures on test.

    Test figures rest on the items people labeled: an auto-label is the labeler's guess, and scoring a
    model (which learned from such guesses) against them flatters it. The torch baseline is scored with
    ONNX FP32's outputs unless ``evaluate_torch``: the export check bounds their difference (it is
    never deployed, and running eager PyTorch over both splits is most of this step's time).
    """
    fmt, positive = prep.fmt, prep.positive
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
    # the reference first: the baseline may reuse its outputs
    order = [REFERENCE, *(n for n in built.variants if n != REFERENCE)]
    for name in order:
        v = built.variants[name]
        if name == BASELINE and not opts.evaluate_torch:
            pv = built.val_probs[built.variants[REFERENCE].path]
            pt = test_probs[REFERENCE]
            built.variants[name] = replace(v, details={
                **v.details, "quality": (f"scored with {REFERENCE}'s outputs: the export matches torch within "
                                         f"max |Δ logit| {exported.max_abs_diff:.2e} on {exported.checked_images} "
                                         f"images (evaluate_torch=false)")})
        else:
            runner = open_runner(v.runtime, v.path, providers=v.providers, provider_options=v.provider_options,
                                 threads=opts.threads)
            cached = None
            if v.providers == ("CPUExecutionProvider",):  # the FP32 variant is a copy of the exported model
                cached = built.val_probs.get(v.path, built.val_probs.get(built.source.onnx_path)
                                             if name == REFERENCE else None)
            pv = cached if cached is not None else probabilities(runner, inp.val.images, fmt, batch=opts.eval_batch)
            if name == REFERENCE:
                built.val_probs[v.path] = pv
            pt = probabilities(runner, inp.test.images, fmt, batch=opts.eval_batch)
            del runner
        test_probs[name] = pt
        quality[name] = _quality(inp, pv, pt, judged=judged, test_labels=test_labels, positive=positive, opts=opts)
    return Evaluated(quality=quality, test_probs=test_probs, test_split=test_split, from_people=from_people,
                     test_labels=test_labels)


def _quality(inp: OptimizeInput, pv: np.ndarray, pt: np.ndarray, *, judged: np.ndarray, test_labels: np.ndarray,
             positive: int | None, opts: OptimizeOptions) -> dict[str, Any]:
    """One variant's threshold (on validation) and figures (on the judged test items)."""
    spec = inp.spec
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
    return {
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


@dataclass
class Benchmarked:
    """Step 5's result: per variant its figures (each one's fastest round) and how the rounds went."""

    speed: dict[str, ProbeResult]
    summary: BenchmarkSummary


def benchmark(prep: Prepared, inp: OptimizeInput, variants: dict[str, Variant], *,
              opts: OptimizeOptions) -> Benchmarked:
    """Step 5: speed and memory, each variant in its own process, in interleaved rounds.

    Every variant is loaded once in its own serving probe (so its peak memory is its own). Each round
    times every variant in turn at batch 1 and through the frame pipeline (``iterations`` calls each);
    the larger batch sizes are timed once, in the first round. The rounds stop when every variant's
    batch-1 speed ratio to ONNX FP32 is known within ``ratio_tolerance`` (:func:`decide_stop`), after
    at least ``min_rounds`` and at most ``rounds``. Each figure is the variant's fastest round. The torch
    baseline (never chosen, and by far the slowest to time) takes part in the first ``baseline_rounds``
    rounds only and does not hold them up.
    """
    fmt, spec = prep.fmt, inp.spec
    rule = StopRule(tolerance=opts.ratio_tolerance, min_rounds=min(opts.min_rounds, opts.rounds),
                    max_rounds=opts.rounds)
    large = [b for b in opts.batch_sizes if b != 1]
    rounds: dict[str, list[Measurement]] = {name: [] for name in variants}
    decision: StopDecision | None = None
    with contextlib.ExitStack() as stack:
        workers: dict[str, ProbeWorker] = {}
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
            workers[name] = stack.enter_context(ProbeWorker(job, timeout=opts.probe_timeout))
        for r in range(rule.max_rounds):
            for name, worker in workers.items():
                if name == BASELINE and r >= opts.baseline_rounds:
                    continue  # the baseline is never chosen: it takes part in the first rounds only
                first = r == 0
                warm = opts.warmup if first else 1
                batches = [1] if 1 in opts.batch_sizes else []
                if first:
                    batches += large
                rounds[name].append(worker.measure(Measure(
                    warmup={b: (warm if b == 1 else max(1, opts.warmup // 3)) for b in batches},
                    iterations={b: (opts.iterations if b == 1 else opts.iterations_large_batch) for b in batches},
                    pipeline_warmup=warm, pipeline_iterations=opts.iterations)))
            p50s = {name: [_round_p50(m) for m in ms] for name, ms in rounds.items() if name != BASELINE}
            decision = decide_stop(p50s, reference=REFERENCE, rule=rule)
            if decision.stop:
                break
    if decision is None:
        raise ValueError("no benchmark round was run")
    round_p50 = {name: [_round_p50(m) for m in ms] for name, ms in rounds.items()}
    summary = BenchmarkSummary(rounds=len(rounds[REFERENCE]), stop_rule=rule, stop_reason=decision.reason,
                               speed_ratios_vs_onnx_fp32=speed_ratios(round_p50, reference=REFERENCE),
                               round_p50_ms=round_p50)
    return Benchmarked(speed={name: combine(ms) for name, ms in rounds.items()}, summary=summary)


def _round_p50(m: Measurement) -> float:
    """The batch-1 median latency of a round (the pipeline's when batch 1 was not timed)."""
    if "1" in m.batches:
        return m.batches["1"].p50_ms
    if m.pipeline is None:
        raise ValueError("a benchmark round timed neither batch 1 nor the pipeline")
    return m.pipeline.p50_ms


@dataclass
class Chosen:
    """Step 6's result: every variant's report and the choice among the deployable ones."""

    reports: dict[str, VariantReport]
    choice: VariantChoice


def choose(inp: OptimizeInput, variants: dict[str, Variant], evaluated: Evaluated, speed: dict[str, ProbeResult], *,
           opts: OptimizeOptions, positive: int | None) -> Chosen:
    """Step 6: per variant its report and spec check; then the choice (:func:`choose_variant`)."""
    spec = inp.spec
    quality, test_probs = evaluated.quality, evaluated.test_probs
    reports: dict[str, VariantReport] = {}
    ref_acc = quality[REFERENCE]["test_argmax"].accuracy
    ref_at = quality[REFERENCE]["test"].accuracy
    for name, v in variants.items():
        sp = speed[name]
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
            threshold_recall_lower_bound=th.val_recall_lower_bound, evidence_from_people=evaluated.from_people)
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
    return Chosen(reports=reports, choice=choice_made)


def optimize(
    inp: OptimizeInput,
    *,
    workdir: Path,
    options: OptimizeOptions | None = None,
    compressors: Sequence[Compressor] | None = None,
) -> OptimizeResult:
    """Export, build the variants, evaluate, benchmark and choose (see the module docstring).

    ``compressors`` replaces the standard plug-ins (ONNX FP32, one INT8 per calibration method, the
    GPU ones); plug-ins are used by what they declare (:class:`~dlforge.optimizer.compressors.Need`,
    ``competes_as``), not by class or name. Raises InvalidInput for inputs that cannot be optimized
    (classes that do not match the checkpoint, a positive class the model does not know, no images to
    evaluate).
    """
    opts = options or OptimizeOptions()
    workdir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(step: str) -> None:
        seconds[step] = time.perf_counter() - t0 - sum(seconds.values())

    prep = views_step(prepare(inp), inp, opts=opts)
    lap("views")
    exported = export_step(prep, inp, workdir=workdir, opts=opts)
    lap("export")
    if compressors is None:
        compressors = standard_compressors(opts)
    built = build_variants(prep, inp, exported, compressors=compressors, workdir=workdir, opts=opts)
    lap("compress")
    evaluated = evaluate(prep, inp, built, exported, opts=opts)
    lap("evaluate")
    measured = benchmark(prep, inp, built.variants, opts=opts)
    lap("benchmark")
    chosen = choose(inp, built.variants, evaluated, measured.speed, opts=opts, positive=prep.positive)
    seconds["total"] = time.perf_counter() - t0
    report = _report(inp, prep, exported, built, evaluated, chosen, measured.summary, opts=opts, seconds=seconds)
    files = {name: v.path for name, v in built.variants.items() if name != BASELINE}
    return OptimizeResult(report=report, files=files)


def standard_compressors(opts: OptimizeOptions) -> list[Compressor]:
    """ONNX FP32, one INT8 candidate per calibration method (in the order listed), the GPU ones if enabled, the
    structured-compression search if ``opts.compression`` has configs."""
    fp32s, int8s, gpus = default_compressors(
        calibration_methods=tuple(opts.calibration_methods),  # type: ignore[arg-type]
        calibration_batch=opts.calibration_batch)
    out: list[Compressor] = [*fp32s, *int8s, *(gpus if opts.gpu else [])]
    if opts.compression:  # the structured-compression search, when configs are given (off by default)
        from dlforge.optimizer.compression import CompressionSearch

        out.append(CompressionSearch(opts.compression, recovery_seconds=opts.compression_recovery_seconds,
                                     max_disagreement=opts.max_accuracy_drop, threads=opts.threads))
    return out


def _report(inp: OptimizeInput, prep: Prepared, exported: ExportResult, built: Built, evaluated: Evaluated,
            chosen_step: Chosen, bench: BenchmarkSummary, *, opts: OptimizeOptions,
            seconds: dict[str, float]) -> OptimizationReport:
    """The stored report: the chosen variant's figures first, then every variant's, then how they were made."""
    spec, fmt = inp.spec, prep.fmt
    reports, choice_made = chosen_step.reports, chosen_step.choice
    chosen = reports[choice_made.chosen]
    chosen_curve: OperatingCurve | None = evaluated.quality[chosen.name]["curve"]
    if chosen_curve is not None:
        keep = [chosen.accuracy_at_spec_recall.threshold] if chosen.accuracy_at_spec_recall else []
        chosen_curve = chosen_curve.thin(300, keep=keep)
    int8, fp32, torch_r = reports.get(INT8), reports[REFERENCE], reports.get(BASELINE)
    big = str(max(opts.batch_sizes))
    return OptimizationReport(
        dataset_id=inp.dataset_id, model_id=inp.model_id, arch=prep.arch, classes=list(inp.classes),
        positive_class=spec.positive_class, spec=spec,
        input={"in_channels": fmt.in_channels, "input_size": fmt.input_size, "mean": list(fmt.mean),
               "std": list(fmt.std), "frame_size": spec.input_size},
        pipeline=(f"FPS = batch-1 images/s of the deployed pipeline on a {spec.input_size}x{spec.input_size} uint8 "
                  f"frame: PIL bilinear resize to the network's {fmt.input_size}x{fmt.input_size} input, "
                  f"normalization and inference ({opts.threads} intra-op threads; image decoding excluded). The "
                  f"network runs at the input size it was trained at, so the accuracy measured at "
                  f"{fmt.input_size} is the accuracy of the pipeline whose FPS is measured."),
        speedup_rule=("speedups are ratios of median (p50) per-call latencies at the given batch size, each "
                      "variant benchmarked in its own process, in interleaved rounds (every variant once per "
                      "round) that stop when the per-round ratios are steady; each variant's fastest round is "
                      "used; robust to other processes on a shared machine"),
        export=exported, calibration=built.calibration,
        variants=reports, skipped=built.skipped, choice=choice_made, chosen_variant=chosen.name,
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
        test_split=evaluated.test_split, test_accuracy_argmax=chosen.test_argmax.accuracy,
        test_accuracy_interval=chosen.test_figures.accuracy if chosen.test_figures else None,
        test_accuracy_argmax_interval=chosen.test_figures_argmax.accuracy if chosen.test_figures_argmax else None,
        positive_recall_interval=chosen.test_figures.positive_recall if chosen.test_figures else None,
        test_figures=chosen.test_figures, operating_curve=chosen_curve,
        accuracy_at_spec_recall=chosen.accuracy_at_spec_recall, spec_verdict=chosen.verdict, benchmark=bench,
        test_views=prep.test_views,
    )
