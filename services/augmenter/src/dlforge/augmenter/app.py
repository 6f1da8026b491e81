"""The augmenter's REST API: the augmentation record of a data set and its generated samples."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query
from pydantic import BaseModel

from dlforge.augmenter.settings import AugmenterSettings
from dlforge.augmenter.worker import RUNS, SAMPLES, AugmenterDeps, build_deps, service
from dlforge.common.app import ServicePart, backends_of
from dlforge.common.app import create_app as create_common_app
from dlforge.common.classnames import ClassName
from dlforge.common.errors import InvalidInput, NotFound
from dlforge.common.http_errors import error_responses
from dlforge.common.runtime import Backends
from dlforge.common.settings import load_settings

router = APIRouter(tags=["augmenter"])
BackendsDep = Annotated[Backends, Depends(backends_of)]


class Sample(BaseModel):
    sample_id: str
    label: str
    parent_id: str
    recipe: str
    confidence: float | None
    predicted: str | None
    kept: bool
    width: int
    height: int
    key: str
    url: str


class SamplePage(BaseModel):
    dataset_id: str
    total: int
    offset: int
    limit: int
    samples: list[Sample]


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in ("_id", "_version")}


async def _run(backends: Backends, dataset_id: str) -> dict[str, Any]:
    doc = await backends.docs.get(RUNS, dataset_id)
    if doc is None:
        raise NotFound(f"no augmentation of data set {dataset_id!r}")
    return doc


@router.get("/datasets/{dataset_id}/augmentation", responses=error_responses(404))
async def get_augmentation(dataset_id: str, backends: BackendsDep) -> dict[str, Any]:
    """Per class real/generated/kept counts, the plan, the X2 filter's held-out accuracy and the timings."""
    return _public(await _run(backends, dataset_id))


@router.get("/datasets/{dataset_id}/samples", responses=error_responses(404))
async def list_samples(
    dataset_id: str,
    backends: BackendsDep,
    label: Annotated[ClassName | None, Query()] = None,
    kept: bool | None = None,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> SamplePage:
    """The generated samples of the latest augmentation (kept and refused), with presigned image URLs."""
    run = await _run(backends, dataset_id)
    if label is not None and label not in run.get("classes", []):
        raise InvalidInput(f"unknown label {label!r}; the data set's classes are {run.get('classes', [])}")
    where: dict[str, Any] = {"dataset_id": dataset_id, "fingerprint": run["fingerprint"]}
    if label is not None:
        where["label"] = label
    if kept is not None:
        where["kept"] = kept
    docs = await backends.docs.find(SAMPLES, where, sort=[("_id", 1)])
    page = docs[offset:offset + limit]

    def sign() -> list[str]:
        return [backends.objects.presigned_get_url(d["key"]) for d in page]

    urls = await asyncio.to_thread(sign)
    samples = [Sample.model_validate({**_public(d), "url": url}) for d, url in zip(page, urls, strict=True)]
    return SamplePage(dataset_id=dataset_id, total=len(docs), offset=offset, limit=limit, samples=samples)


def part() -> ServicePart[AugmenterSettings, AugmenterDeps]:
    from dlforge.augmenter.reconcile import reconcile

    return ServicePart(service=service, router=router, on_start=reconcile, settings=AugmenterSettings, build=build_deps)


def create_app(settings: AugmenterSettings | None = None) -> FastAPI:
    return create_common_app([part()], settings=settings or load_settings(AugmenterSettings))
