"""No label is lost after a 202: the race of a closing label with corrections, history, refusals.

The app runs with its worker (memory bus, fs objects, sqlite docs) behind httpx's ASGI transport,
so many submissions are in flight at once while the worker closes batches. Expectations come from
what the test sent and the ``sequence`` of each 202 (the order the server accepted them in), never
from the labeler's own state.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio
from labeler_testkit import labeler_settings_for, make_zip, two_class_images

from dlforge.labeler.app import create_app
from dlforge.vision.manifest import Manifest

SPEC = {"positive_class": "dark"}
OTHER = {"bright": "dark", "dark": "bright"}
# 60 cells: 6 random test items and a seed of 20 in the first batch (26 items), 6 per batch after,
# people label at most 36
OPTIONS = {"label_budget": 0.6, "seed_fraction": 1 / 3, "batch_fraction": 0.1, "seed": 3}


@dataclass
class Ledger:
    """What the server accepted (the 202s) and refused, as the client saw it."""

    accepted: list[tuple[int, str, str, str]] = field(default_factory=list)  # (sequence, item, label, annotator)
    refused: list[tuple[int, str]] = field(default_factory=list)  # (status, detail)
    sequences: list[int] = field(default_factory=list)  # one per 202

    def expected(self) -> dict[str, list[tuple[str, str]]]:
        """Per item, the changes its history must show: (label, annotator) in acceptance order,
        a repeat of the current label left out."""
        out: dict[str, list[tuple[str, str]]] = {}
        for _, item, label, annotator in sorted(self.accepted):
            changes = out.setdefault(item, [])
            if not changes or changes[-1][0] != label:
                changes.append((label, annotator))
        return out


@pytest_asyncio.fixture
async def client(tmp_path: Path, stub_embedder: object) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(labeler_settings_for(tmp_path))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


async def until(what: str, probe: Callable[[], Awaitable[Any]], *, timeout: float = 60) -> Any:
    """``probe()``'s value once it is truthy; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.02)  # poll interval, not a wait for something not to happen


async def upload(client: httpx.AsyncClient, images: dict[str, tuple[bytes, str]], **fields: Any) -> str:
    form = {k: json.dumps(v) if isinstance(v, dict | list) else str(v) for k, v in fields.items()}
    r = await client.post("/datasets", data=form,
                          files={"file": ("cells.zip", make_zip({n: b for n, (b, _) in images.items()}))})
    assert r.status_code == 201, r.text
    dataset_id: str = r.json()["dataset_id"]
    return dataset_id


async def record_of(client: httpx.AsyncClient, dataset_id: str) -> dict[str, Any]:
    r = await client.get(f"/datasets/{dataset_id}")
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def settled(client: httpx.AsyncClient, dataset_id: str, *, not_batch: str | None = None) -> dict[str, Any]:
    """The record once every accepted label is applied and (``not_batch``) that batch has closed."""

    async def probe() -> dict[str, Any] | None:
        record = await record_of(client, dataset_id)
        if not_batch is not None and record["state"] == "labeling" \
                and (record.get("current_batch") or {}).get("batch_id") == not_batch:
            return None
        if record["state"] not in ("labeling", "labeled"):
            raise AssertionError(f"dataset {dataset_id} is {record['state']}: {record.get('error')}")
        labels = (await client.get(f"/datasets/{dataset_id}/labels")).json()
        return record if labels["pending"] == 0 else None

    result: dict[str, Any] = await until(f"dataset {dataset_id} settled past {not_batch}", probe)
    return result


async def post(client: httpx.AsyncClient, ledger: Ledger, dataset_id: str, batch_id: str, labels: dict[str, str],
               annotator: str) -> httpx.Response:
    r = await client.post("/labels", json={"dataset_id": dataset_id, "batch_id": batch_id, "labels": labels,
                                           "annotator": annotator})
    if r.status_code == 202:
        seq = r.json()["sequence"]
        ledger.sequences.append(seq)
        ledger.accepted += [(seq, item, label, annotator) for item, label in labels.items()]
    else:
        assert 400 <= r.status_code < 500, r.text  # refused before the response, with a reason
        ledger.refused.append((r.status_code, r.json()["detail"]))
    return r


async def staggered(delay: float, request: Awaitable[httpx.Response]) -> httpx.Response:
    """``request`` sent ``delay`` seconds from now: the corrections keep coming while the worker closes the batch."""
    await asyncio.sleep(delay)
    return await request


async def check_labels_match(client: httpx.AsyncClient, dataset_id: str, ledger: Ledger) -> dict[str, str]:
    """Every accepted label is visible, in order, with its history; returns item -> current label."""
    # each 202 took its own place in the log, none skipped
    assert sorted(ledger.sequences) == list(range(1, len(ledger.sequences) + 1))
    expected = ledger.expected()
    got = (await client.get(f"/datasets/{dataset_id}/labels")).json()
    assert got["pending"] == 0
    by_item = {i["item_id"]: i for i in got["items"]}
    assert set(by_item) == set(expected)
    for item, changes in expected.items():
        doc = by_item[item]
        history = doc["history"]
        assert [(h["label"], h["annotator"]) for h in history] == changes, item
        assert [h["previous"] for h in history] == [None, *(label for label, _ in changes[:-1])], item
        assert [h["sequence"] for h in history] == sorted(h["sequence"] for h in history)
        assert (doc["label"], doc["annotator"]) == changes[-1] and doc["corrections"] == len(changes) - 1
    return {item: changes[-1][0] for item, changes in expected.items()}


async def test_a_closing_label_raced_by_60_corrections_loses_none(client: httpx.AsyncClient) -> None:
    images = two_class_images(30)
    truth = {name: label for name, (_, label) in images.items()}
    dataset_id = await upload(client, images, spec=SPEC, options=OPTIONS, classes="bright,dark",
                              allow_new_classes="false")
    await until("the first batch", lambda: _labeling(client, dataset_id))
    ledger = Ledger()
    rounds = 0
    late = 0  # corrections sent for a batch after it had closed
    while True:
        queue = (await client.get(f"/datasets/{dataset_id}/queue")).json()
        if queue["state"] == "labeled":
            break
        batch_id, items = queue["batch_id"], queue["items"]
        assert items, queue
        names = {i["item_id"]: i["name"] for i in items}
        *first, last = sorted(names)
        if rounds == 0:
            assert len(items) == 26
        # all but one item answered and applied: the batch waits for its last label
        r = await post(client, ledger, dataset_id, batch_id, {i: truth[names[i]] for i in first}, "ann")
        assert r.status_code == 202 and r.json()["waiting"] == 1, r.text
        await settled(client, dataset_id)
        # the closing label and 60 corrections of the answered items, all in flight at once
        seen: dict[str, int] = {}
        corrections = []
        for k in range(60):
            item = first[k % len(first)]
            seen[item] = seen.get(item, 0) + 1
            label = OTHER[truth[names[item]]] if seen[item] % 2 else truth[names[item]]
            corrections.append(staggered(k * 0.004, post(client, ledger, dataset_id, batch_id, {item: label},
                                                          f"reviewer-{k % 3}")))
        closing = post(client, ledger, dataset_id, batch_id, {last: truth[names[last]]}, "ann")
        responses = await asyncio.gather(closing, *corrections)
        assert responses[0].status_code == 202, responses[0].text
        record = await settled(client, dataset_id, not_batch=batch_id)
        if record["state"] == "labeling":
            # after the batch closed: corrections of its items still apply (to the next round)
            for item in first[:3]:
                r = await post(client, ledger, dataset_id, batch_id, {item: OTHER[truth[names[item]]]}, "late")
                assert r.status_code == 202, r.text
                late += 1
            await settled(client, dataset_id)
        await check_labels_match(client, dataset_id, ledger)
        rounds += 1
        assert rounds < 10
    record = await settled(client, dataset_id)
    assert record["state"] == "labeled" and rounds >= 2 and late >= 3
    # every refusal came with its reason before its response: only once the labels were final
    assert all(status == 409 and "final" in detail for status, detail in ledger.refused), ledger.refused
    current = await check_labels_match(client, dataset_id, ledger)
    assert record["counts"]["human"] == len(current) <= 36  # distinct items, not submissions
    assert record["classes"] == ["bright", "dark"]
    # the final labels (and the classifier's rows before them) hold the last accepted label of each item
    labeled = Manifest.model_validate(await _object(client, record["labels_key"]))
    people = {i.item_id: i.label for i in labeled.items if i.label_source == "human"}
    assert people == current
    # afterwards a correction is refused before its response and changes nothing
    item, label = next(iter(current.items()))
    r = await post(client, ledger, dataset_id, f"{dataset_id}-r1", {item: OTHER[label]}, "ann")
    assert r.status_code == 409 and "final" in r.json()["detail"]
    assert await check_labels_match(client, dataset_id, ledger) == current


async def test_the_same_item_labeled_twice_keeps_its_history_and_no_stale_class(client: httpx.AsyncClient) -> None:
    images = two_class_images(10)
    truth = {name: label for name, (_, label) in images.items()}
    dataset_id = await upload(client, images, spec=SPEC, options={"label_budget": 0.5, "seed_fraction": 0.3})
    await until("the first batch", lambda: _labeling(client, dataset_id))
    queue = (await client.get(f"/datasets/{dataset_id}/queue")).json()
    names = {i["item_id"]: i["name"] for i in queue["items"]}
    item, *rest = sorted(names)
    ledger = Ledger()
    r = await post(client, ledger, dataset_id, queue["batch_id"], {item: "brite"}, "ann")  # a typo: a new class
    assert r.status_code == 202 and r.json()["new_classes"] == ["brite"]
    await settled(client, dataset_id)
    assert (await record_of(client, dataset_id))["classes"] == ["brite", "dark"]
    r = await post(client, ledger, dataset_id, queue["batch_id"], {item: truth[names[item]]}, "reviewer")
    assert r.status_code == 202 and r.json()["sequence"] == 2
    r = await post(client, ledger, dataset_id, queue["batch_id"], {item: truth[names[item]]}, "ann")  # a repeat
    assert r.status_code == 202
    await settled(client, dataset_id)
    got = (await client.get(f"/datasets/{dataset_id}/labels", params={"item": item})).json()["items"]
    assert len(got) == 1
    assert [(h["label"], h["previous"], h["annotator"]) for h in got[0]["history"]] == [
        ("brite", None, "ann"), (truth[names[item]], "brite", "reviewer")]
    assert got[0]["corrections"] == 1 and got[0]["history"][1]["at"] >= got[0]["history"][0]["at"]
    record = await record_of(client, dataset_id)
    # the typo's class is gone with its only label; the item counts once
    assert record["classes"] == sorted({"dark", truth[names[item]]})
    assert record["counts"]["human"] == 1 and record["counts"]["pending"] == len(rest)


async def test_refusals_come_before_the_response_and_store_nothing(client: httpx.AsyncClient,
                                                                   tmp_path: Path) -> None:
    images = two_class_images(10)
    dataset_id = await upload(client, images, spec=SPEC, classes="bright,dark", allow_new_classes="false",
                              options={"label_budget": 0.5, "seed_fraction": 0.3})
    await until("the first batch", lambda: _labeling(client, dataset_id))
    queue = (await client.get(f"/datasets/{dataset_id}/queue")).json()
    asked = {i["item_id"] for i in queue["items"]}
    manifest = Manifest.model_validate(await _object(client, f"labeler/datasets/{dataset_id}/manifest.json"))
    not_asked = next(i.item_id for i in manifest.items if i.item_id not in asked)
    item = sorted(asked)[0]

    async def send(**kw: Any) -> httpx.Response:
        body = {"dataset_id": dataset_id, "batch_id": queue["batch_id"], "labels": {item: "dark"}} | kw
        return await client.post("/labels", json=body)

    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"dataset_id": "no-such-dataset"}, 404, "no dataset"),
        ({"batch_id": "no-such-batch"}, 404, "no batch"),
        ({"labels": {"no-such-item": "dark"}}, 404, "no item"),
        ({"labels": {not_asked: "dark"}}, 409, "not asked"),
        ({"labels": {item: "da\x07rk"}}, 422, "not a valid class name"),
        ({"labels": {item: "da\u0085rk"}}, 422, "not a valid class name"),
        ({"labels": {item: "a/b"}}, 422, "not a valid class name"),
        ({"labels": {item: "x" * 101}}, 422, "not a valid class name"),
        ({"labels": {item: "cat"}}, 422, "unknown class"),
        ({"labels": {}}, 422, "at least 1 item"),
        ({"annotator": "simulated"}, 422, "reserved"),
        ({"annotator": "eve\x1b[31m"}, 422, "annotator"),
        ({"annotator": ""}, 422, "at least 1 character"),
        ({"labels": {f"i{k}": "dark" for k in range(10_001)}}, 422, "at most 10000 items"),
    ]
    for change, status, words in cases:
        r = await send(**change)
        assert r.status_code == status, (change, r.text)
        assert words and words in json.dumps(r.json()), (change, r.text)
    got = (await client.get(f"/datasets/{dataset_id}/labels")).json()
    assert got == {"dataset_id": dataset_id, "accepting": True, "pending": 0, "items": []}
    assert (await client.get("/datasets/no-such-dataset/labels")).status_code == 404
    r = await send()
    assert r.status_code == 202 and r.json()["sequence"] == 1  # the refusals took no place in the log


async def _labeling(client: httpx.AsyncClient, dataset_id: str) -> bool:
    record = await record_of(client, dataset_id)
    if record["state"] == "failed":
        raise AssertionError(record.get("error"))
    return bool(record["state"] == "labeling")


async def _object(client: httpx.AsyncClient, key: str) -> Any:
    app = client._transport.app  # type: ignore[attr-defined]
    return await asyncio.to_thread(app.state.backends.objects.get_json, key)

