"""Similar-image search over embeddings: a small ``VectorIndex`` port and its FAISS backends.

Vectors are L2-normalized, so inner product is cosine similarity (and ``2 - 2*sim`` the squared
Euclidean distance). ``faiss-cpu`` is the default; ``faiss-gpu`` is imported lazily only when the
``DLFORGE_LABELER_INDEX`` setting asks for it, and fails with what to install when it is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from dlforge.common.backends import optional_import
from dlforge.common.errors import ConfigError


class VectorIndex(Protocol):
    """Nearest neighbours by cosine similarity over a fixed set of vectors."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, row indices), each ``len(queries) x k``, best first; -1 pads missing rows."""
        ...

    def to_bytes(self) -> bytes:
        """A serialized copy that :func:`load_index` restores."""
        ...


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Float32 rows scaled to unit length (zero rows stay zero)."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


class FaissIndex:
    """An exact inner-product FAISS index (flat: a few thousand items need no approximation)."""

    def __init__(self, index: Any, faiss: Any, *, on_gpu: bool = False) -> None:
        self._index = index
        self._faiss = faiss
        self._on_gpu = on_gpu

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, rows = self._index.search(normalize(queries), int(k))
        return sims, rows

    def to_bytes(self) -> bytes:
        index = self._faiss.index_gpu_to_cpu(self._index) if self._on_gpu else self._index
        return bytes(self._faiss.serialize_index(index).tobytes())


def _faiss(backend: str) -> Any:
    if backend == "faiss-cpu":
        return optional_import("faiss", install="pip install faiss-cpu", purpose="the similar-image index")
    if backend == "faiss-gpu":
        faiss = optional_import("faiss", install="pip install faiss-gpu-cu12", purpose="the GPU similar-image index")
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            raise ConfigError("DLFORGE_LABELER_INDEX=faiss-gpu needs the faiss-gpu package and a visible GPU "
                              "(pip install faiss-gpu-cu12), or set it to faiss-cpu")
        return faiss
    raise ConfigError(f"DLFORGE_LABELER_INDEX: unknown index backend {backend!r} (faiss-cpu or faiss-gpu)")


def _place(faiss: Any, index: Any, backend: str) -> Any:
    if backend == "faiss-gpu":
        return faiss.index_cpu_to_all_gpus(index)
    return index


def build_index(vectors: np.ndarray, *, backend: str = "faiss-cpu") -> FaissIndex:
    """An index over ``vectors`` (rows are items, in manifest order)."""
    faiss = _faiss(backend)
    v = normalize(vectors)
    index = faiss.IndexFlatIP(v.shape[1])
    index.add(v)
    return FaissIndex(_place(faiss, index, backend), faiss, on_gpu=backend == "faiss-gpu")


def load_index(data: bytes, *, backend: str = "faiss-cpu") -> FaissIndex:
    faiss = _faiss(backend)
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    return FaissIndex(_place(faiss, index, backend), faiss, on_gpu=backend == "faiss-gpu")


@dataclass
class SimilarSearch:
    """One dataset's items, their embeddings and their index, ready for similar-item queries."""

    ids: list[str]
    names: list[str]
    vectors: np.ndarray
    index: VectorIndex
    row: dict[str, int] = field(init=False)
    by_name: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.row = {i: n for n, i in enumerate(self.ids)}
        self.by_name = {nm: n for n, nm in enumerate(self.names)}
