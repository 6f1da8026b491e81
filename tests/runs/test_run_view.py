"""The run view folds events into per-run stage states, timings and artifacts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dlforge.common import runs
from dlforge.common.events import (
    DatasetLabeled,
    DatasetUploaded,
    Event,
    LabelsSubmitted,
    RunFailed,
    Spec,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _at(event: Event, seconds: float) -> Event:
    return event.model_copy(update={"occurred_at": T0 + timedelta(seconds=seconds)})


def _uploaded() -> Event:
    return Event.new(
        DatasetUploaded(dataset_id="d1", name="cells", item_count=10, classes=["a", "b"], labeled_count=0,
                        rejected_count=1, duplicate_count=0, manifest_key="labeler/d1/manifest.json", spec=Spec()),
        run_id="r1",
    )


def test_stages_move_from_running_to_succeeded_with_seconds_and_artifacts() -> None:
    doc = runs.apply(None, _at(_uploaded(), 0))
    assert doc["stages"]["labeler"]["state"] == "running"
    assert doc["stages"]["augmenter"]["state"] == "pending"
    assert doc["stages"]["labeler"]["artifacts"] == {"manifest_key": "labeler/d1/manifest.json"}
    submitted = Event.new(LabelsSubmitted(dataset_id="d1", batch_id="b1", labels={"x": "a", "y": "b"},
                                          annotator="p"), run_id="r1")
    doc = runs.apply(doc, _at(submitted, 3))
    assert doc["stages"]["labeler"]["human_labels"] == 2
    labeled = Event.new(DatasetLabeled(dataset_id="d1", labels_key="labeler/d1/labeled.json", classes=["a", "b"],
                                       counts=[], human_labels=2, auto_labels=6, needs_review=2, rounds=1,
                                       spec=Spec()), run_id="r1")
    doc = runs.apply(doc, _at(labeled, 12.5))
    lab = doc["stages"]["labeler"]
    assert lab["state"] == "succeeded"
    assert lab["seconds"] == 12.5
    assert lab["artifacts"]["labels_key"] == "labeler/d1/labeled.json"
    assert lab["summary"] == {"human_labels": 2, "auto_labels": 6, "needs_review": 2, "rounds": 1}
    assert doc["stages"]["augmenter"]["state"] == "running"
    assert doc["state"] == "running"
    assert doc["counts"] == {"dataset.uploaded": 1, "labels.submitted": 1, "dataset.labeled": 1}


def test_human_labels_counts_distinct_items_not_submissions() -> None:
    def submitted(labels: dict[str, str], seconds: float) -> Event:
        return _at(Event.new(LabelsSubmitted(dataset_id="d1", batch_id="b1", labels=labels, annotator="p"),
                             run_id="r1"), seconds)

    doc = runs.apply(None, _at(_uploaded(), 0))
    doc = runs.apply(doc, submitted({"x": "a"}, 1))
    doc = runs.apply(doc, submitted({"x": "b"}, 2))  # the same item again: a correction
    assert doc["stages"]["labeler"]["human_labels"] == 1
    doc = runs.apply(doc, submitted({"x": "a", "y": "b"}, 3))
    assert doc["stages"]["labeler"]["human_labels"] == 2
    assert doc["counts"]["labels.submitted"] == 3
    labeled = Event.new(DatasetLabeled(dataset_id="d1", labels_key="k", classes=["a", "b"], counts=[],
                                       human_labels=2, auto_labels=0, needs_review=8, rounds=1, spec=Spec()),
                        run_id="r1")
    doc = runs.apply(doc, _at(labeled, 4))
    assert doc["stages"]["labeler"]["human_labels"] == 2 and doc[runs.LABELED_ITEMS] == []
    doc = runs.apply(doc, submitted({"z": "a"}, 5))  # after dataset.labeled the labels are final
    assert doc["stages"]["labeler"]["human_labels"] == 2


def test_run_failed_marks_the_stage_and_the_run() -> None:
    doc = runs.apply(None, _at(_uploaded(), 0))
    doc = runs.apply(doc, _at(Event.new(RunFailed(stage="labeler", reason="boom"), run_id="r1"), 1))
    assert doc["state"] == "failed"
    assert doc["stages"]["labeler"]["state"] == "failed"
    assert doc["failure"]["reason"] == "boom"


def test_a_failure_outside_the_stages_fails_the_running_stage() -> None:
    # the simulated annotator is no stage: its failure fails the labeler it was answering for
    doc = runs.apply(None, _at(_uploaded(), 0))
    failed = RunFailed(stage="annotator-sim", reason="the simulated annotator has no answer for 3 item(s)")
    doc = runs.apply(doc, _at(Event.new(failed, run_id="r1"), 2))
    assert doc["state"] == "failed"
    assert doc["stages"]["labeler"]["state"] == "failed"
    assert doc["stages"]["labeler"]["reason"] == "annotator-sim: the simulated annotator has no answer for 3 item(s)"
    assert doc["stages"]["augmenter"]["state"] == "pending"
    assert doc["failure"]["stage"] == "annotator-sim"


async def test_runs_api_lists_and_gets(tmp_path) -> None:
    import httpx

    from dlforge.common.app import create_app
    from dlforge.common.runtime import Backends, Worker
    from dlforge.common.settings import load_settings

    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db")
    backends = Backends.from_settings(settings)
    await backends.start()
    app = create_app([runs.part()], backends=backends, run_workers=False)
    worker = Worker(runs.service, backends)
    from dlforge.common.bus import Delivery
    from dlforge.common.events import encode

    ev = _uploaded()
    delivery = Delivery(topic=ev.event_type.value, key="r1", value=encode(ev))
    await worker.process(delivery)
    await worker.process(delivery)  # a duplicate changes nothing
    labels = Event.new(LabelsSubmitted(dataset_id="d1", batch_id="b1", labels={"x": "a"}, annotator="p"), run_id="r1")
    await worker.process(Delivery(topic=labels.event_type.value, key="r1", value=encode(labels)))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        listed = (await client.get("/runs")).json()
        assert [r["run_id"] for r in listed] == ["r1"]
        one = (await client.get("/runs/r1")).json()
        assert one["counts"] == {"dataset.uploaded": 1, "labels.submitted": 1}
        assert one["stages"]["labeler"]["human_labels"] == 1
        assert runs.LABELED_ITEMS not in one and runs.LABELED_ITEMS not in listed[0]  # kept, not served
        assert (await client.get("/runs/nope")).status_code == 404
        assert (await client.get("/runs?state=bogus")).status_code == 422
    await backends.stop()
