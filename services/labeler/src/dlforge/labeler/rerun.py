"""A new run on the images of an earlier dataset, with changed spec or options.

A zip upload leaves no folder to read again, so the new dataset is made from what the labeler
stored for the earlier one: its ingestion manifest (images, given labels, classes) and its image
objects, read through :class:`StoredTree` and copied under the new dataset (the earlier run may be
deleted later; the new one keeps its own copies). The new dataset starts labeling afresh: people's
labels of the earlier run are not carried over (the rerun asks its own questions, so its random
test split stays what the evidence rules need); given labels (class folders, a CSV) are. Random
choices are keyed by the images and the run's seed: a rerun with the same seed draws the same test
split and first questions as the earlier run (and asks them again); another seed draws others.
Served as ``POST /labeler/datasets/{dataset_id}/rerun`` and ``POST /runs/{run_id}/rerun``.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from typing import Any, BinaryIO

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dlforge.common.auth import DEFAULT_PROJECT, principal_of, reserved_resources
from dlforge.common.errors import InvalidInput, NotFound
from dlforge.common.events import PipelineOptions, Spec
from dlforge.common.objects import ObjectStore
from dlforge.common.runtime import Backends
from dlforge.labeler import records
from dlforge.labeler.ingest import FileTree, IngestedItem, IngestLimits, IngestResult
from dlforge.labeler.settings import LabelerSettings
from dlforge.vision.manifest import Manifest, load_manifest


class RerunRequest(BaseModel):
    """What changes for the new run: fields of the spec and of the options (the rest is the earlier run's)."""

    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] = Field(default_factory=dict, description="Spec fields to change")
    options: dict[str, Any] = Field(default_factory=dict, description="PipelineOptions fields to change")
    name: str | None = Field(default=None, min_length=1, max_length=200)
    run_id: str | None = Field(default=None, max_length=64)
    dataset_id: str | None = Field(default=None, max_length=64)

    @field_validator("run_id", "dataset_id")
    @classmethod
    def _ids(cls, v: str | None) -> str | None:
        from dlforge.labeler.app import _check_id

        return _check_id(v, "id")


class StoredTree(FileTree):
    """A dataset's stored images as a file tree: paths are their object keys."""

    def __init__(self, objects: ObjectStore, keys: list[str], limits: IngestLimits) -> None:
        super().__init__(limits)
        self._objects = objects
        self._keys = sorted(keys)

    def files(self) -> list[str]:
        return list(self._keys)

    def _open(self, path: str) -> BinaryIO:
        return io.BytesIO(self._objects.get_bytes(path))  # one image: bounded by labeler_max_file_bytes

    def declared_size(self, path: str) -> int:
        return self._objects.stat(path).size


def _merged(model: type[Spec] | type[PipelineOptions], base: dict[str, Any], changes: dict[str, Any], what: str
            ) -> Any:
    try:
        return model.model_validate({**base, **changes})
    except ValidationError as exc:
        errors = json.loads(exc.json(include_url=False))
        for e in errors:
            e["loc"] = ["body", what, *e.get("loc", [])]
        raise InvalidInput(f"invalid {what}", details=errors) from exc


def _result_of(manifest: Manifest, record: dict[str, Any]) -> IngestResult:
    """The earlier ingestion as a scan result: every accepted image with its given label, if any."""
    items = [IngestedItem(item_id=i.item_id, source=i.key, name=i.name, sha256=i.sha256, size=0, width=i.width,
                          height=i.height, ext=i.key.rsplit(".", 1)[-1],
                          label=i.label if i.label_source == "given" else None, domain=i.domain)
             for i in manifest.items]
    return IngestResult(layout=record.get("layout") or "flat", csv_name=record.get("csv_name"), items=items,
                        classes=list(manifest.classes), rejected=list(manifest.rejected),
                        duplicates=list(manifest.duplicates), skipped=list(record.get("skipped", [])))


async def rerun_dataset(request: Request, backends: Backends, settings: LabelerSettings, source_id: str,
                        req: RerunRequest) -> Any:
    """Create the new dataset (images copied, ``dataset.uploaded`` emitted) in the earlier dataset's
    project; returns its DatasetCreated. The caller must be an operator of that project."""
    from dlforge.labeler.app import DatasetRequest, _limits, import_dataset

    record = await backends.docs.get(records.DATASETS, source_id)
    if record is None:
        raise NotFound(f"no dataset {source_id!r}")
    if record.get("state") in ("ingesting", None) or not record.get("manifest_key"):
        raise InvalidInput(f"dataset {source_id!r} is {record.get('state')}: its images are not stored yet",
                           status_code=409)
    spec = _merged(Spec, record.get("spec") or {}, req.spec, "spec")
    options = _merged(PipelineOptions, record.get("options") or {}, req.options, "options")
    try:
        manifest = await asyncio.to_thread(load_manifest, backends.objects, record["manifest_key"])
    except NotFound as exc:
        raise InvalidInput(f"dataset {source_id!r} has no stored manifest any more (deleted?): {exc}",
                           status_code=409) from exc
    result = _result_of(manifest, record)
    project = record.get("project") or DEFAULT_PROJECT
    principal_of(request).require(project, "operator")
    new = DatasetRequest(name=req.name or record.get("name"), spec=spec, options=options,
                         run_id=req.run_id or uuid.uuid4().hex, dataset_id=req.dataset_id or uuid.uuid4().hex[:16],
                         classes=list(record.get("classes") or manifest.classes),
                         allow_new_classes=record.get("allow_new_classes"), project=project)
    assert new.run_id is not None and new.dataset_id is not None
    # as for an upload: the ids are reserved to the earlier dataset's project first (409 if another project's),
    # and released if the import fails
    async with reserved_resources(request, [("run", new.run_id), ("dataset", new.dataset_id)], project):
        tree = StoredTree(backends.objects, [i.source for i in result.items], _limits(settings))
        try:
            created = await import_dataset(backends, settings, new, tree, result, rerun_of=source_id)
        except NotFound as exc:  # an image object went missing meanwhile: nothing is left half-written
            raise InvalidInput(f"dataset {source_id!r}: a stored image is gone ({exc})", status_code=409) from exc
    return created


async def dataset_of_run(backends: Backends, run_id: str) -> str:
    """The id of the dataset a run was started on (the labeler records it with the dataset)."""
    found = await backends.docs.find(records.DATASETS, {"run_id": run_id}, limit=1)
    if not found:
        raise NotFound(f"no run {run_id!r} with a dataset")
    return str(found[0]["_id"])
