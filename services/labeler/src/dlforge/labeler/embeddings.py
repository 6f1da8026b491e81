"""Image embeddings: the ``Embedder`` plug-in interface and the EfficientNet-Lite0 ImageNet embedder.

An embedder turns a decoded image into a fixed-length vector in two steps, so image decoding
can run in loader threads while the network runs: :meth:`Embedder.prepare` (PIL image -> uint8
array at the embedder's input size) and :meth:`Embedder.embed` (a uint8 batch -> float32 rows).
:func:`embed_items` drives it over a manifest's items; vectors are stored as ``.npy`` next to
the dataset, keyed by the embedder's ``name`` so another backbone's vectors do not collide.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from dlforge.common.errors import ConfigError, NotFound
from dlforge.common.objects import ObjectStore
from dlforge.vision.images import DIHEDRAL_VIEWS, dihedral_view, to_array
from dlforge.vision.manifest import Item, load_pixels

log = logging.getLogger(__name__)


class Embedder(Protocol):
    """Maps images to vectors that put similar images close together."""

    name: str

    def prepare(self, image: Image.Image) -> np.ndarray:
        """One decoded image -> a uint8 H x W x C array ready for :meth:`embed` (runs in loader threads)."""
        ...

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """A uint8 N x H x W x C batch -> float32 N x D embeddings."""
        ...


@runtime_checkable
class StoredEmbedder(Protocol):
    """Optional capability: embeds manifest items through the feature store (computed once per image)."""

    name: str

    def embed_stored(self, objects: ObjectStore, items: Sequence[Item], *, batch_size: int) -> np.ndarray:
        """float32 N x D embeddings of ``items``, read from or computed into the feature store."""
        ...


def _multi_stage_vector(pooled: Sequence[np.ndarray]) -> np.ndarray:
    """Each stage's pooled features L2-normalized, concatenated, scaled to unit norm overall."""
    parts = [p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12) for p in pooled]
    return np.asarray(np.concatenate(parts, axis=1) / float(np.sqrt(len(parts))), dtype=np.float32)


EMBED_VIEWS = ("none", "dihedral")


class EfficientNetLite0Embedder:
    """EfficientNet-Lite0 (ImageNet weights) features pooled at several depths.

    Global-average-pooled activations at the end of the 40/80/112/192/320-channel stages and of
    the 1280-channel head, each L2-normalized and concatenated (2,024 values): the mid-level
    stages keep the texture cues (cracks, scratches) that the final ImageNet features blur away.

    ``views="dihedral"`` appends the same vector averaged over the image's eight flips and quarter
    turns (:data:`dlforge.vision.images.DIHEDRAL_VIEWS`; 4,048 values in all, :meth:`embed` scales
    the concatenation by 1/sqrt 2; the labeler normalizes each vector to unit length after that, and
    the averaged half, a mean of unit vectors, is the shorter one): ImageNet features are not
    invariant to how a part lies on the camera, the average is, and a classifier weighs the two
    halves as the labels say. Where orientation carries the class (a 6 against a 9, a shoe's toe)
    the first half keeps it. Measured in the loop (benchmarks/labeler.py ``--views``; README): it
    helps ELPV's cells and hurts Fashion-MNIST, so it is an option for parts whose class does not
    depend on how they lie. It costs eight trunk passes per image.

    The network is the shared ImageNet trunk of :mod:`dlforge.vision.staged`; manifest items go
    through :class:`dlforge.vision.trunk.TrunkFeatures`, so each image's pooled features are
    computed once and stored in the feature store, where the augmenter, proposer and trainer find
    them (each other view under its own key, only the stages read here). ``runtime="onnxruntime"``
    (default) runs the exported trunk with ONNX Runtime, about 5x faster than PyTorch eager on a
    2-core CPU with the same outputs (to 1e-5); ``runtime="torch"`` runs it in PyTorch.
    """

    STAGES = ("c40", "c80", "c112", "c192", "c320", "head")

    def __init__(self, *, size: int = 224, threads: int = 2, runtime: str = "onnxruntime",
                 views: str = "none") -> None:
        if runtime not in ("onnxruntime", "torch"):
            raise ConfigError(f"DLFORGE_LABELER_EMBED_RUNTIME: unknown runtime {runtime!r} (onnxruntime or torch)")
        if views not in EMBED_VIEWS:
            raise ConfigError(f"DLFORGE_LABELER_EMBED_VIEWS: unknown views {views!r} ({' or '.join(EMBED_VIEWS)})")
        self.size = size
        self.threads = threads
        self.runtime = runtime
        self.views = views
        self.name = f"efficientnet_lite0-ms-{size}" + ("-dihedral" if views == "dihedral" else "")

    def _features(self, objects: ObjectStore | None, batch_size: int = 32, view: str = "identity") -> Any:
        from dlforge.vision.features import feature_store
        from dlforge.vision.trunk import TrunkFeatures

        store = feature_store(objects) if objects is not None else None
        return TrunkFeatures(store, runtime=self.runtime, threads=self.threads, batch_size=batch_size,
                             view=view, keep_standard=view == "identity")

    def _view_names(self) -> list[str]:
        """The views to embed, the image itself ("identity") first."""
        return list(DIHEDRAL_VIEWS) if self.views == "dihedral" else ["identity"]

    def _combine(self, per_view: Sequence[np.ndarray]) -> np.ndarray:
        """The identity view's vector, then (with views) the mean over every view's, halves scaled by 1/sqrt 2."""
        if len(per_view) == 1:
            return per_view[0]
        pooled = np.mean(np.stack(per_view), axis=0)
        return np.asarray(np.concatenate([per_view[0], pooled], axis=1) / np.sqrt(2.0), dtype=np.float32)

    def prepare(self, image: Image.Image) -> np.ndarray:
        return to_array(image, size=self.size, channels=3)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings of images given as arrays (not stored: they have no content hash here)."""
        features = self._features(None)
        viewed = [batch if v == "identity" else dihedral_view(batch, v) for v in self._view_names()]
        return self._combine([_multi_stage_vector(features.pooled_arrays(x, stages=self.STAGES)) for x in viewed])

    def activations(self, batch: np.ndarray) -> np.ndarray:
        """What :meth:`activations_stored` gives, for images given as arrays (not stored)."""
        features = self._features(None)
        return features.activation_arrays(batch, boundary=features.shared)

    def activations_stored(self, objects: ObjectStore, items: Sequence[Item], *, batch_size: int = 32) -> np.ndarray:
        """float16 N x C x H x W: the trunk's activation at its shared freeze boundary for the images
        themselves at the embedding's size, what :meth:`embed_stored`'s pass stored beside the pooled
        features (read from the feature store; computed only for items it lacks)."""
        features = self._features(objects, batch_size)
        load = features.for_items(objects, items, size=self.size)
        return features.activations([i.sha256 for i in items], size=self.size, boundary=features.shared, load=load)

    def embed_stored(self, objects: ObjectStore, items: Sequence[Item], *, batch_size: int = 32) -> np.ndarray:
        per_view = []
        for view in self._view_names():
            features = self._features(objects, batch_size, view)
            load = features.for_items(objects, items, size=self.size)
            if view != "identity":
                load = _in_view(load, view)
            pooled = features.pooled([i.sha256 for i in items], size=self.size, stages=self.STAGES, load=load)
            per_view.append(_multi_stage_vector([pooled[s] for s in self.STAGES]))
        return self._combine(per_view)


def _in_view(load: Callable[[list[int]], np.ndarray], view: str) -> Callable[[list[int]], np.ndarray]:
    def viewed(rows: list[int]) -> np.ndarray:
        return dihedral_view(load(rows), view)

    return viewed


EmbedderFactory = Callable[..., Embedder]
EMBEDDERS: dict[str, EmbedderFactory] = {"efficientnet_lite0": EfficientNetLite0Embedder}


def make_embedder(name: str, *, size: int = 224, threads: int = 2, runtime: str = "onnxruntime",
                  views: str = "none") -> Embedder:
    try:
        factory = EMBEDDERS[name]
    except KeyError as exc:
        raise ConfigError(f"DLFORGE_LABELER_EMBEDDER: unknown embedder {name!r}; known: {', '.join(EMBEDDERS)}") \
            from exc
    return factory(size=size, threads=threads, runtime=runtime, views=views)


def embed_items(
    objects: ObjectStore,
    items: Sequence[Item],
    embedder: Embedder,
    *,
    batch_size: int = 64,
    loader_threads: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Embeddings of ``items`` (rows in order), decoding the next batch while the current one runs.

    An embedder that can use the feature store (:class:`StoredEmbedder`) reads each image's
    features from there, computing only those of images seen for the first time.
    """
    if isinstance(embedder, StoredEmbedder):
        started = time.perf_counter()
        vectors = embedder.embed_stored(objects, items, batch_size=batch_size)  # no items: 0 x D
        if progress is not None:
            progress(len(items), len(items))
        log.info("embedded %d items with %s in %.1fs", len(items), embedder.name, time.perf_counter() - started)
        return vectors

    def load_batch(start: int) -> np.ndarray:
        chunk = items[start:start + batch_size]
        pixels = load_pixels(objects, chunk, threads=loader_threads)  # decoded once, kept in the feature store
        return np.stack(list(pool.map(lambda p: embedder.prepare(Image.fromarray(p)), pixels)))

    rows: list[np.ndarray] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(loader_threads) as pool, ThreadPoolExecutor(1) as prefetch:
        starts = list(range(0, len(items), batch_size))
        pending = prefetch.submit(load_batch, starts[0]) if starts else None
        for n, start in enumerate(starts):
            assert pending is not None
            batch = pending.result()
            pending = prefetch.submit(load_batch, starts[n + 1]) if n + 1 < len(starts) else None
            rows.append(embedder.embed(batch))
            if progress is not None:
                progress(min(start + batch_size, len(items)), len(items))
    log.info("embedded %d items with %s in %.1fs", len(items), embedder.name, time.perf_counter() - started)
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32)


def embeddings_key(dataset_id: str, embedder_name: str) -> str:
    return f"labeler/datasets/{dataset_id}/embeddings/{embedder_name}.npy"


def save_embeddings(objects: ObjectStore, key: str, vectors: np.ndarray, item_ids: Sequence[str]) -> None:
    buf = io.BytesIO()
    np.save(buf, vectors.astype(np.float32), allow_pickle=False)
    objects.put_bytes(key + ".ids.json", json.dumps(list(item_ids)).encode(), content_type="application/json")
    objects.put_bytes(key, buf.getvalue())


def load_embeddings(objects: ObjectStore, key: str, item_ids: Sequence[str]) -> np.ndarray | None:
    """The stored vectors if they exist and belong to exactly these items, else None."""
    try:
        ids = objects.get_json(key + ".ids.json")
        data = objects.get_bytes(key)
    except NotFound:
        return None
    if list(ids) != list(item_ids):
        return None
    vectors: np.ndarray = np.load(io.BytesIO(data), allow_pickle=False)
    return vectors
