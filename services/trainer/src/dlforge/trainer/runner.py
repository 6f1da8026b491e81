"""REST jobs (``POST /jobs``) trained in background tasks of the trainer process, a few at a time.

A job keeps the state to resume from while it trains (see :func:`dlforge.trainer.handlers.run_training`),
so when this process is killed and started again, :func:`dlforge.trainer.reconcile.resume_jobs` submits
its unfinished jobs again and they go on from their last checkpoint instead of failing.

**Leases.** A killed trainer does not always come back under its host name: a Kubernetes pod that is
replaced gets a new one, and another replica may be the only trainer left. So each REST job carries a
lease (``lease_holder``, ``lease_until`` in seconds since the epoch) that the process training it renews
every third of ``lease_s``. Every trainer looks, as often, for ``queued``/``running`` REST jobs whose
lease ran out (or that predate leases) and takes them over with a compare-and-set on the job record's
version, so two trainers never both take one job; the taker resumes it from its stored state. A
process that finds its job taken over (it was paused past its lease) stops that training at the end
of the epoch, writes nothing more to its record and leaves the stored state to the new holder.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from dlforge.common.errors import Conflict, InvalidInput, NotFound
from dlforge.common.runtime import Backends
from dlforge.trainer.handlers import (
    TrainerConfig,
    TrainingRequest,
    flat_metrics,
    resume_key,
    run_training,
    save_model,
)
from dlforge.trainer.jobs import JOBS, OWNER, JobRecords, LeaseLost, LoopBridge
from dlforge.trainer.params import EpochMetrics

log = logging.getLogger(__name__)


class JobRunner:
    """Runs REST jobs in background tasks, at most ``concurrent`` at once, and holds their leases."""

    def __init__(self, backends: Backends, config: TrainerConfig, *, concurrent: int, lease_s: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.backends = backends
        self.config = config
        self.records = JobRecords(backends.docs)
        self.slots = asyncio.Semaphore(concurrent)
        self.tasks: set[asyncio.Task[None]] = set()
        self.lease_s = lease_s
        self.clock = clock
        self.holder = f"{OWNER}/{os.getpid()}/{uuid.uuid4().hex[:12]}"  # this process, unlike the host name
        self.held: set[str] = set()  # the jobs whose lease this process renews
        self.lost: set[str] = set()  # held jobs another trainer took over (or this one stops at shutdown)
        self.running: dict[str, asyncio.Task[None]] = {}  # one task per job at most, until it has ended
        self._leases: asyncio.Task[None] | None = None

    def lease_fields(self) -> dict[str, Any]:
        """The fields a job record gets when this process takes (or renews) its lease."""
        return {"owner": OWNER, "lease_holder": self.holder, "lease_until": self.clock() + self.lease_s}

    def submit(self, job_id: str, request: TrainingRequest, key_prefix: str) -> None:
        """Train the job (a recorded one whose lease this process holds: new, or resumed) in the background."""
        self.held.add(job_id)
        task = asyncio.create_task(self._run(job_id, request, key_prefix), name=f"trainer-job-{job_id}")
        self.tasks.add(task)
        self.running[job_id] = task

        def ended(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            if self.running.get(job_id) is t:
                del self.running[job_id]

        task.add_done_callback(ended)

    async def take_over(self, *, at_start: bool = False) -> list[str]:
        """Take the REST jobs nobody trains and submit them: those whose lease ran out (or that have none), and
        at start those this host ran before it stopped. Returns the ids taken."""
        docs = self.backends.docs
        # every unfinished job is read before any is taken: a submitted job turns ``running`` as soon as the
        # loop runs it, and a later query for ``running`` jobs would find it again
        unfinished = {job["_id"]: job for state in ("queued", "running")
                      for job in await docs.find(JOBS, {"state": state, "kind": "api"})}
        taken: list[str] = []
        now = self.clock()
        for job in unfinished.values():
            if job["_id"] in self.held or job["_id"] in self.running:
                continue  # held here, or a task of this process that lost it has not ended yet
            expired = not isinstance(job.get("lease_until"), int | float) or job["lease_until"] < now
            if not (expired or (at_start and job.get("owner") == OWNER)):
                continue  # another trainer holds it
            note = ("the trainer restarted; the job goes on from its last checkpoint" if job.get("owner") == OWNER
                    else f"taken over from {job.get('lease_holder') or job.get('owner')!r}, whose lease ran out; "
                         "the job goes on from its last checkpoint")
            try:
                await docs.update(JOBS, job["_id"], {**self.lease_fields(), "state": "queued", "note": note},
                                  expected_version=job["_version"])
            except (Conflict, NotFound):
                continue  # another trainer took it (or it ended) since it was read
            try:
                request = TrainingRequest.model_validate(job["request"])
            except ValidationError as exc:
                await self.records.finish(job["_id"], state="failed",
                                          error=f"interrupted, and its request no longer validates: {exc}")
                await asyncio.to_thread(self.backends.objects.delete, resume_key(job["key_prefix"]))
                continue
            log.info("training job %s (%s): %s", job["_id"], job["state"], note)
            self.submit(job["_id"], request, job["key_prefix"])
            taken.append(job["_id"])
        return taken

    async def renew(self) -> None:
        """Extend the lease of every job this process holds; a job another trainer took over is marked lost."""
        for job_id in list(self.held):
            for _ in range(5):
                job = await self.backends.docs.get(JOBS, job_id)
                if job is None or job.get("state") not in ("queued", "running"):
                    break
                if job.get("lease_holder") != self.holder:
                    log.warning("training job %s was taken over by %s: this process stops training it",
                                job_id, job.get("lease_holder"))
                    self.lost.add(job_id)
                    self.held.discard(job_id)
                    break
                try:
                    await self.backends.docs.update(JOBS, job_id, self.lease_fields(),
                                                    expected_version=job["_version"])
                    break
                except Conflict:
                    continue  # the job's own record writes moved the version on: read it again
                except NotFound:
                    break

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.renew()
                await self.take_over()
            except Exception:  # the store is down for a moment: the next turn tries again
                log.exception("renewing the training jobs' leases failed")

    def start_leases(self) -> None:
        """Renew this process's leases and take over expired jobs every third of the lease, until :meth:`close`."""
        if self._leases is None:
            self._leases = asyncio.create_task(self._keep_leases(), name="trainer-job-leases")

    async def close(self) -> None:
        """At shutdown: stop renewing, and have every job of this process stop at its next epoch without writing
        to its record and keeping its stored state: its lease runs out and a trainer takes it over and resumes it
        (this host's next start at once)."""
        if self._leases is not None:
            self._leases.cancel()
            await asyncio.gather(self._leases, return_exceptions=True)
            self._leases = None
        self.lost.update(self.held)
        self.held.clear()

    async def _run(self, job_id: str, request: TrainingRequest, key_prefix: str) -> None:
        try:
            await self._train(job_id, request, key_prefix)
        finally:
            self.held.discard(job_id)
            self.lost.discard(job_id)

    async def _train(self, job_id: str, request: TrainingRequest, key_prefix: str) -> None:
        async with self.slots:
            if job_id in self.lost:
                return
            try:
                await self.records.start(job_id, holder=self.holder)
            except LeaseLost:
                self.lost.add(job_id)
                return
            bridge = LoopBridge(asyncio.get_running_loop())

            def on_epoch(m: EpochMetrics) -> bool:
                if job_id in self.lost:
                    return False  # another trainer goes on from the stored state: stop, write nothing
                try:  # written only while this process holds the lease (checked on the record itself)
                    bridge.run(self.records.add_epoch(job_id, m, holder=self.holder))
                except LeaseLost:
                    self.lost.add(job_id)
                    return False
                return True

            def handed_over() -> bool:
                """Whether another trainer holds the job now (asked before the stored state is removed)."""
                if job_id not in self.lost:
                    try:
                        bridge.run(self.records.check_holder(job_id, self.holder))
                    except LeaseLost:
                        self.lost.add(job_id)
                return job_id in self.lost

            try:
                outcome = await asyncio.to_thread(run_training, self.backends.objects, request, job_id=job_id,
                                                  key_prefix=key_prefix, config=self.config, on_epoch=on_epoch,
                                                  resumable=True, handed_over=handed_over)
                if job_id in self.lost:
                    log.info("training job %s: stopped here, another trainer trains it on", job_id)
                    return
                await self.records.check_holder(job_id, self.holder)  # LeaseLost: below
                model_key = f"{key_prefix}/model.pt"
                await asyncio.to_thread(save_model, self.backends.objects, outcome, model_key,
                                        work_dir=self.config.work_dir, extra={"params": request.hparams.model_dump()})
                metrics = flat_metrics(outcome)
                await self.records.add_model(job_id, checkpoint_key=model_key, arch=outcome.arch,
                                             classes=outcome.classes, job_id=job_id, run_id=None, metrics=metrics)
                await self.records.finish(job_id, state="diverged" if outcome.state == "diverged" else "completed",
                                          summary=outcome.summary(), model_key=model_key,
                                          resumed_from=outcome.resumed_from, holder=self.holder)
            except Exception as exc:  # the job's failure is its record's business, not the server's
                if isinstance(exc, LeaseLost):
                    self.lost.add(job_id)
                if job_id in self.lost:
                    log.info("training job %s: stopped here (%s), another trainer trains it on", job_id, exc)
                    return
                if not isinstance(exc, InvalidInput):
                    log.exception("training job %s failed", job_id)
                try:
                    await self.records.finish(job_id, state="failed", error=f"{type(exc).__name__}: {exc}",
                                              holder=self.holder)
                except LeaseLost:
                    return  # taken over meanwhile: the new holder's attempt decides
                # a failed job is never submitted again: the state it (or a killed attempt) stored goes
                await asyncio.to_thread(self.backends.objects.delete, resume_key(key_prefix))
