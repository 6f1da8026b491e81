"""Sample filters: the plug-in that decides which generated samples enter the training set.

The seeds' "X2" filter (:class:`ConfidenceFilter`): a classifier trained on the *real* training data
of the data set (frozen ImageNet features of EfficientNet-Lite0 and a logistic regression) keeps a
generated sample only if it assigns the intended class a probability of at least a threshold.
:class:`KeepAllFilter` is the no-filter baseline. A better judge (an ensemble, a domain
discriminator, a realism score) slots in behind the same two methods.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from dlforge.common.errors import ConfigError


@dataclass(frozen=True)
class FilterFit:
    """How the filter's classifier was trained and how well it does on held-out real data."""

    train_count: int
    val_count: int
    val_accuracy: float | None
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Judgement:
    """Per generated sample: keep it or not, the probability of the intended class, the predicted class."""

    keep: np.ndarray
    confidence: np.ndarray
    predicted: np.ndarray


class SampleFilter(Protocol):
    """Judges generated samples against a model of the real data."""

    name: str
    image_size: int | None
    """Side the filter works at: callers may load real images at this size (None: any size)."""

    def fit(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        num_classes: int,
        val_images: np.ndarray,
        val_labels: np.ndarray,
    ) -> FilterFit:
        """Learn from real images (N x H x W x C uint8) and class indices; report held-out accuracy."""
        ...

    def judge(self, images: np.ndarray, intended: np.ndarray) -> Judgement:
        """Decide for each generated image whether it is a convincing sample of its ``intended`` class index."""
        ...


class FeatureExtractor(Protocol):
    """Images -> fixed-length feature vectors."""

    image_size: int

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x C (any H, W) -> float32 N x D."""
        ...


_NET_LOCK = threading.Lock()


def _single_threaded_blas() -> Any:
    """BLAS on one thread: the regressions are small, and threaded OpenBLAS spins badly on a busy CPU
    (cross-validation took 60 s instead of 2 s on this 2-core machine under load)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


@functools.lru_cache(maxsize=2)
def _pretrained(arch: str) -> Any:
    from dlforge.vision.networks import build_network

    with _NET_LOCK:
        return build_network(arch, 1, pretrained=True).eval()


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 N x H x W x C -> N x size x size x C with PIL bilinear (the resize the loaders use)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    from dlforge.vision.images import to_array

    channels = images.shape[3]
    out = np.empty((len(images), size, size, channels), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[:, :, 0] if channels == 1 else img)
        out[i] = to_array(pil, size=size, channels=channels)
    return out


class FrozenNetworkFeatures:
    """Pooled features of a pretrained network, frozen, at a chosen (lower) input size, in batches."""

    def __init__(self, arch: str = "efficientnet_lite0", *, image_size: int = 128, batch_size: int = 64,
                 threads: int = 2) -> None:
        if arch != "efficientnet_lite0":
            raise ConfigError(f"frozen features need a pretrained network; {arch!r} has none (use efficientnet_lite0)")
        if image_size < 32:
            raise ConfigError(f"filter image size {image_size} is below 32 px")
        self.arch = arch
        self.image_size = image_size
        self.batch_size = batch_size
        self.threads = threads

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        from dlforge.vision.images import to_tensor
        from dlforge.vision.networks import spec_of

        spec = dataclasses.replace(spec_of(self.arch), input_size=self.image_size)
        net = _pretrained(self.arch)
        torch.set_num_threads(self.threads)
        out = np.zeros((len(images), spec.feature_dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = resize_batch(images[start:start + self.batch_size], self.image_size)
                out[start:start + len(batch)] = net.features(to_tensor(batch, spec)).numpy()
        return out


class ConfidenceFilter:
    """The "X2" filter: keep a generated sample iff P(intended class | sample) >= ``threshold``.

    The classifier is a class-balanced logistic regression on standardized frozen features; its
    regularization is chosen by cross-validated log-loss so that its probabilities mean something.
    """

    name = "x2-confidence"

    def __init__(self, extractor: FeatureExtractor, *, threshold: float = 0.9,
                 cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"filter threshold {threshold} must be in (0, 1]")
        self.extractor = extractor
        self.threshold = threshold
        self.cs = cs
        self.image_size: int | None = extractor.image_size
        self._model: Any = None

    def fit(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        num_classes: int,
        val_images: np.ndarray,
        val_labels: np.ndarray,
    ) -> FilterFit:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        started = time.perf_counter()
        present, per_class = np.unique(labels, return_counts=True)
        if len(present) < 2:
            raise ValueError("the filter needs real train images of at least two classes")
        feats = self.extractor(images)
        feature_seconds = time.perf_counter() - started

        def model(c: float) -> Any:
            return make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))

        folds = int(min(3, per_class.min()))
        scores: dict[str, float] = {}
        t = time.perf_counter()
        with _single_threaded_blas():
            if folds >= 2 and len(self.cs) > 1:
                cv = StratifiedKFold(folds, shuffle=True, random_state=0)
                for c in self.cs:
                    scores[f"{c:g}"] = float(
                        cross_val_score(model(c), feats, labels, cv=cv, scoring="neg_log_loss").mean())
                best_c = float(max(self.cs, key=lambda c: scores[f"{c:g}"]))
            else:
                best_c = float(self.cs[len(self.cs) // 2])
            self._model = model(best_c).fit(feats, labels)
        classifier_seconds = time.perf_counter() - t

        val_accuracy = None
        val_seconds = 0.0
        if len(val_images):
            t = time.perf_counter()
            val_feats = self.extractor(val_images)
            with _single_threaded_blas():
                val_pred = self._model.predict(val_feats)
            val_accuracy = float(np.mean(val_pred == val_labels))
            val_seconds = time.perf_counter() - t
        return FilterFit(
            train_count=len(images),
            val_count=len(val_images),
            val_accuracy=val_accuracy,
            seconds=time.perf_counter() - started,
            details={
                "classifier": "logistic_regression(balanced) on frozen features",
                "arch": getattr(self.extractor, "arch", type(self.extractor).__name__),
                "image_size": self.extractor.image_size,
                "threshold": self.threshold,
                "C": best_c,
                "cv_neg_log_loss": scores,
                "feature_seconds": round(feature_seconds, 3),
                "classifier_seconds": round(classifier_seconds, 3),
                "val_seconds": round(val_seconds, 3),
            },
        )

    def probabilities(self, images: np.ndarray, *, num_classes: int) -> np.ndarray:
        """P(class | image) for every class index (0 for classes absent from the real train data)."""
        if self._model is None:
            raise RuntimeError("fit() the filter first")
        feats = self.extractor(images)
        with _single_threaded_blas():
            proba = self._model.predict_proba(feats)
        full = np.zeros((len(images), num_classes), dtype=np.float64)
        full[:, self._model.classes_] = proba
        return full

    def judge(self, images: np.ndarray, intended: np.ndarray) -> Judgement:
        if len(images) == 0:
            return Judgement(np.zeros(0, dtype=bool), np.zeros(0), np.zeros(0, dtype=np.int64))
        num_classes = int(max(int(np.max(intended)), int(np.max(self._model.classes_))) + 1)
        proba = self.probabilities(images, num_classes=num_classes)
        confidence = proba[np.arange(len(images)), intended]
        return Judgement(confidence >= self.threshold, confidence, proba.argmax(axis=1))


class KeepAllFilter:
    """No filter: every generated sample is kept (the baseline the X2 filter is measured against)."""

    name = "keep-all"
    image_size: int | None = None

    def fit(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        num_classes: int,
        val_images: np.ndarray,
        val_labels: np.ndarray,
    ) -> FilterFit:
        return FilterFit(train_count=len(images), val_count=0, val_accuracy=None, seconds=0.0)

    def judge(self, images: np.ndarray, intended: np.ndarray) -> Judgement:
        n = len(images)
        return Judgement(np.ones(n, dtype=bool), np.full(n, np.nan), np.asarray(intended, dtype=np.int64))
