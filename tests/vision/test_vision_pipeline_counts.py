"""Over one whole pipeline run, each image is decoded at most twice and run through the ImageNet trunk
from pixels at most once per input size (the vision core's feature store serves every other use).

The run is the end-to-end test's small one (240 ELPV cells, two trials, one epoch) on the memory bus
and SQLite, with the feature store on the filesystem and on S3. Counts come from the observers of
:mod:`dlforge.vision.observe`, which :func:`dlforge.vision.images.decode` and
:class:`dlforge.vision.trunk.TrunkFeatures` report to.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from uuid import uuid4

import pytest

from dlforge.common.events import PipelineOptions, Spec
from dlforge.common.runtime import Backends
from dlforge.common.settings import load_settings
from dlforge.vision.observe import CountingObserver, observing
from dlforge.vision.staged import imagenet_trunk
from dlforge.vision.trunk import TrunkFeatures

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(params=[pytest.param("fs", id="fs"), pytest.param("s3", id="s3", marks=pytest.mark.s3)])
def objects_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"file://{tmp_path}/objects" if request.param == "fs" else str(request.getfixturevalue("s3_url"))


def test_one_run_decodes_each_image_at_most_twice_and_embeds_it_once_per_size(
        tmp_path: Path, objects_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dlforge.cli.pipeline import run_in_process
    from dlforge.cli.platform import combined_app
    from dlforge.labeler import simulated
    from dlforge.labeler.demo_data import materialize_elpv

    data = tmp_path / "elpv"
    truth = materialize_elpv(data, limit=240)
    monkeypatch.setenv("DLFORGE_LABELER_IMPORT_ROOTS", str(tmp_path))
    monkeypatch.setenv("DLFORGE_OPTIMIZER_ROUNDS", "1")
    settings = load_settings(bus="memory://", objects=objects_url, docs=f"sqlite:///{tmp_path}/docs.db",
                             work_dir=str(tmp_path / "work"), poll_seconds=0.2)
    backends = Backends.from_settings(settings)
    app = combined_app(backends=backends, simulated_annotator=True)
    spec = Spec(positive_class="defect", min_recall=0.9, min_accuracy=0.5, min_fps=1.0, input_size=256)
    # as the end-to-end test: 240 items are too few people labels for the auto-label guarantee
    options = PipelineOptions(hpo_trials=2, train_epochs=1, min_per_class=120, seed_fraction=0.1,
                              batch_fraction=0.05, auto_label_all=True)
    dataset_id = f"counts-{uuid4().hex[:8]}"

    async def upload(client):  # type: ignore[no-untyped-def]
        await asyncio.to_thread(simulated.register_answers, backends.objects, dataset_id, truth)
        response = await client.post("/labeler/datasets", json={
            "folder": str(data), "name": "elpv-small", "spec": spec.model_dump(), "options": options.model_dump(),
            "dataset_id": dataset_id})
        assert response.status_code == 201, response.text
        return response.json()

    with observing(CountingObserver()) as counts:
        run, _, _ = asyncio.run(run_in_process(app, upload=upload, on_progress=lambda r: None, timeout=1500))
    assert run["state"] == "succeeded", run.get("failure")

    real = {hashlib.sha256(p.read_bytes()).hexdigest() for p in data.rglob("*.png")}
    assert len(real) == 240
    # every real image was decoded (at ingestion), none more than twice; generated ones too
    assert real <= set(counts.decodes)
    worst = counts.decodes.most_common(1)[0]
    assert worst[1] <= 2, f"image {worst[0][:12]} decoded {worst[1]} times"

    imagenet = TrunkFeatures(None, imagenet_trunk()).trunk_id()
    by_size: dict[int, set[str]] = {}
    for (trunk, size, content), n in counts.embeds.items():
        assert n <= 1, f"image {content[:12]} embedded {n} times by {trunk} at {size} px"
        if trunk == imagenet:
            by_size.setdefault(size, set()).add(content)
    # the instrumented path is the one used: the labeler embedded every real image at 224 px; the
    # augmenter, the proposer and the trainer (EfficientNet-Lite0 trains at 224 px) read that pass, so
    # no real image was run again at 224 (a label-preserving view the trainer adds is its own input,
    # counted as "<content>/<view>", once too)
    assert real <= by_size.get(224, set())
