"""The labeler after a crash: a redelivered submission re-emits its round; start-up reconciles uploads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from labeler_testkit import labeler_settings_for, stub_deps, two_class_images
from test_labeler_worker import ingest

from dlforge.common.bus import Delivery
from dlforge.common.events import Event, LabelsRequested, LabelsSubmitted, Topic, decode, encode
from dlforge.common.runtime import Backends, Outcome, Worker
from dlforge.labeler import records
from dlforge.labeler.ingest import dataset_prefix
from dlforge.labeler.reconcile import reconcile
from dlforge.labeler.settings import LabelerSettings
from dlforge.labeler.worker import on_labels_submitted, service


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Backends, LabelerSettings]]:
    settings = labeler_settings_for(tmp_path)
    backends = Backends.from_settings(settings)
    await backends.start()
    yield backends, settings
    await backends.stop()


async def _published(backends: Backends, topic: Topic, group: str) -> list[Event]:
    sub = await backends.bus.subscribe(group=group, topics=[topic])
    out = []
    try:
        while (d := await sub.get(timeout=0.2)) is not None:
            out.append(decode(d.value))
            await sub.commit(d)
    finally:
        await sub.close()
    return out


async def test_a_submission_redelivered_after_it_closed_its_batch_emits_the_next_round_again(
    env: tuple[Backends, LabelerSettings],
) -> None:
    backends, settings = env
    images = two_class_images(30)
    truth = {n: label for n, (_, label) in images.items()}
    await ingest(backends, settings, images, dataset_id="cells")
    worker = Worker(service, backends, deps=await stub_deps(settings, backends))
    [uploaded] = await _published(backends, Topic.DATASET_UPLOADED, "t1")
    assert await worker.process(Delivery(topic=uploaded.event_type.value, key=uploaded.run_id,
                                         value=encode(uploaded))) is Outcome.HANDLED
    [first] = await _published(backends, Topic.LABELS_REQUESTED, "t2")
    request = first.payload
    assert isinstance(request, LabelsRequested) and request.round == 1
    manifest_names = await _names(backends, "cells")
    answer = first.follow(LabelsSubmitted(dataset_id="cells", batch_id=request.batch_id, annotator="p",
                                          labels={i: truth[manifest_names[i]] for i in request.item_ids}))

    # the handler's writes happen, then the process dies before the runtime writes its marker
    crashed = await on_labels_submitted(answer, worker._context())
    assert isinstance(crashed, Event) and crashed.event_type in (Topic.LABELS_REQUESTED, Topic.DATASET_LABELED)
    # the bus delivers the submission again: the round it closed is emitted, not dropped as a closed batch
    assert await worker.process(Delivery(topic=answer.event_type.value, key=answer.run_id,
                                         value=encode(answer))) is Outcome.HANDLED
    again = await _published(backends, crashed.event_type, "t3")
    assert [e.payload for e in again if e.causation_id == answer.event_id] == [crashed.payload]
    assert (await records.load(backends.docs, "cells"))["advanced_by"] == answer.event_id


async def _names(backends: Backends, dataset_id: str) -> dict[str, str]:
    from dlforge.labeler.ingest import manifest_key
    from dlforge.vision.manifest import load_manifest

    manifest = await asyncio.to_thread(load_manifest, backends.objects, manifest_key(dataset_id))
    return {i.item_id: i.name for i in manifest.items}


async def test_start_up_republishes_a_stored_upload_and_fails_a_cut_one(
    env: tuple[Backends, LabelerSettings], tmp_path: Path,
) -> None:
    backends, settings = env
    await ingest(backends, settings, two_class_images(5), dataset_id="stored")
    [published] = await _published(backends, Topic.DATASET_UPLOADED, "t1")
    # a second upload was cut while its images were being stored
    await backends.docs.insert(records.DATASETS, {"_id": "cut", "run_id": "run-cut", "state": "ingesting"})
    await asyncio.to_thread(backends.objects.put_bytes, f"{dataset_prefix('cut')}/items/x.png", b"x")

    # the process restarts (a fresh in-memory bus: the publish of "stored" may never have happened)
    restarted = Backends.from_settings(labeler_settings_for(tmp_path))
    await restarted.start()
    try:
        await reconcile(restarted)
        again = await _published(restarted, Topic.DATASET_UPLOADED, "t2")
        failed = await _published(restarted, Topic.RUN_FAILED, "t3")
    finally:
        await restarted.stop()
    assert [e.event_id for e in again] == [published.event_id]  # the same event: consumers that have it skip it
    assert again[0].payload == published.payload
    cut = await records.load(backends.docs, "cut")
    assert cut["state"] == "failed" and "interrupted" in cut["error"]
    assert not list(backends.objects.list(f"{dataset_prefix('cut')}/"))
    assert failed == []  # no event named the cut upload's run: there is no run to fail
