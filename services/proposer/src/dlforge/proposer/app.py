"""The proposer's REST API: the model repository and the proposals."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI
from pydantic import BaseModel, Field

from dlforge.common.app import ServicePart, backends_of, deps_of
from dlforge.common.app import create_app as common_create_app
from dlforge.common.auth import role
from dlforge.common.errors import NotFound
from dlforge.common.events import Spec
from dlforge.common.http_errors import error_responses
from dlforge.common.runtime import Backends
from dlforge.common.settings import CommonSettings
from dlforge.proposer.handlers import rank
from dlforge.proposer.repository import MODELS, ModelRecipe, SourceProvider, list_models
from dlforge.proposer.scoring import default_scorers, sub_score_specs
from dlforge.proposer.settings import ProposerSettings
from dlforge.proposer.worker import PROPOSALS, ProposerDeps, build_deps, service

log = logging.getLogger(__name__)

router = APIRouter(tags=["proposer"])
Deps = Annotated[ProposerDeps, Depends(deps_of("proposer", ProposerDeps))]


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in ("_id", "_version")}


@router.get("/models")
async def get_models(deps: Deps, backends: Backends = Depends(backends_of)) -> dict[str, Any]:
    """The repository (Network x Data): every candidate with its source, metrics and weights key."""
    models = [_public(m) for m in await list_models(backends.docs)]
    return {"models": models, "build": deps.repository.status()}


@router.get("/models/{model_id}", responses=error_responses(404))
async def get_model(model_id: str, backends: Backends = Depends(backends_of)) -> dict[str, Any]:
    doc = await backends.docs.get(MODELS, model_id)
    if doc is None:
        raise NotFound(f"no model {model_id!r} in the repository")
    return _public(doc)


@router.post("/models/rebuild", status_code=202, openapi_extra=role("admin"))
async def rebuild_models(deps: Deps, force: bool = False) -> dict[str, Any]:
    """Start (re)building the repository in the background: missing/stale entries, or all with ``force``."""
    running = deps.repository.status()["state"] == "running"
    if not running:
        deps.repository.build(force=force)
    return {"state": "running", "already_running": running, "force": force and not running}


@router.get("/proposals/{dataset_id}", responses=error_responses(404))
async def get_proposal(dataset_id: str, backends: Backends = Depends(backends_of)) -> dict[str, Any]:
    """The ranking of a dataset's proposal: every raw and normalized sub-score, timings, and why the winner won."""
    doc = await backends.docs.get(PROPOSALS, dataset_id)
    if doc is None:
        raise NotFound(f"no proposal for dataset {dataset_id!r}")
    return _public(doc)


class RerankRequest(BaseModel):
    weights: dict[Annotated[str, Field(max_length=100)], Annotated[float, Field(ge=0.0, le=1e6)]] = Field(
        max_length=50, description="sub-score -> weight (0-1,000,000; only their ratios matter), merged over the "
        "weights the proposal used")


@router.post("/proposals/{dataset_id}/rerank", responses=error_responses(404))
async def rerank(dataset_id: str, body: RerankRequest, backends: Backends = Depends(backends_of)) -> dict[str, Any]:
    """The same measurements ranked with other weights (nothing is re-measured or stored)."""
    doc = await backends.docs.get(PROPOSALS, dataset_id)
    if doc is None:
        raise NotFound(f"no proposal for dataset {dataset_id!r}")
    specs = sub_score_specs(default_scorers())
    ranking = rank(doc["ranking"], specs, {**doc["weights"], **body.weights}, Spec(**doc["spec"]),
                   gate_speedup=float(doc.get("scoring", {}).get("gate_speedup", 1.0)))
    return ranking.model_dump()


async def build_repository_on_start(deps: ProposerDeps, backends: Backends) -> None:
    """Start-up hook: build missing or stale repository entries in the background (unless disabled)."""
    if deps.settings.proposer_build_on_start:
        deps.repository.build()


def part(
    *, recipes: Sequence[ModelRecipe] | None = None, sources: Mapping[str, SourceProvider] | None = None
) -> ServicePart[ProposerSettings, ProposerDeps]:
    """The proposer as a part of an app; ``recipes``/``sources`` replace the repository's defaults (tests)."""
    import dlforge.proposer.reconcile  # noqa: F401  (registers the run deletion)

    async def build(settings: ProposerSettings, backends: Backends) -> ProposerDeps:
        return await build_deps(settings, backends, recipes=recipes, sources=sources)

    return ServicePart(service=service, router=router, settings=ProposerSettings, build=build,
                       on_built=build_repository_on_start)


def create_app(settings: CommonSettings | None = None) -> FastAPI:
    return common_create_app([part()], settings=settings)
