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


def _multi_stage(net: Any) -> Any:
    """The EfficientNet-Lite0 trunk returning the normalized, concatenated multi-stage pooled features."""
    import torch

    class MultiStage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = self.net
            pooled = []
            h = n._swish(n._bn0(n._conv_stem(x)))
            for idx, block in enumerate(n._blocks):
                h = block(h)
                if idx in EfficientNetLite0Embedder.STAGE_ENDS:
                    pooled.append(h.mean((2, 3)))
            h = n._swish(n._bn1(n._conv_head(h)))
            pooled.append(h.mean((2, 3)))
            parts = [torch.nn.functional.normalize(p, dim=1) for p in pooled]
            return torch.cat(parts, dim=1) / float(np.sqrt(len(parts)))

    return MultiStage().eval()


class EfficientNetLite0Embedder:
    """EfficientNet-Lite0 (ImageNet weights) features pooled at several depths.

    Global-average-pooled activations at the end of the 40/80/112/192/320-channel stages and of
    the 1280-channel head, each L2-normalized and concatenated (2,024 values): the mid-level
    stages keep the texture cues (cracks, scratches) that the final ImageNet features blur away.

    ``runtime="onnxruntime"`` (default) exports the network once per process and runs it with
    ONNX Runtime, about 5x faster than PyTorch eager on a 2-core CPU with the same outputs (to
    1e-6); ``runtime="torch"`` runs it in PyTorch (channels-last).
    """

    STAGE_ENDS = (4, 7, 10, 14, 15)

    def __init__(self, *, size: int = 224, threads: int = 2, runtime: str = "onnxruntime") -> None:
        if runtime not in ("onnxruntime", "torch"):
            raise ConfigError(f"DLFORGE_LABELER_EMBED_RUNTIME: unknown runtime {runtime!r} (onnxruntime or torch)")
        self.size = size
        self.threads = threads
        self.runtime = runtime
        self.name = f"efficientnet_lite0-ms-{size}"
        self._model: Any = None
        self._session: Any = None
        from dlforge.vision.networks import spec_of

        spec = spec_of("efficientnet_lite0")
        self._mean = np.array(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self._std = np.array(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)

    def _torch_model(self) -> Any:
        if self._model is None:
            import torch

            from dlforge.vision.networks import efficientnet_lite0_imagenet

            torch.set_num_threads(self.threads)
            self._model = _multi_stage(efficientnet_lite0_imagenet())
        return self._model

    def _onnx_session(self) -> Any:
        if self._session is None:
            import warnings

            import torch

            from dlforge.common.backends import optional_import

            ort = optional_import("onnxruntime", install="pip install onnxruntime",
                                  purpose="the onnxruntime embedding runtime (or DLFORGE_LABELER_EMBED_RUNTIME=torch)")
            model = self._torch_model()
            buf = io.BytesIO()
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (torch.zeros(1, 3, self.size, self.size),), buf,  # type: ignore[arg-type]
                                  input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                                  opset_version=17, dynamo=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
        return self._session

    def prepare(self, image: Image.Image) -> np.ndarray:
        return to_array(image, size=self.size, channels=3)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
        x = (x - self._mean) / self._std
        if self.runtime == "onnxruntime":
            out = self._onnx_session().run(None, {"x": x})[0]
            return np.asarray(out, dtype=np.float32)
        import torch

        model = self._torch_model().to(memory_format=torch.channels_last)
        with torch.inference_mode():
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            return np.asarray(model(t).numpy(), dtype=np.float32)


EmbedderFactory = Callable[..., Embedder]
EMBEDDERS: dict[str, EmbedderFactory] = {"efficientnet_lite0": EfficientNetLite0Embedder}


def register_embedder(name: str, factory: EmbedderFactory) -> None:
    """Make another backbone available to ``DLFORGE_LABELER_EMBEDDER``."""
    EMBEDDERS[name] = factory


def make_embedder(name: str, *, size: int = 224, threads: int = 2, runtime: str = "onnxruntime") -> Embedder:
    try:
        factory = EMBEDDERS[name]
    except KeyError as exc:
        raise ConfigError(f"DLFORGE_LABELER_EMBEDDER: unknown embedder {name!r}; known: {', '.join(EMBEDDERS)}") \
            from exc
    return factory(size=size, threads=threads, runtime=runtime)


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
