"""Labels under auth: the annotator is the signed-in user, another name is refused, every label is audited.

The labeler runs alone with its worker (memory bus, SQLite documents, the TEST STUB embedder), as in
the split deployment without DLFORGE_AUTH_URL: it checks tokens in the shared document store.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from auth_testkit import StubEmbedder, bearer, create_accounts, flat_zip

from dlforge.common.auth.store import AuthStore
from dlforge.common.docs.sqlite import SqliteDocumentStore
from dlforge.common.settings import CommonSettings
from dlforge.labeler.app import create_app
from dlforge.labeler.settings import LabelerSettings


async def until(what: str, probe: Callable[[], Awaitable[Any]], *, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.02)


async def test_labels_are_the_signed_in_users_and_audited(auth_settings: CommonSettings, tmp_path: Path) -> None:
    tokens = await create_accounts(auth_settings, {"otto": {"default": "operator"}, "lars": {"default": "labeler"},
                                           "pia": {"p": "labeler"}})
    settings = LabelerSettings(**{**auth_settings.model_dump(), "labeler_import_roots": [str(tmp_path / "imports")]})
    app = create_app(settings, embedder=StubEmbedder())
    cells = {f"b{i:02d}.png": 200 for i in range(10)} | {f"d{i:02d}.png": 50 for i in range(10)}
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                                   base_url="http://t") as client:
        made = await client.post("/datasets", headers=bearer(tokens["otto"]),
                                 files={"file": ("cells.zip", flat_zip(cells))},
                                 data={"spec": '{"positive_class": "d"}',
                                       "options": '{"label_budget": 1.0, "seed_fraction": 1.0, "seed": 1}'})
        assert made.status_code == 201, made.text
        dataset_id = made.json()["dataset_id"]

        async def queue() -> dict[str, Any] | None:
            q = (await client.get(f"/datasets/{dataset_id}/queue", headers=bearer(tokens["lars"]))).json()
            return q if q.get("batch_id") and q["items"] else None

        batch = await until("the first batch waits for people", queue)
        items = [i["item_id"] for i in batch["items"]]
        names = {i["item_id"]: i["name"] for i in batch["items"]}

        def body(item: str, **extra: str) -> dict[str, Any]:
            return {"dataset_id": dataset_id, "batch_id": batch["batch_id"],
                    "labels": {item: "b" if names[item].startswith("b") else "d"}, **extra}

        # no annotator given: lars; his own name given: fine; another name: refused, nothing stored
        assert (await client.post("/labels", headers=bearer(tokens["lars"]), json=body(items[0]))).status_code == 202
        assert (await client.post("/labels", headers=bearer(tokens["lars"]),
                                  json=body(items[1], annotator="lars"))).status_code == 202
        forged = await client.post("/labels", headers=bearer(tokens["lars"]), json=body(items[2], annotator="otto"))
        assert forged.status_code == 403 and "not the signed-in user" in forged.json()["detail"]
        # a labeler of another project does not see the dataset
        other = await client.post("/labels", headers=bearer(tokens["pia"]), json=body(items[2]))
        assert other.status_code == 404

        async def applied() -> dict[str, Any] | None:
            got = (await client.get(f"/datasets/{dataset_id}/labels", headers=bearer(tokens["lars"]))).json()
            return got if got["pending"] == 0 and len(got["items"]) == 2 else None

        labels = await until("both labels applied", applied)
        assert {i["item_id"]: i["annotator"] for i in labels["items"]} == {items[0]: "lars", items[1]: "lars"}

    docs = SqliteDocumentStore(auth_settings.docs.removeprefix("sqlite:///"))
    entries = list(reversed(await AuthStore(docs).audit_entries(limit=100)))
    await docs.close()
    label_entries = [e for e in entries if e["route"] == "POST /labels"]
    assert [(e["who"], e["status"]) for e in label_entries] == [("lars", 202), ("lars", 202), ("lars", 403),
                                                               ("pia", 404)]
    assert [e["detail"]["labels"] for e in label_entries[:2]] == [body(items[0])["labels"], body(items[1])["labels"]]
    assert [e["detail"]["label_count"] for e in label_entries[:2]] == [1, 1]
    assert label_entries[0]["detail"]["labels_sha256"] == hashlib.sha256(
        json.dumps(body(items[0])["labels"], sort_keys=True).encode()).hexdigest()
    assert all(e["detail"]["annotator"] == "lars" and e["detail"]["dataset_id"] == dataset_id
               for e in label_entries[:2])
    assert entries[0]["who"] == "otto" and entries[0]["route"] == "POST /datasets" and entries[0]["status"] == 201
