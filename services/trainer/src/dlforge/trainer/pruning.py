"""A trial's side of pruning, without the tuner's study: report each epoch, then read the tuner's decision.

After each epoch but the last the training loop publishes the trial's objective as ``hpo.trial.reported`` (keyed
per trial, with a deterministic event id per step, so a retrained trial's reports are duplicates for
the tuner). The tuner, which alone owns the Optuna study, records it, asks its pruner and answers
with ``hpo.trial.decision``. The trainer's decision consumer (:data:`decisions_service`, its own
consumer group, so a training in progress does not block it) stores each decision in the trainer's
own collection :data:`DECISIONS`; the replica that trains the trial — any replica sharing the
trainer's document store — reads it there before the next epoch (:class:`TrialReporter`).

The reporter waits for the decision of the epoch it just reported, at most ``wait_seconds``; if none
comes (the tuner is down or slow) it trains on without pruning and no longer waits for this trial,
but still reads the decisions that arrive later.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from dlforge.common.bus import EventBus
from dlforge.common.docs import DocumentStore
from dlforge.common.errors import Conflict
from dlforge.common.events import Event, HpoTrialDecision, HpoTrialReported, Topic
from dlforge.common.runtime import HandlerContext, Service, publish_event

log = logging.getLogger(__name__)

DECISIONS = "trainer_trial_decisions"
POLL_SECONDS = 0.05

decisions_service = Service("trainer-decisions")

T = TypeVar("T")
RunOnLoop = Callable[[Coroutine[Any, Any, T]], T]


@decisions_service.deletes_runs
async def forget_decisions(event: Event, ctx: HandlerContext) -> None:
    """A deleted run's pruning decisions go with it."""
    for doc in await ctx.docs.find(DECISIONS, {"run_id": event.run_id}):
        await ctx.docs.delete(DECISIONS, doc["_id"])


def decision_id(study_name: str, trial_number: int, step: int) -> str:
    return f"{study_name}:{trial_number}:{step}"


def report_event_id(study_name: str, trial_number: int, step: int) -> str:
    """The same id whenever the same step of the same trial is reported (a retrained trial, a redelivery)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"dlforge:trainer:{study_name}:{trial_number}:report:{step}").hex


@decisions_service.handles(Topic.HPO_TRIAL_DECISION)
async def on_decision(event: Event, ctx: HandlerContext) -> None:
    """Keep the tuner's decision where the training loop of the trial looks for it."""
    p = event.payload
    assert isinstance(p, HpoTrialDecision)
    try:
        await ctx.docs.insert(DECISIONS, {
            "_id": decision_id(p.study_name, p.trial_number, p.step), "run_id": event.run_id,
            "study_name": p.study_name, "trial_number": p.trial_number, "step": p.step, "action": p.action,
            "reason": p.reason, "event_id": event.event_id,
        })
    except Conflict:
        pass  # the tuner answers a step once (a redelivered report gets the same decision)


class TrialReporter:
    """Reports a trial's epochs to the tuner and tells the training loop whether to go on.

    ``run`` runs a coroutine on the service's event loop and waits for it (the training loop runs in
    another thread); :meth:`report` is called from that thread after each epoch.
    """

    def __init__(self, *, bus: EventBus, docs: DocumentStore, cause: Event, study_name: str, trial_number: int,
                 wait_seconds: float, run: RunOnLoop[Any], clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.docs = docs
        self.cause = cause
        self.study_name = study_name
        self.trial_number = trial_number
        self.wait_seconds = wait_seconds
        self.run = run
        self.clock = clock
        self.intermediate: list[float] = []
        self.pruned_at: int | None = None
        self.reason = ""
        self._waiting = wait_seconds > 0

    def report(self, value: float, step: int, *, last: bool = False) -> bool:
        """Publish ``value`` at ``step``; False if the tuner said stop (a non-finite value stops too).

        The ``last`` step is not published and nothing is waited for: training ends anyway, and its
        value reaches the tuner with the trial's completion (``hpo.trial.completed``), which the tuner
        tells the study together with any step whose report it did not get.
        """
        self.intermediate.append(value)
        if not math.isfinite(value):
            return False
        if last:
            return True
        event = self.cause.follow(HpoTrialReported(study_name=self.study_name, trial_number=self.trial_number,
                                                   step=step, value=value))
        event = event.model_copy(update={"event_id": report_event_id(self.study_name, self.trial_number, step)})
        self.run(publish_event(self.bus, event))
        decision = self._decision(step, wait=self._waiting)
        if decision is None and self._waiting:
            log.warning("no pruning decision for trial %d of %s within %.1fs of step %d: training on without "
                        "waiting for the tuner", self.trial_number, self.study_name, self.wait_seconds, step)
            self._waiting = False
        stop = self._pruned(step)
        if stop is not None:
            self.pruned_at, self.reason = stop["step"], str(stop.get("reason", ""))
            log.info("trial %d of %s pruned by the tuner at step %d: %s", self.trial_number, self.study_name,
                     self.pruned_at, self.reason)
            return False
        return True

    def _decision(self, step: int, *, wait: bool) -> dict[str, Any] | None:
        deadline = self.clock() + (self.wait_seconds if wait else 0.0)
        while True:
            doc = self.run(self.docs.get(DECISIONS, decision_id(self.study_name, self.trial_number, step)))
            if doc is not None or self.clock() >= deadline:
                return doc
            time.sleep(POLL_SECONDS)

    def _pruned(self, step: int) -> dict[str, Any] | None:
        """The earliest 'prune' decision for this trial up to ``step`` (answers may arrive late)."""
        docs = self.run(self.docs.find(DECISIONS, {"study_name": self.study_name, "trial_number": self.trial_number,
                                                   "action": "prune"}, sort=[("step", 1)], limit=1))
        return docs[0] if docs and int(docs[0]["step"]) <= step else None
