"""Optimizer settings (environment variables ``DLFORGE_OPTIMIZER_*``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from dlforge.common.settings import CommonSettings
from dlforge.optimizer.compression import CompressionConfig
from dlforge.optimizer.compressors import CALIBRATION_METHODS, CalibrationMethodName


class OptimizerSettings(CommonSettings):
    optimizer_opset: int = Field(default=17, ge=17, le=23, description="ONNX opset of the export")
    optimizer_export_tolerance: float = Field(default=1e-3, gt=0, description="max |onnx - torch| logit difference")
    optimizer_calibration_images: int = Field(default=64, ge=1, le=4096,
                                              description="training images (never val/test) to calibrate INT8 on")
    optimizer_train_images: int = Field(
        default=512, ge=1, le=100_000,
        description="labeled training images loaded for compressors that declare the training-images need "
                    "(recovery fine-tune); loaded only then")
    optimizer_calibration_methods: list[CalibrationMethodName] = Field(
        default=["minmax", "percentile", "entropy"], min_length=1,
        description="INT8 calibrations to try; the one agreeing best with FP32 on validation is kept")
    optimizer_calibration_batch: int = Field(default=8, ge=1, le=256)
    optimizer_threads: int = Field(default=2, ge=1, le=256, description="intra-op threads of every measured runtime")
    optimizer_batch_sizes: list[int] = Field(default=[1, 32], min_length=1)
    optimizer_warmup: int = Field(default=5, ge=0, description="untimed calls before timing (batch 1)")
    optimizer_iterations: int = Field(default=60, ge=2,
                                      description="timed calls per round at batch 1 (and for the pipeline)")
    optimizer_iterations_large_batch: int = Field(default=6, ge=2, description="timed calls at batch sizes > 1")
    optimizer_rounds: int = Field(
        default=8, ge=1, le=50,
        description="most benchmark rounds, each measuring every variant once in turn (so that a busy spell of the "
                    "machine slows all of them, not one); each variant's fastest round is reported")
    optimizer_min_rounds: int = Field(default=3, ge=1, le=50, description="fewest benchmark rounds")
    optimizer_baseline_rounds: int = Field(
        default=1, ge=1, le=50,
        description="rounds the PyTorch eager baseline takes part in (the first ones): it is never deployed, and "
                    "timing it costs more than all the ONNX variants together")
    optimizer_ratio_tolerance: float = Field(
        default=0.05, gt=0, le=1,
        description="the rounds stop once every batch-1 speed ratio to ONNX FP32 is known within this share of itself "
                    "(half-width of its 95 % interval over the rounds)")
    optimizer_calibration_stop_agreement: float | None = Field(
        default=0.99, ge=0, le=1,
        description="INT8 calibrations are tried in the order listed until one decides this share of validation "
                    "images as FP32 does (unset: try every one)")
    optimizer_evaluate_torch: bool = Field(
        default=False, description="score the PyTorch eager baseline on val/test itself (slow on CPUs) instead of "
                                   "with ONNX FP32's outputs, which the export check ties to it")
    optimizer_max_accuracy_drop: float = Field(default=0.01, ge=0, le=1,
                                               description="accuracy a variant may lose vs ONNX FP32 (0.01 = 1 point)")
    optimizer_max_int8_disagreement: float = Field(
        default=0.02, ge=0, le=1,
        description="share of test images on which an INT8 variant's argmax may differ from ONNX FP32's; above it the "
                    "variant is rejected (0.02 = 2 %)")
    optimizer_recall_margin: float = Field(default=0.0, ge=0, le=0.5,
                                           description="extra validation recall the threshold must reach")
    optimizer_threshold_min_positives: int = Field(
        default=10, ge=1, description="positives a validation view (all items, items labeled by people) needs "
                                      "before the recall threshold is checked on it")
    optimizer_eval_batch: int = Field(
        default=8, ge=1, le=1024,
        description="images per inference call when scoring val/test (EfficientNet-Lite0 at 224 on ONNX Runtime, "
                    "2 threads: 57 images/s at 8, 26 at 32 — large batches fall out of the cache)")
    optimizer_gpu: bool = Field(default=True, description="try the GPU compressors where their libraries exist")
    optimizer_benchmark_torch: bool = Field(default=True, description="measure PyTorch eager FP32 as the baseline")
    optimizer_probe_timeout: float = Field(default=900.0, gt=0)
    optimizer_compression: list[CompressionConfig] = Field(
        default=[], description="structured-compression configs (JSON list of {prune_ratio, rank_fraction, "
                                "resolution, int8}) the 'pruned' plug-in searches; [] leaves it out (it needs "
                                "torch-pruning and adds recovery time per config)")
    optimizer_test_views: Literal["trained", "forced", "none"] = Field(
        default="none", description="trained: every variant averages its class probabilities over the "
        "label-preserving views the model was trained on (the trainer's checked views) when, on the validation "
        "items people labeled, that is more accurate at the argmax or at the spec's recall and no worse at the "
        "other, and the averaging network reaches the spec's FPS in eager PyTorch; forced: without the "
        "validation check; none: the plain network (the default; see README, 'Test-time views')")
    optimizer_compression_recovery_seconds: float = Field(
        default=20.0, ge=0.0, le=3600.0, description="distillation budget per structured-compression config")

    @field_validator("optimizer_calibration_methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in CALIBRATION_METHODS]
        if unknown:
            raise ValueError(f"unknown calibration methods {unknown}; known: {', '.join(CALIBRATION_METHODS)}")
        return list(dict.fromkeys(v))

    @field_validator("optimizer_batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("batch sizes must be >= 1")
        return sorted(set(v))

