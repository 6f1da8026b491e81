"""The labeler at start and at a run's deletion (its own collection ``labeler_datasets`` only).

At start, per data set state:

* ``ingesting``: the upload request was cut before its images and manifest were complete; nobody
  will finish it. Its objects are removed and the data set is failed (its run never started, so
  no ``run.failed``: no event named the run yet).
* ``ingested``: the upload was complete and its ``dataset.uploaded`` stored with the record, but
  the publish may not have happened: it is published again under its own event id (consumers
  that have it skip it).
* ``embedding`` / ``labeling``: driven by the ``dataset.uploaded`` or ``labels.submitted`` a durable
  bus delivers again. On the in-memory bus those events are gone: the data set is failed with the
  reason and a ``run.failed``.

``run.deleted``: the run's data set records, their label inboxes and per-item label documents, and
every object under their prefixes go.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dlforge.common.events import Event, decode
from dlforge.common.recovery import bus_is_durable, delete_prefix, fail_run
from dlforge.common.runtime import Backends, HandlerContext
from dlforge.common.runtime import publish_event as publish
from dlforge.labeler import labels, records
from dlforge.labeler.ingest import dataset_prefix
from dlforge.labeler.worker import service

log = logging.getLogger(__name__)


async def reconcile(backends: Backends) -> None:
    """Finish or fail what the labeler left unfinished when it stopped (see the module docstring)."""
    docs = backends.docs
    for record in await docs.find(records.DATASETS, {"state": "ingesting"}):
        await asyncio.to_thread(delete_prefix, backends.objects, dataset_prefix(record["_id"]) + "/")
        await records.change(docs, record, state="failed",
                             error="interrupted: the labeler stopped while the upload was being stored")
        log.warning("labeler: upload of %s was interrupted; failed", record["_id"])
    for record in await docs.find(records.DATASETS, {"state": "ingested"}):
        if record.get("uploaded_event"):
            await publish(backends.bus, decode(record["uploaded_event"].encode()))
            log.info("labeler: dataset.uploaded of %s published again after a restart", record["_id"])
    if bus_is_durable(backends):
        return
    for state in ("embedding", "labeling"):
        for record in await docs.find(records.DATASETS, {"state": state}):
            reason = (f"interrupted while {state}: the labeler restarted on the in-memory bus, which lost the "
                      "event in flight; upload the data set again")
            await records.change(docs, record, state="failed", error=reason)
            await fail_run(backends, stage="labeler", run_id=record["run_id"], work=record["_id"], reason=reason)


@service.deletes_runs
async def delete_run(event: Event, ctx: HandlerContext[Any]) -> None:
    """The run's data sets: their records and every object under ``labeler/datasets/<id>/``."""
    for record in await ctx.docs.find(records.DATASETS, {"run_id": event.run_id}):
        dataset_id = record["_id"]
        for item in await ctx.docs.find(labels.LABELS, {"dataset_id": dataset_id}):
            await ctx.docs.delete(labels.LABELS, item["_id"])
        await ctx.docs.delete(labels.INBOX, dataset_id)
        await asyncio.to_thread(delete_prefix, ctx.objects, dataset_prefix(dataset_id) + "/")
        await ctx.docs.delete(records.DATASETS, dataset_id)
