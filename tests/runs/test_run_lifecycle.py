"""Cancelling and deleting runs through the API: every service stops, then forgets the run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from dlforge.common import runs
from dlforge.common.app import ServicePart, create_app
from dlforge.common.events import DatasetLabeled, DatasetUploaded, Event, Spec, Topic
from dlforge.common.runtime import Backends, HandlerContext, Outcome, Service
from dlforge.common.settings import load_settings


def _uploaded(run_id: str = "r1") -> Event:
    return Event.new(DatasetUploaded(dataset_id="d1", name="cells", item_count=10, classes=["a", "b"],
                                     labeled_count=0, rejected_count=0, duplicate_count=0,
                                     manifest_key="labeler/d1/manifest.json", spec=Spec()), run_id=run_id)


def _labeled(run_id: str = "r1") -> Event:
    return Event.new(DatasetLabeled(dataset_id="d1", labels_key="labeler/d1/labeled.json", classes=["a", "b"],
                                    counts=[], human_labels=2, auto_labels=6, rounds=1, spec=Spec()), run_id=run_id)


def test_folding_an_event_twice_changes_nothing() -> None:
    event = _uploaded()
    once = runs.apply(None, event)
    twice = runs.apply(once, event)
    assert twice == once and twice["counts"] == {"dataset.uploaded": 1}
    assert len(twice["events"]) == 1


async def _until(what: str, condition: Callable[[], Awaitable[Any]], deadline: float = 20.0) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = await condition()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _stage_service() -> tuple[Service, list[str]]:
    """A stage that writes a document and an object per run, works long on dataset.labeled until the run
    is cancelled, and deletes what it wrote when the run is deleted."""
    stage = Service("stage")
    stopped: list[str] = []

    @stage.handles(Topic.DATASET_UPLOADED)
    async def store(event: Event, ctx: HandlerContext) -> None:
        await ctx.docs.upsert("stage_things", {"_id": event.run_id, "run_id": event.run_id})
        await asyncio.to_thread(ctx.objects.put_bytes, f"stage/{event.run_id}/thing.bin", b"x")

    @stage.handles(Topic.DATASET_LABELED)
    async def long_work(event: Event, ctx: HandlerContext) -> None:
        end = time.monotonic() + 30
        while time.monotonic() < end:  # an epoch loop: it checks between its steps
            if await ctx.is_cancelled(event.run_id):
                stopped.append(event.run_id)
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the long work never learnt that its run was cancelled")

    @stage.deletes_runs
    async def forget(event: Event, ctx: HandlerContext) -> None:
        await ctx.docs.delete("stage_things", event.run_id)
        await asyncio.to_thread(ctx.objects.delete, f"stage/{event.run_id}/thing.bin")

    return stage, stopped


async def test_cancel_stops_long_work_and_skips_later_events_then_delete_removes_everything(tmp_path: Path) -> None:
    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db",
                             poll_seconds=0.05)
    backends = Backends.from_settings(settings)
    stage, stopped = _stage_service()
    app = create_app([runs.part(), ServicePart(service=stage)], backends=backends, mount_prefix=True)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        worker = app.state.workers["stage"]
        await _until("the workers to join", lambda: _ready(app))
        await backends.publish(_uploaded())
        await _until("the run to show", lambda: _state(c, "r1", "running"))
        await _until("the stage's document", lambda: backends.docs.get("stage_things", "r1"))

        # unknown runs are 404; a running run cannot be deleted
        assert (await c.post("/runs/nope/cancel")).status_code == 404
        assert (await c.delete("/runs/nope")).status_code == 404
        refused = await c.delete("/runs/r1")
        assert refused.status_code == 409 and "cancel it first" in refused.json()["detail"]
        assert (await c.post("/runs/r1/cancel", json={"reason": "x" * 501})).status_code == 422

        await backends.publish(_labeled())  # the stage starts its long work on it
        await _until("the long work to start", lambda: _current(worker, Topic.DATASET_LABELED))
        cancelled = await c.post("/runs/r1/cancel", json={"reason": "wrong data"})
        assert cancelled.status_code == 202
        await _until("the long work to stop", lambda: _true(stopped == ["r1"]))
        doc = await _until("the run to be cancelled", lambda: _state(c, "r1", "cancelled"))
        assert doc["cancelled"]["reason"] == "wrong data"
        assert (await c.post("/runs/r1/cancel")).status_code == 409

        skipped = worker.processed[Outcome.CANCELLED]
        await backends.publish(_uploaded().model_copy(update={"event_id": "another"}))
        await _until("a later event of the run to be skipped",
                     lambda: _true(worker.processed[Outcome.CANCELLED] == skipped + 1))

        deleted = await c.delete("/runs/r1")
        assert deleted.status_code == 202
        await _until("the run view to forget the run", lambda: _gone(c, "/runs/r1"))
        await _until("the stage to forget the run", lambda: _none(backends.docs.get("stage_things", "r1")))
        await _until("the stage to delete its object of the run",
                     lambda: _true_async(asyncio.to_thread(backends.objects.exists, "stage/r1/thing.bin"), False))
        await _until("the runtime to drop the run's markers", lambda: _only_deletion_markers(backends))
    await backends.stop()


async def _ready(app: Any) -> bool:
    return all(w.ready.is_set() and w.cancellations.ready.is_set() for w in app.state.workers.values())


async def _state(client: httpx.AsyncClient, run_id: str, state: str) -> dict[str, Any] | None:
    response = await client.get(f"/runs/{run_id}")
    doc: dict[str, Any] = response.json()
    return doc if response.status_code == 200 and doc["state"] == state else None


async def _current(worker: Any, topic: Topic) -> bool:
    return worker.current is not None and worker.current.event_type is topic


async def _true(value: bool) -> bool:
    return value


async def _gone(client: httpx.AsyncClient, path: str) -> bool:
    return (await client.get(path)).status_code == 404


async def _true_async(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def _only_deletion_markers(backends: Backends) -> bool:
    """The stage's markers of the run: only the deletion's own is left."""
    markers = await backends.docs.find("processed_events", {"consumer": "dlforge.stage", "run_id": "r1"})
    return [m["topic"] for m in markers] == ["run.deleted"]


async def _none(value: Awaitable[Any]) -> bool:
    return await value is None


@pytest.mark.parametrize("state", ["succeeded", "failed"])
def test_finished_states_may_be_deleted(state: str) -> None:
    assert state in runs.FINISHED and "running" not in runs.FINISHED
