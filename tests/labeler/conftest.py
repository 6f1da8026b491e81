"""Fixtures for the labeler tests (helpers live in labeler_testkit.py)."""

from __future__ import annotations

import pytest
from labeler_testkit import StubStatsEmbedder


@pytest.fixture
def stub_embedder() -> StubStatsEmbedder:
    """The TEST STUB embedder, for tests about the loop's logic (handed to the labeler as its embedder)."""
    return StubStatsEmbedder()
