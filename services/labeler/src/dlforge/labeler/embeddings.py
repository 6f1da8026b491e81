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
from typing import Any, Protocol

import numpy as np
from PIL import Image

from dlforge.common.errors import ConfigError, NotFound
from dlforge.common.objects import ObjectStore
from dlforge.vision.images import decode, to_array
from dlforge.vision.manifest import Item

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


class EfficientNetLite0Embedder:
    """EfficientNet-Lite0 (ImageNet weights) features pooled at several depths.

    Global-average-pooled activations at the end of the 40/80/112/192/320-channel stages and of
    the 1280-channel head, each L2-normalized and concatenated (2,024 values): the mid-level
    stages keep the texture cues (cracks, scratches) that the final ImageNet features blur away.
    """

    STAGE_ENDS = (4, 7, 10, 14, 15)

    def __init__(self, *, size: int = 224, threads: int = 2) -> None:
        self.size = size
        self.threads = threads
        self.name = f"efficientnet_lite0-ms-{size}"
        self._net: Any = None

    def _network(self) -> Any:
        if self._net is None:
            import torch

            from dlforge.vision.networks import efficientnet_lite0_imagenet, spec_of

            torch.set_num_threads(self.threads)
            self._net = efficientnet_lite0_imagenet().eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            spec = spec_of("efficientnet_lite0")
            self._mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
            self._std = torch.tensor(spec.std).view(1, 3, 1, 1)
        return self._net

    def prepare(self, image: Image.Image) -> np.ndarray:
        return to_array(image, size=self.size, channels=3)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        import torch

        net = self._network()
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
        x = ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
        pooled = []
        with torch.inference_mode():
            h = net._swish(net._bn0(net._conv_stem(x)))
            for idx, block in enumerate(net._blocks):
                h = block(h)
                if idx in self.STAGE_ENDS:
                    pooled.append(h.mean((2, 3)))
            h = net._swish(net._bn1(net._conv_head(h)))
            pooled.append(h.mean((2, 3)))
        parts = [torch.nn.functional.normalize(p, dim=1) for p in pooled]
        out = torch.cat(parts, dim=1) / np.sqrt(len(parts))
        return out.numpy().astype(np.float32)


EmbedderFactory = Callable[..., Embedder]
EMBEDDERS: dict[str, EmbedderFactory] = {"efficientnet_lite0": EfficientNetLite0Embedder}


def register_embedder(name: str, factory: EmbedderFactory) -> None:
    """Make another backbone available to ``DLFORGE_LABELER_EMBEDDER``."""
    EMBEDDERS[name] = factory


def make_embedder(name: str, *, size: int = 224, threads: int = 2) -> Embedder:
    try:
        factory = EMBEDDERS[name]
    except KeyError as exc:
        raise ConfigError(f"DLFORGE_LABELER_EMBEDDER: unknown embedder {name!r}; known: {', '.join(EMBEDDERS)}") \
            from exc
    return factory(size=size, threads=threads)


def embed_items(
    objects: ObjectStore,
    items: Sequence[Item],
    embedder: Embedder,
    *,
    batch_size: int = 64,
    loader_threads: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Embeddings of ``items`` (rows in order), decoding the next batch while the current one runs."""

    def load(item: Item) -> np.ndarray:
        return embedder.prepare(decode(objects.get_bytes(item.key), name=item.name))

    def load_batch(start: int) -> np.ndarray:
        chunk = items[start:start + batch_size]
        return np.stack(list(pool.map(load, chunk)))

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
