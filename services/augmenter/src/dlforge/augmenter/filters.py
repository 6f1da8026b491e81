"""Sample filters: the plug-in that decides which generated samples enter the training set.

The seeds' "X2" filter (:class:`ConfidenceFilter`): a classifier trained on the *real* training data
of the data set (frozen ImageNet features of EfficientNet-Lite0 and a logistic regression) keeps a
generated sample only if it assigns the intended class a probability of at least a threshold.
:class:`KeepAllFilter` is the no-filter baseline. A better judge (an ensemble, a domain
discriminator, a realism score) slots in behind the same two methods.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from dlforge.common.blas import single_threaded_blas
from dlforge.common.errors import ConfigError
from dlforge.vision.features import FeatureStore


@dataclass(frozen=True)
class FilterFit:
    """How the filter's classifier was trained and how well it does on held-out real data."""

    train_count: int
    val_count: int
    val_accuracy: float | None
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    val_predicted: np.ndarray | None = field(default=None, repr=False)  # class index per real val image


@dataclass(frozen=True)
class Judgement:
    """Per generated sample: keep it or not, the probability of the intended class, the predicted class."""

    keep: np.ndarray
    confidence: np.ndarray
    predicted: np.ndarray
    features: np.ndarray | None = field(default=None, repr=False)  # what the filter saw of each sample


class SampleFilter(Protocol):
    """Judges generated samples against a model of the real data.

    ``contents`` (optional): the sha256 of each image's bytes, so that a filter can read features
    already in the feature store instead of computing them again.
    """

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
        contents: Sequence[str] | None = None,
        val_contents: Sequence[str] | None = None,
    ) -> FilterFit:
        """Learn from real images (N x H x W x C uint8) and class indices; report held-out accuracy."""
        ...

    def judge(self, images: np.ndarray, intended: np.ndarray, *, contents: Sequence[str] | None = None) -> Judgement:
        """Decide for each generated image whether it is a convincing sample of its ``intended`` class index."""
        ...

    def second_classifier(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        """The seed's second classifier: the filter's model trained again on the real train images plus the
        samples with these ``features`` (from :class:`Judgement`) and class indices; its predicted class of
        each real validation image (None: the filter has no model or no validation images)."""
        ...


class FeatureExtractor(Protocol):
    """Images -> fixed-length feature vectors."""

    image_size: int

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x C (any H, W) -> float32 N x D."""
        ...


@runtime_checkable
class StoredFeatureExtractor(Protocol):
    """Optional capability of a :class:`FeatureExtractor`: features through the feature store."""

    def of_contents(self, images: np.ndarray, contents: Sequence[str]) -> np.ndarray:
        """Like ``__call__``, reading the features of images already stored under their content hash."""
        ...


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
    """Pooled head features of the shared ImageNet trunk (:mod:`dlforge.vision.trunk`), frozen.

    With a feature store, images named by their content hash (:meth:`of_contents`) are read from it
    when another stage already computed them at this size (the labeler does, at 224 px), and stored
    for the stages after otherwise.
    """

    def __init__(self, arch: str = "efficientnet_lite0", *, image_size: int = 224, batch_size: int = 64,
                 threads: int = 2, store: FeatureStore | None = None, runtime: str = "onnxruntime") -> None:
        if arch != "efficientnet_lite0":
            raise ConfigError(f"frozen features need a pretrained network; {arch!r} has none (use efficientnet_lite0)")
        if image_size < 32:
            raise ConfigError(f"filter image size {image_size} is below 32 px")
        self.arch = arch
        self.image_size = image_size
        self.batch_size = batch_size
        self.threads = threads
        self.store = store
        self.runtime = runtime

    def _trunk(self) -> Any:
        from dlforge.vision.trunk import TrunkFeatures

        return TrunkFeatures(self.store, runtime=self.runtime, threads=self.threads, batch_size=self.batch_size)

    def _prepare(self, images: np.ndarray) -> np.ndarray:
        batch = resize_batch(images, self.image_size)
        return np.repeat(batch, 3, axis=3) if batch.shape[3] == 1 else batch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, 1280), dtype=np.float32)
        out: np.ndarray = self._trunk().pooled_arrays(self._prepare(images), stages=["head"])[0]
        return out

    def of_contents(self, images: np.ndarray, contents: Sequence[str]) -> np.ndarray:
        if self.store is None:
            return self(images)
        if len(images) == 0:
            return np.zeros((0, 1280), dtype=np.float32)
        trunk = self._trunk()
        pooled = trunk.pooled(list(contents), size=self.image_size, stages=["head"],
                              load=lambda rows: self._prepare(images[rows]))
        return np.asarray(pooled["head"], dtype=np.float32)


def _features(extractor: FeatureExtractor, images: np.ndarray, contents: Sequence[str] | None) -> np.ndarray:
    if contents is not None and isinstance(extractor, StoredFeatureExtractor):
        if len(contents) != len(images):
            raise ValueError(f"{len(contents)} content hashes for {len(images)} images")
        return extractor.of_contents(images, contents)
    return extractor(images)


def _x2_model(c: float) -> Any:
    """The X2 filter's classifier: class-balanced logistic regression on standardized features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))


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
        self._real: tuple[np.ndarray, np.ndarray, float] | None = None  # train features, labels, C
        self._val_features: np.ndarray | None = None

    def fit(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        num_classes: int,
        val_images: np.ndarray,
        val_labels: np.ndarray,
        contents: Sequence[str] | None = None,
        val_contents: Sequence[str] | None = None,
    ) -> FilterFit:
        from sklearn.model_selection import StratifiedKFold, cross_val_score

        started = time.perf_counter()
        present, per_class = np.unique(labels, return_counts=True)
        if len(present) < 2:
            raise ValueError("the filter needs real train images of at least two classes")
        feats = _features(self.extractor, images, contents)
        feature_seconds = time.perf_counter() - started

        folds = int(min(3, per_class.min()))
        scores: dict[str, float] = {}
        t = time.perf_counter()
        with single_threaded_blas():
            if folds >= 2 and len(self.cs) > 1:
                cv = StratifiedKFold(folds, shuffle=True, random_state=0)
                for c in self.cs:
                    scores[f"{c:g}"] = float(
                        cross_val_score(_x2_model(c), feats, labels, cv=cv, scoring="neg_log_loss").mean())
                best_c = float(max(self.cs, key=lambda c: scores[f"{c:g}"]))
            else:
                best_c = float(self.cs[len(self.cs) // 2])
            self._model = _x2_model(best_c).fit(feats, labels)
        classifier_seconds = time.perf_counter() - t
        self._real = (feats, np.asarray(labels), best_c)

        val_accuracy = None
        val_seconds = 0.0
        val_pred = None
        self._val_features = None
        if len(val_images):
            t = time.perf_counter()
            val_feats = _features(self.extractor, val_images, val_contents)
            with single_threaded_blas():
                val_pred = self._model.predict(val_feats)
            val_accuracy = float(np.mean(val_pred == val_labels))
            val_seconds = time.perf_counter() - t
            self._val_features = val_feats
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
            val_predicted=val_pred,
        )

    def probabilities(self, images: np.ndarray, *, num_classes: int, contents: Sequence[str] | None = None
                      ) -> np.ndarray:
        """P(class | image) for every class index (0 for classes absent from the real train data)."""
        if self._model is None:
            raise RuntimeError("fit() the filter first")
        return self._probabilities(_features(self.extractor, images, contents), num_classes)

    def _probabilities(self, feats: np.ndarray, num_classes: int) -> np.ndarray:
        with single_threaded_blas():
            proba = self._model.predict_proba(feats)
        full = np.zeros((len(feats), num_classes), dtype=np.float64)
        full[:, self._model.classes_] = proba
        return full

    def judge(self, images: np.ndarray, intended: np.ndarray, *, contents: Sequence[str] | None = None) -> Judgement:
        if len(images) == 0:
            return Judgement(np.zeros(0, dtype=bool), np.zeros(0), np.zeros(0, dtype=np.int64))
        if self._model is None:
            raise RuntimeError("fit() the filter first")
        num_classes = int(max(int(np.max(intended)), int(np.max(self._model.classes_))) + 1)
        feats = _features(self.extractor, images, contents)
        proba = self._probabilities(feats, num_classes)
        confidence = proba[np.arange(len(images)), intended]
        return Judgement(confidence >= self.threshold, confidence, proba.argmax(axis=1), features=feats)

    def second_classifier(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        if self._model is None or self._real is None or self._val_features is None:
            return None
        feats, real_labels, c = self._real
        x = np.concatenate([feats, np.asarray(features, dtype=feats.dtype)])
        y = np.concatenate([real_labels, np.asarray(labels, dtype=real_labels.dtype)])
        with single_threaded_blas():  # the same model, the same C: only the training rows differ
            predicted: np.ndarray = _x2_model(c).fit(x, y).predict(self._val_features)
        return predicted


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
        contents: Sequence[str] | None = None,
        val_contents: Sequence[str] | None = None,
    ) -> FilterFit:
        return FilterFit(train_count=len(images), val_count=0, val_accuracy=None, seconds=0.0)

    def judge(self, images: np.ndarray, intended: np.ndarray, *, contents: Sequence[str] | None = None) -> Judgement:
        n = len(images)
        return Judgement(np.ones(n, dtype=bool), np.full(n, np.nan), np.asarray(intended, dtype=np.int64))

    def second_classifier(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        return None  # no model of the real data to train again
