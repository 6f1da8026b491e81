"""Job records in the document store: ``trainer_jobs``, ``trainer_metrics`` (one per epoch), ``trainer_models``.

Training runs in a worker thread (and its DDP processes); the document store is async, so the
thread hands its writes to the event loop with :class:`LoopBridge` and waits for them.
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from dlforge.common.docs import Doc, DocumentStore
from dlforge.common.errors import Conflict
from dlforge.trainer.params import EpochMetrics

JOBS = "trainer_jobs"
METRICS = "trainer_metrics"
MODELS = "trainer_models"

JobKind = Literal["trial", "final", "api"]
JobState = Literal["queued", "running", "completed", "stopped", "pruned", "diverged", "failed"]

T = TypeVar("T")

OWNER = socket.gethostname()  # a REST job runs in the trainer process that started it (``owner``)


class LeaseLost(Exception):
    """A write for a job whose lease another trainer holds now (see :mod:`dlforge.trainer.runner`)."""

    def __init__(self, job_id: str, holder: str | None) -> None:
        super().__init__(f"training job {job_id}: its lease is held by {holder!r} now")
        self.job_id, self.holder = job_id, holder


def now() -> str:
    return datetime.now(UTC).isoformat()


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (JSON and the document stores refuse them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class LoopBridge:
    """Runs coroutines on ``loop`` from another thread and waits for their results."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float = 60.0) -> None:
        self.loop = loop
        self.timeout = timeout

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout)


class JobRecords:
    """The trainer's own collections."""

    def __init__(self, docs: DocumentStore) -> None:
        self.docs = docs

    async def create(self, job_id: str, *, kind: JobKind, request: dict[str, Any], run_id: str | None = None,
                     key_prefix: str, extra: dict[str, Any] | None = None) -> Doc:
        doc = {
            "_id": job_id,
            "kind": kind,
            "run_id": run_id,
            "state": "queued",
            "request": request,
            "key_prefix": key_prefix,
            "logs_prefix": f"{key_prefix}/tensorboard/",
            "checkpoints": [],
            "created_at": now(),
            "started_at": None,
            "finished_at": None,
            "error": None,
            **(extra or {}),
        }
        return await self.docs.upsert(JOBS, json_safe(doc))

    async def update(self, job_id: str, *, holder: str | None = None, **changes: Any) -> Doc:
        """Set ``changes`` on the job's record (only those fields, compare-and-set on its version, read again on
        a conflict). With ``holder``: only while the job's lease is that process's, else :class:`LeaseLost`."""
        for _ in range(20):
            current = await self.docs.get(JOBS, job_id)
            if current is None:
                raise KeyError(job_id)
            if holder is not None and current.get("lease_holder") != holder:
                raise LeaseLost(job_id, current.get("lease_holder"))
            try:
                return await self.docs.update(JOBS, job_id, json_safe(changes), expected_version=current["_version"])
            except Conflict:
                continue
        raise Conflict(f"{JOBS}/{job_id}: too many concurrent writers")

    async def check_holder(self, job_id: str, holder: str) -> None:
        """:class:`LeaseLost` unless ``holder`` holds the job's lease."""
        current = await self.docs.get(JOBS, job_id)
        if current is None or current.get("lease_holder") != holder:
            raise LeaseLost(job_id, None if current is None else current.get("lease_holder"))

    async def start(self, job_id: str, *, holder: str | None = None) -> Doc:
        return await self.update(job_id, holder=holder, state="running", started_at=now())

    async def finish(self, job_id: str, *, state: JobState, summary: dict[str, Any] | None = None,
                     error: str | None = None, holder: str | None = None, **extra: Any) -> Doc:
        changes: dict[str, Any] = {"state": state, "finished_at": now(), "error": error, **extra}
        if summary is not None:
            changes.update(
                result=summary,
                checkpoints=summary.get("checkpoints", []),
                logs_prefix=summary.get("logs_prefix"),
                metrics=summary.get("metrics", {}),
                device=summary.get("device"),  # where it trained: cpu | cuda
            )
        return await self.update(job_id, holder=holder, **changes)

    async def add_epoch(self, job_id: str, metrics: EpochMetrics, *, holder: str | None = None) -> None:
        m = json_safe(metrics.model_dump(mode="json"))
        await self.update(job_id, holder=holder, epochs_done=metrics.epoch, last_epoch=m)  # the lease first
        await self.docs.upsert(METRICS, {"_id": f"{job_id}:{metrics.epoch:05d}", "job_id": job_id, **m})

    async def epochs(self, job_id: str) -> list[Doc]:
        return await self.docs.find(METRICS, {"job_id": job_id}, sort=[("epoch", 1)])

    async def get(self, job_id: str) -> Doc | None:
        return await self.docs.get(JOBS, job_id)

    async def find(self, *, limit: int = 100, kind: str | None = None, state: str | None = None) -> list[Doc]:
        where = {k: v for k, v in (("kind", kind), ("state", state)) if v is not None}
        return await self.docs.find(JOBS, where or None, sort=[("created_at", -1)], limit=limit)

    async def add_model(self, model_id: str, *, checkpoint_key: str, arch: str, classes: list[str],
                        job_id: str, run_id: str | None, metrics: dict[str, float]) -> Doc:
        return await self.docs.upsert(MODELS, {"_id": model_id, "checkpoint_key": checkpoint_key, "arch": arch,
                                               "classes": classes, "job_id": job_id, "run_id": run_id,
                                               "metrics": json_safe(metrics), "created_at": now()})

    async def model(self, model_id: str) -> Doc | None:
        return await self.docs.get(MODELS, model_id)

    async def model_with_checkpoint(self, checkpoint_key: str) -> Doc | None:
        """The trained model whose checkpoint is the object at ``checkpoint_key``, if one is."""
        found = await self.docs.find(MODELS, {"checkpoint_key": checkpoint_key}, limit=1)
        return found[0] if found else None
