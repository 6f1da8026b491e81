"""The optimizer's REST API: the latest report of a dataset, and predictions with the chosen variant."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Query, UploadFile

from dlforge.common.app import ServicePart, backends_of, deps_of
from dlforge.common.app import create_app as create_common_app
from dlforge.common.auth import role
from dlforge.common.body_limit import body_limit
from dlforge.common.errors import InvalidInput, NotFound
from dlforge.common.http_errors import error_responses
from dlforge.common.runtime import Backends
from dlforge.common.settings import CommonSettings
from dlforge.optimizer.predictor import Prediction, Predictor
from dlforge.optimizer.settings import OptimizerSettings
from dlforge.optimizer.worker import REPORTS, OptimizerDeps, build_deps, service

router = APIRouter(tags=["optimizer"])
Deps = Annotated[OptimizerDeps, Depends(deps_of("optimizer", OptimizerDeps))]

MAX_IMAGE_BYTES = 32 * 2**20
FORM_FIELDS_BYTES = 64 << 10  # the multipart framing around the image


async def _latest(backends: Backends, dataset_id: str, model_id: str | None) -> dict[str, Any]:
    where: dict[str, Any] = {"dataset_id": dataset_id}
    if model_id is not None:
        where["model_id"] = model_id
    docs = await backends.docs.find(REPORTS, where, sort=[("updated_at", -1)], limit=1)
    if not docs:
        suffix = f" and model {model_id!r}" if model_id else ""
        raise NotFound(f"no optimized model for dataset {dataset_id!r}{suffix}")
    return docs[0]


@router.get("/reports/{dataset_id}", responses=error_responses(404))
async def get_report(
    dataset_id: str, model_id: str | None = Query(default=None, max_length=200),
    backends: Backends = Depends(backends_of),
) -> dict[str, Any]:
    """The optimizer report of the dataset's latest optimized model (or of ``model_id``)."""
    doc = await _latest(backends, dataset_id, model_id)
    report = await asyncio.to_thread(backends.objects.get_json, doc["report_key"])
    return {
        "dataset_id": dataset_id,
        "model_id": doc["model_id"],
        "run_id": doc.get("run_id"),
        "report_key": doc["report_key"],
        "artifacts": doc.get("artifacts", {}),
        "report": report,
    }


async def _predictor(deps: OptimizerDeps, backends: Backends, doc: dict[str, Any], variant: str | None
                     ) -> Predictor:
    cache = deps.predictors
    cache_key = (doc["report_key"], variant)
    predictor = cache.get(cache_key)
    if predictor is None:
        settings = deps.settings
        predictor = await asyncio.to_thread(
            Predictor.load, backends.objects, doc["report_key"],
            cache_dir=Path(settings.work_dir) / "optimizer" / "models", variant=variant,
            threads=settings.optimizer_threads,
        )
        cache[cache_key] = predictor
    return predictor


# a prediction changes nothing: whoever may see the dataset's project may ask for one
@router.post("/models/{dataset_id}/predict", response_model=Prediction, responses=error_responses(404, 413),
             openapi_extra=role("viewer"))
@body_limit(lambda _: MAX_IMAGE_BYTES + FORM_FIELDS_BYTES)
async def predict(
    deps: Deps,
    dataset_id: str,
    file: UploadFile = File(..., description="an image (PNG, JPEG, ...)"),
    variant: str | None = Query(default=None, max_length=100, description="variant to use (default: the chosen one)"),
    model_id: str | None = Query(default=None, max_length=200),
    backends: Backends = Depends(backends_of),
) -> Prediction:
    """Classify one uploaded image with the optimized model; the spec's threshold is applied."""
    data = await file.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput(f"image larger than {MAX_IMAGE_BYTES // 2**20} MiB", status_code=413)
    if not data:
        raise InvalidInput("the uploaded file is empty")
    doc = await _latest(backends, dataset_id, model_id)
    predictor = await _predictor(deps, backends, doc, variant)
    return await asyncio.to_thread(predictor.predict, data, name=file.filename or "image")


def part() -> ServicePart[OptimizerSettings, OptimizerDeps]:
    from dlforge.optimizer.reconcile import reconcile

    return ServicePart(service=service, router=router, on_start=reconcile, settings=OptimizerSettings, build=build_deps)


def create_app(settings: CommonSettings | None = None) -> FastAPI:
    return create_common_app([part()], settings=settings)
