"""Load an optimized variant from the object store and classify images with the chosen threshold."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from dlforge.common.errors import InvalidInput, NotFound
from dlforge.common.objects import ObjectStore
from dlforge.optimizer.evaluation import decide, softmax
from dlforge.optimizer.preprocess import InputFormat, normalize, resize_frame
from dlforge.optimizer.runners import Runner, open_runner

log = logging.getLogger(__name__)


class Prediction(BaseModel):
    """One image's decision: the class, its probability, and the positive class's score vs threshold."""

    model_config = ConfigDict(extra="forbid")

    label: str
    probability: float
    probabilities: dict[str, float]
    positive_class: str | None
    positive_probability: float | None
    threshold: float | None
    variant: str
    model_id: str


class Predictor:
    """A variant's runner plus what it needs to turn images into decisions.

    The decision rule is the optimizer's (see :mod:`dlforge.optimizer.evaluation`): the positive class
    when its probability reaches the variant's threshold, otherwise the most probable other class.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        fmt: InputFormat,
        classes: Sequence[str],
        positive_class: str | None,
        threshold: float | None,
        variant: str,
        model_id: str = "",
    ) -> None:
        self.runner = runner
        self.fmt = fmt
        self.classes = list(classes)
        self.positive_class = positive_class
        self.positive = self.classes.index(positive_class) if positive_class is not None else None
        self.threshold = threshold if self.positive is not None else None
        self.variant = variant
        self.model_id = model_id

    @classmethod
    def from_report(
        cls,
        objects: ObjectStore,
        report: Mapping[str, Any],
        *,
        cache_dir: Path,
        variant: str | None = None,
        threads: int = 2,
    ) -> Predictor:
        """The predictor of ``variant`` (default: the chosen one) of an optimizer report."""
        name = variant or str(report["chosen_variant"])
        variants: Mapping[str, Any] = report["variants"]
        entry = variants.get(name)
        if entry is None or not entry.get("key"):
            stored = sorted(n for n, v in variants.items() if v.get("key"))
            raise NotFound(f"variant {name!r} has no stored model; stored variants: {', '.join(stored)}")
        key = str(entry["key"])
        local = cache_dir / key
        size = objects.stat(key).size
        if not local.exists() or local.stat().st_size != size:
            objects.get_file(key, local)
        providers = tuple(entry.get("providers") or ("CPUExecutionProvider",))
        runner = open_runner(entry["runtime"], local, providers=providers, threads=threads)
        inp = report["input"]
        fmt = InputFormat(int(inp["in_channels"]), int(inp["input_size"]), tuple(inp["mean"]), tuple(inp["std"]))
        return cls(runner, fmt=fmt, classes=report["classes"], positive_class=report.get("positive_class"),
                   threshold=float(entry["threshold"]["threshold"]), variant=name,
                   model_id=str(report.get("model_id", "")))

    @classmethod
    def load(
        cls, objects: ObjectStore, report_key: str, *, cache_dir: Path, variant: str | None = None, threads: int = 2
    ) -> Predictor:
        """The predictor of the optimizer report stored at ``report_key``."""
        return cls.from_report(objects, objects.get_json(report_key), cache_dir=cache_dir, variant=variant,
                               threads=threads)

    def predict(self, data: bytes, *, name: str = "image") -> Prediction:
        """Classify one encoded image (PNG, JPEG, ...); InvalidInput if it cannot be decoded."""
        from dlforge.vision.images import decode

        return self.predict_images([decode(data, name=name)])[0]

    def predict_images(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Classify decoded images (any size: each is resized to the network's input)."""
        if not images:
            return []
        try:
            batch = np.stack([resize_frame(img, self.fmt) for img in images])
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot convert the image for the network: {exc}") from exc
        probs = softmax(self.runner.run(normalize(batch, self.fmt)))
        pred = decide(probs, positive=self.positive, threshold=self.threshold)
        out = []
        for p, k in zip(probs, pred, strict=True):
            out.append(Prediction(
                label=self.classes[int(k)], probability=float(p[int(k)]),
                probabilities={c: float(v) for c, v in zip(self.classes, p, strict=True)},
                positive_class=self.positive_class,
                positive_probability=float(p[self.positive]) if self.positive is not None else None,
                threshold=self.threshold, variant=self.variant, model_id=self.model_id,
            ))
        return out
