"""The whole pipeline on the real Kafka-protocol broker and S3 server: a few hundred ELPV images,
two trials; every stage's event, one trace across all six services, the optimized model predicts, and
over the whole run each image is decoded at most twice and run through the ImageNet trunk from pixels
at most once per input size (the vision core's feature store serves every other use).

Counts come from the observers of :mod:`dlforge.vision.observe`, which :func:`dlforge.vision.images.decode`
and :class:`dlforge.vision.trunk.TrunkFeatures` report to. The feature store's reads and writes on every
backend are ``tests/vision/test_vision_features.py``'s.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from uuid import uuid4

import pytest

from dlforge.common.events import (
    DatasetAugmented,
    DatasetLabeled,
    DatasetUploaded,
    HpoCompleted,
    HpoTrial,
    HpoTrialCompleted,
    LabelsRequested,
    LabelsSubmitted,
    ModelOptimized,
    ModelProposed,
    ModelTrained,
)

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(1800)]

SERVICES = {"labeler", "augmenter", "proposer", "tuner", "trainer", "optimizer"}


def test_pipeline_end_to_end_on_kafka_and_s3(tmp_path: Path, kafka_url: str, s3_url: str, spans,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from small_run import small_run

    from dlforge.cli.bundle import bundle_downloader
    from dlforge.cli.pipeline import run_in_process
    from dlforge.cli.report import add_truth
    from dlforge.common.report import build_report
    from dlforge.common.runs import RUNS
    from dlforge.optimizer.predictor import Predictor
    from dlforge.vision.observe import CountingObserver, observing
    from dlforge.vision.staged import imagenet_trunk
    from dlforge.vision.trunk import TrunkFeatures

    backends, app, data, truth, upload = small_run(tmp_path, monkeypatch, bus=kafka_url, objects=s3_url,
                                                   dataset_id=f"e2e-{uuid4().hex[:8]}")

    bundle: dict[str, object] = {}  # the model bundle, written as dlforge demo/run write it beside their report
    with observing(CountingObserver()) as counts:
        run, events, created = asyncio.run(run_in_process(
            app, upload=upload, on_progress=lambda r: None, timeout=1500,
            after=bundle_downloader(tmp_path / "bundle.zip", bundle)))
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

    kinds = [type(e.payload) for e in events]
    for cls in (DatasetUploaded, LabelsRequested, LabelsSubmitted, DatasetLabeled, DatasetAugmented,
                ModelProposed, HpoTrial, HpoTrialCompleted, HpoCompleted, ModelTrained, ModelOptimized):
        assert cls in kinds, f"no {cls.__name__} event in the run"
    assert kinds.count(HpoTrialCompleted) == 2
    for stage in SERVICES:
        assert run["stages"][stage]["state"] == "succeeded"
        assert run["stages"][stage]["seconds"] >= 0

    # one trace per run, spanning all six services
    spans = [s for s in spans.get_finished_spans()
             if (s.attributes or {}).get("dlforge.run_id") == created["run_id"]]
    handled_by = {s.attributes.get("dlforge.service") for s in spans if s.name.startswith("handle ")}
    assert handled_by >= SERVICES
    assert len({s.context.trace_id for s in spans}) == 1

    # the report's numbers come from the run
    doc = asyncio.run(backends.docs.get(RUNS, created["run_id"]))
    labeled = next(e.payload for e in events if isinstance(e.payload, DatasetLabeled))
    report = add_truth(build_report(doc), objects=backends.objects, labels_key=labeled.labels_key, truth=truth)
    assert report["verdict"]["reasons"] and report["trace_id"] == format(spans[0].context.trace_id, "032x")
    assert 0 < report["human_label_fraction"] <= 0.30
    assert report["auto_label_accuracy"] is not None
    assert 0.0 <= report["test_accuracy"] <= 1.0

    # the optimized model loads from the object store and predicts
    optimized = next(e.payload for e in events if isinstance(e.payload, ModelOptimized))
    predictor = Predictor.load(backends.objects, optimized.report_key, cache_dir=tmp_path / "predictor")
    defect = next(name for name, label in truth.items() if label == "defect")
    prediction = predictor.predict((data / defect).read_bytes())
    assert prediction.label in ("defect", "good")
    assert 0.0 <= prediction.probability <= 1.0

    # the model bundle, through the API, is the one the optimizer stored for the run's model, and verifies
    from dlforge.optimizer.bundle import verify_bundle

    assert bundle.get("error") is None, bundle
    written = (tmp_path / "bundle.zip").read_bytes()
    stored = backends.objects.get_bytes(f"optimizer/{optimized.dataset_id}/{optimized.model_id}/bundle.zip")
    assert written == stored and bundle["sha256"] == hashlib.sha256(stored).hexdigest()
    manifest = verify_bundle(tmp_path / "bundle.zip")
    assert (manifest.model_id, manifest.variant) == (optimized.model_id, optimized.chosen_variant)
    assert bundle["model_id"] == optimized.model_id and bundle["file"] == str(tmp_path / "bundle.zip")
