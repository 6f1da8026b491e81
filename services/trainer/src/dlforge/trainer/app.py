"""The trainer's REST API: start training jobs and follow them.

``POST /jobs`` validates the request (model source, manifest, hyperparameters), records the job and
trains it in the background (at most ``DLFORGE_TRAINER_MAX_CONCURRENT_JOBS`` at once); ``GET /jobs/{id}``
shows its state, per-epoch metrics, checkpoints and TensorBoard log prefix; ``GET /jobs/{id}/tensorboard``
serves its TensorBoard scalars; ``GET /jobs`` lists jobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dlforge.common.app import ServicePart, backends_of, deps_of
from dlforge.common.app import create_app as create_common_app
from dlforge.common.auth import DEFAULT_PROJECT, visible_ids, visible_projects
from dlforge.common.errors import InvalidInput, NotFound
from dlforge.common.events import MAX_CLASSES, UniqueClasses
from dlforge.common.http_errors import error_responses
from dlforge.common.resource_access import project_of, require_in, require_on
from dlforge.common.runtime import Backends
from dlforge.common.settings import CommonSettings
from dlforge.trainer.handlers import TrainingRequest
from dlforge.trainer.jobs import JobRecords
from dlforge.trainer.monitor import read_scalars
from dlforge.trainer.params import RunOptions, TrainParams
from dlforge.trainer.pruning import decisions_service
from dlforge.trainer.settings import TrainerSettings
from dlforge.trainer.worker import TrainerDeps, build_deps, service
from dlforge.vision.manifest import Manifest

log = logging.getLogger(__name__)

router = APIRouter(tags=["trainer"])
Deps = Annotated[TrainerDeps, Depends(deps_of("trainer", TrainerDeps))]

# the proposer's model repository (dlforge.proposer.repository.weights_key), shared by every project
REPOSITORY_PREFIX = "proposer/models/"


class JobCreate(BaseModel):
    """A training job: the model (a checkpoint, a trained model id or an arch), the data and the parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    arch: str | None = Field(default=None, max_length=100)
    weights_key: str | None = Field(default=None, max_length=1024)
    model_id: str | None = Field(default=None, max_length=200,
                                 description="a model this trainer trained (see trainer_models)")
    manifest_key: str = Field(max_length=1024)
    classes: UniqueClasses = Field(min_length=2, max_length=MAX_CLASSES)
    hparams: TrainParams = TrainParams()
    run_config: RunOptions = RunOptions()
    sample_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    evaluate_test: bool = True


class JobCreated(BaseModel):
    job_id: str
    state: str
    logs_prefix: str


async def _job_project(request: Request, job: dict[str, Any]) -> str:
    """The project a job belongs to: its run's, else (a ``POST /jobs`` job) its dataset's, recorded at the start."""
    if job.get("run_id"):
        return await project_of(request, "run", str(job["run_id"]))
    return str(job.get("project") or DEFAULT_PROJECT)


async def _dataset_of(backends: Backends, manifest_key: str) -> str:
    """The id of the dataset the manifest at ``manifest_key`` describes (InvalidInput if it is not a manifest)."""
    def read() -> str:
        try:
            return Manifest.model_validate_json(backends.objects.get_bytes(manifest_key)).dataset_id
        except ValidationError as exc:
            raise InvalidInput(f"manifest_key {manifest_key!r}: not a dataset manifest ({exc.error_count()} "
                               "problem(s))") from exc

    return await asyncio.to_thread(read)


async def _visible_model(request: Request, records: JobRecords, model: dict[str, Any] | None) -> dict[str, Any] | None:
    """``model`` if the caller may see it (a viewer of its run's or its job's project), else None: another
    project's model is as if there were none."""
    if model is None:
        return None
    source = await records.get(str(model["job_id"])) if model.get("job_id") else None
    if model.get("run_id") or source is not None:
        project = await (project_of(request, "run", str(model["run_id"])) if model.get("run_id")
                         else _job_project(request, source or {}))
        try:
            require_in(request, project, "viewer", what="trained model")
        except NotFound:
            return None
    return model


@router.post("/jobs", status_code=202, response_model=JobCreated, responses=error_responses(403, 404))
async def create_job(body: JobCreate, request: Request, deps: Deps,
                     backends: Backends = Depends(backends_of)) -> JobCreated:
    """Start a training job on a dataset's manifest: the caller must be an operator of the dataset's project (and
    may start from a model trained in a project where they are at least a viewer)."""
    records = JobRecords(backends.docs)
    weights_key = body.weights_key
    if body.model_id is not None:
        if weights_key is not None:
            raise InvalidInput("give weights_key or model_id, not both")
        model = await _visible_model(request, records, await records.model(body.model_id))
        if model is None:
            raise InvalidInput(f"model_id {body.model_id!r}: no such trained model")
        weights_key = model["checkpoint_key"]
    elif weights_key is not None and not weights_key.startswith(REPOSITORY_PREFIX) \
            and visible_projects(request) is not None \
            and await _visible_model(request, records, await records.model_with_checkpoint(weights_key)) is None:
        # any other object could be another project's checkpoint (or not a checkpoint at all): a raw key is
        # taken from the shared repository, or as a trained model's checkpoint the caller may see; a principal
        # of every project may name any object
        raise InvalidInput(f"weights_key {weights_key!r}: neither a repository candidate ({REPOSITORY_PREFIX}...) "
                               "nor the checkpoint of a trained model you may see")
    try:
        training = TrainingRequest(arch=body.arch, weights_key=weights_key, manifest_key=body.manifest_key,
                                   classes=body.classes, hparams=body.hparams, run_config=body.run_config,
                                   sample_fraction=body.sample_fraction, evaluate_test=body.evaluate_test)
    except ValidationError as exc:
        details = json.loads(exc.json(include_url=False, include_context=False))
        raise InvalidInput(f"invalid training job: {exc}", details=details) from exc
    for what, key in (("manifest_key", training.manifest_key), ("weights_key", training.weights_key)):
        if key is not None and not await asyncio.to_thread(backends.objects.exists, key):
            raise InvalidInput(f"{what} {key!r}: no such object")
    dataset_id = await _dataset_of(backends, training.manifest_key)
    project = await require_on(request, "dataset", dataset_id, "operator", what=f"dataset {dataset_id!r}")
    job_id = uuid.uuid4().hex
    key_prefix = f"trainer/jobs/{job_id}"
    await records.create(job_id, kind="api", request=training.model_dump(mode="json"), key_prefix=key_prefix,
                         extra={"name": body.name, **deps.jobs.lease_fields(), "dataset_id": dataset_id,
                                "project": project})
    deps.jobs.submit(job_id, training, key_prefix)
    return JobCreated(job_id=job_id, state="queued", logs_prefix=f"{key_prefix}/tensorboard/")


@router.get("/jobs/{job_id}", responses=error_responses(404))
async def get_job(job_id: str, request: Request, backends: Backends = Depends(backends_of)) -> dict[str, Any]:
    """A job's state, epochs and checkpoints, for a viewer of its project (its run's, or its dataset's)."""
    records = JobRecords(backends.docs)
    job = await records.get(job_id)
    if job is None:
        raise NotFound(f"no training job {job_id!r}")
    require_in(request, await _job_project(request, job), "viewer", what=f"training job {job_id!r}")
    return {**job, "epochs": [{k: v for k, v in e.items() if not k.startswith("_")}
                              for e in await records.epochs(job_id)]}


class JobScalars(BaseModel):
    """A job's TensorBoard scalars, read from its event files."""

    job_id: str
    state: str
    logs_prefix: str = Field(description="object-store prefix of the event files (tensorboard --logdir on a copy)")
    scalars: dict[str, list[tuple[float, int, float | None]]] = Field(
        description="tag -> [wall_time, step, value] by step, as TensorBoard's scalars plugin serves them "
                    "(value null where it was not finite)")


@router.get("/jobs/{job_id}/tensorboard", response_model=JobScalars, responses=error_responses(404))
async def job_tensorboard(job_id: str, request: Request, deps: Deps, backends: Backends = Depends(backends_of),
                          tag: str | None = Query(default=None, max_length=200, description="only this tag"),
                          ) -> JobScalars:
    """The job's TensorBoard scalars (train/step_loss by step; train/loss, val/loss, val/accuracy,
    val/recall/<class> by epoch), read from the event files the trainer writes to the object store with
    TensorBoard's own reader, for a viewer of its project; while the job trains, up to its last epoch."""
    records = JobRecords(backends.docs)
    job = await records.get(job_id)
    if job is None:
        raise NotFound(f"no training job {job_id!r}")
    require_in(request, await _job_project(request, job), "viewer", what=f"training job {job_id!r}")
    prefix = str(job.get("logs_prefix") or f"{job['key_prefix']}/tensorboard/")
    scalars = await asyncio.to_thread(read_scalars, backends.objects, prefix, work_dir=deps.config.work_dir)
    if tag is not None:
        if tag not in scalars:
            raise NotFound(f"training job {job_id!r} has logged no scalar {tag!r}"
                           + (f"; it has {', '.join(sorted(scalars))}" if scalars else " (no event file yet)"))
        scalars = {tag: scalars[tag]}
    return JobScalars(job_id=job_id, state=str(job["state"]), logs_prefix=prefix, scalars=scalars)


@router.get("/jobs")
async def list_jobs(
    request: Request,
    kind: str | None = Query(default=None, pattern="^(trial|final|api)$"),
    state: str | None = Query(default=None, pattern="^(queued|running|completed|stopped|pruned|diverged|failed)$"),
    limit: int = Query(default=100, ge=1, le=1000),
    backends: Backends = Depends(backends_of),
) -> list[dict[str, Any]]:
    """Training jobs, newest first, of the projects the caller may see: a run's job is its run's project's, a job
    started through ``POST /jobs`` its dataset's."""
    jobs = await JobRecords(backends.docs).find(kind=kind, state=state, limit=limit)
    runs = await visible_ids(request, "run", (str(j["run_id"]) for j in jobs if j.get("run_id")))
    projects = visible_projects(request)

    def visible(job: dict[str, Any]) -> bool:
        if job.get("run_id"):
            return str(job["run_id"]) in runs
        return projects is None or str(job.get("project") or DEFAULT_PROJECT) in projects

    return [{k: job.get(k) for k in ("_id", "kind", "name", "run_id", "project", "state", "created_at",
                                     "finished_at", "epochs_done", "metrics", "error")} for job in jobs if visible(job)]


def part() -> ServicePart[TrainerSettings, TrainerDeps]:
    from dlforge.trainer.reconcile import reconcile, resume_jobs, stop_leases

    return ServicePart(service=service, router=router, on_start=reconcile, settings=TrainerSettings, build=build_deps,
                       on_built=resume_jobs, on_stop=stop_leases, also=(decisions_service,))


def create_app(settings: CommonSettings | None = None) -> FastAPI:
    return create_common_app([part()], settings=settings)


__all__ = ["JobCreate", "create_app", "part", "router"]
