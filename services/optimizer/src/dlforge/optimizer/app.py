"""The optimizer's REST API: the latest report of a dataset, its model bundle, predictions with the chosen variant."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Query, Response, UploadFile
from pydantic import Field

from dlforge.common.app import ServicePart, backends_of, deps_of
from dlforge.common.app import create_app as create_common_app
from dlforge.common.auth import role
from dlforge.common.body_limit import body_limit
from dlforge.common.errors import Conflict, InvalidInput, NotFound
from dlforge.common.http_errors import error_responses
from dlforge.common.runtime import Backends
from dlforge.common.settings import CommonSettings
from dlforge.optimizer.predictor import Prediction, Predictor
from dlforge.optimizer.preprocess import InputFormat, normalize, resize_frame
from dlforge.optimizer.settings import OptimizerSettings
from dlforge.optimizer.worker import REPORTS, OptimizerDeps, build_deps, service

router = APIRouter(tags=["optimizer"])
Deps = Annotated[OptimizerDeps, Depends(deps_of("optimizer", OptimizerDeps))]

MAX_IMAGE_BYTES = 32 * 2**20
CAM_MAX_SIDE = 1024  # the map is drawn on a copy no larger: its memory stays bounded whatever the upload's size
FORM_FIELDS_BYTES = 64 << 10  # the multipart framing around the image


async def _latest(backends: Backends, dataset_id: str, model_id: str | None, *, run_id: str | None = None
                  ) -> dict[str, Any]:
    where: dict[str, Any] = {"dataset_id": dataset_id}
    if model_id is not None:
        where["model_id"] = model_id
    if run_id is not None:
        where["run_id"] = run_id
    docs = await backends.docs.find(REPORTS, where, sort=[("updated_at", -1)], limit=1)
    if not docs:
        suffix = (f" and model {model_id!r}" if model_id else "") + (f" of run {run_id!r}" if run_id else "")
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


@router.get("/models/{dataset_id}/bundle", response_class=Response, responses={
    200: {"description": "the model bundle, a zip: model.onnx, preprocessing.json, classes.json, decision.json, "
                         "spec.json, spec_check.json and manifest.json (format version, producer versions, the "
                         "sha256 of every file); `dlforge-edge` runs it",
          "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}},
    **error_responses(404, 409)})
async def get_bundle(
    dataset_id: str,
    model_id: str | None = Query(default=None, max_length=200, description="default: the latest optimized model"),
    run_id: str | None = Query(default=None, max_length=200, description="the model the run optimized"),
    backends: Backends = Depends(backends_of),
) -> Response:
    """The model bundle of the dataset's latest optimized model (or of ``model_id``, or of ``run_id``'s model).

    409 for a model optimized before bundles were made (optimize it again)."""
    doc = await _latest(backends, dataset_id, model_id, run_id=run_id)
    key = doc.get("bundle_key")
    if not key:
        raise Conflict(f"model {doc['model_id']!r} of dataset {dataset_id!r} was optimized before model bundles were "
                       "made: no bundle (optimize it again)")
    try:
        data = await asyncio.to_thread(backends.objects.get_bytes, str(key))
    except NotFound as exc:
        raise NotFound(f"model {doc['model_id']!r} of dataset {dataset_id!r}: its bundle {key!r} is not in the "
                       "object store") from exc
    name = f"dlforge-{_filename_part(dataset_id)}-{_filename_part(str(doc['model_id']))}.zip"
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _filename_part(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


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


class CamPrediction(Prediction):
    """A prediction and, when asked for (``cam=true``), the class activation map of the decided class."""

    cam_png: str | None = Field(default=None, description="base64 PNG: the image, scaled down to at most "
                                f"{CAM_MAX_SIDE} px on its long side (see cam_size), with the heat map of the "
                                "decided class's activation map over it (red: most evidence)")
    cam_size: dict[str, int] | None = Field(default=None, description="{width, height} of cam_png (the image's "
                                            f"own size if neither side is over {CAM_MAX_SIDE} px)")
    cam_class: str | None = Field(default=None, description="the class the map is of (the decided one unless "
                                  "asked for another)")
    cam_peak: dict[str, int] | None = Field(default=None, description="{x, y}: the map's maximum in the uploaded "
                                            "image's pixels")


def _cam_model(deps: OptimizerDeps, backends: Backends, checkpoint_key: str) -> tuple[Any, InputFormat]:
    """The trained torch model of ``checkpoint_key`` and its input format (loaded once per process)."""
    from dlforge.optimizer.handlers import checkpoint_format
    from dlforge.vision.networks import load_checkpoint

    def load() -> tuple[Any, InputFormat]:
        local = Path(deps.settings.work_dir) / "optimizer" / "cam" / checkpoint_key
        backends.objects.get_file(checkpoint_key, local)
        model, _ = load_checkpoint(str(local))
        return model.eval(), checkpoint_format(local)

    return deps.cam_models.get(checkpoint_key, load)  # type: ignore[no-any-return]


def _with_cam(prediction: Prediction, data: bytes, *, name: str, model: Any, fmt: InputFormat,
              cam_class: str) -> CamPrediction:
    import torch

    from dlforge.vision.cam import class_activation_map, overlay_png, scaled_within, upsample
    from dlforge.vision.images import decode

    image = decode(data, name=name)
    width, height = image.size
    x = torch.from_numpy(normalize(resize_frame(image, fmt)[None], fmt))
    index = list(prediction.probabilities).index(cam_class)
    shown = scaled_within(image, CAM_MAX_SIDE)
    del image  # the full-size image is not needed any more
    cam = upsample(class_activation_map(model, x, index), shown.size)
    y, x_peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    sx, sy = width / shown.width, height / shown.height  # back to the upload's pixels (the shown pixel's centre)
    peak = {"x": min(width - 1, int((x_peak + 0.5) * sx)), "y": min(height - 1, int((y + 0.5) * sy))}
    return CamPrediction(**prediction.model_dump(), cam_png=base64.b64encode(overlay_png(shown, cam)).decode(),
                         cam_class=cam_class, cam_peak=peak, cam_size={"width": shown.width, "height": shown.height})


# a prediction changes nothing: whoever may see the dataset's project may ask for one
@router.post("/models/{dataset_id}/predict", response_model=CamPrediction, responses=error_responses(404, 409, 413),
             openapi_extra=role("viewer"))
@body_limit(lambda _: MAX_IMAGE_BYTES + FORM_FIELDS_BYTES)
async def predict(
    deps: Deps,
    dataset_id: str,
    file: UploadFile = File(..., description="an image (PNG, JPEG, ...)"),
    variant: str | None = Query(default=None, max_length=100, description="variant to use (default: the chosen one)"),
    model_id: str | None = Query(default=None, max_length=200),
    cam: bool = Query(default=False, description="also the class activation map of the decided class (from the "
                      "trained torch model's last conv features) as a PNG over the image"),
    cam_class: str | None = Query(default=None, max_length=100,
                                  description="the class to map (default: the decided one)"),
    backends: Backends = Depends(backends_of),
) -> CamPrediction:
    """Classify one uploaded image with the optimized model; the spec's threshold is applied.

    409 with ``cam=true`` for a model optimized before its checkpoint was recorded (no map to draw)."""
    data = await file.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput(f"image larger than {MAX_IMAGE_BYTES // 2**20} MiB", status_code=413)
    if not data:
        raise InvalidInput("the uploaded file is empty")
    doc = await _latest(backends, dataset_id, model_id)
    predictor = await _predictor(deps, backends, doc, variant)
    name = file.filename or "image"
    prediction = await asyncio.to_thread(predictor.predict, data, name=name)
    if not cam:
        return CamPrediction(**prediction.model_dump())
    if not doc.get("checkpoint_key"):
        raise Conflict(f"model {doc['model_id']!r} of dataset {dataset_id!r} was optimized before its trained "
                       "checkpoint was recorded: no class activation map (optimize it again)")
    target = cam_class if cam_class is not None else prediction.label
    if target not in prediction.probabilities:
        raise InvalidInput(f"cam_class {target!r} is not a class of the model; its classes: "
                           f"{', '.join(prediction.probabilities)}")
    model, fmt = await asyncio.to_thread(_cam_model, deps, backends, str(doc["checkpoint_key"]))
    return await asyncio.to_thread(_with_cam, prediction, data, name=name, model=model, fmt=fmt, cam_class=target)


def part() -> ServicePart[OptimizerSettings, OptimizerDeps]:
    from dlforge.optimizer.reconcile import reconcile

    return ServicePart(service=service, router=router, on_start=reconcile, settings=OptimizerSettings, build=build_deps)


def create_app(settings: CommonSettings | None = None) -> FastAPI:
    return create_common_app([part()], settings=settings)
