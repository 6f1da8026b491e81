"""A bundle's model in ONNX Runtime, with the platform's preprocessing and decision rule.

The steps are the platform's own (``dlforge.optimizer.preprocess`` and ``evaluation.decide``): decode,
``convert`` to the colour mode, PIL bilinear resize to the input size, ``(x / 255 - mean) / std`` in
float32, the model's logits, a float64 softmax; the positive class when its probability reaches the
threshold, otherwise the most probable other class.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dlforge_edge.bundle import Bundle, BundleError

MAX_PIXELS = 64_000_000  # the platform's limit: a larger image is refused from its header, before decoding
MIN_SIDE = 8


class ImageRejected(ValueError):
    """An input that is not an image this model can take; ``status`` is the HTTP status that fits."""

    def __init__(self, message: str, *, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def decode(data: bytes, *, name: str = "image") -> Image.Image:
    """Decode and fully load an image, refusing what the platform refuses (with the reason)."""
    if not data:
        raise ImageRejected(f"{name}: empty file", status=400)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        pixels = img.width * img.height
        if pixels > MAX_PIXELS:
            img.close()
            raise ImageRejected(f"{name}: image is {img.width}x{img.height} = {pixels / 1e6:.1f} MP, over the limit "
                                f"of {MAX_PIXELS / 1e6:.0f} MP", status=413)
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"{name}: image too large ({exc})", status=413) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageRejected):
            raise
        raise ImageRejected(f"{name}: not a readable image ({exc})") from exc
    if img.width < MIN_SIDE or img.height < MIN_SIDE:
        raise ImageRejected(f"{name}: image is {img.width}x{img.height}, smaller than {MIN_SIDE}x{MIN_SIDE}")
    return img


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


@dataclass(frozen=True)
class Decision:
    """One image's decision."""

    label: str
    probability: float
    probabilities: dict[str, float]
    positive_class: str | None
    positive_probability: float | None
    threshold: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "probability": self.probability, "probabilities": self.probabilities,
                "positive_class": self.positive_class, "positive_probability": self.positive_probability,
                "threshold": self.threshold}


class EdgeModel:
    """A verified bundle ready to classify images (one ONNX Runtime CPU session)."""

    def __init__(self, bundle: Bundle, *, threads: int = 0) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.bundle = bundle
        try:
            self.session = ort.InferenceSession(bundle.model, so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types (an unknown opset, a bad graph)
            producer = bundle.manifest.get("producer") or {}
            raise BundleError(
                f"{bundle.path}: onnxruntime {ort.__version__} cannot load its model.onnx (made with onnxruntime "
                f"{producer.get('onnxruntime', '?')}, ONNX opset {producer.get('onnx_opset', '?')}): "
                f"{type(exc).__name__}: {exc}") from exc
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        pre = bundle.preprocessing
        # N x C x H x W; a dimension the model leaves symbolic (a name, or None) takes what it is given
        shape = list(model_input.shape or [])
        if shape and len(shape) != 4:  # an empty shape: the model does not say its rank
            raise BundleError(f"{bundle.path}: model.onnx takes a {len(shape)}-d input {shape}, not images "
                              "(N x C x H x W)")
        if not shape:
            shape = ["N", "C", "H", "W"]
        if isinstance(shape[1], int) and shape[1] != pre.channels:
            raise BundleError(f"{bundle.path}: model.onnx takes {shape[1]}-channel images, but preprocessing.json's "
                              f"colour mode {pre.colour_mode} makes {pre.channels}")
        if any(isinstance(d, int) and d != pre.input_size for d in shape[2:]):
            raise BundleError(f"{bundle.path}: model.onnx takes {shape[2]} x {shape[3]} images, but "
                              f"preprocessing.json's input_size makes {pre.input_size} x {pre.input_size}")
        outputs = self.session.get_outputs()[0].shape
        if outputs and isinstance(outputs[-1], int) and outputs[-1] != len(bundle.classes):
            raise BundleError(f"{bundle.path}: model.onnx gives {outputs[-1]} scores per image, but classes.json names "
                              f"{len(bundle.classes)} classes")
        self._mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(pre.std, dtype=np.float32).reshape(1, -1, 1, 1)
        self._positive = bundle.classes.index(bundle.positive_class) if bundle.positive_class is not None else None

    def resize(self, img: Image.Image) -> np.ndarray:
        """uint8 ``S x S x C`` at the network's input size."""
        pre = self.bundle.preprocessing
        arr = np.asarray(img.convert(pre.colour_mode).resize((pre.input_size, pre.input_size),
                                                             Image.Resampling.BILINEAR), dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """uint8 ``N x S x S x C`` -> float32 ``N x C x S x S``."""
        x = batch.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(self.bundle.preprocessing.divide_by)
        return np.ascontiguousarray((x - self._mean) / self._std, dtype=np.float32)

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Softmax probabilities ``(N, classes)`` of decoded images of any size."""
        try:
            batch = np.stack([self.resize(img) for img in images])
        except (OSError, ValueError) as exc:  # a mode Pillow cannot convert (e.g. LAB to L): the platform's 422
            raise ImageRejected(f"cannot convert the image for the network: {exc}") from exc
        logits = self.session.run(None, {self.input_name: self.normalize(batch)})[0]
        return softmax(logits)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class indices under the bundle's decision rule."""
        if self._positive is None or self.bundle.threshold is None:
            out: np.ndarray = probs.argmax(axis=1)
            return out
        others = probs.copy()
        others[:, self._positive] = -np.inf
        pred = others.argmax(axis=1)
        pred[probs[:, self._positive] >= self.bundle.threshold] = self._positive
        return pred

    def predict_images(self, images: Sequence[Image.Image]) -> list[Decision]:
        if not images:
            return []
        probs = self.probabilities(images)
        classes = self.bundle.classes
        out = []
        for p, k in zip(probs, self.decide(probs), strict=True):
            out.append(Decision(
                label=classes[int(k)], probability=float(p[int(k)]),
                probabilities={c: float(v) for c, v in zip(classes, p, strict=True)},
                positive_class=self.bundle.positive_class,
                positive_probability=float(p[self._positive]) if self._positive is not None else None,
                threshold=self.bundle.threshold))
        return out

    def predict(self, data: bytes, *, name: str = "image") -> Decision:
        """Classify one encoded image (PNG, JPEG, ...); ImageRejected if it cannot be used."""
        return self.predict_images([decode(data, name=name)])[0]
