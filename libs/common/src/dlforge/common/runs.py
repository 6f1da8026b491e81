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

import asyncio
import io
import json
import time
import zipfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from dlforge.common.app import ServicePart, backends_of
from dlforge.common.auth import DEFAULT_PROJECT, check_stream_slot, still_allowed, stream_slot, visible_projects
from dlforge.common.errors import Conflict, NotFound, RetryableError
from dlforge.common.events import Event, RunCancelled, RunDeleted, Topic
from dlforge.common.http_errors import error_responses
from dlforge.common.runtime import Backends, HandlerContext, Service
from dlforge.common.tracing import current_trace_id

RUNS = "runs_view"
# the items people labeled so far, kept in the run document while its labeler stage runs (not served)
LABELED_ITEMS = "labeled_items"
# per stage-starting/finishing topic, the last such event of the run: id, key, version, payload. The report
# is built from them (:mod:`dlforge.common.report`) and a retry re-emits one; served by neither the list,
# the run's page nor its stream (the optimizer's report is tens of kB)
LAST_EVENTS = "last_events"
NOT_SERVED = ("seen", LABELED_ITEMS, LAST_EVENTS)
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
        Topic.HPO_COMPLETED: ("best_params", "best_value", "choice"),
        Topic.MODEL_TRAINED: ("metrics", "no_of_workers"),
        Topic.MODEL_OPTIMIZED: ("chosen_variant", "spec_met"),
    }
    return {k: p[k] for k in keep.get(topic, ()) if k in p}


def apply(run: dict[str, Any] | None, event: Event, *, trace_id: str | None = None) -> dict[str, Any]:
    """Fold one event into the run document (pure; the worker persists the result).

    ``trace_id`` is the trace the event was handled in (its producer's, from the message headers): the
    document keeps the one of the first event it folds (the whole run shares it).
    """
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
        "trace_id": trace_id,
    }
    if doc.get("trace_id") is None and trace_id is not None:
        doc["trace_id"] = trace_id
    payload = event.payload.model_dump(mode="json")
    topic = event.event_type
    # an input event re-emitted by POST /runs/{id}/retry restarts its stage; it finishes nothing again
    retried = event.event_id in {r["event_id"] for r in doc.get("retries", ())}
    doc["updated_at"] = max(doc["updated_at"], at)
    doc["started_at"] = min(doc["started_at"], at)
    doc["events"] = [*doc["events"], {"type": topic.value, "event_id": event.event_id, "occurred_at": at}][-500:]
    doc["seen"] = [*doc.get("seen", []), event.event_id][-SEEN_IDS:]
    doc["counts"] = {**doc["counts"], topic.value: doc["counts"].get(topic.value, 0) + 1}
    stages = {k: dict(v) for k, v in doc["stages"].items()}
    if "dataset_id" in payload and "dataset_id" not in doc:
        doc["dataset_id"] = payload["dataset_id"]
    if topic == Topic.DATASET_UPLOADED and "project" not in doc:  # the first upload's: a later one never moves it
        doc["project"] = payload.get("project", DEFAULT_PROJECT)
    if topic in _TRANSITIONS:
        doc[LAST_EVENTS] = {**doc.get(LAST_EVENTS, {}), topic.value: {
            "event_id": event.event_id, "key": event.key, "schema_version": event.schema_version,
            "occurred_at": at, "causation_id": event.causation_id, "payload": payload}}
        if topic == Topic.DATASET_UPLOADED:
            doc["spec"], doc["options"] = payload["spec"], payload["options"]
            doc["dataset_name"] = payload["name"]
        finishes, starts = _TRANSITIONS[topic]
        if finishes is not None and not retried:
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
    # the handler runs in a span whose parent is the producer's context (from the message headers)
    trace_id = current_trace_id() if current_trace_id() != "-" else None
    for _ in range(10):
        current = await ctx.docs.get(RUNS, event.run_id)
        if current is not None and event.event_id in current.get("seen", ()):
            return  # folded before: a redelivery after a crash between the write and the marker
        doc = apply(current, event, trace_id=trace_id)
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
    return [{k: v for k, v in d.items() if k not in ("events", *NOT_SERVED)} for d in docs]


@router.get("/runs/{run_id}", responses=error_responses(404))
async def get_run(run_id: str, backends: Backends = Depends(backends_of)) -> dict[str, Any]:
    doc = await backends.docs.get(RUNS, run_id)
    if doc is None:
        raise NotFound(f"no run {run_id!r}")
    return served(doc)


def served(doc: dict[str, Any]) -> dict[str, Any]:
    """The run document as ``GET /runs/{run_id}`` and its stream serve it."""
    return {k: v for k, v in doc.items() if k not in NOT_SERVED}


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


# ------------------------------------------------------------------------------------------------
# The pages' endpoints: the live stream, the report, the model download, retry
# ------------------------------------------------------------------------------------------------

STREAM_POLL_SECONDS = 0.3
STREAM_PING_SECONDS = 15
STREAM_RECHECK_SECONDS = 2.0  # how often a stream checks again that its token may still read the run
_INPUT_OF = {starts: topic for topic, (_, starts) in _TRANSITIONS.items() if starts is not None}


async def _run_doc(backends: Backends, run_id: str) -> dict[str, Any]:
    doc = await backends.docs.get(RUNS, run_id)
    if doc is None:
        raise NotFound(f"no run {run_id!r}")
    return doc


@router.get("/runs/{run_id}/stream", responses={
    200: {"description": "`text/event-stream`: `event: run` (the run document as `GET /runs/{run_id}` serves it) at "
                         "once and on each change, `event: end` once the run is succeeded, failed or cancelled",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **error_responses(404, 429)})
async def stream_run(run_id: str, request: Request, backends: Backends = Depends(backends_of)) -> Response:
    """The run document live: sent at once and again whenever it changes (its ``_version``), then ``end``.

    Comment lines (``: ping``) keep idle connections open; the stream stops when the client goes, and with
    ``end`` ``{"state": "unauthorized"}`` when its token is revoked or loses the run's project (checked every
    few seconds). A principal has at most 8 streams open (429 beyond).
    """
    from sse_starlette import EventSourceResponse, ServerSentEvent

    doc = await _run_doc(backends, run_id)
    check_stream_slot(request)

    async def events() -> AsyncIterator[ServerSentEvent]:
        with stream_slot(request):
            current: dict[str, Any] | None = doc
            version = None
            checked = time.monotonic()
            while current is not None:
                if current["_version"] != version:
                    version = current["_version"]
                    yield ServerSentEvent(data=json.dumps(served(current)), event="run")
                    if current["state"] in FINISHED:
                        yield ServerSentEvent(data=json.dumps({"state": current["state"]}), event="end")
                        return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(STREAM_POLL_SECONDS)
                if time.monotonic() - checked >= STREAM_RECHECK_SECONDS:  # a revoked token stops receiving
                    checked = time.monotonic()
                    if not await still_allowed(request, "run", run_id):
                        yield ServerSentEvent(data=json.dumps({"state": "unauthorized"}), event="end")
                        return
                current = await backends.docs.get(RUNS, run_id)
            yield ServerSentEvent(data=json.dumps({"state": "deleted"}), event="end")  # deleted while watched

    return EventSourceResponse(events(), ping=STREAM_PING_SECONDS, headers={"Cache-Control": "no-cache"})


async def _report(backends: Backends, run_id: str) -> dict[str, Any]:
    from dlforge.common.report import build_report

    doc = await _run_doc(backends, run_id)
    if doc["state"] not in FINISHED:
        raise Conflict(f"run {run_id!r} is {doc['state']}: its report comes when it is succeeded, failed or "
                       f"cancelled (follow GET /runs/{run_id}/stream)")
    return await asyncio.to_thread(build_report, doc)


@router.get("/runs/{run_id}/report", responses=error_responses(404, 409))
async def get_report(run_id: str, backends: Backends = Depends(backends_of)) -> dict[str, Any]:
    """The run's report (the JSON ``dlforge run --json`` writes), ``verdict`` first; 409 while it runs."""
    return await _report(backends, run_id)


@router.get("/runs/{run_id}/report.html", responses={
    200: {"description": "the report as one HTML page", "content": {"text/html": {"schema": {"type": "string"}}}},
    **error_responses(404, 409)})
async def get_report_html(run_id: str, backends: Backends = Depends(backends_of)) -> HTMLResponse:
    """The run's report as one self-contained HTML page (the one ``dlforge run --html`` writes)."""
    from dlforge.common.report import render_html, report_images

    report = await _report(backends, run_id)
    images = await asyncio.to_thread(report_images, report, backends.objects)
    page = await asyncio.to_thread(render_html, report, images)
    return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'none'; img-src data:; "
                                                                  "style-src 'unsafe-inline'"})


@router.get("/runs/{run_id}/model", responses={
    200: {"description": "a zip: the chosen variant's model file, `model.json` (how to feed it and read it), "
                         "`report.json` (the run's report) and `optimizer_report.json`",
          "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}},
    **error_responses(404, 409)})
async def get_model(run_id: str, backends: Backends = Depends(backends_of)) -> Response:
    """The chosen model variant of a succeeded run with its report, as a zip download."""
    from dlforge.common.report import build_report

    doc = await _run_doc(backends, run_id)
    optimized = (doc.get(LAST_EVENTS) or {}).get(Topic.MODEL_OPTIMIZED.value)
    if doc["state"] != "succeeded" or optimized is None:
        raise Conflict(f"run {run_id!r} is {doc['state']} and has no optimized model to download")
    payload = optimized["payload"]
    variant = payload["chosen_variant"]
    key = payload["artifacts"].get(variant)
    if not key:
        raise NotFound(f"run {run_id!r}: the chosen variant {variant!r} has no stored model file")
    opt_report = payload["report"]
    entry = (opt_report.get("variants") or {}).get(variant) or {}
    about = {"run_id": run_id, "dataset_id": payload["dataset_id"], "model_id": payload["model_id"],
             "variant": variant, "file": f"{variant}{PurePosixPath(key).suffix}", "runtime": entry.get("runtime"),
             "classes": opt_report.get("classes"), "positive_class": opt_report.get("positive_class"),
             "threshold": (entry.get("threshold") or {}).get("threshold"), "input": opt_report.get("input")}

    def pack() -> bytes:
        report = build_report(doc)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr(about["file"], backends.objects.get_bytes(key))
            z.writestr("model.json", json.dumps(about, indent=2))
            z.writestr("report.json", json.dumps(report, indent=2, default=str))
            z.writestr("optimizer_report.json", json.dumps(opt_report, indent=2, default=str))
        return buf.getvalue()

    try:
        data = await asyncio.to_thread(pack)
    except NotFound as exc:
        raise NotFound(f"run {run_id!r}: the model file {key!r} is not in the object store ({exc})") from exc
    name = f"dlforge-{run_id}-{variant}.zip"
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.post("/runs/{run_id}/retry", status_code=202, responses=error_responses(404, 409))
async def retry_run(run_id: str, backends: Backends = Depends(backends_of)) -> dict[str, Any]:
    """Retry a failed run from its failed stage: its input event is emitted again under a new event id
    (so every consumer handles it anew), and the run is running again."""
    for _ in range(10):
        doc = await _run_doc(backends, run_id)
        if doc["state"] != "failed":
            raise Conflict(f"run {run_id!r} is {doc['state']}, not failed: there is nothing to retry")
        stage = next((s for s in STAGES if doc["stages"][s]["state"] == "failed"), None)
        topic = _INPUT_OF.get(stage) if stage is not None else None
        stored = (doc.get(LAST_EVENTS) or {}).get(topic.value) if topic is not None else None
        if stage is None or topic is None or stored is None:
            raise Conflict(f"run {run_id!r}: no stage input to emit again (failed stage {stage!r}, "
                           f"failure {doc.get('failure')})")
        from dlforge.common.report import last_events

        original = last_events({"run_id": run_id, LAST_EVENTS: {topic.value: stored}}).get(topic)
        if original is None:
            raise Conflict(f"run {run_id!r}: its stored {topic.value} event can no longer be read")
        again = Event.new(original.payload, run_id=run_id, causation_id=original.event_id)
        now = datetime.now(UTC).isoformat()
        stages = {k: dict(v) for k, v in doc["stages"].items()}
        stages[stage] = {**{k: v for k, v in stages[stage].items() if k not in ("reason", "finished_at", "seconds")},
                         "state": "running", "started_at": now}
        retries = [*doc.get("retries", []), {"at": now, "stage": stage, "topic": topic.value,
                                             "event_id": again.event_id, "failure": doc.get("failure")}]
        try:
            await backends.docs.update(RUNS, run_id, {"state": "running", "failure": None, "stages": stages,
                                                      "retries": retries, "updated_at": max(doc["updated_at"], now)},
                                       expected_version=doc["_version"])
        except Conflict:
            continue  # the run view folded an event meanwhile: look again
        try:
            await backends.publish(again)
        except Exception:
            # nothing re-emitted: put the run back as it was, so it can be retried
            current = await backends.docs.get(RUNS, run_id)
            if current is not None:
                await backends.docs.update(RUNS, run_id, {k: doc.get(k) for k in
                                                          ("state", "failure", "stages", "updated_at")} |
                                           {"retries": doc.get("retries", [])}, expected_version=current["_version"])
            raise
        return {"run_id": run_id, "state": "running", "stage": stage, "topic": topic.value,
                "event_id": again.event_id}
    raise Conflict(f"run {run_id!r} changed while it was being retried; try again")
