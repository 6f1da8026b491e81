"""Fixtures: embedded backends in a temporary folder, a tiny synthetic data set and a candidate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dlforge.common.runtime import Backends
from dlforge.common.settings import load_settings
from dlforge.trainer.testing import make_candidate, make_dataset


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DLFORGE_TUNER_STORAGE", f"sqlite:///{tmp_path}/tuner.db")
    monkeypatch.setenv("DLFORGE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("DLFORGE_TRAINER_PREFIX_RUNNER", "torch")
    monkeypatch.setenv("DLFORGE_TRAINER_THREADS", "1")
    return tmp_path


@pytest.fixture
async def backends(env: Path) -> AsyncIterator[Backends]:
    b = Backends.from_settings(load_settings(bus="memory://", objects=f"file://{env}/o", docs=f"sqlite:///{env}/d.db",
                                             work_dir=str(env / "work")))
    await b.start()
    yield b
    await b.stop()


@pytest.fixture
def data(backends: Backends) -> dict[str, str]:
    manifest_key = make_dataset(backends.objects, per_class={"defect": 30, "good": 30}, size=24)
    weights_key = make_candidate(backends.objects, "proposer/models/small_cnn-mnist.pt")
    return {"manifest_key": manifest_key, "weights_key": weights_key}
