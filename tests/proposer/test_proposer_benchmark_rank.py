"""benchmarks/proposer.py's rank aggregation: ranks by hand, and the subset it chooses on made-up truths."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "proposer.py"
_SPEC = importlib.util.spec_from_file_location("dlforge_benchmark_proposer", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench
_SPEC.loader.exec_module(bench)
rank_mean, choose_subset = bench.rank_mean, bench.choose_subset


def test_rank_mean_averages_ranks_and_puts_a_missing_value_last() -> None:
    features = np.array([[1.0, 10.0], [3.0, np.nan], [2.0, 5.0]])
    # column 0 ranks the candidates 0, 2, 1; column 1 (the missing value lowest) 2, 0, 1
    assert rank_mean(features, (0,)).tolist() == [0.0, 2.0, 1.0]
    assert rank_mean(features, (1,)).tolist() == [2.0, 0.0, 1.0]
    assert rank_mean(features, (0, 1)).tolist() == [1.0, 1.0, 1.0]
    # tied values share their average rank: 0 and 1 -> 0.5 each, whatever the candidates' order
    tied = np.array([[2.0], [7.0], [2.0]])
    assert rank_mean(tied, (0,)).tolist() == [0.5, 2.0, 0.5]
    assert rank_mean(tied[::-1], (0,)).tolist() == [0.5, 2.0, 0.5]


def test_the_subset_is_the_one_that_ranks_like_the_truth_under_both_protocols() -> None:
    rng = np.random.default_rng(0)
    truth_a = [np.arange(6.0), np.array([5.0, 0.0, 4.0, 1.0, 3.0, 2.0])]
    truth_b = [t[::-1].copy() for t in truth_a]  # protocol b ranks every target the other way round
    # column 0 follows protocol a, column 1 protocol b, column 2 is noise, column 3 follows both halves:
    # it agrees with a on the top three of a and with b on the top three of b
    features = []
    for ta, tb in zip(truth_a, truth_b, strict=True):
        both = np.where(ta >= 3, ta, tb)
        features.append(np.column_stack([ta, tb, rng.normal(size=6), both]))
    only_a = choose_subset(features, {"a": truth_a, "a again": truth_a}, max_size=2)
    assert only_a == (0,)
    assert choose_subset(features, {"b": truth_b}, max_size=2) == (1,)
    # under both protocols no single column of 0 and 1 holds up; the one built to serve both wins
    assert choose_subset(features, {"a": truth_a, "b": truth_b}, max_size=1) == (3,)
