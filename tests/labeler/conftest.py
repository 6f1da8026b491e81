"""Fixtures for the labeler tests (helpers live in labeler_testkit.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from labeler_testkit import StubStatsEmbedder


@pytest.fixture
def stub_embedder() -> Iterator[StubStatsEmbedder]:
    """Every dataset embedded by the TEST STUB (only for tests about the loop's logic)."""
    from dlforge.labeler import worker

    stub = StubStatsEmbedder()
    worker.use_embedder(stub)
    yield stub
    worker.use_embedder(None)
