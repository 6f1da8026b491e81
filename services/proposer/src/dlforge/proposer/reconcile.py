"""The proposer at a run's deletion (its own collection ``proposer_proposals``).

Nothing to reconcile at start: a proposal is written in one step at the end of its handler, and
an interrupted one is redone from the ``dataset.augmented`` a durable bus delivers again. The
model repository is shared by every run and stays.
"""

from __future__ import annotations

from typing import Any

from dlforge.common.events import Event
from dlforge.common.runtime import HandlerContext
from dlforge.proposer.worker import PROPOSALS, service


@service.deletes_runs
async def delete_run(event: Event, ctx: HandlerContext[Any]) -> None:
    for doc in await ctx.docs.find(PROPOSALS, {"run_id": event.run_id}):
        await ctx.docs.delete(PROPOSALS, doc["_id"])
