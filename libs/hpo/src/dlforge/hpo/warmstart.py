"""Warm starts: a study's best configurations, found again by the fingerprint of its data set.

A finished study is remembered with a *fingerprint* of its data set (statistics of the stored
embeddings: per dimension, the mean and standard deviation of the L2-normalised rows) and its best
trials. A new study on data whose fingerprint is near one of theirs starts with their best
configurations (transfer HPO): related data sets tend to share good regions of the search space.

The nearest past studies are found with FAISS: an exact ``IndexFlatL2`` while there are few, an
``IndexIVFPQ`` (inverted lists over product-quantised codes) from ``ivfpq_from`` studies on, whose
candidates are re-ranked by their exact distance. ``faiss`` (``faiss-cpu``) is imported only when an
index is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlforge.common.backends import optional_import
from dlforge.common.errors import InvalidInput

PQ_GROUP = 8  # fingerprints are zero-padded to a multiple of this (the number of PQ sub-vectors)


def fingerprint(features: np.ndarray) -> np.ndarray:
    """Per-dimension mean and standard deviation of the L2-normalised rows of ``features`` (float32, 2 * dims)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2 or not np.isfinite(x).all():
        raise InvalidInput(f"a fingerprint needs finite (rows >= 2, dims) features, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    return np.concatenate([x.mean(axis=0), x.std(axis=0)]).astype(np.float32)


@dataclass(frozen=True)
class PastStudy:
    """A finished study: its data set's fingerprint and its best trials' parameters, best first."""

    study_name: str
    fingerprint: np.ndarray
    best_params: list[dict[str, Any]] = field(default_factory=list)


def _faiss() -> Any:
    return optional_import("faiss", install="pip install faiss-cpu", purpose="warm starts")


def _padded(vectors: np.ndarray) -> np.ndarray:
    d = vectors.shape[1]
    width = math.ceil(d / PQ_GROUP) * PQ_GROUP
    out = np.zeros((len(vectors), width), dtype=np.float32)
    out[:, :d] = vectors
    return out


class StudyIndex:
    """The past studies, searchable by fingerprint (one dimension for all of them)."""

    def __init__(self, studies: Sequence[PastStudy], *, ivfpq_from: int = 1024, nprobe: int = 8) -> None:
        if ivfpq_from < 256:
            raise InvalidInput(f"ivfpq_from must be >= 256 (8-bit product quantizers train on 256+ rows), "
                               f"got {ivfpq_from}")
        self.studies = list(studies)
        if not self.studies:
            self.vectors = np.zeros((0, 0), dtype=np.float32)
            self.index = None
            return
        dims = {len(s.fingerprint) for s in self.studies}
        if len(dims) != 1:
            raise InvalidInput(f"past studies' fingerprints differ in length: {sorted(dims)}")
        self.vectors = _padded(np.stack([np.asarray(s.fingerprint, dtype=np.float32) for s in self.studies]))
        faiss = _faiss()
        n, d = self.vectors.shape
        if n < ivfpq_from:
            self.index = faiss.IndexFlatL2(d)
        else:
            nlist = max(1, int(math.sqrt(n)))
            quantizer = faiss.IndexFlatL2(d)
            # d is a multiple of 8, so 8, 16, 32 or 64 sub-quantizers of 8 bits each divide it
            self.index = faiss.IndexIVFPQ(quantizer, d, nlist, math.gcd(d, 64), 8)
            self.index.train(self.vectors)
            self.index.nprobe = min(nlist, nprobe)
        self.index.add(self.vectors)

    @property
    def kind(self) -> str:
        return "none" if self.index is None else type(self.index).__name__

    def nearest(self, query: np.ndarray, k: int) -> list[tuple[PastStudy, float]]:
        """The ``k`` past studies nearest ``query``, nearest first, with their exact Euclidean distance."""
        if self.index is None or k <= 0:
            return []
        q = np.asarray(query, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != len(self.studies[0].fingerprint):
            raise InvalidInput(f"a fingerprint of {q.shape[1]} values; the past studies' have "
                               f"{len(self.studies[0].fingerprint)}")
        q = _padded(q)
        _, rows = self.index.search(q, min(len(self.studies), max(k * 4, k)))
        found = [int(r) for r in rows[0] if r >= 0]
        exact = sorted((float(np.linalg.norm(self.vectors[r] - q[0])), r) for r in found)
        return [(self.studies[r], dist) for dist, r in exact[:k]]


def warm_start_params(index: StudyIndex, query: np.ndarray, *, studies: int = 3, per_study: int = 2,
                      problems: Callable[[dict[str, Any]], list[str]] | None = None) -> list[dict[str, Any]]:
    """The configurations to enqueue first: the nearest study's best ones first, then the next study's.

    At most ``per_study`` from each of the ``studies`` nearest; duplicates and (with ``problems``, e.g.
    ``SearchSpace.problems``) configurations outside the new study's space are left out.
    """
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for study, _ in index.nearest(query, studies):
        for params in study.best_params[:per_study]:
            key = repr(sorted(params.items()))
            if key in seen or (problems is not None and problems(params)):
                continue
            seen.add(key)
            out.append(dict(params))
    return out
