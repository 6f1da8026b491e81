"""The tuner's REST API: studies, their trial tables, stopping one, and a run's tuning override.

``GET /studies``, ``GET /studies/{name}`` (trial table and best trial, read from the Optuna storage),
``POST /studies/{name}/stop`` (no new trials; the study completes when its running trials end),
``GET /tuning/defaults`` and ``PUT /runs/{run_id}/tuning`` (space, sampler, pruner, sample fraction,
trial epochs, first trials to try — for a run the tuner knows (it saw its ``dataset.uploaded``),
set before the run reaches the tuner).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import ValidationError

from dlforge.common.app import ServicePart, backends_of, deps_of
from dlforge.common.app import create_app as create_common_app
from dlforge.common.auth import visible_ids
from dlforge.common.errors import Conflict, InvalidInput, NotFound
from dlforge.common.http_errors import error_responses
from dlforge.common.resource_access import require_on
from dlforge.common.runtime import Backends
from dlforge.common.settings import CommonSettings
from dlforge.tuner.handlers import StudyContext, TuningOverride, chosen_trial, load_study, trial_table
from dlforge.tuner.settings import TunerSettings
from dlforge.tuner.worker import (
    CONFIGS,
    RUNS,
    STUDIES,
    TunerDeps,
    build_deps,
    change_study,
    now,
    service,
    study_name_for,
)

router = APIRouter(tags=["tuner"])
Deps = Annotated[TunerDeps, Depends(deps_of("tuner", TunerDeps))]

_SUMMARY = ("_id", "run_id", "state", "stop_requested", "n_trials", "best_value", "best_params", "best_trial",
            "created_at", "updated_at", "finished_at")


@router.get("/studies")
async def list_studies(
    request: Request,
    state: str | None = Query(default=None, pattern="^(running|completed|failed)$"),
    limit: int = Query(default=100, ge=1, le=1000),
    backends: Backends = Depends(backends_of),
) -> list[dict[str, Any]]:
    """The studies of the runs of the caller's projects, newest first."""
    docs = await backends.docs.find(STUDIES, {"state": state} if state else None, sort=[("created_at", -1)],
                                    limit=limit)
    runs = await visible_ids(request, "run", (str(d.get("run_id")) for d in docs))
    return [{k: d.get(k) for k in _SUMMARY} for d in docs if str(d.get("run_id")) in runs]


async def _study(request: Request, backends: Backends, name: str, needed: str) -> dict[str, Any]:
    """The study document, once the caller holds ``needed`` in the project of the run it stores (``run_id``;
    never read off the name: a retry's study is ``dlforge-<run>-retry<k>``). 404 as for an unknown study
    when the caller has no role there."""
    doc = await backends.docs.get(STUDIES, name)
    if doc is None:
        raise NotFound(f"no study {name!r}")
    run_id = str(doc["run_id"])
    run = await backends.docs.get(RUNS, run_id)
    await require_on(request, "run", run_id, needed, what=f"study {name!r}",
                     fallback=run.get("project") if run else None)
    return doc


@router.get("/studies/{name}", responses=error_responses(404))
async def get_study(name: str, request: Request, backends: Backends = Depends(backends_of)) -> dict[str, Any]:
    doc = await _study(request, backends, name, "viewer")
    ctx = StudyContext.model_validate(doc["context"])

    def read() -> dict[str, Any]:
        study = load_study(ctx)
        choice = chosen_trial(study, ctx.config)
        best = choice.trial
        return {
            "trials": [t.model_dump() for t in trial_table(study)],
            "best": {"number": best.number, "value": best.value, "params": best.params, "choice": choice.reason}
            if best else None,
            "direction": "maximize",
            "objective": "val_accuracy",
        }

    live = await asyncio.to_thread(read)
    return {**{k: doc.get(k) for k in _SUMMARY}, "config": doc["context"]["config"], "failure": doc.get("failure"),
            **live}


@router.post("/studies/{name}/stop", responses=error_responses(404, 409))
async def stop_study(name: str, request: Request, backends: Backends = Depends(backends_of)) -> dict[str, Any]:
    await _study(request, backends, name, "operator")

    async def request_stop(doc: dict[str, Any]) -> dict[str, Any] | None:
        if doc.get("state") != "running":
            raise Conflict(f"study {name!r} is {doc.get('state')}, not running")
        return None if doc.get("stop_requested") else {"stop_requested": True}

    doc = await change_study(backends.docs, name, request_stop)
    return {k: doc.get(k) for k in _SUMMARY}


@router.get("/tuning/defaults")
async def tuning_defaults(deps: Deps) -> dict[str, Any]:
    return deps.defaults.model_dump(mode="json")


@router.put("/runs/{run_id}/tuning", responses=error_responses(404, 409))
async def set_run_tuning(
    run_id: str, body: dict[str, Any], deps: Deps, backends: Backends = Depends(backends_of)
) -> dict[str, Any]:
    """Override the defaults for one run the tuner knows; refused once the run's study exists."""
    if await backends.docs.get(RUNS, run_id) is None:
        raise NotFound(f"no run {run_id!r} (the tuner learns a run from its dataset.uploaded event)")
    if await backends.docs.get(STUDIES, study_name_for(run_id)) is not None:
        raise Conflict(f"run {run_id!r} is already being tuned; its study cannot change")
    try:
        override = TuningOverride.model_validate(body)
        config = override.apply(deps.defaults)
    except ValidationError as exc:
        details = json.loads(exc.json(include_url=False, include_context=False))
        raise InvalidInput(f"invalid tuning override: {exc}", details=details) from exc
    await backends.docs.upsert(CONFIGS, {"_id": run_id, "override": override.model_dump(mode="json",
                                                                                        exclude_none=True),
                                         "updated_at": now()})
    return {"run_id": run_id, "config": config.model_dump(mode="json")}


def part() -> ServicePart[TunerSettings, TunerDeps]:
    from dlforge.tuner.reconcile import reconcile

    return ServicePart(service=service, router=router, on_start=reconcile, settings=TunerSettings, build=build_deps)


def create_app(settings: CommonSettings | None = None) -> FastAPI:
    return create_common_app([part()], settings=settings)


__all__ = ["create_app", "part", "router"]
