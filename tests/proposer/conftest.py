"""Fixtures of the proposer tests (helpers live in proposer_testdata.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from proposer_testdata import proposer_test_settings

from dlforge.common.runtime import Backends


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[Backends]:
    b = Backends.from_settings(proposer_test_settings(tmp_path))
    await b.start()
    try:
        yield b
    finally:
        await b.stop()
