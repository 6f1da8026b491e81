"""Fixtures: an object store with a tiny synthetic data set and a small CNN candidate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dlforge.common.objects import ObjectStore
from dlforge.common.objects.fs import FsObjectStore
from dlforge.common.runtime import Backends
from dlforge.common.settings import load_settings
from dlforge.trainer.handlers import TrainerConfig
from dlforge.trainer.testing import make_candidate, make_dataset


@pytest.fixture
async def backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Backends]:
    """Embedded backends (memory bus, fs objects, SQLite docs), the prefix runner on torch."""
    monkeypatch.setenv("DLFORGE_TRAINER_PREFIX_RUNNER", "torch")
    b = Backends.from_settings(load_settings(bus="memory://", objects=f"file://{tmp_path}/o",
                                             docs=f"sqlite:///{tmp_path}/d.db", work_dir=str(tmp_path / "w")))
    await b.start()
    yield b
    await b.stop()


@pytest.fixture
def objects(tmp_path: Path) -> ObjectStore:
    return FsObjectStore(tmp_path / "objects")


@pytest.fixture
def manifest_key(objects: ObjectStore) -> str:
    return make_dataset(objects, per_class={"defect": 40, "good": 40}, size=24)


@pytest.fixture
def weights_key(objects: ObjectStore) -> str:
    return make_candidate(objects, "proposer/models/small_cnn-mnist.pt")


@pytest.fixture
def config(tmp_path: Path) -> TrainerConfig:
    return TrainerConfig(work_dir=tmp_path / "work", threads=2, prefix_runner="torch")
