"""Which items people label: the representative seed and the ``QueryStrategy`` plug-ins.

A query strategy sees the classifier's calibrated probabilities for every item, the embeddings
and which items may be asked, and returns the items to ask, most useful first. The default,
:class:`UncertaintyDiversity`, ranks by uncertainty (margin, least confidence or entropy) and
spreads the batch with k-center greedy over the most uncertain few times ``k`` items, so one batch
does not ask the same kind of image again and again.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

from dlforge.common.errors import ConfigError

Measure = Literal["margin", "least_confidence", "entropy"]


class QueryStrategy(Protocol):
    """Chooses the next batch for people to label."""

    def select(
        self,
        *,
        probabilities: np.ndarray,
        embeddings: np.ndarray,
        candidates: np.ndarray,
        k: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Row indices (a subset of ``candidates``, at most ``k``), most useful first.

        ``probabilities`` is N x C (calibrated), ``embeddings`` N x D (L2-normalized),
        ``candidates`` the rows that may be asked.
        """
        ...


def uncertainty(probabilities: np.ndarray, measure: Measure) -> np.ndarray:
    """Higher is more uncertain, in [0, 1] for every measure."""
    p = np.clip(probabilities, 1e-12, 1.0)
    if p.shape[1] < 2:
        return np.zeros(len(p))
    if measure == "least_confidence":
        return (1.0 - p.max(axis=1)) * p.shape[1] / (p.shape[1] - 1)
    if measure == "margin":
        top2 = np.sort(p, axis=1)[:, -2:]
        return 1.0 - (top2[:, 1] - top2[:, 0])
    if measure == "entropy":
        return -(p * np.log(p)).sum(axis=1) / np.log(p.shape[1])
    raise ConfigError(f"unknown uncertainty measure {measure!r}: margin, least_confidence or entropy")


def k_center_greedy(
    embeddings: np.ndarray, *, pool: np.ndarray, k: int, centers: np.ndarray | None = None, first: int | None = None
) -> np.ndarray:
    """Pick ``k`` rows of ``pool``, each the farthest from everything picked so far (and ``centers``).

    Without centers the walk starts at ``first`` (default: the first row of ``pool``).
    """
    pool = np.asarray(pool, dtype=np.int64)
    k = min(k, len(pool))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    x = embeddings[pool]
    chosen: list[int] = []
    if centers is not None and len(centers):
        c = embeddings[np.asarray(centers, dtype=np.int64)]
        # squared distances of unit vectors: 2 - 2 cos; chunked to keep memory flat
        dist = np.full(len(pool), np.inf, dtype=np.float32)
        for s in range(0, len(c), 1024):
            dist = np.minimum(dist, (2.0 - 2.0 * x @ c[s:s + 1024].T).min(axis=1))
    else:
        start = 0 if first is None else int(np.flatnonzero(pool == first)[0])
        chosen.append(start)
        dist = 2.0 - 2.0 * x @ x[start]
    while len(chosen) < k:
        dist[chosen] = -np.inf
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, 2.0 - 2.0 * x @ x[nxt])
    return pool[np.asarray(chosen, dtype=np.int64)]


def representative_seed(
    embeddings: np.ndarray, *, candidates: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """``k`` candidates that represent the data: the item nearest each k-means centroid."""
    candidates = np.asarray(candidates, dtype=np.int64)
    k = min(k, len(candidates))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k == len(candidates):
        return candidates
    from sklearn.cluster import KMeans

    x = embeddings[candidates]
    km = KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=int(rng.integers(2**31 - 1)))
    assign = km.fit_predict(x)
    chosen: list[int] = []
    taken: set[int] = set()
    for cluster in range(k):
        members = np.flatnonzero(assign == cluster)
        if not len(members):
            continue
        d = ((x[members] - km.cluster_centers_[cluster]) ** 2).sum(axis=1)
        for m in members[np.argsort(d)]:
            if int(m) not in taken:
                taken.add(int(m))
                chosen.append(int(m))
                break
    if len(chosen) < k:  # empty clusters: fill with the farthest remaining points
        rest = np.setdiff1d(np.arange(len(candidates)), chosen)
        extra = k_center_greedy(x, pool=rest, k=k - len(chosen), centers=np.asarray(chosen))
        chosen.extend(int(e) for e in extra)
    return candidates[np.asarray(chosen, dtype=np.int64)]


class UncertaintyDiversity:
    """Most uncertain first, spread by k-center greedy among the top ``pool_factor * k`` uncertain."""

    def __init__(self, measure: Measure = "margin", *, pool_factor: float = 3.0) -> None:
        uncertainty(np.full((1, 2), 0.5), measure)  # validate the name early
        self.measure: Measure = measure
        self.pool_factor = pool_factor

    def select(
        self,
        *,
        probabilities: np.ndarray,
        embeddings: np.ndarray,
        candidates: np.ndarray,
        k: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        candidates = np.asarray(candidates, dtype=np.int64)
        k = min(k, len(candidates))
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        score = uncertainty(probabilities[candidates], self.measure)
        # ties (e.g. one known class) are broken at random rather than by position
        order = np.lexsort((rng.random(len(candidates)), -score))
        pool = candidates[order[: max(k, round(self.pool_factor * k))]]
        if self.pool_factor <= 1.0:
            return pool[:k]
        return k_center_greedy(embeddings, pool=pool, k=k, first=int(pool[0]))


def make_strategy(measure: Measure) -> QueryStrategy:
    return UncertaintyDiversity(measure)
