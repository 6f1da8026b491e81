"""Trainer settings (environment variables ``DLFORGE_TRAINER_…``)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dlforge.common.settings import CommonSettings
from dlforge.trainer.views import checked_views


class TrainerSettings(CommonSettings):
    """Knobs of the trainer process; the per-job ones (hyperparameters, workers) come with each job."""

    trainer_device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where training runs: 'auto' (CUDA when torch sees a GPU, one per worker; "
        "else the CPU), 'cpu', or 'cuda' (refused at start when torch sees no CUDA device). On CUDA the step "
        "runs in float16 autocast with a gradient scaler")
    trainer_engine: Literal["ddp", "horovod"] = Field(default="ddp", description="data-parallel engine: ddp | horovod")
    trainer_threads: int = Field(default=2, ge=1, le=256,
                                 description="threads computing the activation cache (ONNX Runtime / torch)")
    trainer_train_threads: int = Field(
        default=1, ge=1, le=256, description="torch threads of one training process. The tail's ops are small "
        "(7x7 maps): one thread trained 1.7-5x faster than two on the 2-core machine (benchmarks/trainer.py)",
    )
    trainer_checkpoint_every_steps: int = Field(
        default=50, ge=0, description="final training: checkpoint to the object store every K steps (0: never)"
    )
    trainer_summary_every_steps: int = Field(default=10, ge=1, description="TensorBoard step-loss interval")
    trainer_prefix_runner: Literal["onnxruntime", "torch"] = Field(
        default="onnxruntime", description="what computes the activation cache: onnxruntime | torch"
    )
    trainer_cache_from_unfreeze: int = Field(
        default=3, ge=0, description="the cache is first computed at this freeze boundary and shallower ones "
        "are derived from it, so images go through the network once for unfreeze 0..N",
    )
    trainer_cache_batch_size: int = Field(default=32, ge=1, le=1024)
    trainer_cache_max_mb: int = Field(default=2048, ge=1, description="refuse caches larger than this")
    trainer_input_size: int | None = Field(default=None, ge=16, le=1024,
                                           description="image side to train at (default: the network's)")
    trainer_max_concurrent_jobs: int = Field(default=1, ge=1, description="REST jobs that train at once")
    trainer_job_lease_s: float = Field(
        default=60.0, ge=3.0, le=3600.0, description="a REST job's lease: its trainer renews it every third of "
        "this; a job whose lease ran out (its trainer died, e.g. a pod replaced under another host name) is "
        "taken over and resumed by another trainer")
    trainer_val_people_min: int = Field(
        default=30, ge=0, description="validate on the val items people labeled when there are at least this "
        "many (and every val class is among them); 0 validates on every val item, auto-labels included")

    trainer_final_epochs: int | None = Field(
        default=30, ge=1, le=1000, description="final training: at most max(this, the run's train_epochs) "
        "epochs, stopped early on validation (DLFORGE_TRAINER_FINAL_PATIENCE) with the best epoch's weights "
        "kept; unset: the run's train_epochs, every epoch trained")
    trainer_final_max_seconds: float = Field(
        default=420.0, ge=0.0, description="final training: time cap in seconds for the view check's probe and the "
        "training (the probe gets a tenth when backbone units train, being a head on the frozen units whose "
        "forward pass over the cached rows comes before and outside it; half otherwise); no epoch starts that "
        "would end past it; 0: none. The last three units train at about "
        "20 s an epoch on 2 cores for ELPV's 2,331 training cells, so the cap keeps `make demo` in its budget "
        "(README)")
    trainer_final_patience: int = Field(
        default=5, ge=0, le=1000, description="final training: stop after this many epochs without a better "
        "val accuracy (0: no early stopping)")
    trainer_final_views: str = Field(
        default="flips", description="final training: label-preserving views (none | flips | dihedral | a comma "
        "list, see dlforge.trainer.views) cached and sampled one per item per epoch")
    trainer_check_views: bool = Field(
        default=True, description="final training: keep only the views that a probe trained without them "
        "(a head on the frozen units when units train, else the model itself) still classifies on the val items "
        "(each may cost the larger of DLFORGE_TRAINER_VIEW_TOLERANCE and DLFORGE_TRAINER_VIEW_ERROR_SHARE times "
        "the probe's error); off: trust the declared set")
    trainer_view_tolerance: float = Field(
        default=0.02, ge=0.0, le=1.0, description="the least val accuracy a view may cost the probe and be kept")
    trainer_view_error_share: float = Field(
        default=0.5, ge=0.0, le=10.0, description="a view may cost the probe up to this share of its own val "
        "error (when more than DLFORGE_TRAINER_VIEW_TOLERANCE). Measured: flipped ELPV cells cost probes 0.5-4.3 "
        "points at 9.5-12 % error, mirrored digits 5 points at 5 % error (benchmarks/trainer_learning.py)")
    trainer_label_weighting: str = Field(
        default="confidence", description="'confidence': auto-labels weigh their confidence in the loss, "
        "people's labels 1; 'none': every label weighs 1")
    trainer_decision_wait_seconds: float = Field(
        default=30.0, ge=0.0, le=3600.0, description="after reporting a trial's epoch, how long to wait for the "
        "tuner's pruning decision before training on without it (0: never wait, only read decisions that came)")

    trainer_launcher: Literal["local", "kubernetes"] = Field(
        default="local", description="where a run of several workers runs: 'local' (processes of this trainer) "
        "or 'kubernetes' (the pods of an indexed Job, see dlforge.trainer.launcher); one worker always runs here")
    trainer_k8s_image: str | None = Field(default=None, description="the worker pods' image (the trainer's)")
    trainer_k8s_namespace: str = Field(default="dlforge", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    trainer_k8s_api_url: str = Field(default="https://kubernetes.default.svc", description="the API server")
    trainer_k8s_token_file: str | None = Field(
        default="/var/run/secrets/kubernetes.io/serviceaccount/token", description="bearer token of the "
        "trainer's service account (needs create/get/watch/delete on jobs and services)")
    trainer_k8s_ca_file: str | None = Field(default="/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    trainer_k8s_cpu: str = Field(default="1", description="CPU request of a worker pod")
    trainer_k8s_memory: str = Field(default="2Gi", description="memory request and limit of a worker pod")
    trainer_k8s_gpus_per_worker: int = Field(default=0, ge=0, le=1, description="nvidia.com/gpu per worker pod")
    trainer_k8s_env_from: str = Field(
        default="configmap/dlforge-config,secret/dlforge-objects", description="comma list of configmap/NAME "
        "and secret/NAME the worker pods take their environment from (DLFORGE_OBJECTS and its credentials)")

    @field_validator("trainer_k8s_env_from")
    @classmethod
    def _env_refs(cls, value: str) -> str:
        bad = [r for r in (p.strip() for p in value.split(",")) if r and not re.fullmatch(r"(configmap|secret)/\S+", r)]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: give configmap/NAME or secret/NAME")
        return value

    @model_validator(mode="after")
    def _device_exists(self) -> TrainerSettings:
        if self.trainer_device == "cuda":
            from dlforge.common.errors import ConfigError
            from dlforge.trainer.training import resolve_device

            try:
                resolve_device(self.trainer_device)
            except ConfigError as exc:  # names DLFORGE_TRAINER_DEVICE and what is missing
                raise ValueError(str(exc)) from exc
        return self

    @model_validator(mode="after")
    def _launcher_needs_an_image(self) -> TrainerSettings:
        if self.trainer_launcher == "kubernetes" and not self.trainer_k8s_image:
            raise ValueError("DLFORGE_TRAINER_K8S_IMAGE is required with DLFORGE_TRAINER_LAUNCHER=kubernetes")
        return self

    @field_validator("trainer_final_views")
    @classmethod
    def _known_views(cls, value: str) -> str:
        return checked_views(value)

    @field_validator("trainer_label_weighting")
    @classmethod
    def _known_weighting(cls, value: str) -> str:
        if value not in ("confidence", "none"):
            raise ValueError(f"{value!r} is not one of confidence, none")
        return value

