"""The small whole-pipeline run of the end-to-end test (with its decode/embed counts), whose spec and options
the crash test uses too: 240 ELPV cells in a folder, the simulated annotator, two trials of one epoch, on
given backends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dlforge.common.events import PipelineOptions, Spec
from dlforge.common.runtime import Backends
from dlforge.common.settings import load_settings

SPEC = Spec(positive_class="defect", min_recall=0.9, min_accuracy=0.5, min_fps=1.0, input_size=256)
# 240 items are too few people-labeled items for the 2 % auto-label guarantee: label them all
OPTIONS = PipelineOptions(hpo_trials=2, train_epochs=1, min_per_class=120, seed_fraction=0.1, batch_fraction=0.05,
                          auto_label_all=True)


def small_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, bus: str, objects: str, dataset_id: str
              ) -> tuple[Backends, Any, Path, dict[str, str], Callable[[Any], Awaitable[Any]]]:
    """``(backends, app, data folder, truth, upload)``: ``upload(client)`` registers the simulated
    annotator's answers and posts the folder as ``dataset_id``, asserting 201."""
    from dlforge.cli.platform import combined_app
    from dlforge.labeler import simulated
    from dlforge.labeler.demo_data import materialize_elpv

    data = tmp_path / "elpv"
    truth = materialize_elpv(data, limit=240)
    monkeypatch.setenv("DLFORGE_LABELER_IMPORT_ROOTS", str(tmp_path))
    monkeypatch.setenv("DLFORGE_OPTIMIZER_ROUNDS", "1")  # one benchmark round: these tests are about the flow
    settings = load_settings(bus=bus, objects=objects, docs=f"sqlite:///{tmp_path}/docs.db",
                             work_dir=str(tmp_path / "work"), poll_seconds=0.2)
    backends = Backends.from_settings(settings)
    app = combined_app(backends=backends, simulated_annotator=True)

    async def upload(client: Any) -> Any:
        await asyncio.to_thread(simulated.register_answers, backends.objects, dataset_id, truth)
        response = await client.post("/labeler/datasets", json={
            "folder": str(data), "name": "elpv-small", "spec": SPEC.model_dump(), "options": OPTIONS.model_dump(),
            "dataset_id": dataset_id})
        assert response.status_code == 201, response.text
        return response.json()

    return backends, app, data, truth, upload
