"""The service runtime: consume -> skip duplicates -> handle -> record marker -> emit -> commit.

A service declares a handler per topic. The :class:`Worker` owns the loop for one service:

1. decode the message (undecodable -> dead-letter with the original bytes, commit);
2. skip it if the processed-marker ``(consumer, event_id)`` exists and its outbox was published;
3. run the handler inside a span that is a child of the producer's span; retry
   :class:`RetryableError` with exponential backoff; :class:`PoisonMessage`, exhausted retries and
   unexpected errors go to the dead-letter topic and a ``run.failed`` event;
4. write the marker together with the events to emit (the outbox), publish them, mark the
   outbox published, then commit the offset.

A crash anywhere before the commit redelivers the event; a marker makes the redelivery publish
the stored outbox instead of running the handler again, so the state changes once.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from dlforge.common.backends import open_bus, open_docs, open_objects
from dlforge.common.bus import Delivery, EventBus, Subscription
from dlforge.common.docs import DocumentStore
from dlforge.common.errors import Conflict, PoisonMessage, RetryableError
from dlforge.common.events import DeadLetter, Event, RunFailed, Topic, decode, encode
from dlforge.common.objects import ObjectStore
from dlforge.common.settings import CommonSettings
from dlforge.common.tracing import (
    EventMetrics,
    attach,
    current_trace_id,
    detach,
    extract_context,
    inject_headers,
    tracer,
)

log = logging.getLogger(__name__)

MARKERS = "processed_events"


@dataclass
class Backends:
    """The three ports a process talks to; shared by every service in one process."""

    bus: EventBus
    objects: ObjectStore
    docs: DocumentStore
    settings: CommonSettings
    _started: bool = False

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> Backends:
        return cls(
            bus=open_bus(settings.bus),
            objects=open_objects(settings.objects),
            docs=open_docs(settings.docs),
            settings=settings,
        )

    async def start(self) -> None:
        if not self._started:
            await self.bus.start()
            await self.docs.ensure_unique(MARKERS, ["consumer", "event_id"])
            self._started = True

    async def stop(self) -> None:
        if self._started:
            await self.bus.stop()
            await self.docs.close()
            self._started = False

    async def publish(self, event: Event) -> None:
        """Publish an event keyed by its run id, carrying the current trace context."""
        await publish_event(self.bus, event)


async def publish_event(bus: EventBus, event: Event) -> None:
    with tracer().start_as_current_span(
        f"publish {event.event_type.value}",
        kind=SpanKind.PRODUCER,
        attributes={"messaging.destination.name": event.event_type.value, "dlforge.run_id": event.run_id,
                    "dlforge.event_id": event.event_id},
    ):
        await bus.publish(event.event_type, key=event.run_id, value=encode(event), headers=inject_headers())


@dataclass
class HandlerContext:
    """What a handler may use besides its event."""

    service: str
    objects: ObjectStore
    docs: DocumentStore
    settings: CommonSettings
    bus: EventBus


HandlerResult = Event | Sequence[Event] | None
HandlerFn = Callable[[Event, HandlerContext], Awaitable[HandlerResult]]


@dataclass
class Service:
    """A stage: a name, and one handler per topic it consumes."""

    name: str
    handlers: dict[Topic, HandlerFn] = field(default_factory=dict)

    def handles(self, topic: Topic) -> Callable[[HandlerFn], HandlerFn]:
        def register(fn: HandlerFn) -> HandlerFn:
            if topic in self.handlers:
                raise ValueError(f"{self.name} already handles {topic.value}")
            self.handlers[topic] = fn
            return fn

        return register

    @property
    def consumes(self) -> list[Topic]:
        return list(self.handlers)

    @property
    def group(self) -> str:
        return f"dlforge.{self.name}"


class Outcome(StrEnum):
    HANDLED = "handled"
    DUPLICATE = "duplicate"
    DEAD_LETTERED = "dead_lettered"


class Worker:
    """Runs one service's consume loop against the given backends."""

    def __init__(
        self,
        service: Service,
        backends: Backends,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.service = service
        self.backends = backends
        self.settings = backends.settings
        self._sleep = sleep
        self._metrics = EventMetrics()
        self.processed: dict[Outcome, int] = {o: 0 for o in Outcome}
        self.current: Event | None = None
        self.ready = asyncio.Event()

    @property
    def consumer(self) -> str:
        return self.service.group

    def _context(self) -> HandlerContext:
        b = self.backends
        return HandlerContext(self.service.name, b.objects, b.docs, b.settings, b.bus)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; the in-flight event is finished and committed first."""
        if not self.service.consumes:
            self.ready.set()
            await stop.wait()
            return
        while not stop.is_set():
            sub = await self.backends.bus.subscribe(group=self.consumer, topics=self.service.consumes)
            self.ready.set()
            try:
                await self._consume(sub, stop)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A backend failed mid-event: rejoin so the uncommitted event is delivered again.
                log.exception("%s: consume loop failed; rejoining the group", self.consumer)
                await self._sleep(self.settings.retry_base_seconds)
            finally:
                await sub.close()

    async def _consume(self, sub: Subscription, stop: asyncio.Event) -> None:
        while not stop.is_set():
            delivery = await sub.get(timeout=self.settings.poll_seconds)
            if delivery is None:
                continue
            started = time.perf_counter()
            outcome = await self.process(delivery)
            await sub.commit(delivery)
            self.processed[outcome] += 1
            self._metrics.latency.record(
                time.perf_counter() - started, {"consumer": self.consumer, "topic": delivery.topic}
            )

    async def process(self, delivery: Delivery) -> Outcome:
        """Everything but the commit. Raises only if a backend write failed (then: redeliver)."""
        attrs = {"consumer": self.consumer, "topic": delivery.topic}
        try:
            event = decode(delivery.value)
        except PoisonMessage as exc:
            await self._dead_letter(delivery, reason=str(exc), attempts=0, event=None)
            return Outcome.DEAD_LETTERED

        marker_id = f"{self.consumer}:{event.event_id}"
        marker = await self.backends.docs.get(MARKERS, marker_id)
        if marker is not None:
            if not marker.get("published"):
                await self._publish_outbox(marker)
            self._metrics.duplicates.add(1, attrs)
            return Outcome.DUPLICATE

        handler = self.service.handlers.get(event.event_type)
        if handler is None:
            await self._dead_letter(delivery, reason=f"{self.consumer} has no handler for {event.event_type}",
                                    attempts=0, event=event)
            return Outcome.DEAD_LETTERED

        token = attach(extract_context(delivery.headers))
        try:
            with tracer().start_as_current_span(
                f"handle {event.event_type.value}",
                kind=SpanKind.CONSUMER,
                attributes={
                    "dlforge.service": self.service.name,
                    "messaging.consumer.group.name": self.consumer,
                    "messaging.destination.name": event.event_type.value,
                    "dlforge.run_id": event.run_id,
                    "dlforge.event_id": event.event_id,
                },
            ) as span:
                self.current = event
                try:
                    emitted, failure, attempts = await self._handle_with_retries(handler, event)
                finally:
                    self.current = None
                if failure is not None:
                    span.set_status(Status(StatusCode.ERROR, failure))
                    await self._dead_letter(delivery, reason=failure, attempts=attempts, event=event)
                    return Outcome.DEAD_LETTERED
                marker = {
                    "_id": marker_id,
                    "consumer": self.consumer,
                    "event_id": event.event_id,
                    "run_id": event.run_id,
                    "topic": event.event_type.value,
                    "outbox": [encode(e).decode() for e in emitted],
                    "published": False,
                }
                try:
                    marker = await self.backends.docs.insert(MARKERS, marker)
                except Conflict:
                    # Another member of the group handled it concurrently; its outbox is the truth.
                    existing = await self.backends.docs.get(MARKERS, marker_id)
                    if existing is not None and not existing.get("published"):
                        await self._publish_outbox(existing)
                    self._metrics.duplicates.add(1, attrs)
                    return Outcome.DUPLICATE
                await self._publish_outbox(marker)
                self._metrics.handled.add(1, attrs)
                return Outcome.HANDLED
        finally:
            detach(token)

    async def _handle_with_retries(
        self, handler: HandlerFn, event: Event
    ) -> tuple[list[Event], str | None, int]:
        attempts = 0
        attrs = {"consumer": self.consumer, "topic": event.event_type.value}
        while True:
            attempts += 1
            try:
                result = await handler(event, self._context())
            except RetryableError as exc:
                self._metrics.failed.add(1, attrs)
                if attempts >= self.settings.retry_attempts:
                    return [], f"retries exhausted after {attempts} attempts: {exc}", attempts
                delay = min(self.settings.retry_base_seconds * 2 ** (attempts - 1), self.settings.retry_max_seconds)
                delay *= 1 + random.random() * 0.1
                log.warning("%s: retryable failure on %s (attempt %d), retrying in %.2fs: %s",
                            self.consumer, event.event_id, attempts, delay, exc)
                await self._sleep(delay)
                continue
            except PoisonMessage as exc:
                self._metrics.failed.add(1, attrs)
                return [], f"poison message: {exc}", attempts
            except Exception as exc:
                self._metrics.failed.add(1, attrs)
                log.exception("%s: handler failed on event %s (trace %s)", self.consumer, event.event_id,
                              current_trace_id())
                return [], f"{type(exc).__name__}: {exc}", attempts
            if result is None:
                return [], None, attempts
            if isinstance(result, Event):
                return [result], None, attempts
            return list(result), None, attempts

    async def _publish_outbox(self, marker: dict[str, Any]) -> None:
        for raw in marker.get("outbox", []):
            event = decode(raw.encode())
            await publish_event(self.backends.bus, event)
        await self.backends.docs.update(
            MARKERS, marker["_id"], {"published": True}, expected_version=marker["_version"]
        )

    async def _dead_letter(self, delivery: Delivery, *, reason: str, attempts: int, event: Event | None) -> None:
        log.error("%s: dead-lettering a %s message: %s (trace %s)", self.consumer, delivery.topic, reason,
                  current_trace_id())
        letter = DeadLetter(
            consumer=self.consumer,
            source_topic=delivery.topic,
            reason=reason,
            original=base64.b64encode(delivery.value).decode(),
            original_headers=dict(delivery.headers),
            attempts=attempts,
        )
        run_id = event.run_id if event is not None else (delivery.key or "unknown")
        await publish_event(self.backends.bus, Event.new(letter, run_id=run_id,
                                                         causation_id=event.event_id if event else None))
        if event is not None and event.event_type not in (Topic.RUN_FAILED, Topic.DEAD_LETTER):
            failed = RunFailed(stage=self.service.name, reason=reason, event_id=event.event_id)
            await publish_event(self.backends.bus, event.follow(failed))
        self._metrics.dead_lettered.add(1, {"consumer": self.consumer, "topic": delivery.topic})


async def run_workers(workers: Sequence[Worker], stop: asyncio.Event) -> None:
    """Run several workers until ``stop``; one worker's crash stops the others and re-raises."""
    tasks = [asyncio.create_task(w.run(stop), name=w.consumer) for w in workers]
    try:
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
