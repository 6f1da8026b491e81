"""REST jobs (``POST /jobs``) trained in background tasks of the trainer process, a few at a time.

A job keeps the state to resume from while it trains (see :func:`dlforge.trainer.handlers.run_training`),
so when this process is killed and started again, :func:`dlforge.trainer.reconcile.resume_jobs` submits
its unfinished jobs again and they go on from their last checkpoint instead of failing.
"""

from __future__ import annotations

import asyncio
import logging

from dlforge.common.errors import InvalidInput
from dlforge.common.runtime import Backends
from dlforge.trainer.handlers import (
    TrainerConfig,
    TrainingRequest,
    flat_metrics,
    resume_key,
    run_training,
    save_model,
)
from dlforge.trainer.jobs import JobRecords, LoopBridge
from dlforge.trainer.params import EpochMetrics

log = logging.getLogger(__name__)


class JobRunner:
    """Runs REST jobs in background tasks, at most ``concurrent`` at once."""

    def __init__(self, backends: Backends, config: TrainerConfig, *, concurrent: int) -> None:
        self.backends = backends
        self.config = config
        self.records = JobRecords(backends.docs)
        self.slots = asyncio.Semaphore(concurrent)
        self.tasks: set[asyncio.Task[None]] = set()

    def submit(self, job_id: str, request: TrainingRequest, key_prefix: str) -> None:
        """Train the job (a recorded one: new, or resumed after a restart) in the background."""
        task = asyncio.create_task(self._run(job_id, request, key_prefix), name=f"trainer-job-{job_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, job_id: str, request: TrainingRequest, key_prefix: str) -> None:
        async with self.slots:
            await self.records.start(job_id)
            bridge = LoopBridge(asyncio.get_running_loop())

            def on_epoch(m: EpochMetrics) -> bool:
                bridge.run(self.records.add_epoch(job_id, m))
                return True

            try:
                outcome = await asyncio.to_thread(run_training, self.backends.objects, request, job_id=job_id,
                                                  key_prefix=key_prefix, config=self.config, on_epoch=on_epoch,
                                                  resumable=True)
                model_key = f"{key_prefix}/model.pt"
                await asyncio.to_thread(save_model, self.backends.objects, outcome, model_key,
                                        work_dir=self.config.work_dir, extra={"params": request.hparams.model_dump()})
                metrics = flat_metrics(outcome)
                await self.records.add_model(job_id, checkpoint_key=model_key, arch=outcome.arch,
                                             classes=outcome.classes, job_id=job_id, run_id=None, metrics=metrics)
                await self.records.finish(job_id, state="diverged" if outcome.state == "diverged" else "completed",
                                          summary=outcome.summary(), model_key=model_key,
                                          resumed_from=outcome.resumed_from)
            except Exception as exc:  # the job's failure is its record's business, not the server's
                if not isinstance(exc, InvalidInput):
                    log.exception("training job %s failed", job_id)
                await self.records.finish(job_id, state="failed", error=f"{type(exc).__name__}: {exc}")
                # a failed job is never submitted again: the state it (or a killed attempt) stored goes
                await asyncio.to_thread(self.backends.objects.delete, resume_key(key_prefix))
