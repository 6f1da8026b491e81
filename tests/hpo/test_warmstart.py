"""Warm starts: data-set fingerprints and the nearest past studies (exact index, then IVF-PQ when many)."""

from __future__ import annotations

import numpy as np
import pytest

from dlforge.common.errors import InvalidInput
from dlforge.hpo.warmstart import PastStudy, StudyIndex, fingerprint, warm_start_params


def test_fingerprint_is_mean_and_std_of_the_normalised_rows() -> None:
    # rows (3, 4) and (0, 2) normalise to (0.6, 0.8) and (0, 1): mean (0.3, 0.9), std (0.3, 0.1)
    fp = fingerprint(np.array([[3.0, 4.0], [0.0, 2.0]]))
    assert fp.tolist() == pytest.approx([0.3, 0.9, 0.3, 0.1])
    with pytest.raises(InvalidInput, match="rows >= 2"):
        fingerprint(np.ones((1, 4)))


def study(name: str, fp: list[float], *best: dict[str, float]) -> PastStudy:
    return PastStudy(study_name=name, fingerprint=np.array(fp, dtype=np.float32), best_params=list(best))


def test_the_nearest_studies_best_configurations_come_first() -> None:
    index = StudyIndex([study("far", [5.0, 5.0], {"lr": 0.1}),
                        study("near", [1.0, 0.0], {"lr": 0.01}, {"lr": 0.02}),
                        study("middle", [0.0, 3.0], {"lr": 0.001}, {"lr": 0.01})])
    assert index.kind == "IndexFlatL2"
    found = index.nearest(np.array([1.2, 0.1]), 3)
    assert [s.study_name for s, _ in found] == ["near", "middle", "far"]
    assert found[0][1] == pytest.approx(np.hypot(0.2, 0.1), rel=1e-5)
    # near's two best, then middle's first (its second repeats near's first), then far's
    assert warm_start_params(index, np.array([1.2, 0.1]), per_study=2) == [
        {"lr": 0.01}, {"lr": 0.02}, {"lr": 0.001}, {"lr": 0.1}]
    # a configuration outside the new study's space is left out
    assert warm_start_params(index, np.array([1.2, 0.1]), studies=1, per_study=2,
                             problems=lambda p: ["too high"] if p["lr"] > 0.015 else []) == [{"lr": 0.01}]
    with pytest.raises(InvalidInput, match="fingerprint of 3 values"):
        index.nearest(np.zeros(3), 1)


def test_many_studies_use_ivf_pq_and_still_find_the_nearest() -> None:
    # 1500 studies in 12 clusters of 32-value fingerprints; the query is a slightly moved copy of one of them.
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(12, 32))
    fps = centres[rng.integers(0, 12, size=1500)] + rng.normal(scale=0.5, size=(1500, 32))
    index = StudyIndex([study(f"s{i}", fp.tolist(), {"i": float(i)}) for i, fp in enumerate(fps)], ivfpq_from=1000)
    assert index.kind == "IndexIVFPQ"
    hits = 0
    for target in range(0, 1500, 50):
        query = fps[target] + rng.normal(scale=0.01, size=32)
        hits += index.nearest(query, 1)[0][0].study_name == f"s{target}"
    assert hits >= 28  # of 30: approximate, re-ranked by exact distance among the candidates


def test_no_past_studies_gives_no_warm_start() -> None:
    assert warm_start_params(StudyIndex([]), np.zeros(4)) == []
    with pytest.raises(InvalidInput, match="differ in length"):
        StudyIndex([study("a", [0.0, 1.0]), study("b", [0.0, 1.0, 2.0])])
