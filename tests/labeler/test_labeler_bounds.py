"""Bounded input at the labeler's upload: every bad input gets its 4xx with the reason, and nothing
is written (no dataset record, no object, no ``dataset.uploaded`` event)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from labeler_testkit import labeler_settings_for, make_zip, png
from PIL import Image
from test_labeler_api import dataset_rows, objects_under, upload, wait_record

from dlforge.common.events import Topic
from dlforge.labeler.app import FORM_FIELDS_BYTES, create_app
from dlforge.labeler.settings import LabelerSettings

SPEC = {"positive_class": "dark", "min_recall": 0.9}


@pytest.fixture
def settings(tmp_path: Path) -> LabelerSettings:
    return labeler_settings_for(tmp_path)


@pytest.fixture
def client(settings: LabelerSettings, stub_embedder: object) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def published(client: TestClient, topic: Topic = Topic.DATASET_UPLOADED) -> int:
    """How many events are on ``topic``, read from the start by a consumer group of its own."""
    bus = client.app.state.backends.bus  # type: ignore[attr-defined]

    async def count() -> int:
        sub = await bus.subscribe(group=f"probe-{uuid4().hex}", topics=[topic])
        try:
            return len(await sub.get_batch(100_000, timeout=0))
        finally:
            await sub.close()

    assert client.portal is not None
    return int(client.portal.call(count))


def assert_nothing_written(client: TestClient, settings: LabelerSettings) -> None:
    assert objects_under(settings) == []
    assert dataset_rows(settings) == 0
    assert client.get("/datasets").json() == []
    assert published(client) == 0


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (see tests/vision/test_vision_images.py)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


FOUR = make_zip({f"{i}.png": png(i) for i in range(4)})


@pytest.mark.parametrize(
    ("fields", "data", "words"),
    [
        ({"options": {"hpo_trials": 1e9, "train_epochs": 1e9}}, FOUR, "less than or equal to 200"),
        ({"options": {"train_epochs": 501}}, FOUR, "train_epochs"),
        ({"options": {"seed": -1}}, FOUR, "seed"),
        ({"spec": {"positive_class": "dark\x1b[2J"}}, FOUR, "not a valid class name"),
        ({"spec": {"min_fps": 1e12}}, FOUR, "min_fps"),
        ({"classes": ["good", "bad\x00"]}, FOUR, "not a valid class name"),
        ({"classes": [f"c{i}" for i in range(1001)]}, FOUR, "at most 1000 items"),
        # labels entering through the upload itself
        ({}, make_zip({"labels.csv": b"file,label\n0.png,ok\n1.png,bad\x07bell\n", "0.png": png(0),
                       "1.png": png(1)}), "labels.csv line 3"),
        ({}, make_zip({"ok/0.png": png(0), "b\x1bd/1.png": png(1)}), "not a valid class name"),
        # new classes where they are not allowed
        ({"classes": "good,bad", "allow_new_classes": "false"},
         make_zip({"labels.csv": b"file,label\n0.png,good\n1.png,ugly\n2.png,weird\n3.png,bad\n",
                   **{f"{i}.png": png(i) for i in range(4)}}), "line 3: 'ugly', line 4: 'weird'"),
        ({"classes": "good,bad", "allow_new_classes": "false"},
         make_zip({"good/0.png": png(0), "ugly/1.png": png(1)}), "class folder(s) 'ugly'"),
        ({"classes": "good,bad", "allow_new_classes": "false", "spec": {"positive_class": "defect"}}, FOUR,
         "spec.positive_class 'defect' is not among the classes"),
        ({"allow_new_classes": "maybe"}, FOUR, "must be true or false"),
    ],
    ids=["options-1e9", "epochs-over-trainer-bound", "negative-seed", "positive-control-chars", "fps",
         "classes-control-chars", "too-many-classes", "csv-control-chars", "folder-control-chars",
         "csv-new-classes", "folder-new-classes", "positive-new-class", "allow-not-a-bool"],
)
def test_bad_upload_fields_are_refused_with_422_and_nothing_written(
    client: TestClient, settings: LabelerSettings, fields: dict[str, Any], data: bytes, words: str
) -> None:
    r = upload(client, data, **fields)
    assert r.status_code == 422, r.text
    assert words in r.text
    assert_nothing_written(client, settings)


def test_the_same_bounds_hold_for_a_json_folder_import(client: TestClient, settings: LabelerSettings,
                                                      tmp_path: Path) -> None:
    folder = tmp_path / "imports" / "cells"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"{i}.png").write_bytes(png(i))
    r = client.post("/datasets", json={"folder": str(folder), "options": {"hpo_trials": 10**9}})
    assert r.status_code == 422 and "hpo_trials" in r.text
    r = client.post("/datasets", json={"folder": str(folder), "classes": ["a", "a"]})
    assert r.status_code == 422 and "unique" in r.text
    r = client.post("/datasets", json={"folder": f"{folder}/\x00x"})
    assert r.status_code == 422 and "control characters" in r.text
    r = client.post("/datasets", json={"folder": str(folder), "name": "cells\x1b[2J"})
    assert r.status_code == 422 and "control characters" in r.text
    r = client.post("/datasets", json={"folder": "~no-such-user-4711/cells"})
    assert r.status_code == 422 and "not a usable path" in r.text
    assert_nothing_written(client, settings)


def test_allowed_classes_are_accepted(client: TestClient, settings: LabelerSettings) -> None:
    data = make_zip({"labels.csv": b"file,label\n0.png,good\n1.png,bad\n", **{f"{i}.png": png(i) for i in range(4)}})
    r = upload(client, data, classes="good,bad", allow_new_classes="false")
    assert r.status_code == 201, r.text
    assert r.json()["classes"] == ["bad", "good"] and r.json()["counts"]["given"] == 2
    assert published(client) == 1


def test_an_image_over_64_megapixels_is_a_rejected_item_with_its_reason(client: TestClient) -> None:
    data = make_zip({**{f"{i}.png": png(i) for i in range(4)}, "huge.png": png_claiming(11_000, 11_000)})
    r = upload(client, data, spec=SPEC)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["counts"]["items"] == 4
    assert body["rejected"] == [{"name": "huge.png",
                                 "reason": "image is 11000x11000 = 121.0 MP, over the limit of 64 MP"}]


async def test_a_chunked_upload_over_the_limit_stops_being_read_at_the_limit(
    tmp_path: Path, stub_embedder: object
) -> None:
    settings = labeler_settings_for(tmp_path, labeler_max_upload_bytes=1_000_000)
    limit = 1_000_000 + FORM_FIELDS_BYTES
    chunk = 64 << 10
    pulled = 0

    async def body() -> AsyncIterator[bytes]:  # a 30 MB multipart upload, sent chunked (no Content-Length)
        nonlocal pulled
        head = (b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n'
                b"Content-Type: application/zip\r\n\r\n")
        pulled += len(head)
        yield head
        while pulled < 30_000_000:
            pulled += chunk
            yield b"\0" * chunk
        yield b"\r\n--b0undary--\r\n"

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://labeler") as c:
            r = await c.post("/datasets", content=body(),
                             headers={"content-type": "multipart/form-data; boundary=b0undary"})
            assert r.status_code == 413, r.text
            assert f"over the limit of {limit} bytes" in r.json()["detail"]
            assert limit < pulled <= limit + chunk
            assert (await c.get("/datasets")).json() == []
    assert objects_under(settings) == []
    assert dataset_rows(settings) == 0


def test_a_declared_upload_over_the_limit_is_refused_unread(tmp_path: Path, stub_embedder: object) -> None:
    settings = labeler_settings_for(tmp_path, labeler_max_upload_bytes=1_000)
    with TestClient(create_app(settings)) as client:
        r = upload(client, FOUR + b"\0" * 2_000)
        assert r.status_code == 413 and "over the limit of 1000" in r.json()["detail"]
        assert_nothing_written(client, settings)


def test_a_flat_zip_of_two_unlabeled_images_completes_when_people_may_label_one(client: TestClient) -> None:
    # at the default 30 % budget it is refused ("nothing to label", test_labeler_api); at 50 % people
    # label one image and the run completes instead of crashing
    r = upload(client, make_zip({"a.png": png(1), "b.png": png(2)}), options={"label_budget": 0.5})
    assert r.status_code == 201, r.text
    dataset_id = r.json()["dataset_id"]
    record = wait_record(client, dataset_id, lambda rec: bool(rec.get("current_batch")) or rec["state"] == "failed")
    batch = record["current_batch"]
    assert len(batch["item_ids"]) == 1
    r = client.post("/labels", json={"dataset_id": dataset_id, "batch_id": batch["batch_id"],
                                     "labels": {batch["item_ids"][0]: "cat"}})
    assert r.status_code == 202, r.text
    record = wait_record(client, dataset_id, lambda rec: rec["state"] in ("labeled", "failed"))
    assert record["state"] == "labeled"
    assert record["classes"] == ["cat"]
    assert published(client, Topic.DATASET_LABELED) == 1
