"""The augmenter at start and at a run's deletion (its own collections ``augmenter_runs``, ``augmenter_samples``).

At start, a record still ``running`` is an augmentation a stop cut short. On a durable bus its
``dataset.labeled`` is delivered again and the handler redoes it (same seeds, same sample ids and
keys; what an earlier attempt wrote is overwritten, and stale samples are removed), so nothing is
done here. On the in-memory bus the event is gone: the record is failed with the reason and the
run gets a ``run.failed``.

``run.deleted``: the run's records, their samples' documents and every object under
``augmenter/<dataset_id>/``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from dlforge.augmenter.worker import RUNS, SAMPLES, service
from dlforge.common.events import Event
from dlforge.common.recovery import bus_is_durable, delete_prefix, fail_run
from dlforge.common.runtime import Backends, HandlerContext


async def reconcile(backends: Backends) -> None:
    """Fail the augmentations nothing will resume (see the module docstring)."""
    if bus_is_durable(backends):
        return
    for record in await backends.docs.find(RUNS, {"status": "running"}):
        reason = ("interrupted: the augmenter restarted on the in-memory bus, which lost the dataset.labeled "
                  "event in flight")
        await backends.docs.upsert(RUNS, {**record, "status": "failed", "error": reason,
                                          "finished_at": datetime.now(UTC).isoformat()})
        await fail_run(backends, stage="augmenter", run_id=record["run_id"], work=record["_id"], reason=reason)


@service.deletes_runs
async def delete_run(event: Event, ctx: HandlerContext[Any]) -> None:
    for record in await ctx.docs.find(RUNS, {"run_id": event.run_id}):
        dataset_id = record["dataset_id"]
        for sample in await ctx.docs.find(SAMPLES, {"dataset_id": dataset_id}):
            await ctx.docs.delete(SAMPLES, sample["_id"])
        await asyncio.to_thread(delete_prefix, ctx.objects, f"augmenter/{dataset_id}/")
        await ctx.docs.delete(RUNS, record["_id"])
