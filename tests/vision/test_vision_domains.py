"""Per-domain standardization of embeddings (the labeler's DLFORGE_LABELER_DOMAINS=standardize)."""

from __future__ import annotations

import numpy as np
import pytest

from dlforge.common.errors import InvalidInput
from dlforge.vision.domains import standardize_domains


def test_each_domain_gets_the_whole_sets_moments_and_keeps_its_order() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal([0.0, 1.0], [1.0, 0.1], size=(60, 2))
    b = rng.normal([5.0, -3.0], [3.0, 2.0], size=(40, 2))
    x = np.vstack([a, b]).astype(np.float32)
    domains = ["mono"] * 60 + ["poly"] * 40
    out, done = standardize_domains(x, domains)
    assert done == {"mono": 60, "poly": 40} and out.dtype == np.float32
    mu, sd = x.astype(np.float64).mean(axis=0), x.astype(np.float64).std(axis=0)
    for rows in (slice(0, 60), slice(60, 100)):
        assert out[rows].mean(axis=0) == pytest.approx(mu, abs=1e-4)
        assert out[rows].std(axis=0) == pytest.approx(sd, rel=1e-4)
        assert (np.argsort(out[rows, 0]) == np.argsort(x[rows, 0])).all()


def test_small_domains_rows_without_a_domain_and_a_single_domain_are_left_alone() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3))
    domains: list[str | None] = ["a"] * 30 + ["b"] * 10 + [None] * 10
    out, done = standardize_domains(x, domains, min_items=20)
    assert done == {"a": 30}
    assert np.array_equal(out[30:], x[30:])  # b has 10 items: too few for moments; None: no domain
    assert not np.array_equal(out[:30], x[:30])
    same, nothing = standardize_domains(x, ["a"] * 50)
    assert same is x and nothing == {}
    with pytest.raises(InvalidInput, match="one domain per row"):
        standardize_domains(x, ["a"] * 49)
