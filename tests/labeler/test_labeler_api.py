"""The labeler's REST API through FastAPI's TestClient, with the app lifespan on memory/fs/sqlite."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from labeler_testkit import labeler_settings_for, lying_zip, make_zip, png, two_class_images, zip_with_symlink

from dlforge.common.objects.fs import FsObjectStore
from dlforge.labeler.app import create_app
from dlforge.labeler.embeddings import Embedder
from dlforge.labeler.settings import LabelerSettings
from dlforge.vision.manifest import Manifest

SPEC = {"positive_class": "dark", "min_recall": 0.9}


@pytest.fixture
def settings(tmp_path: Path) -> LabelerSettings:
    return labeler_settings_for(tmp_path)


@pytest.fixture
def client(settings: LabelerSettings, stub_embedder: Embedder) -> Iterator[TestClient]:
    with TestClient(create_app(settings, embedder=stub_embedder)) as c:
        yield c


def objects_under(settings: LabelerSettings, prefix: str = "labeler/") -> list[str]:
    return [o.key for o in FsObjectStore(settings.objects.removeprefix("file://")).list(prefix)]


def dataset_rows(settings: LabelerSettings) -> int:
    path = settings.docs.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
        return sum(db.execute(f'select count(*) from "{t}"').fetchone()[0] for t in tables if "labeler" in t)


def upload(client: TestClient, data: bytes, **fields: Any) -> Any:
    form = {k: json.dumps(v) if isinstance(v, dict | list) else str(v) for k, v in fields.items()}
    return client.post("/datasets", files={"file": ("data.zip", data, "application/zip")}, data=form)


def wait_record(client: TestClient, dataset_id: str, done: Callable[[dict[str, Any]], bool], *,
                timeout: float = 60) -> dict[str, Any]:
    """The dataset's record once ``done(record)`` holds; fails when it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        record: dict[str, Any] = client.get(f"/datasets/{dataset_id}").json()
        if done(record):
            return record
        if time.monotonic() >= deadline:
            raise AssertionError(f"dataset {dataset_id}: condition not reached in {timeout} s (state "
                                 f"{record['state']})")
        time.sleep(0.05)  # poll interval, not a wait for something not to happen


def wait_state(client: TestClient, dataset_id: str, states: set[str], timeout: float = 60) -> dict[str, Any]:
    return wait_record(client, dataset_id, lambda r: r["state"] in states, timeout=timeout)


def test_zip_upload_created_with_rejected_and_duplicates(client: TestClient, settings: LabelerSettings) -> None:
    same = png(3)
    data = make_zip({"cats/a.png": png(1), "cats/b.png": png(2), "dogs/c.png": same, "dogs/c2.png": same,
                     "dogs/broken.png": b"\x89PNG\r\n\x1a\nbroken", "dogs/readme.txt": b"text"})
    r = upload(client, data, spec=SPEC, options={"seed": 3}, run_id="run-1", name="pets")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["run_id"] == "run-1" and body["name"] == "pets" and body["layout"] == "class_folders"
    assert body["counts"]["items"] == 3 and body["counts"]["given"] == 3
    assert body["counts"]["rejected"] == 2 and body["counts"]["duplicates"] == 1
    assert sorted(x["name"] for x in body["rejected"]) == ["dogs/broken.png", "dogs/readme.txt"]
    assert body["duplicates"] == [{"name": "dogs/c2.png", "duplicate_of": "dogs/c.png"}]
    assert body["classes"] == ["cats", "dogs"]
    dataset_id = body["dataset_id"]
    keys = objects_under(settings)
    assert f"labeler/datasets/{dataset_id}/manifest.json" in keys
    assert len([k for k in keys if "/items/" in k]) == 3
    record = client.get(f"/datasets/{dataset_id}").json()
    assert record["run_id"] == "run-1" and record["options"]["seed"] == 3
    assert sorted(x["name"] for x in record["rejected"]) == ["dogs/broken.png", "dogs/readme.txt"]
    assert "human_labels" not in record and "splits" not in record
    listed = client.get("/datasets").json()
    assert [d["dataset_id"] for d in listed] == [dataset_id]


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (make_zip({"a.png": png(1), "../evil.png": png(2)}), 422, "escape"),
        (make_zip({"a.png": png(1), "/abs/evil.png": png(2)}), 422, "absolute path"),
        (zip_with_symlink("link.png", "/etc/passwd", {"a.png": png(1)}), 422, "symlink"),
        (make_zip({"a.png": png(1), "big.png": b"\0" * 200_001}), 413, "per-file limit"),
        (lying_zip("bomb.png", 3_000_000, declared=500, extra={"a.png": png(1)}), 413, "bomb.png"),
        (make_zip({f"{i}.png": png(i) for i in range(201)}), 413, "entries"),
        (png(1), 415, "not a zip"),
        (make_zip({"notes.txt": b"nothing"}), 422, "empty"),
        (make_zip({"labels.csv": b"file,label\nghost.png,x\n", "a.png": png(1)}), 422, "ghost.png"),
        (make_zip({"labels.csv": b"label,score\nx,1\n", "a.png": png(1)}), 422, "no file column"),
        # two unlabeled images at the default 30 % budget: floor(0.6) = 0 labels people could give
        (make_zip({"a.png": png(1), "b.png": png(2)}), 422, "nothing to label"),
    ],
    ids=["traversal", "absolute", "symlink", "oversize", "bomb", "entries", "not-zip", "empty", "csv-missing",
         "csv-no-file-column", "nothing-to-label"],
)
def test_refusals_write_nothing(client: TestClient, settings: LabelerSettings, data: bytes, status: int,
                                words: str) -> None:
    r = upload(client, data, spec=SPEC)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert objects_under(settings) == []
    assert dataset_rows(settings) == 0
    assert client.get("/datasets").json() == []


def test_request_validation(client: TestClient, settings: LabelerSettings, tmp_path: Path) -> None:
    data = make_zip({f"{i}.png": png(i) for i in range(4)})  # 4 unlabeled: a 30 % budget asks 1
    r = upload(client, data, spec={"min_recall": 3})
    assert r.status_code == 422 and r.json()["errors"]
    r = upload(client, data, run_id="bad id!")
    assert r.status_code == 422
    r = client.post("/datasets", content=b"raw", headers={"content-type": "application/octet-stream"})
    assert r.status_code == 415
    r = client.post("/datasets", json={"spec": SPEC})
    assert r.status_code == 422 and "exactly one" in r.json()["detail"]
    assert upload(client, data, dataset_id="fixed").status_code == 201
    r = upload(client, make_zip({f"{i}.png": png(10 + i) for i in range(4)}), dataset_id="fixed")
    assert r.status_code == 409
    assert len([k for k in objects_under(settings) if "/items/" in k]) == 4  # the first upload's only


def test_folder_import_inside_and_outside_the_roots(client: TestClient, settings: LabelerSettings,
                                                   tmp_path: Path) -> None:
    ds = tmp_path / "imports" / "cells"
    ds.mkdir(parents=True)
    for i in range(4):
        (ds / f"c{i}.png").write_bytes(png(10 + i))
    (ds / "labels.csv").write_text("file,label\nc0.png,good\nc1.png,\nc2.png,defect\n")
    r = client.post("/datasets", json={"folder": str(ds), "spec": SPEC})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["layout"] == "csv" and body["counts"]["items"] == 4 and body["counts"]["given"] == 2
    assert body["name"] == "cells"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "a.png").write_bytes(png(1))
    r = client.post("/datasets", json={"folder": str(outside), "spec": SPEC})
    assert r.status_code == 403
    r = client.post("/datasets", data={"folder": str(ds / ".." / ".." / "elsewhere")})
    assert r.status_code == 403


def test_similar_returns_the_item_itself_first(client: TestClient) -> None:
    images = two_class_images(12)
    r = upload(client, make_zip({n: b for n, (b, _) in images.items()}), spec=SPEC)
    assert r.status_code == 201, r.text
    dataset_id = r.json()["dataset_id"]
    wait_state(client, dataset_id, {"labeling"})
    manifest = Manifest.model_validate(client.app.state.backends.objects.get_json(  # type: ignore[attr-defined]
        r.json()["manifest_key"]))
    first = manifest.items[0]
    r = client.get(f"/datasets/{dataset_id}/similar", params={"item": first.item_id, "k": 5})
    assert r.status_code == 200, r.text
    hits = r.json()["neighbours"]
    assert len(hits) == 5 and hits[0]["item_id"] == first.item_id and hits[0]["similarity"] == pytest.approx(1.0)
    assert hits[0]["distance"] == pytest.approx(0.0, abs=1e-3)
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    truth = {n: label for n, (_, label) in images.items()}
    assert all(truth[h["name"]] == truth[first.name] for h in hits[1:])  # neighbours share the class
    by_name = client.get(f"/datasets/{dataset_id}/similar", params={"item": first.name, "k": 2}).json()
    assert by_name["item_id"] == first.item_id
    assert client.get(f"/datasets/{dataset_id}/similar", params={"item": "nope"}).status_code == 404
    assert client.get(f"/datasets/{dataset_id}/similar", params={"item": first.item_id, "k": 0}).status_code == 422
    assert client.get(f"/datasets/{dataset_id}/similar",
                      params={"item": first.item_id, "k": 5000}).status_code == 422
    assert client.get(f"/datasets/{dataset_id}/similar", params={"k": 3}).status_code == 422
    assert client.get("/datasets/unknown/similar", params={"item": first.item_id}).status_code == 404


def test_people_label_through_the_queue_until_the_dataset_is_labeled(client: TestClient) -> None:
    images = two_class_images(20)
    truth = {n: label for n, (_, label) in images.items()}
    r = upload(client, make_zip({n: b for n, (b, _) in images.items()}), spec=SPEC,
               options={"label_budget": 0.5, "target_confidence": 0.9, "seed_fraction": 0.1,
                        "batch_fraction": 0.05})
    dataset_id = r.json()["dataset_id"]
    record = wait_state(client, dataset_id, {"labeling"})
    assert record["classes"] == ["dark"]  # the spec's positive class is known before any label
    rounds = 0
    while record["state"] == "labeling":
        queue = client.get(f"/datasets/{dataset_id}/queue").json()
        assert queue["items"], queue
        batch_id = queue["batch_id"]
        for item in queue["items"]:
            image = client.get(item["image_url"])
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        if rounds == 0:
            reasons = {i["reason"] for i in queue["items"]}
            assert reasons == {"test", "val", "seed"}
            assert all(i["split"] == "test" for i in queue["items"] if i["reason"] == "test")
            assert all(i["split"] == "val" for i in queue["items"] if i["reason"] == "val")
            first, rest = queue["items"][:1], queue["items"][1:]
            # a partial answer keeps the batch open
            r = client.post("/labels", json={"dataset_id": dataset_id, "batch_id": batch_id,
                                             "labels": {i["item_id"]: truth[i["name"]] for i in first}})
            assert r.status_code == 202 and r.json()["waiting"] == len(rest)
            queue["items"] = rest
        r = client.post("/labels", json={"dataset_id": dataset_id, "batch_id": batch_id, "annotator": "ann",
                                         "labels": {i["item_id"]: truth[i["name"]] for i in queue["items"]}})
        assert r.status_code == 202, r.text
        rounds += 1
        # the answered batch is closed: the next one is open, or the dataset is labeled
        record = wait_record(client, dataset_id, lambda r, b=batch_id: r["state"] == "labeled"
                             or (r.get("current_batch") or {}).get("batch_id") != b, timeout=30)
    assert record["state"] == "labeled"
    counts = record["counts"]
    assert counts["human"] <= 20  # budget 0.5 of 40
    # 40 items: far too few people-labeled representative items for a 2 % guarantee, so nothing is
    # auto-labeled and every other item waits for people
    assert counts["auto"] == 0 and counts["needs_review"] == 40 - counts["human"] > 0
    assert record["result"]["needs_review"] == counts["needs_review"]
    assert record["result"]["auto_label_coverage"] == 0.0 and record["result"]["auto_label_threshold"] is None
    assert record["classes"] == ["bright", "dark"]
    assert record["annotators"] == ["ann", "human"]
    assert len(record["rounds"]) == rounds and record["result"]["stop_reason"] in ("confident", "budget")
    labeled = Manifest.model_validate(client.app.state.backends.objects.get_json(  # type: ignore[attr-defined]
        record["labels_key"]))
    assert all(i.label_source in ("human", "needs_review") and i.split and i.confidence for i in labeled.items)
    assert all(i.label == truth[i.name] for i in labeled.items if i.label_source == "human")
    assert all(i.label is None for i in labeled.items if i.label_source == "needs_review")
    assert all(i.label_source == "human" for i in labeled.items if i.split == "test")
    queue = client.get(f"/datasets/{dataset_id}/queue").json()
    assert queue["items"] == [] and queue["state"] == "labeled"
    review = client.get(f"/datasets/{dataset_id}/review", params={"limit": 5}).json()
    assert review["needs_review"] == counts["needs_review"] and len(review["items"]) == 5
    expected = {i.item_id for i in labeled.items if i.label_source == "needs_review"}
    assert {i["item_id"] for i in review["items"]} <= expected
    confidences = [i["confidence"] for i in review["items"]]
    assert confidences == sorted(confidences)
    assert client.get(review["items"][0]["image_url"]).status_code == 200
    assert review["warnings"] and "need review" in review["warnings"][-1]
    assert client.get(f"/datasets/{dataset_id}/review", params={"limit": 0}).status_code == 422


def test_queue_shows_the_rounds_guess_and_the_budget(client: TestClient) -> None:
    images = two_class_images(20)  # 40 items, 'bright' and 'dark' far apart
    truth = {n: label for n, (_, label) in images.items()}
    r = upload(client, make_zip({n: b for n, (b, _) in images.items()}), spec=SPEC,
               options={"label_budget": 0.5, "seed_fraction": 0.1, "batch_fraction": 0.1})
    dataset_id = r.json()["dataset_id"]
    wait_state(client, dataset_id, {"labeling"})

    def queue_when(done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while not done(q := client.get(f"/datasets/{dataset_id}/queue").json()):
            assert time.monotonic() < deadline, q
            time.sleep(0.05)  # poll interval
        return q

    seed = client.get(f"/datasets/{dataset_id}/queue").json()
    assert seed["round"] == 1 and seed["items"] and seed["run_id"] == r.json()["run_id"]
    # the seed round is asked before any classifier: no guesses
    assert all(i["guess"] is None and i["confidence"] is None for i in seed["items"])
    assert seed["budget"] == {"labeled": 0, "total": 20}  # floor(0.5 * 40)
    first = seed["items"][0]
    r = client.post("/labels", json={"dataset_id": dataset_id, "batch_id": seed["batch_id"],
                                     "labels": {first["item_id"]: truth[first["name"]]}})
    assert r.status_code == 202
    queue_when(lambda q: q["budget"]["labeled"] == 1)
    rest = {i["item_id"]: truth[i["name"]] for i in seed["items"][1:]}
    r = client.post("/labels", json={"dataset_id": dataset_id, "batch_id": seed["batch_id"], "labels": rest})
    assert r.status_code == 202
    asked = queue_when(lambda q: q["round"] == 2 and bool(q["items"]))
    assert asked["budget"] == {"labeled": len(seed["items"]), "total": 20}
    items = asked["items"]
    assert all(i["guess"] in ("bright", "dark") for i in items), items
    # two classes: the predicted class has a calibrated probability of at least one half
    assert all(0.5 <= i["confidence"] <= 1.0 for i in items), items
    # the classes are far apart: the classifier fitted on the seed round predicts every item's truth
    assert [i["guess"] for i in items] == [truth[i["name"]] for i in items]
    # the guesses are stored with the batch: an answer to one item leaves the others' as they were
    r = client.post("/labels", json={"dataset_id": dataset_id, "batch_id": asked["batch_id"],
                                     "labels": {items[0]["item_id"]: truth[items[0]["name"]]}})
    assert r.status_code == 202
    later = queue_when(lambda q: len(q["items"]) == len(items) - 1)
    assert later["items"] == items[1:]
    assert later["budget"]["labeled"] == len(seed["items"]) + 1
    record = client.get(f"/datasets/{dataset_id}").json()
    assert "guesses" not in record["current_batch"]  # the record view stays as it was: the queue shows them


def test_no_guess_while_people_used_one_class_only(client: TestClient) -> None:
    images = two_class_images(20)
    r = upload(client, make_zip({n: b for n, (b, _) in images.items()}), spec=SPEC,
               options={"label_budget": 0.5, "seed_fraction": 0.1, "batch_fraction": 0.1})
    dataset_id = r.json()["dataset_id"]
    wait_state(client, dataset_id, {"labeling"})
    seed = client.get(f"/datasets/{dataset_id}/queue").json()
    # every seed item called 'dark': a classifier of one class would "predict" it with certainty 1
    r = client.post("/labels", json={"dataset_id": dataset_id, "batch_id": seed["batch_id"],
                                     "labels": {i["item_id"]: "dark" for i in seed["items"]}})
    assert r.status_code == 202
    record = wait_record(client, dataset_id, lambda rec: (rec.get("current_batch") or {}).get("round") == 2)
    assert record["classes"] == ["dark"]
    asked = client.get(f"/datasets/{dataset_id}/queue").json()
    assert asked["round"] == 2 and asked["items"]
    assert all(i["guess"] is None and i["confidence"] is None for i in asked["items"]), asked["items"]


def test_post_labels_refusals(client: TestClient) -> None:
    images = two_class_images(10)
    r = upload(client, make_zip({n: b for n, (b, _) in images.items()}), spec=SPEC, classes="bright,dark",
               allow_new_classes="false")
    assert r.json()["classes"] == ["bright", "dark"]
    dataset_id = r.json()["dataset_id"]
    wait_state(client, dataset_id, {"labeling"})
    queue = client.get(f"/datasets/{dataset_id}/queue").json()
    item = queue["items"][0]["item_id"]
    batch = queue["batch_id"]
    r = client.get(f"/datasets/{dataset_id}/review")
    assert r.status_code == 409 and "not labeled yet" in r.text

    def post(**kw: Any) -> Any:
        body = {"dataset_id": dataset_id, "batch_id": batch, "labels": {item: "dark"}} | kw
        return client.post("/labels", json=body)

    assert post(dataset_id="nope").status_code == 404
    r = post(batch_id="old-batch")
    assert r.status_code == 404 and "no batch 'old-batch'" in r.json()["detail"]
    r = post(labels={"not-an-item": "dark"})
    assert r.status_code == 404 and "no item(s) 'not-an-item'" in r.json()["detail"]
    r = post(labels={item: "cat"})
    assert r.status_code == 422 and "unknown class" in r.json()["detail"]
    assert post(labels={}).status_code == 422
    assert post(annotator="simulated").status_code == 422
    assert post(extra=1).status_code == 422
    assert post().status_code == 202


def test_a_failure_after_writing_removes_everything(settings: LabelerSettings, stub_embedder: Embedder) -> None:
    with TestClient(create_app(settings, embedder=stub_embedder), raise_server_exceptions=False) as client:
        backends = client.app.state.backends  # type: ignore[attr-defined]

        async def broken_publish(event: object) -> None:
            raise ConnectionError("the bus is down")

        backends.publish = broken_publish
        r = upload(client, make_zip({f"{i}.png": png(i) for i in range(4)}), spec=SPEC)
        assert r.status_code == 500
        assert objects_under(settings) == []
        assert client.get("/datasets").json() == []
