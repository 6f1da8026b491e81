"""The optimizer at start and at a run's deletion (its own collections ``optimizer_jobs``, ``optimizer_reports``).

``optimizer_jobs`` holds one document per ``model.trained`` being optimized (``running`` until the
report is stored). At start a ``running`` one was cut short: on a durable bus its event is
delivered again and the handler redoes it (the work folder is per event and wiped first; variant
files and the report have deterministic keys), so nothing is done; on the in-memory bus it is
failed with the reason and a ``run.failed``.

``run.deleted``: the run's jobs, reports and every object under ``optimizer/<dataset_id>/``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dlforge.common.events import Event
from dlforge.common.recovery import bus_is_durable, delete_prefix, fail_run
from dlforge.common.runtime import Backends, HandlerContext
from dlforge.optimizer.worker import JOBS, REPORTS, service


async def reconcile(backends: Backends) -> None:
    if bus_is_durable(backends):
        return
    for job in await backends.docs.find(JOBS, {"state": "running"}):
        reason = "interrupted: the optimizer restarted on the in-memory bus, which lost the model.trained event"
        await backends.docs.upsert(JOBS, {**job, "state": "failed", "error": reason})
        await fail_run(backends, stage="optimizer", run_id=job["run_id"], work=job["_id"], reason=reason)


@service.deletes_runs
async def delete_run(event: Event, ctx: HandlerContext[Any]) -> None:
    datasets = set()
    for collection in (JOBS, REPORTS):
        for doc in await ctx.docs.find(collection, {"run_id": event.run_id}):
            datasets.add(doc["dataset_id"])
            await ctx.docs.delete(collection, doc["_id"])
    for dataset_id in sorted(datasets):
        await asyncio.to_thread(delete_prefix, ctx.objects, f"optimizer/{dataset_id}/")
