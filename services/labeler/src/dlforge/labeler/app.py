"""The labeler's REST API.

- ``POST /datasets``: a zip upload (multipart field ``file``) or a server-side ``folder`` (JSON or
  form; only inside ``DLFORGE_LABELER_IMPORT_ROOTS``), with the run's ``spec`` and ``options``
  and optionally ``project`` (default ``default``; the caller must be its operator), ``run_id``,
  ``dataset_id``, ``name``, ``classes``, ``layout``, ``allow_new_classes``.
  201 with the counts, the rejected files and the duplicates; 4xx refusals write nothing.
- ``GET /datasets``, ``GET /datasets/{id}``: records (state, rounds, counts, rejected); the list shows
  the caller's projects only.
- ``GET /datasets/{id}/queue``: the items waiting for a person, with image URLs and the round's
  guess and confidence for each, the classes and the progress against the label budget.
- ``GET /datasets/{id}/review``: once labeled, the items left "needs review" (below the guaranteed
  auto-labeling threshold), least confident first, with the guarantee's figures.
- ``GET /datasets/{id}/items/{item_id}/image``: an item's image bytes.
- ``GET /datasets/{id}/similar?item=…&k=…``: nearest items by embedding (the item itself first).
- ``POST /labels``: a person's labels (or corrections) -> stored, then ``labels.submitted``; never
  dropped after its 202 (:mod:`dlforge.labeler.labels`).
- ``GET /datasets/{id}/labels``: people's labels per item, with each item's history of corrections.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile

from dlforge.common.app import ServicePart, backends_of, deps_of
from dlforge.common.app import create_app as create_common_app
from dlforge.common.auth import (
    DEFAULT_PROJECT,
    audit,
    principal_of,
    reserved_resources,
    role,
    visible_projects,
)
from dlforge.common.auth.enforcement import runtime_of
from dlforge.common.body_limit import body_limit
from dlforge.common.errors import Conflict, Forbidden, InvalidInput, NotFound
from dlforge.common.events import (
    MAX_CLASSES,
    DatasetUploaded,
    Event,
    LabelsSubmitted,
    PipelineOptions,
    Spec,
    Topic,
    UniqueClasses,
    encode,
)
from dlforge.common.http_errors import error_responses
from dlforge.common.runtime import Backends
from dlforge.common.settings import CommonSettings, load_settings
from dlforge.labeler import handlers, records, rerun
from dlforge.labeler import labels as labels_log
from dlforge.labeler.embeddings import Embedder, load_embeddings
from dlforge.labeler.index import SimilarSearch, build_index, load_index
from dlforge.labeler.ingest import (
    MAX_LABEL_CHARS,
    FileTree,
    IngestLimits,
    IngestResult,
    Layout,
    manifest_key,
    open_folder,
    open_zip,
    persist,
    remove_objects,
    scan,
    valid_label,
)
from dlforge.labeler.rerun import RerunRequest
from dlforge.labeler.settings import LabelerSettings
from dlforge.labeler.worker import LabelerDeps, build_deps, index_key, service
from dlforge.vision.manifest import Duplicate, Rejection, load_manifest

router = APIRouter(tags=["labeler"])
Deps = Annotated[LabelerDeps, Depends(deps_of("labeler", LabelerDeps))]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
SIMULATED = "simulated"
# room for the upload form's other fields (spec, options, classes, ...) next to the zip itself
FORM_FIELDS_BYTES = 1 << 20


def _check_id(value: str | None, what: str) -> str | None:
    if value is not None and not _ID.match(value):
        raise ValueError(f"{what} must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)")
    return value


class DatasetRequest(BaseModel):
    """The fields of ``POST /datasets`` besides the upload itself."""

    model_config = ConfigDict(extra="forbid")

    folder: str | None = Field(default=None, min_length=1, max_length=4096,
                               description="server-side folder (inside an import root)")
    name: str | None = Field(default=None, max_length=200)
    spec: Spec = Spec()
    options: PipelineOptions = PipelineOptions()
    run_id: str | None = Field(default=None, max_length=64)
    dataset_id: str | None = Field(default=None, max_length=64)
    project: str = Field(default=DEFAULT_PROJECT, max_length=64,
                         description="the project the dataset and its run belong to (the caller must be its operator)")
    classes: UniqueClasses = Field(default_factory=list, max_length=MAX_CLASSES,
                                   description="class names known in advance (optional)")
    layout: Layout = "auto"
    allow_new_classes: bool | None = Field(default=None, description="labels may add classes (default: setting)")

    @field_validator("run_id")
    @classmethod
    def _run(cls, v: str | None) -> str | None:
        return _check_id(v, "run_id")

    @field_validator("name", "folder")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and re.search(r"[\x00-\x1f\x7f-\x9f]", v):
            raise ValueError("must not contain control characters")
        return v

    @field_validator("dataset_id")
    @classmethod
    def _dataset(cls, v: str | None) -> str | None:
        return _check_id(v, "dataset_id")

    @field_validator("project")
    @classmethod
    def _project(cls, v: str) -> str:
        checked = _check_id(v, "project")
        assert checked is not None
        return checked


class DatasetCreated(BaseModel):
    dataset_id: str
    run_id: str
    project: str
    name: str
    layout: str
    csv_name: str | None
    classes: list[str]
    counts: dict[str, int]
    manifest_key: str
    rejected: list[Rejection]
    duplicates: list[Duplicate]
    skipped: list[str]


def _check_annotator(value: str) -> str:
    text = value.strip()
    if not valid_label(text):
        raise ValueError(f"the annotator must be 1-{MAX_LABEL_CHARS} printable characters without slashes")
    if text.lower() == SIMULATED:
        raise ValueError(f"annotator {SIMULATED!r} is reserved for the simulated annotator")
    return text


class LabelSubmission(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(min_length=1, max_length=64)
    batch_id: str = Field(min_length=1, max_length=100,
                          description="the batch the labels answer: the one waiting, or an earlier one (corrections)")
    labels: dict[Annotated[str, Field(min_length=1, max_length=100)], str] = Field(
        min_length=1, max_length=labels_log.MAX_LABELS_PER_SUBMISSION, description="item_id -> class label")
    annotator: str = Field(default="human", min_length=1, max_length=MAX_LABEL_CHARS,
                           description="who labeled (kept in each item's history); with auth on it is the signed-in "
                           "user: leave it out, or give that user's name (another name is refused with 403)")

    @field_validator("annotator")
    @classmethod
    def _annotator(cls, v: str) -> str:
        return _check_annotator(v)


class LabelsAccepted(BaseModel):
    dataset_id: str
    batch_id: str
    accepted: int
    new_classes: list[str]
    waiting: int = Field(description="items of the batch waiting for people still without a label, counting these "
                         "and every label accepted before them")
    sequence: int = Field(description="the submission's position in the dataset's label log: of two labels of one "
                          "item, the one with the later sequence wins")


class LabelChange(BaseModel):
    label: str
    previous: str | None = Field(description="the item's label before this change (None: it had none)")
    annotator: str
    at: str = Field(description="when the submission was accepted (ISO 8601, UTC)")
    batch_id: str
    sequence: int


class ItemLabel(BaseModel):
    item_id: str
    label: str
    annotator: str
    labeled_at: str
    corrections: int = Field(description="changes after the first label")
    history: list[LabelChange] = Field(description="every change of the item's label, oldest first")


class DatasetLabels(BaseModel):
    dataset_id: str
    accepting: bool = Field(description="whether POST /labels accepts labels for this dataset now")
    pending: int = Field(description="accepted submissions not applied yet (the worker applies them in order)")
    items: list[ItemLabel]


class QueueItem(BaseModel):
    item_id: str
    name: str
    split: str | None
    reason: str | None
    image_url: str
    presigned_url: str | None
    guess: str | None = Field(description="the class the round's classifier predicted for the item when the batch "
                              "was asked (None in the seed round, before any classifier of two classes)")
    confidence: float | None = Field(ge=0.0, le=1.0, description="the classifier's calibrated probability of "
                                     "``guess`` (None with it)")


class Budget(BaseModel):
    labeled: int = Field(description="items people have labeled so far (each counted once, however often "
                         "corrected)")
    total: int = Field(description="how many items people may label in all (``options.label_budget`` of the items)")


class Queue(BaseModel):
    dataset_id: str
    run_id: str
    state: str
    batch_id: str | None
    round: int | None
    classes: list[str]
    allow_new_classes: bool
    budget: Budget
    items: list[QueueItem]


class ReviewItem(BaseModel):
    item_id: str
    name: str
    split: str | None
    confidence: float | None = Field(description="the classifier's confidence, below the auto-labeling threshold")
    image_url: str


class Review(BaseModel):
    dataset_id: str
    state: str
    needs_review: int = Field(description="items of the dataset left without a label for people")
    auto_label_threshold: float | None
    auto_label_coverage: float | None
    auto_label_error_bound: float | None
    warnings: list[str]
    items: list[ReviewItem] = Field(description="up to ``limit`` of them, least confident first")


class Neighbour(BaseModel):
    item_id: str
    name: str
    similarity: float = Field(description="cosine similarity of the embeddings, 1 = identical")
    distance: float = Field(description="Euclidean distance of the L2-normalized embeddings")


class Similar(BaseModel):
    dataset_id: str
    item_id: str
    k: int
    neighbours: list[Neighbour]


# ------------------------------------------------------------------------------------------
# POST /datasets
# ------------------------------------------------------------------------------------------


def _form_schema(*, with_file: bool) -> dict[str, Any]:
    """The form of ``POST /datasets``: DatasetRequest's fields as text (spec, options and classes as JSON)."""
    props: dict[str, Any] = {"file": {"type": "string", "format": "binary", "description": "the zip archive"}} \
        if with_file else {}
    for name, field in DatasetRequest.model_fields.items():
        text = {"spec": "JSON object", "options": "JSON object", "classes": "JSON list or comma-separated names",
                "allow_new_classes": "true/false"}.get(name)
        props[name] = {"type": "string", "description": "; ".join(x for x in (field.description, text) if x)}
    return {"type": "object", "properties": props, "additionalProperties": False}


def _json_field(form: Any, name: str) -> Any:
    raw = form.get(name)
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise InvalidInput(f"form field {name!r} must be text")
    if name == "classes" and not raw.strip().startswith("["):
        return [c.strip() for c in raw.split(",") if c.strip()]
    if name == "allow_new_classes":
        value = raw.strip().lower()
        if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise InvalidInput(f"form field 'allow_new_classes' must be true or false, not {raw[:40]!r}")
        return value in ("1", "true", "yes", "on")
    if name in ("spec", "options", "classes"):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"form field {name!r} is not valid JSON ({exc})") from exc
    return raw


async def _parse(request: Request, settings: LabelerSettings) -> tuple[DatasetRequest, UploadFile | None]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload: UploadFile | None = None
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.labeler_max_upload_bytes:
            raise InvalidInput(f"the upload is {length} bytes, over the limit of {settings.labeler_max_upload_bytes}",
                               status_code=413)
        form = await request.form(max_files=1, max_fields=20)
        file = form.get("file")
        if file is not None and not isinstance(file, UploadFile):
            raise InvalidInput("form field 'file' must be a file upload (a zip archive)")
        upload = file
        fields = {k: _json_field(form, k) for k in form if k != "file"}
        raw: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    elif ctype == "application/json":
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"the body is not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise InvalidInput("the body must be a JSON object")
    else:
        raise InvalidInput("send a zip as multipart/form-data (field 'file') or JSON with a server-side 'folder'",
                           status_code=415)
    try:
        req = DatasetRequest.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput("invalid dataset request", details=json.loads(exc.json(include_url=False))) from exc
    if (upload is None) == (req.folder is None):
        raise InvalidInput("give exactly one of a zip upload (field 'file') or a server-side 'folder'")
    positive = req.spec.positive_class
    if not _allows_new_classes(req, settings) and req.classes and positive is not None and positive not in req.classes:
        raise InvalidInput(f"spec.positive_class {positive!r} is not among the classes {req.classes} and new "
                           "classes are not allowed (allow_new_classes is off)")
    if upload is not None:
        size = upload.size
        if size is None:
            upload.file.seek(0, 2)
            size = upload.file.tell()
            upload.file.seek(0)
        if size > settings.labeler_max_upload_bytes:
            raise InvalidInput(f"the upload is {size} bytes, over the limit of {settings.labeler_max_upload_bytes}",
                               status_code=413)
    return req, upload


def _allows_new_classes(req: DatasetRequest, settings: LabelerSettings) -> bool:
    """Whether labels may add classes: the request's choice, else the setting."""
    return settings.labeler_allow_new_classes if req.allow_new_classes is None else req.allow_new_classes


def _limits(settings: LabelerSettings) -> IngestLimits:
    return IngestLimits(max_file_bytes=settings.labeler_max_file_bytes,
                        max_total_bytes=settings.labeler_max_archive_bytes,
                        max_entries=settings.labeler_max_entries)


def _open_and_scan(
    req: DatasetRequest, upload: UploadFile | None, settings: LabelerSettings
) -> tuple[FileTree, IngestResult]:
    limits = _limits(settings)
    if upload is not None:
        upload.file.seek(0)
        tree: FileTree = open_zip(upload.file, limits)  # type: ignore[arg-type]
    else:
        assert req.folder is not None
        tree = open_folder(req.folder, roots=settings.import_roots, limits=limits)
    try:
        return tree, scan(tree, layout=req.layout, classes=req.classes,
                          allow_new_classes=_allows_new_classes(req, settings))
    except BaseException:
        tree.close()
        raise


@router.post("/datasets", status_code=201, response_model=DatasetCreated,
             responses=error_responses(403, 404, 409, 413, 415, 422),
             openapi_extra={**role("operator"), "requestBody": {"content": {
                 "multipart/form-data": {"schema": _form_schema(with_file=True)},
                 "application/x-www-form-urlencoded": {"schema": _form_schema(with_file=False)},
                 "application/json": {"schema": DatasetRequest.model_json_schema()}}}})
@body_limit(lambda settings: settings.labeler_max_upload_bytes + FORM_FIELDS_BYTES, settings=LabelerSettings)
async def create_dataset(request: Request, backends: Annotated[Backends, Depends(backends_of)],
                         deps: Deps) -> DatasetCreated:
    """Ingest a zip upload or a server-side folder; emits ``dataset.uploaded``."""
    settings = deps.settings
    req, upload = await _parse(request, settings)
    principal_of(request).require(req.project, "operator")
    # the ids are fixed here: a run or dataset id of another project is refused (409) before anything is written
    req = req.model_copy(update={"dataset_id": req.dataset_id or uuid.uuid4().hex[:16],
                                 "run_id": req.run_id or uuid.uuid4().hex})
    assert req.dataset_id is not None and req.run_id is not None
    audit(request, project=req.project, dataset_id=req.dataset_id, run_id=req.run_id)
    # the ids are reserved to the project first (409 if another project's), and released if the import fails
    async with reserved_resources(request, [("run", req.run_id), ("dataset", req.dataset_id)], req.project):
        tree, result = await asyncio.to_thread(_open_and_scan, req, upload, settings)
        try:
            upload_name = upload.filename if upload is not None else None
            created = await import_dataset(backends, settings, req, tree, result, upload_name=upload_name)
        finally:
            tree.close()
    return created


async def import_dataset(
    backends: Backends,
    settings: LabelerSettings,
    req: DatasetRequest,
    tree: FileTree,
    result: IngestResult,
    *,
    upload_name: str | None = None,
    rerun_of: str | None = None,
) -> DatasetCreated:
    """Persist a scanned dataset: record, images and manifest, then ``dataset.uploaded``; all or nothing.

    ``rerun_of``: the dataset whose stored images ``tree`` reads (:mod:`dlforge.labeler.rerun`)."""
    budget = math.floor(req.options.label_budget * len(result.items) + 1e-9)
    if result.labeled_count == 0 and budget == 0:
        raise InvalidInput(
            f"nothing to label: {len(result.items)} image(s), none with a label, and a label budget of "
            f"{req.options.label_budget:g} lets people label none of them; give labels (class folders or "
            f"labels.csv), more images or a larger options.label_budget", status_code=422)
    dataset_id = req.dataset_id or uuid.uuid4().hex[:16]
    run_id = req.run_id or uuid.uuid4().hex
    name = req.name or (upload_name.rsplit(".", 1)[0] if upload_name else None) \
        or (req.folder.rstrip("/").rsplit("/", 1)[-1] if req.folder else dataset_id)
    classes = list(result.classes)
    positive = req.spec.positive_class
    if positive and result.labeled_count == 0 and positive not in classes:
        classes = sorted({*classes, positive})
    counts = {"items": len(result.items), "given": result.labeled_count,
              "unlabeled": len(result.items) - result.labeled_count, "rejected": len(result.rejected),
              "duplicates": len(result.duplicates), "skipped": len(result.skipped), "human": 0, "pending": 0}
    record: dict[str, Any] = {
        "_id": dataset_id, "name": name, "run_id": run_id, "project": req.project, "state": "ingesting",
        "created_at": records.now(),
        "source": "rerun" if rerun_of else "folder" if req.folder else "zip", "rerun_of": rerun_of,
        "layout": result.layout, "csv_name": result.csv_name,
        "spec": req.spec.model_dump(mode="json"), "options": req.options.model_dump(mode="json"),
        "classes": classes, "counts": counts,
        "allow_new_classes": _allows_new_classes(req, settings),
        "rejected": [r.model_dump() for r in result.rejected],
        "duplicates": [d.model_dump() for d in result.duplicates], "skipped": list(result.skipped),
        "manifest_key": manifest_key(dataset_id),
    }
    try:
        record = await backends.docs.insert(records.DATASETS, record)
    except Conflict as exc:
        raise InvalidInput(f"dataset {dataset_id!r} already exists", status_code=409) from exc
    written: list[str] = []
    try:
        manifest = await asyncio.to_thread(persist, backends.objects, tree, dataset_id=dataset_id, name=name,
                                           result=result.model_copy(update={"classes": classes}))
        written = [i.key for i in manifest.items] + [manifest_key(dataset_id)]
        event = records.uploaded_event(record, DatasetUploaded(
            dataset_id=dataset_id, name=name, item_count=len(manifest.items), classes=classes,
            labeled_count=result.labeled_count, rejected_count=len(result.rejected),
            duplicate_count=len(result.duplicates), manifest_key=manifest_key(dataset_id), spec=req.spec,
            options=req.options, project=req.project,
        ))
        # the event goes with the record: a restart before (or after) the publish publishes it again
        # under the same id (see reconcile.py), so it is handled once
        record = await records.change(backends.docs, record, state="ingested",
                                      uploaded_event=encode(event).decode())
        await backends.publish(event)
    except BaseException:
        # persist() removes its own partial writes; after it, undo everything of this dataset
        await asyncio.to_thread(remove_objects, backends.objects, written)
        await backends.docs.delete(records.DATASETS, dataset_id)
        raise
    return DatasetCreated(
        dataset_id=dataset_id, run_id=run_id, project=req.project, name=name, layout=result.layout,
        csv_name=result.csv_name,
        classes=classes, counts=counts, manifest_key=manifest_key(dataset_id), rejected=list(result.rejected),
        duplicates=list(result.duplicates), skipped=list(result.skipped),
    )


# ------------------------------------------------------------------------------------------
# Reading datasets
# ------------------------------------------------------------------------------------------


@router.get("/datasets")
async def list_datasets(
    request: Request,
    backends: Annotated[Backends, Depends(backends_of)],
    state: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Dataset summaries, newest first: those of the projects the caller may see."""
    where = {"state": state} if state else {}
    projects = visible_projects(request)
    if projects is None:
        docs = await backends.docs.find(records.DATASETS, where, sort=[("created_at", -1)], limit=limit)
    else:
        # one query per project (a record from before projects has none: it is in the default project)
        wanted: list[str | None] = [*sorted(projects), *([None] if DEFAULT_PROJECT in projects else [])]
        docs = [d for p in wanted for d in await backends.docs.find(
            records.DATASETS, {**where, "project": p}, sort=[("created_at", -1)], limit=limit)]
        docs = sorted(docs, key=lambda d: d.get("created_at", ""), reverse=True)[:limit]
    return [{"project": DEFAULT_PROJECT} | records.public(d, detail=False) for d in docs]


@router.get("/datasets/{dataset_id}", responses=error_responses(404))
async def get_dataset(dataset_id: str, backends: Annotated[Backends, Depends(backends_of)]) -> dict[str, Any]:
    """The dataset record: state, counts, classes, rounds, rejected files and duplicates."""
    record = await records.load(backends.docs, dataset_id)
    return labels_log.live(records.public(record), record, await labels_log.load_inbox(backends.docs, dataset_id))


@router.get("/datasets/{dataset_id}/queue", response_model=Queue, responses=error_responses(404))
async def get_queue(dataset_id: str, request: Request,
                    backends: Annotated[Backends, Depends(backends_of)], deps: Deps) -> Queue:
    """The items of the batch waiting for a person, with image URLs and the round's guess for each,
    and how many items people labeled of the budget."""
    record = await records.load(backends.docs, dataset_id)
    settings = deps.settings
    batch = record.get("current_batch") or {}
    inbox = await labels_log.load_inbox(backends.docs, dataset_id)
    if inbox is not None and batch and inbox.get("batch_id") == batch.get("batch_id"):
        info = labels_log.BatchInfo(asked=frozenset(), items=tuple(batch.get("item_ids", [])))
        waiting = labels_log.waiting_items(inbox, info)  # as of the labels applied so far
    else:
        answered = record.get("human_labels", {})
        waiting = [i for i in batch.get("item_ids", []) if i not in answered]
    items: list[QueueItem] = []
    if waiting:
        manifest = await asyncio.to_thread(load_manifest, backends.objects, record["manifest_key"])
        by_id = {i.item_id: i for i in manifest.items}
        expires = timedelta(seconds=settings.labeler_presign_seconds)

        def presign(key: str) -> str | None:
            try:
                return backends.objects.presigned_get_url(key, expires=expires)
            except (NotImplementedError, NotFound):
                return None

        urls = await asyncio.to_thread(lambda: [presign(by_id[i].key) for i in waiting])
        base = str(request.url_for("labeler_item_image", dataset_id=dataset_id, item_id="ITEM"))
        guesses: dict[str, dict[str, Any]] = batch.get("guesses") or {}
        for item_id, url in zip(waiting, urls, strict=True):
            item = by_id[item_id]
            guess = guesses.get(item_id) or {}
            items.append(QueueItem(item_id=item_id, name=item.name, split=record.get("splits", {}).get(item_id),
                                   reason=record.get("asked", {}).get(item_id), presigned_url=url,
                                   image_url=base.replace("ITEM", item_id), guess=guess.get("label"),
                                   confidence=guess.get("confidence")))
    live = inbox is not None and record.get("state") == "labeling"
    classes = inbox.get("classes", []) if live and inbox is not None else record.get("classes", [])
    labeled = int(inbox.get("labeled", 0)) if live and inbox is not None \
        else int(record.get("counts", {}).get("human", 0))
    total = handlers.budget_of(int(record.get("counts", {}).get("items", 0)),
                               PipelineOptions.model_validate(record.get("options", {})))
    return Queue(dataset_id=dataset_id, run_id=record["run_id"], state=record["state"],
                 batch_id=batch.get("batch_id"), round=batch.get("round"), classes=list(classes),
                 allow_new_classes=bool(record.get("allow_new_classes", True)),
                 budget=Budget(labeled=labeled, total=total), items=items)


@router.get("/datasets/{dataset_id}/review", response_model=Review, responses=error_responses(404, 409))
async def get_review(dataset_id: str, request: Request, backends: Annotated[Backends, Depends(backends_of)],
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> Review:
    """The items the labeler left for people: no auto-label met the run's error guarantee for them."""
    record = await records.load(backends.docs, dataset_id)
    if record.get("state") != "labeled" or not record.get("labels_key"):
        raise InvalidInput(f"dataset {dataset_id!r} is not labeled yet (state {record.get('state')})",
                           status_code=409)
    labeled = await asyncio.to_thread(load_manifest, backends.objects, record["labels_key"])
    review = sorted((i for i in labeled.items if i.label_source == "needs_review"),
                    key=lambda i: (i.confidence if i.confidence is not None else 0.0, i.item_id))
    base = str(request.url_for("labeler_item_image", dataset_id=dataset_id, item_id="ITEM"))
    result = record.get("result") or {}
    return Review(
        dataset_id=dataset_id, state=record["state"], needs_review=len(review),
        auto_label_threshold=result.get("auto_label_threshold"), auto_label_coverage=result.get("auto_label_coverage"),
        auto_label_error_bound=result.get("auto_label_error_bound"), warnings=list(result.get("warnings", [])),
        items=[ReviewItem(item_id=i.item_id, name=i.name, split=i.split, confidence=i.confidence,
                          image_url=base.replace("ITEM", i.item_id)) for i in review[:limit]],
    )


@router.get("/datasets/{dataset_id}/items/{item_id}/image", name="labeler_item_image",
            responses={200: {"content": {"image/*": {}}, "description": "the image's bytes"},
                       **error_responses(404)})
async def get_item_image(dataset_id: str, item_id: str,
                         backends: Annotated[Backends, Depends(backends_of)]) -> Response:
    record = await records.load(backends.docs, dataset_id)
    manifest = await asyncio.to_thread(load_manifest, backends.objects, record["manifest_key"])
    item = next((i for i in manifest.items if i.item_id == item_id), None)
    if item is None:
        raise NotFound(f"dataset {dataset_id!r} has no item {item_id!r}")
    data = await asyncio.to_thread(backends.objects.get_bytes, item.key)
    info = await asyncio.to_thread(backends.objects.stat, item.key)
    return Response(content=data, media_type=info.content_type)


def _load_search(backends: Backends, record: dict[str, Any], deps: LabelerDeps) -> SimilarSearch:
    settings, searches = deps.settings, deps.searches
    key = record["embeddings_key"]
    cached = searches.get(key)
    if cached is not None:
        searches.move_to_end(key)
        return cached
    manifest = load_manifest(backends.objects, record["manifest_key"])
    ids = [i.item_id for i in manifest.items]
    vectors = load_embeddings(backends.objects, key, ids)
    if vectors is None:
        raise InvalidInput(f"dataset {record['_id']!r}: the embeddings are not ready yet", status_code=409)
    embedder_name = key.rsplit("/", 1)[-1].removesuffix(".npy")
    try:
        index = load_index(backends.objects.get_bytes(index_key(record["_id"], embedder_name)),
                           backend=settings.labeler_index)
    except NotFound:
        index = build_index(vectors, backend=settings.labeler_index)
    search = SimilarSearch(ids, [i.name for i in manifest.items], vectors, index)
    searches[key] = search
    while len(searches) > 4:
        searches.popitem(last=False)
    return search


@router.get("/datasets/{dataset_id}/similar", response_model=Similar, responses=error_responses(404, 409))
async def similar(
    dataset_id: str,
    backends: Annotated[Backends, Depends(backends_of)],
    deps: Deps,
    item: Annotated[str, Query(min_length=1, max_length=1000, description="item id or file name")],
    k: Annotated[int, Query(ge=1, le=200)] = 10,
) -> Similar:
    """The ``k`` items nearest to ``item`` by embedding, the item itself first."""
    record = await records.load(backends.docs, dataset_id)
    if not record.get("embeddings_key"):
        raise InvalidInput(f"dataset {dataset_id!r}: the embeddings are not ready yet (state "
                           f"{record.get('state')})", status_code=409)
    search = await asyncio.to_thread(_load_search, backends, record, deps)
    row = search.row.get(item, search.by_name.get(item))
    if row is None:
        raise NotFound(f"dataset {dataset_id!r} has no item {item!r}")
    kk = min(k, len(search.ids))
    sims, rows = await asyncio.to_thread(search.index.search, search.vectors[row:row + 1], kk + 1)
    pairs = [(int(r), float(s)) for r, s in zip(rows[0], sims[0], strict=True) if r >= 0 and int(r) != row]
    pairs = [(row, float(search.vectors[row] @ search.vectors[row])), *pairs]
    neighbours = [Neighbour(item_id=search.ids[r], name=search.names[r], similarity=round(min(s, 1.0), 6),
                            distance=round(float(np.sqrt(max(0.0, 2.0 - 2.0 * min(s, 1.0)))), 6))
                  for r, s in pairs[:kk]]
    return Similar(dataset_id=dataset_id, item_id=search.ids[row], k=kk, neighbours=neighbours)


# ------------------------------------------------------------------------------------------
# POST /labels
# ------------------------------------------------------------------------------------------


async def _refuse_outside(backends: Backends, deps: LabelerDeps, dataset_id: str, outside: list[str]) -> None:
    """404 for item ids the dataset does not have, else 409 for items nobody asked people about."""
    item_ids = deps.item_ids
    ids = item_ids.get(dataset_id)
    if ids is None:
        manifest = await asyncio.to_thread(load_manifest, backends.objects, manifest_key(dataset_id))
        ids = item_ids[dataset_id] = frozenset(i.item_id for i in manifest.items)
        while len(item_ids) > 16:
            item_ids.popitem(last=False)
    unknown = sorted(i for i in outside if i not in ids)
    if unknown:
        raise InvalidInput(f"dataset {dataset_id!r} has no item(s) {', '.join(repr(i) for i in unknown[:10])}",
                           status_code=404, details={"unknown_items": unknown[:100]})
    raise InvalidInput(f"{len(outside)} item(s) of dataset {dataset_id!r} were not asked of people (they are in no "
                       f"batch so far): {', '.join(outside[:10])}", status_code=409,
                       details={"not_asked": outside[:100]})


_LABELS_DESCRIPTION = """
A person's labels, or corrections, for items people were asked about: those of the batch waiting
for people and of earlier batches. The submission is stored before the 202; it is then applied,
to the waiting batch or, if its batch has closed meanwhile, to the dataset's labels for the next
round. Never dropped: what cannot be applied is refused before the response (404 unknown dataset,
batch or item; 409 an item nobody asked about, or a dataset whose labels are final; 422 a label
that is not a valid class name, or a new class where the dataset allows none).

**Conflict rule:** when an item is labeled more than once, the submission accepted last wins
(``sequence`` in the response orders them). Every change is kept in the item's history (label,
previous label, annotator, time, batch; ``GET /datasets/{id}/labels``); repeating the current label
changes nothing. A class that only a replaced label used is dropped from the dataset's classes, so
no stale class stays in the counts, the training rows or the labeled manifest.
"""


async def inbox_writer(request: Request) -> labels_log.InboxWriter:
    """FastAPI dependency: the app's group-commit writer of label inboxes (one per backends)."""
    backends: Backends = request.app.state.backends
    writer: labels_log.InboxWriter | None = getattr(request.app.state, "label_inbox_writer", None)
    if writer is None or writer.docs is not backends.docs:
        async def publish(group: Sequence[tuple[labels_log.Submission, labels_log.Accepted]]) -> None:
            await backends.publish_all([
                Event(event_id=sub.event_id, event_type=Topic.LABELS_SUBMITTED,
                      schema_version=LabelsSubmitted.SCHEMA_VERSION, run_id=acc.run_id,
                      payload=LabelsSubmitted(dataset_id=sub.dataset_id, batch_id=sub.batch_id, labels=acc.labels,
                                              annotator=sub.annotator, sequence=acc.sequence))
                for sub, acc in group])

        writer = request.app.state.label_inbox_writer = labels_log.InboxWriter(backends.docs, publish)
    return writer


async def _annotator(request: Request, backends: Backends, body: LabelSubmission) -> str:
    """Who labels: with auth on, the signed-in user, who must be a labeler of the dataset's project."""
    principal = principal_of(request)
    if not principal.authenticated:
        return body.annotator
    if "annotator" in body.model_fields_set and body.annotator != principal.name:
        raise Forbidden(f"annotator {body.annotator!r} is not the signed-in user {principal.name!r}: people label "
                        "under their own name (leave 'annotator' out)")
    project = await runtime_of(request).authenticator.project_of("dataset", body.dataset_id)
    if project is None:  # not known to the auth part (yet): the dataset's own record says
        project = (await records.load(backends.docs, body.dataset_id)).get("project", DEFAULT_PROJECT)
    if principal.role_in(project) is None:
        raise NotFound(f"no dataset {body.dataset_id!r}")
    principal.require(project, "labeler")
    return principal.name


@router.post("/labels", status_code=202, response_model=LabelsAccepted, description=_LABELS_DESCRIPTION.strip(),
             openapi_extra=role("labeler"), responses=error_responses(403, 404, 409, 503))
async def submit_labels(body: LabelSubmission, request: Request, backends: Annotated[Backends, Depends(backends_of)],
                        deps: Deps, writer: Annotated[labels_log.InboxWriter, Depends(inbox_writer)]) -> LabelsAccepted:
    """Store a person's labels or corrections; emits ``labels.submitted``.

    The checks that need the dataset's items run here against the inbox as read; the submission is
    then appended with the others waiting at that moment (:class:`dlforge.labeler.labels.InboxWriter`),
    which checks the rest against the inbox it is appended to."""
    dataset_id = body.dataset_id
    annotator = await _annotator(request, backends, body)
    event_id = uuid.uuid4().hex
    for attempt in range(labels_log.MAX_TRIES):
        inbox = await labels_log.load_inbox(backends.docs, dataset_id)
        if inbox is None:
            record = await records.load(backends.docs, dataset_id)
            if record.get("state") == "labeling" and record.get("current_batch"):
                await labels_log.sync_batch(backends.docs, record)  # a dataset from before the label log
                continue
            raise InvalidInput(f"dataset {dataset_id!r} is not waiting for labels (state {record.get('state')})",
                               status_code=409)
        refused = labels_log.refusal(inbox, dataset_id)
        if refused is not None:
            raise refused
        if body.batch_id not in inbox["batches"]:
            record = await records.load(backends.docs, dataset_id)
            if (record.get("current_batch") or {}).get("batch_id") == body.batch_id:
                await labels_log.backoff(attempt)  # the batch opened a moment ago; its inbox follows at once
                continue
            raise InvalidInput(f"dataset {dataset_id!r} has no batch {body.batch_id!r}; the one waiting for labels "
                               f"is {inbox.get('batch_id')!r}", status_code=404)
        try:
            batch = await labels_log.batch_info(backends.docs, dataset_id, inbox["asked_rev"])
        except labels_log.StaleBatch:  # the worker is opening the next batch: its inbox follows at once
            await labels_log.backoff(attempt)
            continue
        outside = sorted(i for i in body.labels if i not in batch.asked)
        if outside:
            await _refuse_outside(backends, deps, dataset_id, outside)
        submission = labels_log.Submission(dataset_id=dataset_id, event_id=event_id, batch_id=body.batch_id,
                                           annotator=annotator, labels=body.labels, rev=inbox["asked_rev"],
                                           batch=batch, at=records.now())
        try:
            accepted = await writer.submit(submission)
            break
        except labels_log.StaleCheck:  # the inbox moved on to another batch meanwhile: check again
            await labels_log.backoff(attempt)
    else:
        raise InvalidInput(f"dataset {dataset_id!r} is receiving too many submissions at once; send again",
                           status_code=503)
    # every label of the submission (the request's size limit bounds it), and a digest to compare submissions
    digest = hashlib.sha256(json.dumps(body.labels, sort_keys=True).encode("utf-8")).hexdigest()
    audit(request, dataset_id=dataset_id, batch_id=body.batch_id, annotator=annotator, sequence=accepted.sequence,
          labels=dict(body.labels), label_count=len(body.labels), labels_sha256=digest)
    return LabelsAccepted(dataset_id=dataset_id, batch_id=body.batch_id, accepted=len(accepted.labels),
                          new_classes=accepted.new_classes, waiting=accepted.waiting, sequence=accepted.sequence)


@router.get("/datasets/{dataset_id}/labels", response_model=DatasetLabels, responses=error_responses(404))
async def get_labels(
    dataset_id: str,
    backends: Annotated[Backends, Depends(backends_of)],
    item: Annotated[str | None, Query(min_length=1, max_length=100, description="only this item")] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
) -> DatasetLabels:
    """People's labels, per item: the current label, who gave it and when, and every change before."""
    inbox = await labels_log.load_inbox(backends.docs, dataset_id)
    if inbox is None:
        await records.load(backends.docs, dataset_id)  # 404 for an unknown dataset
    docs = await labels_log.item_labels(backends.docs, dataset_id, item_id=item, limit=limit)
    items = [ItemLabel(item_id=d["item_id"], label=d["label"], annotator=d["annotator"], labeled_at=d["labeled_at"],
                       corrections=len(d["history"]) - 1,
                       history=[LabelChange.model_validate(h, from_attributes=False) for h in d["history"]])
             for d in docs]
    return DatasetLabels(dataset_id=dataset_id, accepting=bool(inbox and inbox.get("accepting")),
                         pending=len(inbox["pending"]) if inbox else 0, items=items)


# ------------------------------------------------------------------------------------------


@router.post("/datasets/{dataset_id}/rerun", status_code=201, response_model=DatasetCreated,
             responses=error_responses(404, 409, 413))
async def rerun_dataset(dataset_id: str, body: RerunRequest, request: Request,
                        backends: Annotated[Backends, Depends(backends_of)], deps: Deps) -> DatasetCreated:
    """A new dataset and run on the stored images of ``dataset_id``, with the spec and options fields given
    changed; emits ``dataset.uploaded``. People's labels of the earlier run are not carried over."""
    created: DatasetCreated = await rerun.rerun_dataset(request, backends, deps.settings, dataset_id, body)
    return created


root_router = APIRouter(tags=["runs"])


@root_router.post("/runs/{run_id}/rerun", status_code=201, response_model=DatasetCreated,
                  responses=error_responses(404, 409, 413))
async def rerun_run(run_id: str, body: RerunRequest, request: Request,
                    backends: Annotated[Backends, Depends(backends_of)], deps: Deps) -> DatasetCreated:
    """A new run on the images of run ``run_id`` with changed spec/options (served by the labeler, which
    keeps each run's dataset): ``{run_id, dataset_id, ...}`` of the new run."""
    source = await rerun.dataset_of_run(backends, run_id)
    created: DatasetCreated = await rerun.rerun_dataset(request, backends, deps.settings, source, body)
    return created


def part(*, embedder: Embedder | None = None) -> ServicePart[LabelerSettings, LabelerDeps]:
    """The labeler as a part of an app; ``embedder`` replaces the configured one (tests of the loop's logic)."""
    from dlforge.labeler.reconcile import reconcile

    async def build(settings: LabelerSettings, backends: Backends) -> LabelerDeps:
        return await build_deps(settings, backends, embedder=embedder)

    return ServicePart(service=service, router=router, settings=LabelerSettings, build=build, on_start=reconcile,
                       root_router=root_router)


def create_app(settings: CommonSettings | None = None, *, embedder: Embedder | None = None) -> FastAPI:
    """The labeler alone: its API and its worker."""
    return create_common_app([part(embedder=embedder)], settings=settings or load_settings(LabelerSettings))
