"""Augmenter settings (environment variables ``DLFORGE_AUGMENTER_*``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from dlforge.augmenter.generators import DEFAULT_POLICIES, parse_policy
from dlforge.augmenter.learned import Mode
from dlforge.common.errors import ConfigError
from dlforge.common.settings import CommonSettings


class AugmenterSettings(CommonSettings):
    augmenter_threshold: float = Field(
        default=0.9, gt=0.0, le=1.0, description="X2 filter: minimum probability of the intended class to keep a sample"
    )
    augmenter_max_generated_ratio: float = Field(
        default=1.0, ge=0.0, le=10.0, description="at most this many generated samples per real train image of a class"
    )
    augmenter_filter_arch: str = Field(default="efficientnet_lite0", description="frozen feature network of the filter")
    augmenter_filter_image_size: int = Field(
        default=224, ge=32, le=512,
        description="filter input side (px); at the labeler's embedding size (224) the real images' features are "
        "read from the feature store instead of computed again",
    )
    augmenter_filter_max_train: int = Field(
        default=3000, ge=10, description="real train images the filter learns from at most (stratified subsample)"
    )
    augmenter_batch_size: int = Field(default=64, ge=1, le=1024)
    augmenter_threads: int = Field(default=2, ge=1, le=256, description="torch threads for feature extraction")
    augmenter_policies: list[str] = Field(
        default=list(DEFAULT_POLICIES), description="augmentation policies: ops joined by '|', 'op:magnitude'"
    )
    augmenter_mixup_fraction: float = Field(default=0.3, ge=0.0, le=1.0, description="share of samples made by mixup")
    augmenter_mixup_alpha: float = Field(default=0.4, gt=0.0, le=100.0)
    augmenter_max_side: int = Field(default=512, ge=16, le=4096, description="generated images are at most this side")
    augmenter_max_sources: int = Field(
        default=2000, ge=1, description="real images of a class loaded as generation sources at most"
    )
    augmenter_write_threads: int = Field(default=8, ge=1, le=64)
    augmenter_generator: Literal["policy", "cvae", "cvae+policy"] = Field(
        default="policy",
        description="sample generator: 'policy' (augmentation policies + within-class mixup), 'cvae' (a small "
        "convolutional VAE trained per class at 64 px, see dlforge.augmenter.learned) or 'cvae+policy' (each VAE "
        "sample then put through one of the augmentation policies)",
    )
    augmenter_cvae_seconds: float = Field(
        default=90.0, gt=0.0, le=3600.0, description="cvae: training time budget per class"
    )
    augmenter_cvae_steps: int = Field(
        default=1500, ge=1, le=1_000_000, description="cvae: training steps per class at most"
    )
    augmenter_cvae_mode: Mode = Field(
        default="residual",
        description="cvae sampling: 'residual' (the default: on ELPV with its defects scarce, 2.1 points more defect "
        "recall at precision 0.9 than 'perturb' over 10 seeds; equal average precision on Fashion-MNIST), 'perturb', "
        "'prior' or 'interpolate' (dlforge.augmenter.learned; benchmarks/augmenter.py --protocol scarce)",
    )

    @field_validator("augmenter_policies")
    @classmethod
    def _policies(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one augmentation policy is required")
        for p in v:
            try:
                parse_policy(p)
            except ConfigError as exc:
                raise ValueError(str(exc)) from exc
        return v

    @field_validator("augmenter_filter_arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        if v != "efficientnet_lite0":
            raise ValueError(f"{v!r}: the filter needs a pretrained network; only 'efficientnet_lite0' has one")
        return v
