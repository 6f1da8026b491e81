"""Class-stratified coresets on a hand-made clustered set whose covering radius is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from dlforge.common.errors import InvalidInput
from dlforge.hpo.coreset import (
    build_coreset,
    class_quota,
    climb_cost,
    fitted_ladder,
    herding_order,
    k_center_order,
    k_center_radius,
    next_fidelity,
    promotable,
)

SPREAD = 0.1  # every point lies within SPREAD of its cluster's centre
GAP = 10.0  # cluster centres are at least GAP apart


def clustered(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes, each one big cluster of 40 points and three small ones of 3 (49 points, 4 clusters)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(3):
        for j, size in enumerate([40, 3, 3, 3]):
            centre = np.array([GAP * j, GAP * 4 * c])
            direction = rng.normal(size=(size, 2))
            direction /= np.linalg.norm(direction, axis=1, keepdims=True)
            xs.append(centre + direction * rng.uniform(0, SPREAD, size=(size, 1)))
            ys += [c] * size
    return np.concatenate(xs), np.array(ys)


def per_class_radius(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> float:
    """The largest k-center radius over the classes, each class covered by its own rows of the subset."""
    radii = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        radii.append(k_center_radius(x[members], np.searchsorted(members, rows[y[rows] == c])))
    return max(radii)


def random_stratified(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    quota = class_quota(y, fraction)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), size=k, replace=False)
                                   for c, k in quota.items()]))


@pytest.mark.parametrize("method", ["k_center", "herding"])
def test_the_coreset_covers_every_class_with_its_quota(method: str) -> None:
    x, y = clustered()
    y = np.where(np.arange(len(y)) == 0, 3, y)  # a class of a single row still gets it
    for fraction in (0.02, 0.1, 0.5, 1.0):
        rows = build_coreset(x, y, method=method).rows(fraction)  # type: ignore[arg-type]
        assert len(set(rows.tolist())) == len(rows)
        counts = {int(c): int((y[rows] == c).sum()) for c in np.unique(y)}
        # quota by hand: 48 rows of class 0, 49 of 1 and 2, 1 of class 3
        expected = {0: max(1, round(48 * fraction)), 1: max(1, round(49 * fraction)),
                    2: max(1, round(49 * fraction)), 3: 1}
        assert counts == expected


def test_k_center_radius_is_the_cluster_size_and_random_subsets_miss_clusters() -> None:
    # 10 % of 49 is 5 rows per class for 4 clusters: a k-center subset has a row in every cluster, so no
    # point is farther than a cluster's diameter (2 * SPREAD) from it. A random subset of 5 rows out of a
    # class whose 40 rows are in one cluster misses a small cluster (P(all hit) < 3 %), leaving points ~GAP away.
    x, y = clustered()
    rows = build_coreset(x, y, method="k_center").rows(0.1)
    assert per_class_radius(x, y, rows) <= 2 * SPREAD
    random_radii = [per_class_radius(x, y, random_stratified(y, 0.1, seed)) for seed in range(20)]
    assert min(random_radii) > GAP / 2
    assert per_class_radius(x, y, rows) < min(random_radii)


def test_subsets_are_nested_so_raising_the_fidelity_keeps_the_rows_seen() -> None:
    x, y = clustered()
    coreset = build_coreset(x, y, method="k_center")
    small, large = set(coreset.rows(0.1).tolist()), set(coreset.rows(0.5).tolist())
    assert small < large
    assert set(coreset.rows(1.0).tolist()) == set(range(len(y)))


def test_k_center_order_is_farthest_point_traversal_on_a_line() -> None:
    # points 0, 1, 2, 3, 10 on a line (mean 3.2): start at 3, then 10 (farthest), then 0, then 1 or 2 (tie: 1)
    x = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    assert k_center_order(x, 4).tolist() == [3, 4, 0, 1]


def test_herding_keeps_the_subset_mean_near_the_class_mean() -> None:
    # on a line -3, -1, 0, 1, 3 (mean 0): herding picks 0, then the pair -1/1 or -3/3 in turn to keep the mean 0
    x = np.array([[-3.0], [-1.0], [0.0], [1.0], [3.0]])
    order = herding_order(x, 3).tolist()
    assert order[0] == 2 and x[order].mean() == pytest.approx(0.0)
    rng = np.random.default_rng(1)
    blob = rng.normal(size=(500, 8))
    herd = blob[herding_order(blob, 25)].mean(axis=0)
    rand = [blob[rng.choice(500, 25, replace=False)].mean(axis=0) for _ in range(20)]
    assert np.linalg.norm(herd - blob.mean(axis=0)) < min(np.linalg.norm(r - blob.mean(axis=0)) for r in rand)


def test_fidelity_ladder_and_promotion() -> None:
    assert next_fidelity(0.25, [0.25, 0.5, 1.0]) == 0.5
    assert next_fidelity(1.0, [0.25, 0.5, 1.0]) is None
    with pytest.raises(InvalidInput, match="fidelity ladder"):
        next_fidelity(0.1, [0.0, 1.0])
    # six trials at a rung: the best two (ceil(6/3)) are promoted, best first
    rung = list(enumerate([0.50, 0.62, 0.71, 0.55, 0.69, 0.40]))
    assert promotable(rung, set()) == [2, 4]
    assert promotable(rung, {2}) == [4] and promotable(rung, {2, 4}) == []
    # losses: the smallest is the best
    assert promotable([("a", 1.2), ("b", 0.8), ("c", 1.0)], (), maximize=False) == ["b"]
    # ties rank in the order given: never more than the quota (ceil(3/3) = 1)
    tied = [(0, 0.7), (1, 0.7), (2, 0.1)]
    assert promotable(tied, ()) == [0] and promotable(tied, {0}) == []


def test_a_rung_is_ranked_again_at_every_completion() -> None:
    """ASHA: an early trial is judged again as others finish, not once when it completed."""
    rung = [(0, 0.60), (1, 0.90)]
    assert promotable(rung, ()) == []  # fewer than three completed
    rung.append((2, 0.95))
    assert promotable(rung, ()) == [2]  # ceil(3/3) = 1: the best alone
    rung.append((3, 0.50))
    assert promotable(rung, {2}) == [1]  # ceil(4/3) = 2: trial 1, passed over at three, earns it now
    rung += [(4, 0.97), (5, 0.96), (6, 0.99)]
    assert promotable(rung, {1, 2}) == [6, 4, 5]  # ceil(7/3) = 3: 0.99, 0.97, 0.96, best first
    assert promotable([*rung[:4], (4, 0.91)], {2}) == [4]  # 0.91 pushes 0.90 (trial 1) out of the best two
    assert promotable([(0, 0.9)], (), min_trials=1) == [0]


def test_bad_input_is_refused() -> None:
    x, y = clustered()
    with pytest.raises(InvalidInput, match="fraction"):
        build_coreset(x, y).rows(0.0)
    with pytest.raises(InvalidInput, match="one label per row"):
        build_coreset(x, y[:-1])
    with pytest.raises(InvalidInput, match="unknown coreset method"):
        build_coreset(x, y, method="kmeans")  # type: ignore[arg-type]


def test_a_ladder_is_used_only_when_the_trainings_can_climb_it_to_the_top() -> None:
    # one at a time, by hand: the top needs 3 completed below it; 3 promoted there need 7 below (ceil(7/3) = 3);
    # 7 there need 19 (ceil(19/3) = 7): 2 rungs 1 + 3 = 4 trainings, 3 rungs 1 + 3 + 7 = 11, 4 rungs 30
    assert [climb_cost(r) for r in (1, 2, 3, 4)] == [1, 4, 11, 30]
    ladder = [0.25, 0.5, 1.0]
    assert fitted_ladder(ladder, 11) == fitted_ladder(ladder, 100) == [0.25, 0.5, 1.0]
    assert fitted_ladder(ladder, 10) is None  # the top out of reach: no ladder, every trial on the same share
    assert fitted_ladder([0.5, 1.0], 4) == [0.5, 1.0] and fitted_ladder([0.5, 1.0], 3) is None
    assert fitted_ladder([1.0], 1) == [1.0] and fitted_ladder(None, 50) is None and fitted_ladder([], 50) == []
    assert fitted_ladder([0.1, 0.2, 0.4, 1.0], 30) == [0.1, 0.2, 0.4, 1.0]
    assert fitted_ladder([0.1, 0.2, 0.4, 1.0], 29) is None
    # two at a time: each of the 10 trainings below the top of 3 rungs may let one new configuration start
    assert climb_cost(3, parallel=2) == 21 and fitted_ladder(ladder, 20, parallel=2) is None
    assert fitted_ladder(ladder, 21, parallel=2) == ladder
