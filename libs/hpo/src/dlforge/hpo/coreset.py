"""Representative subsets for trials: class-stratified coresets on stored embeddings, with nested fidelities.

A trial that trains on a fraction of the train split is cheaper; how much its ranking of configurations
can be trusted depends on how well that fraction stands for the whole. A random sample leaves holes; a
coreset covers the data: **k-center greedy** (farthest-point traversal) picks each next row as the one
farthest from those already picked, minimising the largest distance from any row to the subset (within
a factor 2 of the optimum); **herding** picks rows so that the running mean of the subset follows the
class mean (the feature distribution's first moment) as closely as possible.

Selection is per class, with a quota ``max(1, round(n_c * fraction))`` for class ``c`` (no more than it
has), so every class is present and the class balance is that of the full split. The greedy order of a
class does not depend on the fraction: the subset at a fraction is a prefix of that order, so subsets
are nested. Raising a promising trial's fidelity (:func:`next_fidelity`) keeps the rows it already saw
and adds the next most representative ones.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from dlforge.common.errors import InvalidInput

Method = Literal["k_center", "herding"]
K = TypeVar("K")


def k_center_order(x: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` rows of a farthest-point traversal of ``x``, starting from the row nearest the mean."""
    n = len(x)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    x = np.asarray(x, dtype=np.float64)
    first = int(np.argmin(((x - x.mean(axis=0)) ** 2).sum(axis=1)))
    order = [first]
    dist = ((x - x[first]) ** 2).sum(axis=1)
    for _ in range(1, k):
        nxt = int(np.argmax(dist))
        order.append(nxt)
        dist = np.minimum(dist, ((x - x[nxt]) ** 2).sum(axis=1))
    return np.array(order, dtype=np.int64)


def herding_order(x: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` rows chosen by herding: each makes the running mean of the chosen rows closest to the mean."""
    n = len(x)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=0)
    total = np.zeros_like(mu)
    free = np.ones(n, dtype=bool)
    order: list[int] = []
    for t in range(1, k + 1):
        # ||mu - (total + x_i) / t||^2 over the rows not chosen yet
        gap = ((mu - (total + x) / t) ** 2).sum(axis=1)
        gap[~free] = np.inf
        i = int(np.argmin(gap))
        order.append(i)
        free[i] = False
        total += x[i]
    return np.array(order, dtype=np.int64)


def class_quota(labels: np.ndarray, fraction: float) -> dict[int, int]:
    """Rows per class at ``fraction``: ``max(1, round(n_c * fraction))``, at most ``n_c``."""
    if not 0.0 < fraction <= 1.0:
        raise InvalidInput(f"a subset fraction must be in (0, 1], got {fraction}")
    classes, counts = np.unique(labels, return_counts=True)
    return {int(c): min(int(n), max(1, round(int(n) * fraction))) for c, n in zip(classes, counts, strict=True)}


def k_center_radius(x: np.ndarray, rows: np.ndarray) -> float:
    """The largest distance from a row of ``x`` to its nearest row among ``rows`` (the k-center objective)."""
    x = np.asarray(x, dtype=np.float64)
    centers = x[np.asarray(rows)]
    d2 = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2).min(axis=1)
    return float(math.sqrt(max(0.0, float(d2.max()))))


@dataclass(frozen=True)
class Coreset:
    """Per class, the rows of the train split in the order the method picks them (computed once per split)."""

    method: Method
    orders: dict[int, np.ndarray]  # class -> row indices into the split, most representative first
    sizes: dict[int, int]  # class -> rows of that class in the split

    def rows(self, fraction: float) -> np.ndarray:
        """Sorted row indices of the subset at ``fraction`` (a prefix of each class's order)."""
        if not 0.0 < fraction <= 1.0:
            raise InvalidInput(f"a subset fraction must be in (0, 1], got {fraction}")
        take = [self.orders[c][:min(self.sizes[c], max(1, round(self.sizes[c] * fraction)))] for c in self.orders]
        return np.sort(np.concatenate(take)) if take else np.zeros(0, dtype=np.int64)


def build_coreset(features: np.ndarray, labels: np.ndarray, *, method: Method = "k_center",
                  max_fraction: float = 1.0) -> Coreset:
    """The per-class orders of ``features`` (one row per train item, e.g. its cached embedding).

    Only the first ``max_fraction`` of each class is ordered (the rest is never asked for), which keeps
    k-center's cost at ``O(n_c * k_c)`` distance evaluations per class.
    """
    x = np.asarray(features)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise InvalidInput(f"features must be (rows, dims) with one label per row; got {x.shape} and {y.shape}")
    if method not in ("k_center", "herding"):
        raise InvalidInput(f"unknown coreset method {method!r}; known: herding, k_center")
    order_of = k_center_order if method == "k_center" else herding_order
    quota = class_quota(y, max_fraction)
    orders: dict[int, np.ndarray] = {}
    sizes: dict[int, int] = {}
    for c, k in quota.items():
        members = np.flatnonzero(y == c)
        orders[c] = members[order_of(x[members], k)]
        sizes[c] = len(members)
    return Coreset(method=method, orders=orders, sizes=sizes)


def next_fidelity(fraction: float, ladder: Sequence[float]) -> float | None:
    """The next rung above ``fraction`` on an increasing ladder of fractions (None: already at the top)."""
    rungs = sorted(set(ladder))
    if not rungs or rungs[0] <= 0.0 or rungs[-1] > 1.0:
        raise InvalidInput(f"a fidelity ladder holds fractions in (0, 1], got {list(ladder)}")
    return next((r for r in rungs if r > fraction + 1e-12), None)


def _completions_for(promotions: int, *, min_trials: int, top_fraction: float) -> int:
    """The fewest completions at a rung from which :func:`promotable` promotes ``promotions`` trials."""
    return max(min_trials, math.ceil((promotions - 1) / top_fraction - 1e-9) + 1)


def climb_cost(rungs: int, *, parallel: int = 1, min_trials: int = 3, top_fraction: float = 1 / 3) -> int:
    """Trainings enough for one of them to train on the top of a ladder of ``rungs`` rungs under
    :func:`promotable`, whatever the values and the order trials end in.

    One at a time it is exact: one at the top needs ``min_trials`` completed on the rung below, three promoted
    there need 7 below that (the best third of 7 is 3), and so on (2 rungs: 4; 3: 11; 4: 30). With
    ``parallel`` trials at a time, each of the trainings below the top can be overtaken by up to ``parallel - 1``
    new configurations started while it runs, which this bound adds (3 rungs, 2 at a time: 21; the worst of
    400 random orders and values, simulated with the tuner's rule, needed 15).
    """
    below = 0
    at = 1
    for _ in range(rungs - 1):
        at = _completions_for(at, min_trials=min_trials, top_fraction=top_fraction)
        below += at
    return 1 + below + max(0, parallel - 1) * below


def fitted_ladder(ladder: Sequence[float] | None, trainings: int, *, parallel: int = 1, min_trials: int = 3,
                  top_fraction: float = 1 / 3) -> list[float] | None:
    """``ladder`` if ``trainings`` (``parallel`` at a time) can climb all of it (:func:`climb_cost`), else None: no
    ladder, every trial on the study's ``sample_fraction`` (None or empty in: the same out).

    With fewer, nothing would train at the top, and every value the study compares would come from part of the
    data, which favours what learns fast on little data. Cutting the lowest rungs instead was tried on the demo
    (4 trials on 0.5, 1: three configurations and one promotion): both runs chose a frozen trunk and tested
    0.847 and 0.809 at the argmax, where the last demo with four configurations on random halves had chosen
    unfreeze 1 and tested 0.863 (DEVELOPERS.md). Nothing measured favours the cut, so a short study keeps
    exploring as before.
    """
    if not ladder:
        return None if ladder is None else []
    rungs = sorted(ladder)
    if len(rungs) == 1:
        return rungs
    cost = climb_cost(len(rungs), parallel=parallel, min_trials=min_trials, top_fraction=top_fraction)
    return rungs if cost <= trainings else None


def promotable(rung: Sequence[tuple[K, float]], promoted: Collection[K], *, maximize: bool = True,
               top_fraction: float = 1 / 3, min_trials: int = 3) -> list[K]:
    """Asynchronous successive halving's rule (ASHA, Li et al. 2020) over one rung: the keys of the trials among
    the best ``ceil(top_fraction * n)`` of the ``n`` completed at the rung that were not promoted yet, best
    first. Nothing before ``min_trials`` completed there. Equal values rank in the order given (for the
    tuner, by validation loss, then by trial number), so ties never promote more than the quota.

    The rung is ranked again at every completion: an early trial that stays among the best third is promoted
    once enough others finished, and one that has fallen out of it is not.
    """
    if len(rung) < max(1, min_trials):
        return []
    order = sorted(range(len(rung)), key=lambda i: (-rung[i][1] if maximize else rung[i][1], i))
    quota = max(1, math.ceil(top_fraction * len(rung) - 1e-9))
    done = set(promoted)
    return [rung[i][0] for i in order[:quota] if rung[i][0] not in done]
