"""People's labels: stored before the ``202``, applied exactly once, never dropped.

Two collections, besides the dataset record (:mod:`dlforge.labeler.records`):

``labeler_label_inbox``
    One small document per dataset (``_id`` = dataset id): whether the dataset accepts labels
    (``accepting``; once its labels are final it does not, ``closed_reason`` says why), the
    batches people were asked so far, the items of the current batch still without a label (a bit
    mask over the batch's item order, so the document stays small however large the batch), the
    classes and how many people's labels each has, a sequence counter, the *pending*
    submissions (accepted, not yet applied) and ``folded_through``, the last sequence applied.
``labeler_labels``
    One document per item people labeled (``_id`` = ``dataset_id:item_id``): its current label
    and its history.

How a submission travels
------------------------
1. ``POST /labels`` reads the inbox and checks the submission's items against it (the items
   asked so far; they come from the record once per batch, :func:`batch_info`, then cached: they
   never change for that batch). It then hands the submission to the :class:`InboxWriter`, which
   *group-commits*: the submissions to one dataset that wait at the same moment (under load,
   dozens) are checked against the inbox as it is when they are appended (whether labels are
   still accepted, the classes, new classes; each in turn sees the ones before it) and appended
   to ``pending`` with consecutive ``sequence`` numbers in one version-checked write
   (``update(..., expected_version=)``; a concurrent change, e.g. a fold, is a ``Conflict``: read
   and check the group again). Only then are their ``labels.submitted`` events (each carrying its
   ``sequence``) published, in one batch, and each submitter answered 202 with its sequence; a
   refusal answers only its own submitter (4xx), before anything of it is stored. The inbox is the
   one document that both decides whether labels are accepted and stores them, so there is no
   moment where a stale check lets a label through that is later ignored. If the publish fails
   (a 5xx, no 202), the stored submissions stay pending and the next fold applies them; a client
   that sends one again repeats a label, which changes nothing. One write per group instead of
   one per submission also ends the retry storm of 50 writers racing for one document.
2. The worker *folds* the inbox on each ``labels.submitted``: every pending submission at once,
   in sequence order. It writes the changed items' documents in ``labeler_labels`` first, then
   commits the fold in the inbox (one version-checked write: the applied submissions leave
   ``pending``, ``folded_through``, the class counts and the batch's open items move on). A crash
   anywhere redoes the fold: an item document skips the sequences it holds, and the inbox's
   figures are recomputed from the items' histories, so nothing is applied or counted twice.
   Events whose submissions an earlier fold applied find nothing to do and cost one read; since
   folding again changes nothing, such a handling writes no processed-marker (the handler is
   registered ``replay_safe`` for events with a ``sequence``). An item labeled for the first time
   is inserted without a read. The large dataset record is not touched per submission: its
   ``human_labels`` (what the classifier is fitted on) are read from the item documents once per
   round.
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
import contextlib
import functools
import random
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dlforge.common.docs import DocumentStore
from dlforge.common.errors import Conflict, InvalidInput, RetryableError
from dlforge.labeler import records
from dlforge.labeler.handlers import check_labels

INBOX = "labeler_label_inbox"
LABELS = "labeler_labels"
MAX_TRIES = 100  # read-check-write attempts before giving up on a busy inbox
MAX_LABELS_PER_SUBMISSION = 10_000
FOLDED_EVENTS_KEPT = 1000  # event ids of folded bus-only submissions the inbox remembers

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
    """What the inbox mirrors of the record's current batch."""
    batch = record.get("current_batch") or {}
    human = record.get("human_labels", {})
    return {
        "run_id": record["run_id"],
        "batches": [r["batch_id"] for r in record.get("rounds", [])],
        "batch_id": batch.get("batch_id"),
        "round": batch.get("round"),
        **_waiting_fields(batch.get("item_ids", []), {i for i in batch.get("item_ids", []) if i not in human}),
        "allow_new_classes": bool(record.get("allow_new_classes", True)),
        # which asked-items set POST /labels may use from its cache (the asked items grow per batch)
        "asked_rev": f"{record.get('created_at')}#{batch.get('round')}",
        # the submission whose fold opened this batch (a redelivery of it re-emits the round: worker._replay)
        "advanced_by": record.get("advanced_by"),
    }


def _waiting_fields(items: Sequence[str], waiting: set[str]) -> dict[str, Any]:
    """The batch's items still without a label, as a bit mask over the batch's item order (hex):
    every submission reads the inbox, and a list of ids would make it as large as the batch."""
    mask = 0
    for n, item in enumerate(items):
        if item in waiting:
            mask |= 1 << n
    return {"waiting_mask": format(mask, "x"), "waiting_count": bin(mask).count("1")}


def _answered(inbox: Mapping[str, Any], batch: BatchInfo, items: Iterable[str]) -> dict[str, Any]:
    """The waiting fields once ``items`` have a label."""
    mask = int(inbox.get("waiting_mask") or "0", 16)
    for item in items:
        n = batch.index.get(item)
        if n is not None:
            mask &= ~(1 << n)
    return {"waiting_mask": format(mask, "x"), "waiting_count": bin(mask).count("1")}


def waiting_items(inbox: Mapping[str, Any], batch: BatchInfo) -> list[str]:
    """The items of the current batch still without an applied label, in batch order."""
    bits = bin(int(inbox.get("waiting_mask") or "0", 16))[:1:-1]
    return [batch.items[n] for n, bit in enumerate(bits) if bit == "1" and n < len(batch.items)]


@dataclass(frozen=True)
class BatchInfo:
    """What one batch of a dataset fixes: the items asked so far and the batch's own items, in order."""

    asked: frozenset[str]
    items: tuple[str, ...]

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Each item's position in the batch (computed once per batch, not per submission)."""
        return {item: n for n, item in enumerate(self.items)}


class StaleBatch(RetryableError):
    """The record has moved on to a later batch than the inbox names (the inbox follows in a moment)."""


_BATCHES: OrderedDict[tuple[str, str], BatchInfo] = OrderedDict()


async def batch_info(docs: DocumentStore, dataset_id: str, rev: str) -> BatchInfo:
    """The :class:`BatchInfo` of the inbox's batch ``rev``: read from the record once, then kept
    (it never changes; the large record is not read per submission)."""
    key = (dataset_id, rev)
    info = _BATCHES.get(key)
    if info is None:
        record = await records.load(docs, dataset_id)
        batch = record.get("current_batch") or {}
        if f"{record.get('created_at')}#{batch.get('round')}" != rev:
            raise StaleBatch(f"dataset {dataset_id}: the record is at batch {batch.get('batch_id')}, the label "
                             f"inbox at {rev}")
        info = _BATCHES[key] = BatchInfo(asked=frozenset(record.get("asked", {})),
                                         items=tuple(batch.get("item_ids", [])))
        while len(_BATCHES) > 32:
            _BATCHES.popitem(last=False)
    return info


def _new_inbox(record: Mapping[str, Any], *, accepting: bool, reason: str | None) -> Doc:
    human: Mapping[str, str] = record.get("human_labels", {})
    base = list(record.get("base_classes", record.get("classes", [])))
    counts = Counter(human.values())
    return {"_id": record["_id"], **_batch_fields(record), "accepting": accepting, "closed_reason": reason,
            "base_classes": base, "classes": _classes(base, counts), "class_counts": dict(counts),
            "labeled": len(human), "sequence": 0, "folded_through": 0, "pending": [], "folded_events": []}


def _classes(base: Iterable[str], counts: Mapping[str, int]) -> list[str]:
    """The dataset's classes: those it had before people labeled, and those people's labels use now."""
    return sorted({*base, *(c for c, n in counts.items() if n > 0)})


async def sync_batch(docs: DocumentStore, record: Mapping[str, Any]) -> Doc:
    """Open the inbox for the record's current batch (creating it on the first batch)."""
    fields = _batch_fields(record)
    if not await docs.get(INBOX, record["_id"]):
        await _migrate(docs, record)

    def fn(current: Doc | None) -> Mapping[str, Any] | None:
        if current is None:
            return _new_inbox(record, accepting=True, reason=None)
        if current.get("accepting") and all(current.get(k) == v for k, v in fields.items()):
            return None
        return {**fields, "accepting": True, "closed_reason": None}

    return await change_inbox(docs, record["_id"], fn)


async def _migrate(docs: DocumentStore, record: Mapping[str, Any]) -> None:
    """Item documents for labels a record holds from before the label log (sequence 0: before any)."""
    for item_id, label in record.get("human_labels", {}).items():
        doc_id = item_doc_id(record["_id"], item_id)
        if await docs.get(LABELS, doc_id) is None:
            step = {"label": label, "previous": None, "annotator": "unknown", "at": record.get("updated_at", ""),
                    "batch_id": "", "sequence": 0, "event_id": ""}
            with contextlib.suppress(Conflict):
                await docs.insert(LABELS, {"_id": doc_id, "dataset_id": record["_id"], "item_id": item_id,
                                           "label": label, "annotator": "unknown", "labeled_at": step["at"],
                                           "batch_id": "", "sequence": 0, "history": [step]})


async def close(docs: DocumentStore, record: Mapping[str, Any], *, reason: str) -> Doc:
    """Stop accepting labels (``reason``: ``finalising``, ``labeled`` or ``failed``)."""

    def fn(current: Doc | None) -> Mapping[str, Any] | None:
        if current is None:
            return _new_inbox(record, accepting=False, reason=reason)
        advanced_by = record.get("advanced_by")
        if not current.get("accepting") and current.get("closed_reason") == reason \
                and current.get("advanced_by") == advanced_by:
            return None
        return {"accepting": False, "closed_reason": reason, "advanced_by": advanced_by}

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
    for e in inbox.get("pending", []):
        known.update(e["labels"].values())
    return sorted(known)


def waiting_after(inbox: Mapping[str, Any], batch: BatchInfo, labels: Iterable[str]) -> int:
    """Items of the current batch still without a label once ``labels`` and the pending ones apply."""
    answered = set(labels)
    for e in inbox.get("pending", []):
        answered.update(e["labels"])
    return int(_answered(inbox, batch, answered)["waiting_count"])


def entry(*, event_id: str, batch_id: str, annotator: str, labels: Mapping[str, str], at: str) -> Doc:
    """A pending submission (its ``sequence`` is set when it is appended)."""
    return {"event_id": event_id, "batch_id": batch_id, "annotator": annotator, "labels": dict(labels), "at": at}


async def append(docs: DocumentStore, inbox: Mapping[str, Any], new: Doc) -> Doc:
    """Append ``new`` to the inbox as read (``inbox``): Conflict if it changed since; the stored inbox."""
    seq = int(inbox["sequence"]) + 1
    return await docs.update(INBOX, inbox["_id"], {"sequence": seq, "pending": [*inbox["pending"],
                                                                                  {**new, "sequence": seq}]},
                             expected_version=inbox["_version"])


async def append_once(docs: DocumentStore, dataset_id: str, new: Doc) -> Doc:
    """Append a submission that came straight from the bus, unless its event is pending already or
    was folded (a redelivered or retried event)."""
    for attempt in range(MAX_TRIES):
        inbox = await docs.get(INBOX, dataset_id)
        if inbox is None:
            raise ValueError(f"no label inbox for dataset {dataset_id}")
        event_id = new["event_id"]
        if event_id in inbox.get("folded_events", []) or any(e["event_id"] == event_id for e in inbox["pending"]):
            return inbox
        try:
            return await append(docs, inbox, {**new, "direct": True})
        except Conflict:
            await backoff(attempt)
    raise RetryableError(f"the label inbox of dataset {dataset_id} kept changing concurrently")


class StaleCheck(RetryableError):
    """The inbox moved on (another batch, or it was recreated) since the submission's items were checked
    against it: check them again."""


@dataclass(frozen=True)
class Accepted:
    """A submission appended to the inbox: its ``sequence``, its labels as stored, the classes it
    introduced, the batch's items still waiting after it, and the dataset's run."""

    sequence: int
    labels: dict[str, str]
    new_classes: list[str]
    waiting: int
    run_id: str


@dataclass
class Submission:
    """A submission whose items were checked against the inbox at ``rev`` (``batch``), waiting to be
    appended; its other checks run against the inbox it is appended to."""

    dataset_id: str
    event_id: str
    batch_id: str
    annotator: str
    labels: Mapping[str, str]
    rev: str
    batch: BatchInfo
    at: str
    accepted: asyncio.Future[Accepted] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


MakeEvents = Callable[[Sequence[tuple[Submission, Accepted]]], Awaitable[None]]


class InboxWriter:
    """Group commit of ``POST /labels``: the submissions to one dataset that wait at the same moment
    are appended to its inbox in one version-checked write, then published in one batch.

    :meth:`submit` queues a submission and waits for its outcome. The first submission to a
    dataset with nothing queued starts a commit task; it runs once the event loop has run the
    requests that are ready too, so those join the group. The commit reads the inbox, checks every
    queued submission against it as the ones before it in the group leave it (refusal, classes,
    new classes; each refusal goes to its own submitter), appends the accepted ones with
    consecutive sequences in one ``update(..., expected_version=)`` (a Conflict: read and check all
    again), then calls ``publish`` with the group, and only then answers each submitter. A failed
    write or publish answers every submitter of the group with the error (no 202); what was
    written stays pending and the next fold applies it. Submissions that arrive during a commit
    form the next group.
    """

    def __init__(self, docs: DocumentStore, publish: MakeEvents) -> None:
        self.docs = docs
        self.publish = publish
        self._queued: dict[str, list[Submission]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, submission: Submission) -> Accepted:
        """Append ``submission`` with the group waiting now; its :class:`Accepted` once stored and
        published. Raises its refusal (:class:`InvalidInput`), :class:`StaleCheck`, or the group's error."""
        dataset_id = submission.dataset_id
        queued = self._queued.get(dataset_id)
        if queued is None:
            queued = self._queued[dataset_id] = []
            task = asyncio.get_running_loop().create_task(self._commit_queued(dataset_id),
                                                          name=f"label inbox {dataset_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        queued.append(submission)
        return await asyncio.shield(submission.accepted)

    async def _commit_queued(self, dataset_id: str) -> None:
        await asyncio.sleep(0)  # the requests that are ready now join this group
        group = self._queued.pop(dataset_id, [])
        try:
            done = await self._append(dataset_id, group)
            if done:
                await self.publish(done)
        except BaseException as exc:
            for sub in group:
                if not sub.accepted.done():
                    sub.accepted.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for sub, accepted in done:
            if not sub.accepted.done():
                sub.accepted.set_result(accepted)

    async def _append(self, dataset_id: str, group: Sequence[Submission]) -> list[tuple[Submission, Accepted]]:
        for attempt in range(MAX_TRIES):
            inbox = await self.docs.get(INBOX, dataset_id)
            refused: dict[int, BaseException] = {}
            done: list[tuple[Submission, Accepted]] = []
            if inbox is None:  # a dataset from before the label log: the submitter syncs it and checks again
                refused = {id(sub): StaleCheck(f"dataset {dataset_id} has no label inbox yet") for sub in group}
            else:
                done, refused = _check_group(inbox, group)
            try:
                if done:
                    assert inbox is not None
                    last = done[-1][1].sequence
                    entries = [{**entry(event_id=sub.event_id, batch_id=sub.batch_id, annotator=sub.annotator,
                                        labels=acc.labels, at=sub.at), "sequence": acc.sequence} for sub, acc in done]
                    await self.docs.update(INBOX, dataset_id, {"sequence": last, "pending": [*inbox["pending"],
                                                                                              *entries]},
                                           expected_version=inbox["_version"])
            except Conflict:  # the worker folded (or closed the inbox) meanwhile: check the group again
                await backoff(attempt)
                continue
            for sub in group:
                why = refused.get(id(sub))
                if why is not None and not sub.accepted.done():
                    sub.accepted.set_exception(why)
            return done
        raise InvalidInput(f"dataset {dataset_id!r} is receiving too many submissions at once; send again",
                           status_code=503)


def _check_group(
    inbox: Mapping[str, Any], group: Sequence[Submission]
) -> tuple[list[tuple[Submission, Accepted]], dict[int, BaseException]]:
    """Check each submission against ``inbox`` with the group's accepted ones before it appended."""
    done: list[tuple[Submission, Accepted]] = []
    refused: dict[int, BaseException] = {}
    closed = refusal(inbox, str(inbox["_id"]))
    known = known_classes(inbox)
    allow_new = bool(inbox.get("allow_new_classes", True))
    sequence = int(inbox["sequence"])
    mask: int | None = None
    for sub in group:
        if closed is not None:
            refused[id(sub)] = closed
            continue
        if sub.rev != inbox.get("asked_rev") or sub.batch_id not in inbox["batches"]:
            refused[id(sub)] = StaleCheck(f"the label inbox of dataset {inbox['_id']} moved on to "
                                          f"{inbox.get('asked_rev')}")
            continue
        try:
            clean, new = check_labels(sub.labels, classes=known, allow_new_classes=allow_new)
        except InvalidInput as exc:
            refused[id(sub)] = exc
            continue
        if new:
            known = sorted({*known, *new})
        if mask is None:  # the batch's items without a label once the pending submissions apply
            mask = int(inbox.get("waiting_mask") or "0", 16)
            for e in inbox.get("pending", []):
                mask = _clear(mask, sub.batch, e["labels"])
        mask = _clear(mask, sub.batch, clean)
        sequence += 1
        done.append((sub, Accepted(sequence=sequence, labels=clean, new_classes=new, waiting=bin(mask).count("1"),
                                   run_id=str(inbox["run_id"]))))
    return done, refused


def _clear(mask: int, batch: BatchInfo, items: Iterable[str]) -> int:
    index = batch.index
    for item in items:
        n = index.get(item)
        if n is not None:
            mask &= ~(1 << n)
    return mask


@dataclass(frozen=True)
class Fold:
    """The inbox after a fold, and how many items' labels the fold changed."""

    inbox: Doc
    changed: int


async def fold(docs: DocumentStore, inbox: Doc) -> Fold:
    """Apply the inbox's pending submissions to the item documents, then commit them in the inbox."""
    dataset_id = inbox["_id"]
    done = int(inbox.get("folded_through", 0))
    todo = sorted((e for e in inbox.get("pending", []) if int(e["sequence"]) > done), key=lambda e: e["sequence"])
    if not todo:
        return Fold(inbox=inbox, changed=0)
    steps: dict[str, list[Doc]] = {}
    for e in todo:
        for item_id, label in e["labels"].items():
            steps.setdefault(item_id, []).append({
                "label": label, "annotator": e["annotator"], "at": e["at"], "batch_id": e["batch_id"],
                "sequence": int(e["sequence"]), "event_id": e["event_id"]})
    after = {item_id: await _write_item(docs, dataset_id, item_id, item_steps)
             for item_id, item_steps in steps.items()}
    # what this fold changed, from the items' histories (the same after a redone fold)
    labeled = int(inbox.get("labeled", 0))
    counts: Counter[str] = Counter(inbox.get("class_counts", {}))
    changed = 0
    for doc in after.values():
        mine = [h for h in doc["history"] if int(h["sequence"]) > done]
        if not mine:
            continue
        changed += 1
        before = mine[0]["previous"]
        if before is None:
            labeled += 1
        else:
            counts[before] -= 1
        counts[doc["label"]] += 1
    new_done = int(todo[-1]["sequence"])
    direct = [e["event_id"] for e in todo if e.get("direct")]
    base: list[str] = inbox.get("base_classes") or inbox.get("classes") or []
    committed = {"folded_through": new_done, "labeled": labeled,
                 "class_counts": {c: n for c, n in sorted(counts.items()) if n > 0}, "classes": _classes(base, counts)}
    batch = await batch_info(docs, dataset_id, inbox["asked_rev"]) if inbox.get("batch_id") else BatchInfo(
        frozenset(), ())
    for attempt in range(MAX_TRIES):
        if int(inbox.get("folded_through", 0)) >= new_done:
            return Fold(inbox=inbox, changed=0)  # another worker committed this fold
        fields = {**committed,
                  "pending": [e for e in inbox["pending"] if int(e["sequence"]) > new_done],
                  **_answered(inbox, batch, after),
                  "folded_events": [*inbox.get("folded_events", []), *direct][-FOLDED_EVENTS_KEPT:]}
        try:
            return Fold(inbox=await docs.update(INBOX, dataset_id, fields, expected_version=inbox["_version"]),
                        changed=changed)
        except Conflict:  # a submission was appended meanwhile: keep it pending
            await backoff(attempt)
            current = await docs.get(INBOX, dataset_id)
            assert current is not None
            inbox = current
    raise RetryableError(f"the label inbox of dataset {dataset_id} kept changing concurrently")


async def _write_item(docs: DocumentStore, dataset_id: str, item_id: str, steps: Sequence[Doc]) -> Doc:
    """Add ``steps`` (in sequence order) to the item's document, skipping those it holds; the document.

    Most items are labeled once: the document is inserted straight away, and only if it exists
    already (a correction, a redone fold) read and updated.
    """
    doc_id = item_doc_id(dataset_id, item_id)
    first = [steps[0]]
    for step in steps[1:]:
        if step["label"] != first[-1]["label"]:
            first.append(step)
    fresh = [{**step, "previous": before["label"] if before else None}
             for step, before in zip(first, [None, *first[:-1]], strict=True)]
    last = fresh[-1]
    with contextlib.suppress(Conflict):
        return await docs.insert(LABELS, {"_id": doc_id, "dataset_id": dataset_id, "item_id": item_id,
                                          "label": last["label"], "annotator": last["annotator"],
                                          "labeled_at": last["at"], "batch_id": last["batch_id"],
                                          "sequence": last["sequence"], "history": fresh})
    current = await docs.get(LABELS, doc_id)
    held = int(current["sequence"]) if current is not None else -1
    label = current["label"] if current is not None else None
    new: list[Doc] = []
    for step in steps:
        if step["sequence"] <= held or step["label"] == label:
            continue  # held already (a redone fold), or a repeat of the current label
        new.append({**step, "previous": label})
        label = step["label"]
    if not new:
        assert current is not None
        return current
    last = new[-1]
    fields = {"label": last["label"], "annotator": last["annotator"], "labeled_at": last["at"],
              "batch_id": last["batch_id"], "sequence": last["sequence"]}
    try:
        if current is None:
            return await docs.insert(LABELS, {"_id": doc_id, "dataset_id": dataset_id, "item_id": item_id,
                                              **fields, "history": new})
        return await docs.update(LABELS, doc_id, {**fields, "history": [*current["history"], *new]},
                                 expected_version=current["_version"])
    except Conflict as exc:
        raise RetryableError(f"the label of item {item_id} of dataset {dataset_id} changed concurrently") from exc


async def item_labels(
    docs: DocumentStore, dataset_id: str, *, item_id: str | None = None, limit: int | None = 1000
) -> list[Doc]:
    """The labeled items' documents (label, annotator, history), by item id."""
    where: dict[str, Any] = {"dataset_id": dataset_id}
    if item_id is not None:
        where["item_id"] = item_id
    return await docs.find(LABELS, where, sort=[("item_id", 1)], limit=limit)


async def sync_record(docs: DocumentStore, record: Doc, inbox: Mapping[str, Any]) -> Doc:
    """The record with the people's labels the rounds use (from the item documents), once per round."""
    items = await item_labels(docs, record["_id"], limit=None)
    human = {d["item_id"]: d["label"] for d in items}
    annotators = sorted({*record.get("annotators", []), *(h["annotator"] for d in items for h in d["history"])})
    classes = sorted({*inbox.get("classes", record.get("classes", [])), *human.values()})
    batch = record.get("current_batch") or {}
    counts = {**record.get("counts", {}), "human": len(human),
              "pending": sum(1 for i in batch.get("item_ids", []) if i not in human)}
    if (human, annotators, classes, counts) == (record.get("human_labels"), record.get("annotators"),
                                                record.get("classes"), record.get("counts")):
        return record
    return await records.change(docs, record, human_labels=human, annotators=annotators, classes=classes,
                                counts=counts)


def live(public: dict[str, Any], record: Mapping[str, Any], inbox: Mapping[str, Any] | None) -> dict[str, Any]:
    """The API's view of a record (``public``) with the label figures the inbox moved on since the round."""
    if inbox is None or record.get("state") != "labeling":
        return public
    public["classes"] = list(inbox.get("classes", public.get("classes", [])))
    public["counts"] = {**public.get("counts", {}), "human": int(inbox.get("labeled", 0)),
                        "pending": int(inbox.get("waiting_count", 0))}
    batch = public.get("current_batch")
    if batch and inbox.get("batch_id") == batch.get("batch_id"):
        public["current_batch"] = {**batch, "waiting": int(inbox.get("waiting_count", 0))}
    return public
