"""A labeler that failed while labeling goes on from its open batch when the run is retried (dataset.uploaded
emitted again under a new event id), keeping every label people gave; a failure before labeling starts over."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest_asyncio
from labeler_testkit import labeler_settings_for, make_zip, stub_deps, two_class_images

from dlforge.common.bus import Delivery
from dlforge.common.events import Event, LabelsRequested, LabelsSubmitted, PipelineOptions, Spec, Topic, decode, encode
from dlforge.common.runtime import Backends, Outcome, Worker
from dlforge.labeler import records
from dlforge.labeler.app import DatasetRequest, _limits, import_dataset
from dlforge.labeler.ingest import open_zip, scan
from dlforge.labeler.settings import LabelerSettings
from dlforge.labeler.worker import service

OPTIONS = PipelineOptions(label_budget=0.6, seed_fraction=0.1, batch_fraction=0.1, seed=1)


class FailsOnce:
    """The configured classifier, but its first fit raises (a stand-in for a transient failure)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.fits = inner, inner.name, 0

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        self.fits += 1
        if self.fits == 1:
            raise RuntimeError("injected classifier failure")
        return self.inner.fit(*args, **kwargs)


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Backends, LabelerSettings]]:
    settings = labeler_settings_for(tmp_path)
    backends = Backends.from_settings(settings)
    await backends.start()
    yield backends, settings
    await backends.stop()


async def _deliver(worker: Worker[Any], event: Event) -> Outcome:
    return await worker.process(Delivery(topic=event.event_type.value, key=event.run_id, value=encode(event)))


async def test_a_retry_goes_on_from_the_open_batch_with_peoples_labels(env: tuple[Backends, LabelerSettings]
                                                                       ) -> None:
    backends, settings = env
    images = two_class_images(20)
    truth = {n: label for n, (_, label) in images.items()}
    tree = open_zip(io.BytesIO(make_zip({n: b for n, (b, _) in images.items()})), _limits(settings))
    await import_dataset(backends, settings, DatasetRequest(spec=Spec(positive_class="dark"), options=OPTIONS,
                                                            dataset_id="d1", run_id="run-d1"), tree, scan(tree))
    deps = await stub_deps(settings, backends)
    classifier = FailsOnce(deps.classifier)
    worker = Worker(service, backends, deps=replace(deps, classifier=classifier))
    sub = await backends.bus.subscribe(group="observer", topics=[Topic.DATASET_UPLOADED, Topic.LABELS_REQUESTED,
                                                                 Topic.RUN_FAILED, Topic.DATASET_LABELED])

    async def next_event() -> Event:
        d = await sub.get(timeout=5)
        assert d is not None
        await sub.commit(d)
        return decode(d.value)

    uploaded = await next_event()
    assert await _deliver(worker, uploaded) == Outcome.HANDLED
    request = (await next_event()).payload
    assert isinstance(request, LabelsRequested) and request.round == 1
    manifest_names = await _names(backends, "d1")
    answers = {i: truth[manifest_names[i]] for i in request.item_ids}
    submitted = uploaded.follow(LabelsSubmitted(dataset_id="d1", batch_id=request.batch_id, labels=answers,
                                                annotator="alice"))
    assert await _deliver(worker, submitted) == Outcome.DEAD_LETTERED  # the round after the batch failed
    failed = await next_event()
    assert failed.event_type == Topic.RUN_FAILED
    assert "injected classifier failure" in failed.payload.reason  # type: ignore[attr-defined]
    record = await records.load(backends.docs, "d1")
    assert record["state"] == "failed"

    # the retry: the same upload under a new event id
    again = Event.new(uploaded.payload, run_id=uploaded.run_id, causation_id=uploaded.event_id)
    assert await _deliver(worker, again) == Outcome.HANDLED
    assert classifier.fits >= 2  # the round really ran again
    nxt = (await next_event()).payload
    record = await records.load(backends.docs, "d1")
    assert record["state"] in ("labeling", "labeled") and record.get("error") is None
    assert {k: v for k, v in record["human_labels"].items() if k in answers} == answers  # alice's labels kept
    # 40 items at this budget: people still have labels to give, so the retry asks the next round's
    assert isinstance(nxt, LabelsRequested) and record["state"] == "labeling"
    assert nxt.round == 2 and not set(nxt.item_ids) & set(answers)  # nobody is asked twice
    await sub.close()


async def _names(backends: Backends, dataset_id: str) -> dict[str, str]:
    from dlforge.vision.manifest import load_manifest

    record = await records.load(backends.docs, dataset_id)
    manifest = load_manifest(backends.objects, record["manifest_key"])
    return {i.item_id: i.name for i in manifest.items}
