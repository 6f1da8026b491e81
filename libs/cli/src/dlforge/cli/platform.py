"""Every service in one process: the combined app on shared backends."""

from __future__ import annotations

import importlib

from fastapi import FastAPI

from dlforge.common import runs
from dlforge.common.app import ServicePart, create_app
from dlforge.common.auth import routes as auth
from dlforge.common.runtime import Backends
from dlforge.common.settings import CommonSettings

STAGE_SERVICES = ("labeler", "augmenter", "proposer", "tuner", "trainer", "optimizer")


def service_parts(*, simulated_annotator: bool = False) -> list[ServicePart]:
    """The six stage services, the run view, accounts, the console and, for demos, the simulated annotator."""
    parts = [importlib.import_module(f"dlforge.{name}.app").part() for name in STAGE_SERVICES]
    parts.append(runs.part())
    parts.append(auth.part())
    parts.append(importlib.import_module("dlforge.console.app").part())
    if simulated_annotator:
        parts.append(importlib.import_module("dlforge.labeler.simulated").part())
    return parts


def combined_app(
    *,
    settings: CommonSettings | None = None,
    backends: Backends | None = None,
    simulated_annotator: bool = False,
) -> FastAPI:
    """One FastAPI app serving each service's API under ``/<service>`` plus ``/runs`` and ``/auth``."""
    return create_app(
        service_parts(simulated_annotator=simulated_annotator),
        settings=settings,
        backends=backends,
        mount_prefix=True,
        title="dlforge",
    )
