"""A rerun: a new dataset and run on the stored images of an earlier (zip) upload, with changed options."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from labeler_testkit import labeler_settings_for, make_zip, png

from dlforge.common.events import DatasetUploaded, Topic, decode
from dlforge.labeler.app import create_app
from dlforge.labeler.embeddings import Embedder
from dlforge.labeler.settings import LabelerSettings
from dlforge.vision.manifest import Manifest


@pytest.fixture
def settings(tmp_path: Path) -> LabelerSettings:
    return labeler_settings_for(tmp_path)


@pytest.fixture
def client(settings: LabelerSettings, stub_embedder: Embedder) -> Iterator[TestClient]:
    with TestClient(create_app(settings, embedder=stub_embedder)) as c:
        yield c


def _manifest(client: TestClient, dataset_id: str) -> Manifest:
    objects = client.app.state.backends.objects  # type: ignore[attr-defined]
    return Manifest.model_validate(objects.get_json(f"labeler/datasets/{dataset_id}/manifest.json"))


def _uploaded_events(client: TestClient) -> list[Any]:
    """Every dataset.uploaded on the bus (read by a group of this test's own, on the app's loop)."""
    bus = client.app.state.backends.bus  # type: ignore[attr-defined]

    async def read() -> list[Any]:
        sub = await bus.subscribe(group="test-rerun-reader", topics=[Topic.DATASET_UPLOADED])
        out = []
        while (d := await sub.get(timeout=0.2)) is not None:
            out.append(decode(d.value))
            await sub.commit(d)
        await sub.close()
        return out

    assert client.portal is not None
    return client.portal.call(read)


def test_a_rerun_copies_the_images_and_changes_the_options(client: TestClient) -> None:
    files = {f"bright/b{i}.png": png(100 + i, level=190) for i in range(4)}
    files.update({f"dark/d{i}.png": png(200 + i, level=60) for i in range(4)})
    files["u0.png"] = png(300, level=120)  # one image without a label
    r = client.post("/datasets", files={"file": ("data.zip", make_zip(files), "application/zip")},
                    data={"spec": json.dumps({"positive_class": "dark", "min_recall": 0.9}),
                          "options": json.dumps({"seed": 3, "label_budget": 0.5}), "run_id": "run-a",
                          "dataset_id": "ds-a", "name": "cells"})
    assert r.status_code == 201, r.text
    first = _manifest(client, "ds-a")

    r = client.post("/runs/run-a/rerun", json={"options": {"hpo_trials": 7}, "spec": {"min_recall": 0.95},
                                               "run_id": "run-b", "dataset_id": "ds-b"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["run_id"] == "run-b" and body["dataset_id"] == "ds-b" and body["name"] == "cells"
    assert body["counts"]["items"] == 9 and body["counts"]["given"] == 8
    second = _manifest(client, "ds-b")
    # the same images (by content), each under the new dataset's own key, with the given labels
    assert sorted((i.name, i.sha256, i.label) for i in second.items) == sorted(
        (i.name, i.sha256, i.label) for i in first.items)
    assert all(i.key.startswith("labeler/datasets/ds-b/") for i in second.items)
    objects = client.app.state.backends.objects  # type: ignore[attr-defined]
    for a, b in zip(sorted(first.items, key=lambda i: i.name), sorted(second.items, key=lambda i: i.name),
                    strict=True):
        assert objects.get_bytes(a.key) == objects.get_bytes(b.key)
    record = client.get("/datasets/ds-b").json()
    assert record["run_id"] == "run-b"
    # the changed fields changed, the others are the earlier run's
    uploaded = [e for e in _uploaded_events(client) if e.run_id == "run-b"]
    assert len(uploaded) == 1
    p = uploaded[0].payload
    assert isinstance(p, DatasetUploaded)
    assert p.options.hpo_trials == 7 and p.options.seed == 3 and p.options.label_budget == 0.5
    assert p.spec.min_recall == 0.95 and p.spec.positive_class == "dark"

    # through the dataset too; honest refusals
    r = client.post("/datasets/ds-a/rerun", json={})
    assert r.status_code == 201 and r.json()["dataset_id"] not in ("ds-a", "ds-b")
    assert client.post("/runs/nope/rerun", json={}).status_code == 404
    assert client.post("/datasets/nope/rerun", json={}).status_code == 404
    r = client.post("/runs/run-a/rerun", json={"options": {"hpo_trials": 100000}})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "options", "hpo_trials"]
    assert client.post("/runs/run-a/rerun", json={"options": {"no_such_option": 1}}).status_code == 422
    assert client.post("/runs/run-a/rerun", json={"dataset_id": "ds-b"}).status_code == 409  # taken
    assert client.post("/runs/run-a/rerun", json={"colour": "red"}).status_code == 422
