"""People's labels: stored before the ``202``, applied exactly once, never dropped.

Two collections, besides the dataset record (:mod:`dlforge.labeler.records`):

``labeler_label_inbox``
    One small document per dataset (``_id`` = dataset id): whether the dataset accepts labels
    (``accepting``; once its labels are final it does not, ``closed_reason`` says why), the
    batches people were asked so far, the items of the current batch still without a label,
    the classes, a sequence counter and the *pending* submissions: accepted, not yet applied.
``labeler_labels``
    One document per item people labeled (``_id`` = ``dataset_id:item_id``): its current label
    and its history.

How a submission travels
------------------------
1. ``POST /labels`` reads the inbox, checks the submission against it (the items asked so far,
   the classes, whether labels are still accepted) and appends it to ``pending`` with the next
   ``sequence`` in one version-checked write (``update(..., expected_version=)``). A concurrent
   change (another submission, the worker) is a ``Conflict``: read, check and append again.
   Only then does it publish ``labels.submitted`` (carrying the ``sequence``) and answer 202.
   The inbox is the one document that both decides whether labels are accepted and stores them,
   so there is no moment where a stale check lets a label through that is later ignored.
2. The worker *folds* the inbox on each ``labels.submitted``: every pending submission at once,
   in sequence order. It writes the changed items' documents in ``labeler_labels`` first, then
   the record's ``human_labels`` and ``labels_folded_through`` (the last sequence applied), then
   removes the applied submissions from the inbox. A crash anywhere redoes the fold: an item
   document skips sequences it holds, the record skips sequences up to ``labels_folded_through``.
   Events whose submissions an earlier fold already applied find nothing to do and cost one read.
3. A label for an item of an earlier batch (a correction, or an answer that arrived after its
   batch closed) is applied to the dataset's labels like any other and used from the next round
   on. Before the worker finalises a dataset it closes the inbox (a version-checked write, like
   every change), folds what arrived meanwhile and refits if that changed a label (reopening the
   inbox if the refit asks people for more). A submission therefore either reached the inbox
   before it closed, and is applied, or is refused with 409 before its response.

The conflict rule (also in the API description): the submission accepted last wins (accepted =
its ``sequence``); each change is kept in the item's history (label, previous label,
annotator, time, batch, sequence). A submission that repeats an item's current label changes
nothing and adds no history. A class introduced only by people's labels is dropped from the
dataset's classes once no label uses it any more, so a corrected item leaves no stale class in
the counts, the classifier's training rows or the labeled manifest.

Labels published straight to the bus (the SIMULATED annotator or another producer:
``sequence`` None) take the same path: the worker appends them to the inbox (once per event id)
and folds. Once the inbox is closed they are logged as a warning and left out: nobody was told
they were accepted.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dlforge.common.docs import DocumentStore
from dlforge.common.errors import Conflict, InvalidInput, RetryableError
from dlforge.labeler import records

INBOX = "labeler_label_inbox"
LABELS = "labeler_labels"
MAX_TRIES = 100  # read-check-write attempts before giving up on a busy inbox
MAX_LABELS_PER_SUBMISSION = 10_000
FOLDED_EVENTS_KEPT = 1000  # event ids of folded bus-only submissions the record remembers

Doc = dict[str, Any]


def item_doc_id(dataset_id: str, item_id: str) -> str:
    return f"{dataset_id}:{item_id}"


async def backoff(attempt: int) -> None:
    """A short random pause after a lost version race (spreads the retries of many writers)."""
    await asyncio.sleep(random.random() * min(0.0005 * 2 ** min(attempt, 6), 0.02))


async def load_inbox(docs: DocumentStore, dataset_id: str) -> Doc | None:
    return await docs.get(INBOX, dataset_id)


async def change_inbox(
    docs: DocumentStore, dataset_id: str, fn: Callable[[Doc | None], Mapping[str, Any] | None]
) -> Doc:
    """Read-modify-write the inbox until no concurrent writer got in between.

    ``fn`` gets the current document (None: there is none) and returns the fields to set, or a
    whole new document (with ``_id``) when there is none yet; None leaves it as it is.
    """
    for attempt in range(MAX_TRIES):
        current = await docs.get(INBOX, dataset_id)
        changes = fn(current)
        try:
            if current is None:
                if changes is None:
                    raise ValueError(f"no label inbox for dataset {dataset_id} and nothing to create")
                return await docs.insert(INBOX, changes)
            if changes is None:
                return current
            return await docs.update(INBOX, dataset_id, changes, expected_version=current["_version"])
        except Conflict:
            await backoff(attempt)
    raise RetryableError(f"the label inbox of dataset {dataset_id} kept changing concurrently")


def _batch_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the inbox mirrors of the record: the batches, the current batch's open items, classes."""
    batch = record.get("current_batch") or {}
    human = record.get("human_labels", {})
    return {
        "run_id": record["run_id"],
        "batches": [r["batch_id"] for r in record.get("rounds", [])],
        "batch_id": batch.get("batch_id"),
        "round": batch.get("round"),
        "waiting": [i for i in batch.get("item_ids", []) if i not in human],
        "classes": list(record.get("classes", [])),
        "allow_new_classes": bool(record.get("allow_new_classes", True)),
        # which asked-items set POST /labels may use from its cache (asked items only grow per batch)
        "asked_rev": f"{record.get('created_at')}#{batch.get('round')}",
    }


async def sync_batch(docs: DocumentStore, record: Mapping[str, Any]) -> Doc:
    """Open the inbox for the record's current batch (creating it on the first batch)."""
    fields = _batch_fields(record)

    def fn(current: Doc | None) -> Mapping[str, Any] | None:
        if current is None:
            return {"_id": record["_id"], **fields, "accepting": True, "closed_reason": None, "sequence": 0,
                    "folded_through": int(record.get("labels_folded_through", 0)), "pending": []}
        if current.get("accepting") and all(current.get(k) == v for k, v in fields.items()):
            return None
        return {**fields, "accepting": True, "closed_reason": None}

    return await change_inbox(docs, record["_id"], fn)


async def close(docs: DocumentStore, record: Mapping[str, Any], *, reason: str) -> Doc:
    """Stop accepting labels (``reason``: ``finalising``, ``labeled`` or ``failed``)."""

    def fn(current: Doc | None) -> Mapping[str, Any] | None:
        if current is None:
            return {"_id": record["_id"], **_batch_fields(record), "accepting": False, "closed_reason": reason,
                    "sequence": 0, "folded_through": int(record.get("labels_folded_through", 0)), "pending": []}
        if not current.get("accepting") and current.get("closed_reason") == reason:
            return None
        return {"accepting": False, "closed_reason": reason}

    return await change_inbox(docs, record["_id"], fn)


def refusal(inbox: Mapping[str, Any], dataset_id: str) -> InvalidInput | None:
    """Why the dataset refuses labels now (409), or None if it accepts them."""
    if inbox.get("accepting"):
        return None
    reason = inbox.get("closed_reason")
    if reason == "labeled":
        why = "its labels are final (the dataset is labeled); corrections are no longer accepted"
    elif reason == "failed":
        why = "the dataset failed"
    else:
        why = "its labels are being finalised; if people are asked more, the queue shows the next batch"
    return InvalidInput(f"dataset {dataset_id!r} does not accept labels: {why}", status_code=409)


def known_classes(inbox: Mapping[str, Any]) -> list[str]:
    """The dataset's classes plus those introduced by submissions not applied yet."""
    known = set(inbox.get("classes", []))
    for entry in inbox.get("pending", []):
        known.update(entry["labels"].values())
    return sorted(known)


def waiting_after(inbox: Mapping[str, Any], labels: Iterable[str]) -> int:
    """Items of the current batch still without a label once ``labels`` and the pending ones apply."""
    answered = set(labels)
    for entry in inbox.get("pending", []):
        answered.update(entry["labels"])
    return sum(1 for i in inbox.get("waiting", []) if i not in answered)


def entry(*, event_id: str, batch_id: str, annotator: str, labels: Mapping[str, str], at: str) -> Doc:
    """A pending submission (its ``sequence`` is set when it is appended)."""
    return {"event_id": event_id, "batch_id": batch_id, "annotator": annotator, "labels": dict(labels), "at": at}


async def append(docs: DocumentStore, inbox: Mapping[str, Any], new: Doc) -> Doc:
    """Append ``new`` to the inbox as read (``inbox``): Conflict if it changed since; the stored inbox."""
    seq = int(inbox["sequence"]) + 1
    return await docs.update(INBOX, inbox["_id"], {"sequence": seq, "pending": [*inbox["pending"],
                                                                                  {**new, "sequence": seq}]},
                             expected_version=inbox["_version"])


async def append_once(docs: DocumentStore, dataset_id: str, new: Doc, *, folded: Collection[str]) -> Doc:
    """Append a submission that came straight from the bus, unless its event is pending already or
    in ``folded`` (the record's ``folded_events``: a redelivered or retried event)."""
    for attempt in range(MAX_TRIES):
        inbox = await docs.get(INBOX, dataset_id)
        if inbox is None:
            raise ValueError(f"no label inbox for dataset {dataset_id}")
        if new["event_id"] in folded or any(e["event_id"] == new["event_id"] for e in inbox["pending"]):
            return inbox
        try:
            return await append(docs, inbox, {**new, "direct": True})
        except Conflict:
            await backoff(attempt)
    raise RetryableError(f"the label inbox of dataset {dataset_id} kept changing concurrently")


@dataclass(frozen=True)
class Fold:
    """The record and inbox after a fold, and how many items' labels it changed."""

    record: Doc
    inbox: Doc
    changed: int


async def fold(docs: DocumentStore, record: Doc, inbox: Doc) -> Fold:
    """Apply the inbox's pending submissions to the item documents and the record (see the module doc)."""
    done = int(record.get("labels_folded_through", 0))
    todo = sorted((e for e in inbox.get("pending", []) if int(e["sequence"]) > done), key=lambda e: e["sequence"])
    changed = 0
    if todo:
        human = dict(record.get("human_labels", {}))
        changes: dict[str, list[Doc]] = {}
        for e in todo:
            for item_id, label in e["labels"].items():
                previous = human.get(item_id)
                if previous == label:
                    continue
                human[item_id] = label
                changes.setdefault(item_id, []).append({
                    "label": label, "previous": previous, "annotator": e["annotator"], "at": e["at"],
                    "batch_id": e["batch_id"], "sequence": int(e["sequence"]), "event_id": e["event_id"]})
        await _write_items(docs, record["_id"], changes)
        changed = len(changes)
        base = record.get("base_classes")
        classes = sorted({*(base if base is not None else record.get("classes", [])), *human.values()})
        batch = record.get("current_batch") or {}
        counts = dict(record.get("counts", {}))
        counts["human"] = len(human)
        counts["pending"] = sum(1 for i in batch.get("item_ids", []) if i not in human)
        annotators = sorted({*record.get("annotators", []), *(e["annotator"] for e in todo)})
        direct = [*record.get("folded_events", []), *(e["event_id"] for e in todo if e.get("direct"))]
        record = await records.change(docs, record, human_labels=human, classes=classes, counts=counts,
                                      annotators=annotators, labels_folded_through=int(todo[-1]["sequence"]),
                                      folded_events=direct[-FOLDED_EVENTS_KEPT:])
    inbox = await _trim(docs, record)
    return Fold(record=record, inbox=inbox, changed=changed)


async def _write_items(docs: DocumentStore, dataset_id: str, changes: Mapping[str, Sequence[Doc]]) -> None:
    for item_id, steps in changes.items():
        doc_id = item_doc_id(dataset_id, item_id)
        current = await docs.get(LABELS, doc_id)
        held = int(current["sequence"]) if current is not None else 0
        new = [s for s in steps if s["sequence"] > held]
        if not new:
            continue  # a redone fold: this item already holds these submissions
        last = new[-1]
        fields = {"label": last["label"], "annotator": last["annotator"], "labeled_at": last["at"],
                  "batch_id": last["batch_id"], "sequence": last["sequence"]}
        try:
            if current is None:
                await docs.insert(LABELS, {"_id": doc_id, "dataset_id": dataset_id, "item_id": item_id, **fields,
                                           "history": new})
            else:
                await docs.update(LABELS, doc_id, {**fields, "history": [*current["history"], *new]},
                                  expected_version=current["_version"])
        except Conflict as exc:
            raise RetryableError(f"the label of item {item_id} of dataset {dataset_id} changed concurrently") \
                from exc


async def _trim(docs: DocumentStore, record: Mapping[str, Any]) -> Doc:
    """Drop the applied submissions from the inbox; mirror the record's classes and open items."""
    done = int(record.get("labels_folded_through", 0))
    batch = record.get("current_batch") or {}
    human = record.get("human_labels", {})
    waiting = [i for i in batch.get("item_ids", []) if i not in human]

    def fn(current: Doc | None) -> Mapping[str, Any] | None:
        if current is None:
            raise ValueError(f"no label inbox for dataset {record['_id']}")
        pending = [e for e in current["pending"] if int(e["sequence"]) > done]
        fields = {"pending": pending, "folded_through": max(done, int(current.get("folded_through", 0))),
                  "classes": list(record.get("classes", [])), "waiting": waiting}
        if all(current.get(k) == v for k, v in fields.items()):
            return None
        return fields

    return await change_inbox(docs, record["_id"], fn)


async def item_labels(
    docs: DocumentStore, dataset_id: str, *, item_id: str | None = None, limit: int = 1000
) -> list[Doc]:
    """The labeled items' documents (label, annotator, history), by item id."""
    where: dict[str, Any] = {"dataset_id": dataset_id}
    if item_id is not None:
        where["item_id"] = item_id
    return await docs.find(LABELS, where, sort=[("item_id", 1)], limit=limit)
