"""The tuner at start and at a run's deletion (its own ``tuner_studies``, ``tuner_configs`` and Optuna storage).

At start, for each study still ``running``:

* a trial Optuna holds as RUNNING that no event asked (a stop came between ``study.ask`` and
  recording who asked it) would keep the study open forever: it is failed with the reason;
* a RUNNING trial an event asked is the trainer's: a durable bus delivers its ``hpo.trial`` again,
  the trainer trains it (from its last epoch checkpoint) and the completion is told as usual;
* on the in-memory bus those events are gone: the study is failed with the reason and a ``run.failed``.

``run.deleted``: the run's study (documents, Optuna study, and its memory for warm starts) and its tuning
override.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from dlforge.common.events import Event
from dlforge.common.recovery import bus_is_durable, fail_run
from dlforge.common.runtime import Backends, HandlerContext
from dlforge.hpo import open_storage
from dlforge.tuner.handlers import ASKED_BY, ERROR, StudyContext, load_study
from dlforge.tuner.warmstart import PAST_STUDIES
from dlforge.tuner.worker import CONFIGS, RUNS, STUDIES, now, service

log = logging.getLogger(__name__)

ORPHAN = "interrupted: the tuner stopped between asking this trial and recording who asked it"


def fail_orphans(ctx: StudyContext) -> list[int]:
    """Fail the study's RUNNING trials that no event asked; returns their numbers."""
    study = load_study(ctx)
    orphans = [t for t in study.get_trials(deepcopy=False)
               if t.state == TrialState.RUNNING and ASKED_BY not in t.user_attrs]
    storage = open_storage(ctx.storage_url)
    for trial in orphans:
        storage.set_trial_user_attr(trial._trial_id, ERROR, ORPHAN)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    return [t.number for t in orphans]


async def reconcile(backends: Backends) -> None:
    durable = bus_is_durable(backends)
    for doc in await backends.docs.find(STUDIES, {"state": "running"}):
        ctx = StudyContext.model_validate(doc["context"])
        if durable:
            failed = await asyncio.to_thread(fail_orphans, ctx)
            if failed:
                log.warning("tuner: study %s: trials %s were asked by no event; failed", ctx.study_name, failed)
            continue
        reason = "interrupted: the tuner restarted on the in-memory bus, which lost the study's trial events"
        await backends.docs.upsert(STUDIES, {**doc, "state": "failed", "error": reason, "finished_at": now(),
                                             "updated_at": now()})
        await fail_run(backends, stage="tuner", run_id=doc["run_id"], work=ctx.study_name, reason=reason)


def _delete_study(ctx: StudyContext) -> None:
    try:
        optuna.delete_study(study_name=ctx.study_name, storage=open_storage(ctx.storage_url))
    except KeyError:
        pass  # deleted before (a redelivery)


@service.deletes_runs
async def delete_run(event: Event, ctx: HandlerContext[Any]) -> None:
    for doc in await ctx.docs.find(STUDIES, {"run_id": event.run_id}):
        await asyncio.to_thread(_delete_study, StudyContext.model_validate(doc["context"]))
        await ctx.docs.delete(PAST_STUDIES, doc["_id"])  # its memory for warm starts goes with the run
        await ctx.docs.delete(STUDIES, doc["_id"])
    await ctx.docs.delete(CONFIGS, event.run_id)
    await ctx.docs.delete(RUNS, event.run_id)
