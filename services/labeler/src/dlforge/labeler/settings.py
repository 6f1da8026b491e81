"""Labeler settings (environment variables ``DLFORGE_LABELER_…``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from dlforge.common.settings import CommonSettings
from dlforge.labeler.guarantee import Guarantee


class LabelerSettings(CommonSettings):
    """What the labeler reads besides the common settings."""

    labeler_import_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="server-side folders POST /datasets may import from (comma- or os.pathsep-separated, "
        "or a JSON list); empty: server-side import is refused",
    )
    labeler_max_upload_bytes: int = Field(default=2 << 30, gt=0, description="largest zip upload (compressed)")
    labeler_max_file_bytes: int = Field(default=32 << 20, gt=0, description="largest single file")
    labeler_max_archive_bytes: int = Field(
        default=4 << 30, gt=0, description="largest total uncompressed size of an archive or folder"
    )
    labeler_max_entries: int = Field(default=100_000, gt=0, description="most files in an archive or folder")
    labeler_allow_new_classes: bool = Field(
        default=True, description="whether labels may introduce classes the dataset did not name (default)"
    )
    labeler_embedder: str = Field(default="efficientnet_lite0", description="embedder plug-in name")
    labeler_embed_size: int = Field(default=224, ge=32, le=1024, description="image side fed to the embedder")
    labeler_embed_views: Literal["none", "dihedral"] = Field(
        default="none", description="dihedral: append each image's multi-stage features averaged over its eight "
        "flips and quarter turns (eight trunk passes per image; the classifier weighs both halves). Measured "
        "in the loop by benchmarks/labeler.py --views; see README")
    labeler_domains: Literal["none", "standardize"] = Field(
        default="none", description="standardize: when the items come from several domains (a manifest's "
        "domain column: camera, line, cell type), each domain's embeddings get the whole set's per-feature moments "
        "before the classifier sees them, so labels of one domain carry to another (domains under 20 items and "
        "items of no domain are left as they are); none: the embeddings as they are. Measured by "
        "benchmarks/domain_adaptation.py and benchmarks/labeler.py; see README")
    labeler_embed_batch: int = Field(default=64, ge=1, le=1024)
    labeler_threads: int = Field(default=2, ge=1, le=256, description="threads for embedding")
    labeler_embed_runtime: Literal["onnxruntime", "torch"] = Field(
        default="onnxruntime", description="run the embedder with ONNX Runtime (about 5x faster on CPU) or PyTorch"
    )
    labeler_index: Literal["faiss-cpu", "faiss-gpu"] = Field(
        default="faiss-cpu", description="vector index backend; faiss-gpu needs the faiss-gpu package and a GPU"
    )
    labeler_query_strategy: Literal["margin", "least_confidence", "entropy"] = "margin"
    labeler_classifier: Literal["linear", "mlp_ssl", "cnn_ssl", "blend", "best", "finetune_top"] = Field(
        default="linear", description="the auto-labeling classifier plug-in: calibrated logistic regression, the "
        "semi-supervised MLP on the embeddings, cnn_ssl: a small CNN trained in the loop on the pixels with "
        "pseudo-labels (FixMatch-style), blend: linear and cnn_ssl averaged with the weight their held-out "
        "predictions favour, or best: linear and mlp_ssl, keeping the one with the better held-out "
        "accuracy on people's "
        "representative labels (which weakens the auto-label guarantee's 95 % to about 90 %), or finetune_top: "
        "the EfficientNet-Lite0 trunk's last three units and a new layer fine-tuned on people's labels, from the "
        "activations the embedding pass stored (benchmarks/labeler.py compares them)")
    labeler_guarantee: Guarantee = Field(
        default="bound", description="what the auto-labeling threshold guarantees about the error of the items "
        "it labels: bound (at most the run's max_auto_label_error with 95 % confidence, an exact binomial bound; "
        "a 1 % target needs 299 or more people's random labels above the threshold, all right) or expected (its "
        "expectation at most the target, by conformal selection; certifies coverage on fewer labels, and a "
        "single run may exceed the target)")
    labeler_cnn_time_budget_s: float = Field(
        default=900.0, gt=0, le=24 * 3600,
        description="cnn_ssl and blend: the seconds one round's fit may take (its fold networks share it); "
        "a fit overruns it only to train labeler_cnn_min_steps steps")
    labeler_cnn_min_steps: int = Field(
        default=300, ge=0, le=100_000,
        description="cnn_ssl and blend: the fewest optimizer steps a fold network trains even when the time "
        "budget is spent (on a busy machine a round overruns the budget rather than keep a network that has "
        "hardly trained); 0 makes the time budget a hard cap")
    labeler_cnn_steps: int = Field(
        default=3000, ge=1, le=1_000_000,
        description="cnn_ssl and blend: the optimizer steps a fold network trains when the time budget allows "
        "(1,500 to 3,000 bought +0.1 to +0.8 points at twice the time: benchmarks/labeler_cnn.py)")
    labeler_cnn_thresholds: Literal["fixed", "flex"] = Field(
        default="fixed",
        description="cnn_ssl and blend: the pseudo-label confidence an unlabeled item needs to train the network: "
        "flex (FlexMatch's per-class thresholds, low for the classes the network has not learned yet) or fixed "
        "(FixMatch's 0.95 for every class; the default: flex helped only digits on random labels); "
        "benchmarks/labeler_cnn.py compares them")
    labeler_finetune_steps: int = Field(
        default=450, ge=1, le=1_000_000,
        description="finetune_top: the optimizer steps (of 32 labeled items) each fold network trains the trunk's "
        "last units and a new layer")
    labeler_finetune_folds: int = Field(
        default=3, ge=2, le=10,
        description="finetune_top: fold networks per round (each trained without one fold's labels, which it "
        "then predicts: the held-out evidence; the other items get their average)")
    labeler_finetune_time_budget_s: float = Field(
        default=600.0, gt=0, le=24 * 3600,
        description="finetune_top: the seconds one round's training may take (its fold networks share it; "
        "each at least a second and 100 steps whatever the budget; predicting the items comes on top)")
    labeler_presign_seconds: int = Field(default=3600, ge=60, le=7 * 24 * 3600)

    @field_validator("labeler_import_roots", mode="before")
    @classmethod
    def _roots(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if not text:
                return []
            if text.startswith("["):
                return json.loads(text)
            parts = [p for chunk in text.split(",") for p in chunk.split(os.pathsep)]
            return [p.strip() for p in parts if p.strip()]
        return v

    @field_validator("labeler_embedder")
    @classmethod
    def _embedder(cls, v: str) -> str:
        from dlforge.labeler.embeddings import EMBEDDERS

        if v not in EMBEDDERS:
            raise ValueError(f"unknown embedder {v!r}; known: {', '.join(EMBEDDERS)}")
        return v

    @property
    def import_roots(self) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in self.labeler_import_roots]

