"""Checks of a handler whose route names no run or dataset in its path, but reaches one through a record
(a study's ``run_id``, a job's ``run_id``, a manifest's ``dataset_id``): the record's resource decides, not a name.
"""

from __future__ import annotations

from fastapi import Request

from dlforge.common.auth import DEFAULT_PROJECT, principal_of
from dlforge.common.auth.enforcement import runtime_of
from dlforge.common.errors import NotFound


async def project_of(request: Request, kind: str, resource_id: str, *, fallback: str | None = None) -> str:
    """The project of run or dataset ``resource_id`` as the auth part knows it; else ``fallback`` (what the
    service's own record says), else the default project (where everything was before projects)."""
    runtime = getattr(request.app.state, "auth", None)
    if runtime is not None and runtime.mode != "off":
        known = await runtime_of(request).authenticator.project_of(kind, resource_id)
        if known is not None:
            return known
    return fallback or DEFAULT_PROJECT


async def require_on(request: Request, kind: str, resource_id: str, needed: str, *, what: str,
                     fallback: str | None = None) -> str:
    """Require role ``needed`` in the project of run or dataset ``resource_id``; returns that project.

    No role there at all answers NotFound (404) ``no {what}`` as for an unknown id (it is not the caller's),
    a lower role Forbidden (403). Passes for every request while auth is off.
    """
    project = await project_of(request, kind, resource_id, fallback=fallback)
    require_in(request, project, needed, what=what)
    return project


def require_in(request: Request, project: str, needed: str, *, what: str) -> None:
    """Require role ``needed`` in ``project`` for a record of that project: no role there at all answers NotFound
    (404) ``no {what}``, a lower role Forbidden (403)."""
    principal = principal_of(request)
    if principal.role_in(project) is None:
        raise NotFound(f"no {what}")
    principal.require(project, needed)


__all__ = ["project_of", "require_in", "require_on"]
