"""DocumentStore contract: one suite, run against SQLite and (when a server is given) MongoDB."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dlforge.common.backends import open_docs
from dlforge.common.docs import DocumentStore
from dlforge.common.errors import Conflict, InvalidInput, NotFound


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"), pytest.param("mongo", id="mongo",
                                                                          marks=pytest.mark.mongo)])
async def docs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DocumentStore]:
    url = f"sqlite:///{tmp_path}/docs.db" if request.param == "sqlite" else str(request.getfixturevalue("mongo_url"))
    store = open_docs(url)
    await store.ping()
    yield store
    await store.close()


async def test_insert_then_get(docs: DocumentStore) -> None:
    stored = await docs.insert("runs", {"_id": "r1", "name": "first", "stats": {"n": 3}, "tags": ["a", "b"]})
    assert stored == {"_id": "r1", "_version": 1, "name": "first", "stats": {"n": 3}, "tags": ["a", "b"]}
    assert await docs.get("runs", "r1") == stored
    assert await docs.get("runs", "missing") is None
    assert await docs.get("other_collection", "r1") is None


async def test_a_given_version_is_ignored_on_insert(docs: DocumentStore) -> None:
    stored = await docs.insert("runs", {"_id": "r1", "_version": 7, "x": 1})
    assert stored["_version"] == 1


async def test_duplicate_id_is_a_conflict(docs: DocumentStore) -> None:
    await docs.insert("runs", {"_id": "r1", "v": 1})
    with pytest.raises(Conflict):
        await docs.insert("runs", {"_id": "r1", "v": 2})
    assert (await docs.get("runs", "r1"))["v"] == 1  # type: ignore[index]


async def test_insert_needs_a_string_id(docs: DocumentStore) -> None:
    with pytest.raises(InvalidInput):
        await docs.insert("runs", {"name": "no id"})
    with pytest.raises(InvalidInput):
        await docs.insert("runs", {"_id": 42})


async def test_update_with_optimistic_concurrency(docs: DocumentStore) -> None:
    await docs.insert("runs", {"_id": "r1", "state": "new", "keep": "me", "meta": {"a": 1}})
    v2 = await docs.update("runs", "r1", {"state": "running", "meta": {"b": 2}, "note": None}, expected_version=1)
    assert v2["_version"] == 2
    assert v2["state"] == "running" and v2["keep"] == "me" and v2["meta"] == {"b": 2} and v2["note"] is None
    assert await docs.get("runs", "r1") == v2

    with pytest.raises(Conflict):  # a writer that read version 1 lost the race
        await docs.update("runs", "r1", {"state": "stale"}, expected_version=1)
    assert (await docs.get("runs", "r1"))["state"] == "running"  # type: ignore[index]

    v3 = await docs.update("runs", "r1", {"state": "done"}, expected_version=2)
    assert v3["_version"] == 3 and v3["state"] == "done"
    with pytest.raises(NotFound):
        await docs.update("runs", "missing", {"state": "x"}, expected_version=1)


async def test_update_cannot_change_id_or_version(docs: DocumentStore) -> None:
    await docs.insert("runs", {"_id": "r1", "x": 1})
    doc = await docs.update("runs", "r1", {"_id": "r2", "_version": 99, "x": 2}, expected_version=1)
    assert (doc["_id"], doc["_version"], doc["x"]) == ("r1", 2, 2)
    assert await docs.get("runs", "r2") is None


async def test_update_of_fields_with_odd_names(docs: DocumentStore) -> None:
    await docs.insert("runs", {"_id": "r1", "x": 1})
    doc = await docs.update("runs", "r1", {"with-dash": 1, "with space": "s"}, expected_version=1)
    assert (await docs.get("runs", "r1")) == doc
    assert doc["with-dash"] == 1 and doc["with space"] == "s" and doc["_version"] == 2


async def test_concurrent_updates_one_wins(docs: DocumentStore) -> None:
    await docs.insert("counters", {"_id": "c", "n": 0})
    results = await asyncio.gather(
        *(docs.update("counters", "c", {"n": i}, expected_version=1) for i in range(1, 6)), return_exceptions=True
    )
    assert sum(1 for r in results if isinstance(r, dict)) == 1
    assert sum(1 for r in results if isinstance(r, Conflict)) == 4
    assert (await docs.get("counters", "c"))["_version"] == 2  # type: ignore[index]


async def _seed(docs: DocumentStore) -> None:
    rows = [
        {"_id": "i1", "dataset": "d1", "label": "defect", "score": 0.9, "meta": {"split": "train", "src": "human"}},
        {"_id": "i2", "dataset": "d1", "label": "good", "score": 0.2, "meta": {"split": "val", "src": "auto"}},
        {"_id": "i3", "dataset": "d1", "label": "defect", "score": 0.5, "meta": {"split": "train", "src": "auto"}},
        {"_id": "i4", "dataset": "d2", "label": "defect", "score": 0.7, "meta": {"split": "train", "src": "human"}},
        {"_id": "i5", "dataset": "d1", "label": None, "score": 0.1, "meta": {"split": "test", "src": "human"},
         "flag": True},
    ]
    for row in rows:
        await docs.insert("items", row)


async def test_find_by_equality_including_nested_fields(docs: DocumentStore) -> None:
    await _seed(docs)
    ids = lambda found: sorted(d["_id"] for d in found)  # noqa: E731
    assert ids(await docs.find("items", {"dataset": "d1"})) == ["i1", "i2", "i3", "i5"]
    assert ids(await docs.find("items", {"dataset": "d1", "label": "defect"})) == ["i1", "i3"]
    assert ids(await docs.find("items", {"meta.split": "train"})) == ["i1", "i3", "i4"]
    assert ids(await docs.find("items", {"meta.split": "train", "meta.src": "human"})) == ["i1", "i4"]
    assert ids(await docs.find("items", {"label": None})) == ["i5"]
    assert ids(await docs.find("items", {"flag": True})) == ["i5"]
    assert ids(await docs.find("items", {"_id": "i2"})) == ["i2"]
    assert ids(await docs.find("items", {"dataset": "nope"})) == []
    assert ids(await docs.find("items")) == ["i1", "i2", "i3", "i4", "i5"]
    assert await docs.find("empty_collection", {"x": 1}) == []
    found = (await docs.find("items", {"_id": "i1"}))[0]
    assert found["_version"] == 1 and found["meta"] == {"split": "train", "src": "human"}


async def test_find_sorts_and_limits(docs: DocumentStore) -> None:
    await _seed(docs)
    by_score = await docs.find("items", {"dataset": "d1"}, sort=[("score", -1)])
    assert [d["_id"] for d in by_score] == ["i1", "i3", "i2", "i5"]
    top2 = await docs.find("items", sort=[("score", 1)], limit=2)
    assert [d["_id"] for d in top2] == ["i5", "i2"]
    two_keys = await docs.find("items", {"meta.split": "train"}, sort=[("label", 1), ("_id", -1)])
    assert [d["_id"] for d in two_keys] == ["i4", "i3", "i1"]
    nested = await docs.find("items", sort=[("meta.split", 1), ("_id", 1)], limit=3)
    assert [d["_id"] for d in nested] == ["i5", "i1", "i3"]


async def test_find_refuses_non_scalar_filters_and_bad_fields(docs: DocumentStore) -> None:
    with pytest.raises(InvalidInput):
        await docs.find("items", {"meta": {"split": "train"}})
    with pytest.raises(InvalidInput):
        await docs.find("items", {"x') OR 1=1 --": 1})
    with pytest.raises(InvalidInput):
        await docs.find("bad name!", {})


async def test_unique_keys_refuse_a_second_document(docs: DocumentStore) -> None:
    await docs.ensure_unique("markers", ["consumer", "event_id"])
    await docs.ensure_unique("markers", ["consumer", "event_id"])  # idempotent
    await docs.insert("markers", {"_id": "m1", "consumer": "a", "event_id": "e1"})
    await docs.insert("markers", {"_id": "m2", "consumer": "b", "event_id": "e1"})  # other consumer: fine
    with pytest.raises(Conflict):
        await docs.insert("markers", {"_id": "m3", "consumer": "a", "event_id": "e1"})
    await docs.insert("markers", {"_id": "m4", "consumer": "a", "event_id": "e2"})
    with pytest.raises(Conflict):  # an update may not create a duplicate either
        await docs.update("markers", "m4", {"event_id": "e1"}, expected_version=1)
    assert (await docs.get("markers", "m4"))["event_id"] == "e2"  # type: ignore[index]


async def test_unique_key_on_a_nested_field(docs: DocumentStore) -> None:
    await docs.ensure_unique("files", ["meta.sha"])
    await docs.insert("files", {"_id": "f1", "meta": {"sha": "abc"}})
    with pytest.raises(Conflict):
        await docs.insert("files", {"_id": "f2", "meta": {"sha": "abc"}})


async def test_unique_key_over_existing_duplicates_is_a_conflict(docs: DocumentStore) -> None:
    await docs.insert("dups", {"_id": "a", "k": 1})
    await docs.insert("dups", {"_id": "b", "k": 1})
    with pytest.raises(Conflict):
        await docs.ensure_unique("dups", ["k"])


async def test_upsert_inserts_then_overwrites(docs: DocumentStore) -> None:
    first = await docs.upsert("runs", {"_id": "r1", "state": "new", "n": 1})
    assert first["_version"] == 1 and first["state"] == "new"
    second = await docs.upsert("runs", {"_id": "r1", "state": "done", "extra": [1, 2]})
    assert second["_version"] == 2 and second["state"] == "done" and second["extra"] == [1, 2]
    assert second["n"] == 1  # fields not given are kept
    assert await docs.get("runs", "r1") == second


async def test_concurrent_upserts_all_land(docs: DocumentStore) -> None:
    results = await asyncio.gather(*(docs.upsert("runs", {"_id": "r", f"k{i}": i}) for i in range(5)))
    final = await docs.get("runs", "r")
    assert final is not None and final["_version"] == 5
    assert all(final[f"k{i}"] == i for i in range(5))
    assert sorted(r["_version"] for r in results) == [1, 2, 3, 4, 5]


async def test_delete(docs: DocumentStore) -> None:
    await docs.insert("runs", {"_id": "r1"})
    await docs.delete("runs", "r1")
    assert await docs.get("runs", "r1") is None
    await docs.delete("runs", "r1")  # gone already: no error
    await docs.insert("runs", {"_id": "r1", "again": True})  # the id is free again


async def test_collection_names_are_checked(docs: DocumentStore) -> None:
    with pytest.raises(InvalidInput):
        await docs.insert("drop table;", {"_id": "x"})
    with pytest.raises(InvalidInput):
        await docs.get("", "x")
