"""Fixtures: an object store with a tiny synthetic data set and a small CNN candidate."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlforge.common.objects import ObjectStore
from dlforge.common.objects.fs import FsObjectStore
from dlforge.trainer.handlers import TrainerConfig
from dlforge.trainer.testing import make_candidate, make_dataset


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
