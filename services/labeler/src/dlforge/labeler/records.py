"""The dataset record (collection ``labeler_datasets``): what the labeler knows about one dataset.

One document per dataset, ``_id`` = dataset id. The API creates it; afterwards only the worker
changes it (events of one run are handled in order), with optimistic versions. Besides the
summary the REST API shows, it holds the loop's state: the split of every item, every human
label and why each item was asked, the batch waiting for people, and the rounds so far.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from dlforge.common.docs import DocumentStore
from dlforge.common.errors import Conflict, NotFound, RetryableError
from dlforge.common.events import DatasetUploaded, Event

DATASETS = "labeler_datasets"
State = Literal["ingesting", "ingested", "embedding", "labeling", "labeled", "failed"]
# large maps kept in the record but left out of API responses
PRIVATE = ("splits", "human_labels", "asked", "labeled_event", "request_event", "base_classes", "folded_events",
           "uploaded_event")


def uploaded_event(record: Mapping[str, Any], payload: DatasetUploaded) -> Event:
    """The data set's ``dataset.uploaded``: its event id derives from the data set, so re-publishing dedupes."""
    event = Event.new(payload, run_id=str(record["run_id"]))
    event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"dlforge:labeler:{record['_id']}:uploaded").hex
    return event.model_copy(update={"event_id": event_id})


def now() -> str:
    return datetime.now(UTC).isoformat()


async def load(docs: DocumentStore, dataset_id: str) -> dict[str, Any]:
    record = await docs.get(DATASETS, dataset_id)
    if record is None:
        raise NotFound(f"no dataset {dataset_id!r}")
    return record


async def change(docs: DocumentStore, record: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    """Apply ``changes`` if nobody changed the record since it was read (else retry the event)."""
    changes["updated_at"] = now()
    try:
        return await docs.update(DATASETS, record["_id"], changes, expected_version=record["_version"])
    except Conflict as exc:
        raise RetryableError(f"dataset {record['_id']} changed concurrently: {exc}") from exc


def public(record: Mapping[str, Any], *, detail: bool = True) -> dict[str, Any]:
    """What the API shows: everything but the large per-item maps (and, in lists, the reports)."""
    out = {k: v for k, v in record.items() if k not in PRIVATE and not k.startswith("_")}
    out["dataset_id"] = record["_id"]
    if not detail:
        for k in ("rejected", "duplicates", "skipped", "rounds", "current_batch"):
            out.pop(k, None)
    elif out.get("current_batch"):
        batch = {k: v for k, v in out["current_batch"].items() if k != "guesses"}  # the queue shows them
        answered = set(record.get("human_labels", {}))
        batch["waiting"] = sum(1 for i in batch.get("item_ids", []) if i not in answered)
        out["current_batch"] = batch
    return out
