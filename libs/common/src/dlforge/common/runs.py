"""The run view: one document per pipeline run, projected from the events alone.

It consumes every pipeline topic (never another service's collections) and keeps, per run,
each stage's state, start/finish time, seconds and artifact keys, plus the run's failure reason.
The labeler stage's ``human_labels`` counts distinct items people labeled (a correction does not
count an item twice): the items seen in ``labels.submitted`` while it runs, then the labeler's own
count from ``dataset.labeled``.
Served as ``GET /runs`` (the caller's projects only) and ``GET /runs/{run_id}``; ``project`` comes
from the run's ``dataset.uploaded``. ``POST /runs/{run_id}/cancel`` emits
``run.cancelled`` (every service stops working on the run); ``DELETE /runs/{run_id}`` (a finished,
failed or cancelled run only) emits ``run.deleted``: every service removes its documents and objects
of the run, this view included, so the run's page then answers 404.

Folding is idempotent: an event whose id the document lists already is not folded again (a
redelivery after a crash between the write and the processed-marker changes nothing).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from dlforge.common.app import ServicePart, backends_of
from dlforge.common.auth import DEFAULT_PROJECT, visible_projects
from dlforge.common.errors import Conflict, NotFound, RetryableError
from dlforge.common.events import Event, RunCancelled, RunDeleted, Topic
from dlforge.common.http_errors import error_responses
from dlforge.common.runtime import Backends, HandlerContext, Service

RUNS = "runs_view"
# the items people labeled so far, kept in the run document while its labeler stage runs (not served)
LABELED_ITEMS = "labeled_items"
STAGES = ("labeler", "augmenter", "proposer", "tuner", "trainer", "optimizer")
FINISHED = ("succeeded", "failed", "cancelled")
SEEN_IDS = 5000  # event ids a document remembers for idempotent folding

# topic -> (stage it finishes, stage it starts)
_TRANSITIONS: dict[Topic, tuple[str | None, str | None]] = {
    Topic.DATASET_UPLOADED: (None, "labeler"),
    Topic.DATASET_LABELED: ("labeler", "augmenter"),
    Topic.DATASET_AUGMENTED: ("augmenter", "proposer"),
    Topic.MODEL_PROPOSED: ("proposer", "tuner"),
    Topic.HPO_COMPLETED: ("tuner", "trainer"),
    Topic.MODEL_TRAINED: ("trainer", "optimizer"),
    Topic.MODEL_OPTIMIZED: ("optimizer", None),
}

_ARTIFACT_FIELDS = ("manifest_key", "labels_key", "checkpoint_key", "report_key", "weights_key")


def _artifacts(payload: dict[str, Any]) -> dict[str, str]:
    found = {k: v for k, v in payload.items() if k in _ARTIFACT_FIELDS and isinstance(v, str)}
    if isinstance(payload.get("artifacts"), dict):
        found.update({f"artifact:{k}": v for k, v in payload["artifacts"].items()})
    return found


def _summary(topic: Topic, p: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a person wants on the run page for this event."""
    keep: dict[Topic, tuple[str, ...]] = {
        Topic.DATASET_UPLOADED: ("dataset_id", "item_count", "labeled_count", "rejected_count", "duplicate_count"),
        Topic.DATASET_LABELED: ("human_labels", "auto_labels", "needs_review", "rounds"),
        Topic.DATASET_AUGMENTED: ("augmentation",),
        Topic.MODEL_PROPOSED: ("chosen_model_id",),
        Topic.HPO_COMPLETED: ("best_params", "best_value"),
        Topic.MODEL_TRAINED: ("metrics", "no_of_workers"),
        Topic.MODEL_OPTIMIZED: ("chosen_variant", "spec_met"),
    }
    return {k: p[k] for k in keep.get(topic, ()) if k in p}


def apply(run: dict[str, Any] | None, event: Event) -> dict[str, Any]:
    """Fold one event into the run document (pure; the worker persists the result)."""
    if run is not None and event.event_id in run.get("seen", ()):
        return run  # folded before (a redelivery)
    at = event.occurred_at.isoformat()
    doc: dict[str, Any] = dict(run) if run is not None else {
        "_id": event.run_id,
        "run_id": event.run_id,
        "state": "running",
        "started_at": at,
        "updated_at": at,
        "stages": {s: {"state": "pending"} for s in STAGES},
        "events": [],
        "counts": {},
        "failure": None,
    }
    payload = event.payload.model_dump(mode="json")
    topic = event.event_type
    doc["updated_at"] = max(doc["updated_at"], at)
    doc["started_at"] = min(doc["started_at"], at)
    doc["events"] = [*doc["events"], {"type": topic.value, "event_id": event.event_id, "occurred_at": at}][-500:]
    doc["seen"] = [*doc.get("seen", []), event.event_id][-SEEN_IDS:]
    doc["counts"] = {**doc["counts"], topic.value: doc["counts"].get(topic.value, 0) + 1}
    stages = {k: dict(v) for k, v in doc["stages"].items()}
    if "dataset_id" in payload and "dataset_id" not in doc:
        doc["dataset_id"] = payload["dataset_id"]
    if topic == Topic.DATASET_UPLOADED:
        doc["project"] = payload.get("project", DEFAULT_PROJECT)
    if topic in _TRANSITIONS:
        finishes, starts = _TRANSITIONS[topic]
        if finishes is not None:
            st = stages[finishes]
            st["state"] = "succeeded"
            st["finished_at"] = at
            st.setdefault("started_at", at)
            st["seconds"] = round(
                (datetime.fromisoformat(at) - datetime.fromisoformat(st["started_at"])).total_seconds(), 3
            )
            st["artifacts"] = {**st.get("artifacts", {}), **_artifacts(payload)}
            st["summary"] = _summary(topic, payload)
        if starts is not None and stages[starts]["state"] == "pending":
            stages[starts] = {"state": "running", "started_at": at}
            if topic == Topic.DATASET_UPLOADED:
                stages[starts]["artifacts"] = _artifacts(payload)
                stages[starts]["summary"] = _summary(topic, payload)
        if topic == Topic.MODEL_OPTIMIZED and doc["state"] == "running":
            doc["state"] = "succeeded"
            doc["spec_met"] = payload.get("spec_met")
        if topic == Topic.DATASET_LABELED:
            # the labeler's own count of distinct items people labeled is final; the running set goes
            stages["labeler"]["human_labels"] = payload.get("human_labels", 0)
            doc[LABELED_ITEMS] = []
    elif topic == Topic.RUN_CANCELLED:
        if doc["state"] == "running":
            doc["state"] = "cancelled"
            for name, st in stages.items():
                if st["state"] == "running":
                    stages[name] = {**st, "state": "cancelled", "finished_at": at}
        doc["cancelled"] = {"reason": payload["reason"], "at": at}
    elif topic in (Topic.LABELS_REQUESTED, Topic.LABELS_SUBMITTED):
        lab = stages["labeler"]
        lab["rounds"] = max(lab.get("rounds", 0), int(payload.get("round", 0)))
        if topic == Topic.LABELS_SUBMITTED:
            if lab["state"] != "succeeded":  # after dataset.labeled the labels are final
                # distinct items, not submissions: a correction of an item does not count it again
                items = sorted({*(doc.get(LABELED_ITEMS) or []), *payload.get("labels", {})})
                doc[LABELED_ITEMS] = items
                lab["human_labels"] = len(items)
        else:
            lab["waiting_for_labels"] = len(payload.get("item_ids", []))
    elif topic == Topic.HPO_TRIAL:
        stages["tuner"]["trials_started"] = stages["tuner"].get("trials_started", 0) + 1
    elif topic == Topic.HPO_TRIAL_COMPLETED:
        tuner = stages["tuner"]
        tuner["trials_done"] = tuner.get("trials_done", 0) + 1
        tuner.setdefault("trial_states", {})
        tuner["trial_states"] = {**tuner["trial_states"], str(payload["trial_number"]): payload["state"]}
    elif topic == Topic.RUN_FAILED and doc["state"] != "cancelled":
        # a helper outside the stages (e.g. the simulated annotator) fails the stage(s) it was serving
        failed = [payload["stage"]] if payload["stage"] in stages else [
            s for s, st in stages.items() if st["state"] == "running"]
        for stage in failed:
            reason = payload["reason"] if stage == payload["stage"] else f"{payload['stage']}: {payload['reason']}"
            stages[stage] = {**stages[stage], "state": "failed", "finished_at": at, "reason": reason}
        doc["state"] = "failed"
        doc["failure"] = {"stage": payload["stage"], "reason": payload["reason"], "at": at}
    doc["stages"] = stages
    return doc


service = Service("runs")


async def _project(event: Event, ctx: HandlerContext) -> None:
    for _ in range(10):
        current = await ctx.docs.get(RUNS, event.run_id)
        if current is not None and event.event_id in current.get("seen", ()):
            return  # folded before: a redelivery after a crash between the write and the marker
        doc = apply(current, event)
        if current is None:
            try:
                await ctx.docs.insert(RUNS, doc)
                return
            except Exception:  # lost an insert race to another member: fold again
                continue
        try:
            await ctx.docs.update(RUNS, event.run_id, doc, expected_version=current["_version"])
            return
        except Exception:
            continue
    raise RetryableError(f"run {event.run_id}: could not update the run view")


# Per-epoch trial chatter (reports and pruning decisions) is not part of a run's story.
_NOT_PROJECTED = (Topic.DEAD_LETTER, Topic.RUN_DELETED, Topic.HPO_TRIAL_REPORTED, Topic.HPO_TRIAL_DECISION)
for _topic in Topic:
    if _topic not in _NOT_PROJECTED:
        service.handles(_topic)(_project)


@service.deletes_runs
async def _delete_view(event: Event, ctx: HandlerContext) -> None:
    await ctx.docs.delete(RUNS, event.run_id)

router = APIRouter(tags=["runs"])


@router.get("/runs")
async def list_runs(
    request: Request,
    backends: Backends = Depends(backends_of),
    state: str | None = Query(default=None, pattern="^(running|succeeded|failed|cancelled)$"),
    limit: int = Query(default=50, ge=1, le=500),
) -> list[dict[str, Any]]:
    """The runs of the projects the caller may see, newest first."""
    where: dict[str, Any] = {"state": state} if state else {}
    projects = visible_projects(request)
    if projects is None:
        docs = await backends.docs.find(RUNS, where, sort=[("started_at", -1)], limit=limit)
    else:
        # one query per project (a run from before projects has none: it is in the default project)
        wanted: list[str | None] = [*sorted(projects), *([None] if DEFAULT_PROJECT in projects else [])]
        docs = [d for p in wanted
                for d in await backends.docs.find(RUNS, {**where, "project": p}, sort=[("started_at", -1)],
                                                  limit=limit)]
        docs = sorted(docs, key=lambda d: d.get("started_at", ""), reverse=True)[:limit]
    return [{k: v for k, v in d.items() if k not in ("events", "seen", LABELED_ITEMS)} for d in docs]


@router.get("/runs/{run_id}", responses=error_responses(404))
async def get_run(run_id: str, backends: Backends = Depends(backends_of)) -> dict[str, Any]:
    doc = await backends.docs.get(RUNS, run_id)
    if doc is None:
        raise NotFound(f"no run {run_id!r}")
    return {k: v for k, v in doc.items() if k not in ("seen", LABELED_ITEMS)}


class CancelRequest(BaseModel):
    """Why the run is cancelled (kept on the run's page)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="cancelled through the API", min_length=1, max_length=500)


@router.post("/runs/{run_id}/cancel", status_code=202, responses=error_responses(404, 409))
async def cancel_run(run_id: str, body: CancelRequest | None = None,
                     backends: Backends = Depends(backends_of)) -> dict[str, Any]:
    """Cancel a running run: every service skips its further events; trials and training stop at their next check."""
    doc = await backends.docs.get(RUNS, run_id)
    if doc is None:
        raise NotFound(f"no run {run_id!r}")
    if doc["state"] != "running":
        raise Conflict(f"run {run_id!r} is {doc['state']}, not running: there is nothing to cancel")
    reason = (body or CancelRequest()).reason
    event = Event.new(RunCancelled(reason=reason), run_id=run_id)
    await backends.publish(event)
    return {"run_id": run_id, "state": "cancelling", "event_id": event.event_id}


@router.delete("/runs/{run_id}", status_code=202, responses=error_responses(404, 409))
async def delete_run(run_id: str, backends: Backends = Depends(backends_of)) -> dict[str, Any]:
    """Delete a finished, failed or cancelled run: every service removes its documents and objects of it."""
    doc = await backends.docs.get(RUNS, run_id)
    if doc is None:
        raise NotFound(f"no run {run_id!r}")
    if doc["state"] not in FINISHED:
        raise Conflict(f"run {run_id!r} is {doc['state']}; cancel it first (POST /runs/{run_id}/cancel) and "
                       f"delete it once it is cancelled")
    event = Event.new(RunDeleted(dataset_id=doc.get("dataset_id")), run_id=run_id)
    await backends.publish(event)
    return {"run_id": run_id, "state": "deleting", "event_id": event.event_id}


def part() -> ServicePart:
    return ServicePart(service=service, router=router, prefix="")
