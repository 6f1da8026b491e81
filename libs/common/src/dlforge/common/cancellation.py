"""Which runs a service must stop working on: ``run.cancelled`` as each consumer has seen it.

A consumer's worker handles one event at a time, so a ``run.cancelled`` behind a long handler (a
trial, a final training) would wait for it. :class:`Cancellations` therefore follows the topic on a
consumer group of its own (``<consumer>.cancellations``) next to the worker's loop, records every
cancelled run in the runtime's collection ``runtime_cancelled`` (one document per consumer and run:
the record survives a restart and is shared by the replicas of one service) and keeps them in memory.
The worker skips the events of a cancelled run; long work asks :meth:`is_cancelled` between its steps.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dlforge.common.bus import EventBus
from dlforge.common.docs import DocumentStore
from dlforge.common.errors import PoisonMessage
from dlforge.common.events import RunCancelled, Topic, decode

log = logging.getLogger(__name__)

CANCELLED = "runtime_cancelled"


def record_id(consumer: str, run_id: str) -> str:
    return f"{consumer}:{run_id}"


class Cancellations:
    """The runs cancelled for one consumer: loaded at start, followed on the bus, asked by handlers."""

    def __init__(self, consumer: str, *, bus: EventBus, docs: DocumentStore, poll_seconds: float = 0.5) -> None:
        self.consumer = consumer
        self.bus = bus
        self.docs = docs
        self.poll_seconds = poll_seconds
        self.runs: set[str] = set()
        self.ready = asyncio.Event()

    async def load(self) -> None:
        """The runs this consumer recorded as cancelled before (a restart keeps skipping them)."""
        for doc in await self.docs.find(CANCELLED, {"consumer": self.consumer}):
            self.runs.add(str(doc["run_id"]))

    async def record(self, run_id: str, reason: str) -> None:
        await self.docs.upsert(CANCELLED, {"_id": record_id(self.consumer, run_id), "consumer": self.consumer,
                                           "run_id": run_id, "reason": reason})
        self.runs.add(run_id)

    async def forget(self, run_id: str) -> None:
        """A deleted run: its record goes with it."""
        self.runs.discard(run_id)
        await self.docs.delete(CANCELLED, record_id(self.consumer, run_id))

    def skips(self, run_id: str) -> bool:
        """True if the worker must not handle this run's events (it was cancelled)."""
        return run_id in self.runs

    async def is_cancelled(self, run_id: str) -> bool:
        """Asked by long work between steps: memory first, then the record (another replica may have seen it)."""
        if run_id in self.runs:
            return True
        doc = await self.docs.get(CANCELLED, record_id(self.consumer, run_id))
        if doc is not None:
            self.runs.add(run_id)
            return True
        return False

    async def follow(self, stop: asyncio.Event) -> None:
        """Record every ``run.cancelled`` until ``stop``; commit after recording (at least once)."""
        sub = await self.bus.subscribe(group=f"{self.consumer}.cancellations", topics=[Topic.RUN_CANCELLED])
        self.ready.set()
        try:
            while not stop.is_set():
                delivery = await sub.get(timeout=self.poll_seconds)
                if delivery is None:
                    continue
                try:
                    event = decode(delivery.value)
                except PoisonMessage as exc:
                    log.warning("%s: an undecodable run.cancelled message is ignored: %s", self.consumer, exc)
                else:
                    payload: Any = event.payload
                    reason = payload.reason if isinstance(payload, RunCancelled) else "cancelled"
                    await self.record(event.run_id, reason)
                    log.info("%s: run %s cancelled (%s)", self.consumer, event.run_id, reason)
                await sub.commit(delivery)
        finally:
            await sub.close()
