"""Group commit of label submissions: one inbox write per group, each refusal only its own."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from dlforge.common.docs.sqlite import SqliteDocumentStore
from dlforge.common.errors import InvalidInput
from dlforge.labeler import labels
from dlforge.labeler.labels import Accepted, BatchInfo, InboxWriter, StaleCheck, Submission

BATCH = BatchInfo(asked=frozenset({"a", "b", "c"}), items=("a", "b", "c"))


def inbox() -> dict[str, Any]:
    return {"_id": "d1", "run_id": "r1", "batches": ["b1"], "batch_id": "b1", "round": 0, "waiting_mask": "7",
            "waiting_count": 3, "allow_new_classes": False, "asked_rev": "rev-1", "accepting": True,
            "closed_reason": None, "base_classes": ["defect", "good"], "classes": ["defect", "good"],
            "class_counts": {}, "labeled": 0, "sequence": 0, "folded_through": 0, "pending": [],
            "folded_events": []}


def submission(item: str, label: str, *, rev: str = "rev-1") -> Submission:
    return Submission(dataset_id="d1", event_id=f"e-{item}-{label}", batch_id="b1", annotator="ann",
                      labels={item: label}, rev=rev, batch=BATCH, at="2026-01-01T00:00:00+00:00")


async def test_submissions_waiting_together_are_one_write_and_one_publish(tmp_path: Path) -> None:
    docs = SqliteDocumentStore(tmp_path / "docs.db")
    await docs.insert(labels.INBOX, inbox())
    published: list[list[tuple[str, int]]] = []

    async def publish(group: Sequence[tuple[Submission, Accepted]]) -> None:
        published.append([(sub.event_id, acc.sequence) for sub, acc in group])

    writer = InboxWriter(docs, publish)
    subs = [submission("a", "good"), submission("b", "scratch"), submission("c", "defect"),
            submission("a", "defect"), submission("b", "good", rev="rev-0")]
    results = await asyncio.gather(*(writer.submit(s) for s in subs), return_exceptions=True)

    first, refused, third, correction, stale = results
    assert isinstance(refused, InvalidInput) and refused.status_code == 422 and "scratch" in str(refused)
    assert isinstance(stale, StaleCheck)
    assert [(r.sequence, r.waiting) for r in (first, third, correction)] == [(1, 2), (2, 1), (3, 1)]  # type: ignore[union-attr]
    assert published == [[("e-a-good", 1), ("e-c-defect", 2), ("e-a-defect", 3)]]
    stored = await docs.get(labels.INBOX, "d1")
    assert stored is not None and stored["_version"] == 2 and stored["sequence"] == 3  # one write
    assert [(e["event_id"], e["sequence"], e["labels"]) for e in stored["pending"]] == [
        ("e-a-good", 1, {"a": "good"}), ("e-c-defect", 2, {"c": "defect"}), ("e-a-defect", 3, {"a": "defect"})]


async def test_a_closed_inbox_refuses_the_group_and_stores_nothing(tmp_path: Path) -> None:
    docs = SqliteDocumentStore(tmp_path / "docs.db")
    await docs.insert(labels.INBOX, {**inbox(), "accepting": False, "closed_reason": "labeled"})

    async def publish(group: Sequence[tuple[Submission, Accepted]]) -> None:
        raise AssertionError("nothing is published for refused submissions")

    writer = InboxWriter(docs, publish)
    for outcome in await asyncio.gather(writer.submit(submission("a", "good")), writer.submit(submission("b", "good")),
                                        return_exceptions=True):
        assert isinstance(outcome, InvalidInput) and outcome.status_code == 409
    stored = await docs.get(labels.INBOX, "d1")
    assert stored is not None and stored["_version"] == 1 and stored["pending"] == []


async def test_a_failed_publish_answers_every_submitter_with_the_error_and_keeps_them_pending(tmp_path: Path) -> None:
    docs = SqliteDocumentStore(tmp_path / "docs.db")
    await docs.insert(labels.INBOX, inbox())

    async def publish(group: Sequence[tuple[Submission, Accepted]]) -> None:
        raise ConnectionError("the bus is down")

    writer = InboxWriter(docs, publish)
    with pytest.raises(ConnectionError):
        await writer.submit(submission("a", "good"))
    stored = await docs.get(labels.INBOX, "d1")
    assert stored is not None and [e["sequence"] for e in stored["pending"]] == [1]  # the next fold applies it
