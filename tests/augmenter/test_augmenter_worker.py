"""The augmenter worker on the memory bus: dataset.labeled -> dataset.augmented, records, REST, idempotency."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from fastapi.testclient import TestClient

from dlforge.augmenter.app import part
from dlforge.augmenter.handlers import GRID_CAPTION, GRID_PER_ROW, GRID_THUMB
from dlforge.augmenter.settings import AugmenterSettings
from dlforge.augmenter.worker import RUNS, SAMPLES, build_deps, service
from dlforge.common.app import create_app
from dlforge.common.bus import Delivery
from dlforge.common.events import DatasetAugmented, DatasetLabeled, Event, PipelineOptions, Spec, Topic, decode, encode
from dlforge.common.runtime import Backends, Outcome, Worker
from dlforge.common.settings import load_settings
from dlforge.vision.images import decode as decode_image
from dlforge.vision.manifest import load_manifest

pytestmark = pytest.mark.slow  # the X2 filter runs EfficientNet-Lite0 on every image

LAYOUT = {
    "stripes": ("stripes", {"train": 40, "val": 10, "test": 4}),
    "spots": ("spots", {"train": 12, "val": 10, "test": 4}),
}


@pytest.fixture(params=[pytest.param("fs", id="fs"), pytest.param("s3", id="s3", marks=pytest.mark.s3)])
def objects_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The worker's object store: a folder, or (where a server is configured) S3."""
    if request.param == "s3":
        return str(request.getfixturevalue("s3_url"))
    return f"file://{tmp_path}/o"


@pytest_asyncio.fixture
async def backends(tmp_path: Path, objects_url: str) -> AsyncIterator[Backends]:
    settings = load_settings(
        AugmenterSettings, bus="memory://", objects=objects_url, docs=f"sqlite:///{tmp_path}/d.db",
        augmenter_filter_image_size=64, augmenter_threshold=0.9, retry_attempts=1,
    )
    b = Backends.from_settings(settings)
    await b.start()
    yield b
    await b.stop()


def _labeled(labels_key: str, *, dataset_id: str = "ds1", max_imbalance: float = 1.0,
             min_per_class: int = 0) -> Event:
    payload = DatasetLabeled(
        dataset_id=dataset_id, labels_key=labels_key, classes=list(LAYOUT),
        counts=[], human_labels=10, auto_labels=42, rounds=2,
        spec=Spec(positive_class="spots", min_recall=0.9),
        options=PipelineOptions(min_per_class=min_per_class, max_imbalance=max_imbalance, seed=3),
    )
    return Event.new(payload, run_id="run-1")


async def _process(backends: Backends, event: Event) -> Outcome:
    delivery = Delivery(topic=event.event_type.value, key=event.run_id, value=encode(event))
    assert isinstance(backends.settings, AugmenterSettings)
    return await Worker(service, backends, deps=await build_deps(backends.settings, backends)).process(delivery)


async def _emitted(backends: Backends, topic: Topic, group: str) -> list[Event]:
    sub = await backends.bus.subscribe(group=group, topics=[topic])
    out = []
    while (d := await sub.get(timeout=0.05)) is not None:
        out.append(decode(d.value))
    await sub.close()
    return out


@pytest.mark.asyncio
async def test_dataset_labeled_becomes_dataset_augmented(backends: Backends, write_dataset: Any) -> None:
    manifest, labels_key = write_dataset(backends.objects, "ds1", LAYOUT)
    event = _labeled(labels_key)
    assert await _process(backends, event) == Outcome.HANDLED

    [out] = await _emitted(backends, Topic.DATASET_AUGMENTED, "t1")
    assert out.causation_id == event.event_id and out.run_id == "run-1"
    payload = out.payload
    assert isinstance(payload, DatasetAugmented)
    assert payload.manifest_key == "augmenter/ds1/manifest.json" and payload.spec.positive_class == "spots"
    counts = {c.label: (c.real, c.generated, c.kept) for c in payload.augmentation}
    # balance (max_imbalance 1.0): spots need 28 more, the cap (1x real) allows 12
    assert counts["stripes"] == (40, 0, 0) and counts["spots"][:2] == (12, 12)
    kept = counts["spots"][2]
    assert kept >= 9  # flips, noise, small affine and mixup of spots remain spots for the filter

    train = load_manifest(backends.objects, payload.manifest_key)
    generated = [i for i in train.items if i.label_source == "generated"]
    assert len(train.items) == len(manifest.items) + kept and len(generated) == kept
    real_spots = {i.item_id for i in manifest.items if i.label == "spots" and i.split == "train"}
    for item in generated:
        assert item.split == "train" and item.label == "spots" and item.parent_id in real_spots
        assert item.key.startswith("augmenter/ds1/generated/")
        assert item.confidence is not None and item.confidence >= 0.9
        assert decode_image(backends.objects.get_bytes(item.key)).size == (48, 48)
    # every generated sample is stored, the refused ones too
    assert len(list(backends.objects.list("augmenter/ds1/generated/"))) == 12

    record = await backends.docs.get(RUNS, "ds1")
    assert record is not None and record["status"] == "completed" and record["run_id"] == "run-1"
    assert record["augmentation"] == [c.model_dump() for c in payload.augmentation]
    assert record["filter"]["val_accuracy"] >= 0.9 and record["filter"]["val_count"] == 20
    assert record["filter"]["train_count"] == 52 and record["filter"]["image_size"] == 64
    assert record["timings"]["total"] > 0 and record["plan"][1]["needed"] == 28
    assert len(await backends.docs.find(SAMPLES, {"dataset_id": "ds1"})) == 12
    # the seed's second classifier: real + kept, scored like the filter on the 20 real validation images
    gain = payload.gain
    assert gain is not None and record["gain"] == gain.model_dump()
    assert (gain.val_items, gain.kept_samples) == (20, kept)
    assert [(c.label, c.val_items) for c in gain.per_class] == [("stripes", 10), ("spots", 10)]
    assert gain.accuracy_real == record["filter"]["val_accuracy"]
    # one row of kept and one of refused spots (nothing generated for stripes)
    assert payload.samples_grid_key == record["samples_grid_key"] == "augmenter/ds1/samples-grid.png"
    grid = decode_image(backends.objects.get_bytes(payload.samples_grid_key))
    assert grid.size == (GRID_CAPTION + GRID_PER_ROW * (GRID_THUMB + 4), 2 * (GRID_THUMB + 18))

    app = create_app([part()], backends=backends, run_workers=False)
    with TestClient(app) as client:
        got = client.get("/datasets/ds1/augmentation").json()
        assert got["augmentation"] == record["augmentation"] and got["filter"]["threshold"] == 0.9
        assert client.get("/datasets/nope/augmentation").status_code == 404
        page = client.get("/datasets/ds1/samples", params={"label": "spots", "kept": True}).json()
        assert page["total"] == kept and len(page["samples"]) == kept
        assert all(s["kept"] and s["confidence"] >= 0.9 for s in page["samples"])
        assert all(s["url"].startswith(("file://", "http://", "https://")) for s in page["samples"])
        refused = client.get("/datasets/ds1/samples", params={"kept": False}).json()
        assert refused["total"] == 12 - kept
        assert client.get("/datasets/ds1/samples", params={"label": "stripes"}).json()["total"] == 0
        assert client.get("/datasets/ds1/samples", params={"limit": 5, "offset": 10}).json()["samples"].__len__() == 2
        bad = client.get("/datasets/ds1/samples", params={"label": "cats"})
        assert bad.status_code == 422 and "cats" in bad.json()["detail"]

    # the same event again is a duplicate (the runtime may re-publish its outbox: same event id);
    # a new event with the same inputs is answered from the record without redoing the work
    etags = {i.key: backends.objects.stat(i.key).etag for i in generated}
    assert await _process(backends, event) == Outcome.DUPLICATE
    again = _labeled(labels_key)
    assert await _process(backends, again) == Outcome.HANDLED
    outs = {e.event_id: e for e in await _emitted(backends, Topic.DATASET_AUGMENTED, "t2")}
    assert len(outs) == 2 and all(e.payload == payload for e in outs.values())
    assert {e.causation_id for e in outs.values()} == {event.event_id, again.event_id}
    assert {k: backends.objects.stat(k).etag for k in etags} == etags
    assert (await backends.docs.get(RUNS, "ds1"))["event_id"] == event.event_id  # type: ignore[index]


@pytest.mark.asyncio
async def test_nothing_scarce_passes_the_real_manifest_on(backends: Backends, write_dataset: Any) -> None:
    manifest, labels_key = write_dataset(backends.objects, "ds1", LAYOUT)
    assert await _process(backends, _labeled(labels_key, max_imbalance=4.0, min_per_class=10)) == Outcome.HANDLED
    [out] = await _emitted(backends, Topic.DATASET_AUGMENTED, "t1")
    assert isinstance(out.payload, DatasetAugmented)
    assert out.payload.manifest_key == "augmenter/ds1/manifest.json" != labels_key
    assert [(c.real, c.generated, c.kept) for c in out.payload.augmentation] == [(40, 0, 0), (12, 0, 0)]
    assert load_manifest(backends.objects, out.payload.manifest_key) == manifest
    assert out.payload.gain is None and out.payload.samples_grid_key is None
    record = await backends.docs.get(RUNS, "ds1")
    assert record is not None and record["filter"] is None and record["status"] == "completed"


@pytest.mark.asyncio
async def test_changed_options_replace_the_earlier_samples(backends: Backends, write_dataset: Any) -> None:
    _, labels_key = write_dataset(backends.objects, "ds1", LAYOUT)
    await _process(backends, _labeled(labels_key))
    first = {i.key for i in backends.objects.list("augmenter/ds1/generated/")}
    await _process(backends, _labeled(labels_key, max_imbalance=2.0))  # target 20: 8 spots
    second = {i.key for i in backends.objects.list("augmenter/ds1/generated/")}
    assert len(first) == 12 and len(second) == 8 and not first & second
    assert len(await backends.docs.find(SAMPLES, {"dataset_id": "ds1"})) == 8


@pytest.mark.asyncio
async def test_a_missing_manifest_is_dead_lettered(backends: Backends) -> None:
    assert await _process(backends, _labeled("labeler/none/labeled.json")) == Outcome.DEAD_LETTERED
    [failed] = await _emitted(backends, Topic.RUN_FAILED, "t1")
    assert failed.payload.stage == "augmenter" and "does not exist" in failed.payload.reason  # type: ignore[attr-defined]
    assert await backends.docs.get(RUNS, "ds1") is None
