"""The trainer at start and at a run's deletion (its own ``trainer_jobs``, ``trainer_metrics``, ``trainer_models``).

At start:

* a REST job (``kind=api``) this host was running (or had queued) is submitted again
  (:func:`resume_jobs`, before the workers start) and goes on from the state it stored at its last
  checkpoint (``<key_prefix>/resume/state.pt``; from the start if it stored none yet): its record
  shows it ``running`` again and, when it ends, ``resumed_from``. So is one whose lease ran out
  (its trainer died and did not come back under its host name), then and every third of the lease
  while the trainer runs (:class:`dlforge.trainer.runner.JobRunner`);
* a trial or final job still ``queued``/``running`` was cut short. On a durable bus its ``hpo.trial``
  or ``hpo.completed`` is delivered again and the handler trains it on from the state the job stored
  after its last epoch or checkpoint step (``<key_prefix>/resume/state.pt``): the record is marked
  ``interrupted`` until then.
  On the in-memory bus the event is gone: the job is failed with the reason and the run gets a
  ``run.failed``.

``run.deleted``: the run's jobs, their epoch metrics and every object under their key prefixes,
its trained models and ``trainer/models/<run>/``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dlforge.common.events import Event
from dlforge.common.recovery import bus_is_durable, delete_prefix, fail_run
from dlforge.common.runtime import Backends, HandlerContext
from dlforge.trainer.jobs import JOBS, METRICS, MODELS, JobRecords
from dlforge.trainer.worker import TrainerDeps, safe_id, service

log = logging.getLogger(__name__)


async def resume_jobs(deps: TrainerDeps, backends: Backends) -> None:
    """Submit again the REST jobs this host had not finished when it stopped, take over those whose lease ran
    out, and from now on renew this process's leases and look for expired ones (see :mod:`dlforge.trainer.runner`)."""
    await deps.jobs.take_over(at_start=True)
    deps.jobs.start_leases()


async def stop_leases(deps: TrainerDeps) -> None:
    await deps.jobs.close()


async def reconcile(backends: Backends) -> None:
    records = JobRecords(backends.docs)
    durable = bus_is_durable(backends)
    for state in ("queued", "running"):
        for job in await backends.docs.find(JOBS, {"state": state}):
            if job.get("kind") == "api":
                continue  # resume_jobs submitted this host's again
            if durable:
                await records.update(job["_id"], state="interrupted",
                                     note="the trainer stopped; the job goes on from its last stored state when its "
                                          "event is delivered again")
                continue
            reason = "interrupted: the trainer restarted on the in-memory bus, which lost the job's event"
            await records.finish(job["_id"], state="failed", error=reason)
            if job.get("run_id"):
                await fail_run(backends, stage="trainer", run_id=job["run_id"], work=job["_id"], reason=reason)


@service.deletes_runs
async def delete_run(event: Event, ctx: HandlerContext[Any]) -> None:
    for job in await ctx.docs.find(JOBS, {"run_id": event.run_id}):
        for metric in await ctx.docs.find(METRICS, {"job_id": job["_id"]}):
            await ctx.docs.delete(METRICS, metric["_id"])
        await asyncio.to_thread(delete_prefix, ctx.objects, job["key_prefix"].rstrip("/") + "/")
        await ctx.docs.delete(JOBS, job["_id"])
    for model in await ctx.docs.find(MODELS, {"run_id": event.run_id}):
        await ctx.docs.delete(MODELS, model["_id"])
    await asyncio.to_thread(delete_prefix, ctx.objects, f"trainer/models/{safe_id(event.run_id)}/")
