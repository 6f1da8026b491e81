"""The service runtime: consume -> skip duplicates -> handle -> record marker -> emit -> commit.

A service declares a handler per topic. The :class:`Worker` owns the loop for one service:

1. decode the message (undecodable -> dead-letter with the original bytes, commit);
2. if the processed-marker ``(consumer, event_id)`` exists, do not handle it again: publish the
   marker's stored outbox once more (unless flagged published) and commit (a handler registered
   ``replay_safe`` for an event gets no marker when it emitted nothing: running it again changes
   nothing, and a write per event is spared);
3. run the handler inside a span that is a child of the producer's span; retry
   :class:`RetryableError` with exponential backoff; :class:`PoisonMessage`, exhausted retries and
   unexpected errors go to the dead-letter topic and a ``run.failed`` event;
4. write the marker together with the events to emit (the outbox), publish them, then commit
   the offset. Fast events are settled in small batches: their emitted events are published
   together (pipelined) and their offsets committed together, always publish before commit.

Run life cycle: the events of a run that was cancelled (``run.cancelled``, followed by
:class:`~dlforge.common.cancellation.Cancellations` beside the loop) are committed without being
handled; handlers ask ``await ctx.is_cancelled(run_id)`` between long steps. ``run.deleted`` reaches
every consumer: its ``delete_run`` hook removes the service's documents and objects of the run,
then the runtime drops the consumer's markers and cancellation record of the run.

A crash anywhere before the commit redelivers the event; a marker makes the redelivery publish
the stored outbox instead of running the handler again, so the state changes once. Emitted
events keep their event ids when re-published, so their consumers skip the copies.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, overload

from opentelemetry.trace import SpanKind, Status, StatusCode
from typing_extensions import TypeVar

from dlforge.common.backends import open_bus, open_docs, open_objects
from dlforge.common.bus import Delivery, EventBus, Message, Subscription
from dlforge.common.cancellation import Cancellations
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
MAX_SETTLING = 8  # settles (publish + commit of handled events) a worker may have in flight


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
        """Publish an event under its partition key (:attr:`Event.key`), carrying the current trace context."""
        await publish_event(self.bus, event)

    async def publish_all(self, events: Sequence[Event]) -> None:
        """Publish several events at once (one batch, one producer span), each keyed by its run id."""
        await publish_events(self.bus, events)


async def publish_event(bus: EventBus, event: Event) -> None:
    """Publish ``event`` under :attr:`Event.key` inside a producer span whose context travels in the headers."""
    with _producer_span(event):
        await bus.publish(event.event_type, key=event.key, value=encode(event), headers=inject_headers())


async def publish_events(bus: EventBus, events: Sequence[Event]) -> None:
    """Publish ``events`` (in order, pipelined: one :meth:`EventBus.publish_batch`) inside one producer span
    whose context travels in every message's headers; returns when all are appended."""
    if not events:
        return
    first = events[0]
    with tracer().start_as_current_span(
        f"publish {first.event_type.value}",
        kind=SpanKind.PRODUCER,
        attributes={"messaging.destination.name": first.event_type.value, "dlforge.run_id": first.run_id,
                    "messaging.batch.message_count": len(events)},
    ):
        headers = inject_headers()
        await bus.publish_batch([Message(e.event_type, key=e.run_id, value=encode(e), headers=headers)
                                 for e in events])


def _producer_span(event: Event) -> Any:
    return tracer().start_as_current_span(
        f"publish {event.event_type.value}",
        kind=SpanKind.PRODUCER,
        attributes={"messaging.destination.name": event.event_type.value, "dlforge.run_id": event.run_id,
                    "dlforge.event_id": event.event_id},
    )


def _message(event: Event, raw: bytes) -> Message:
    """The message of an emitted event, created (and its context injected) inside a producer span."""
    with _producer_span(event):
        return Message(event.event_type, key=event.key, value=raw, headers=inject_headers())


async def _never_cancelled(run_id: str) -> bool:
    return False


D = TypeVar("D", default=None)
"""A service's dependencies: what its start-up built from its settings (plug-ins, clients, caches)."""


@dataclass
class HandlerContext(Generic[D]):
    """What a handler may use besides its event: the backends, and ``deps``, its service's typed
    dependencies, built once when the process started (see :class:`dlforge.common.app.ServicePart`)."""

    service: str
    objects: ObjectStore
    docs: DocumentStore
    settings: CommonSettings
    bus: EventBus
    deps: D
    is_cancelled: Callable[[str], Coroutine[Any, Any, bool]] = _never_cancelled
    """``await ctx.is_cancelled(run_id)``: True once the run was cancelled (long work stops at its next check)."""


HandlerResult = Event | Sequence[Event] | None
HandlerFn = Callable[[Event, HandlerContext[D]], Awaitable[HandlerResult]]
DeleteRunFn = Callable[[Event, HandlerContext[D]], Awaitable[None]]
LIFECYCLE = (Topic.RUN_CANCELLED, Topic.RUN_DELETED)


ReplaySafe = Callable[[Event], bool]


@dataclass
class Service(Generic[D]):
    """A stage: a name, one handler per topic it consumes, and how it forgets a deleted run.

    ``D`` is the type of its dependencies. ``delete_run`` (set with :meth:`deletes_runs`) removes the
    service's own documents and objects of the ``run.deleted`` event's run; it must be idempotent
    (a redelivery runs it again).
    """

    name: str
    handlers: dict[Topic, HandlerFn[D]] = field(default_factory=dict)
    replay_safe: dict[Topic, ReplaySafe] = field(default_factory=dict)
    delete_run: DeleteRunFn[D] | None = None

    def deletes_runs(self, fn: DeleteRunFn[D]) -> DeleteRunFn[D]:
        self.delete_run = fn
        return fn

    def handles(
        self, topic: Topic, *, replay_safe: ReplaySafe | None = None
    ) -> Callable[[HandlerFn[D]], HandlerFn[D]]:
        """Register the handler of ``topic``.

        ``replay_safe(event)`` True declares that handling ``event`` again changes nothing more (the
        handler is idempotent for it). Then, if the handler emitted nothing, the worker writes no
        processed-marker for it (a write per event); a redelivery runs the handler again. An event
        whose handling emitted events always gets its marker (its outbox).
        """
        def register(fn: HandlerFn[D]) -> HandlerFn[D]:
            if topic in self.handlers:
                raise ValueError(f"{self.name} already handles {topic.value}")
            self.handlers[topic] = fn
            if replay_safe is not None:
                self.replay_safe[topic] = replay_safe
            return fn

        return register

    @property
    def consumes(self) -> list[Topic]:
        """The topics the worker subscribes to: the handled ones and, for a consumer, ``run.deleted``."""
        topics = list(self.handlers)
        if topics and Topic.RUN_DELETED not in topics:
            topics.append(Topic.RUN_DELETED)
        return topics

    @property
    def group(self) -> str:
        return f"dlforge.{self.name}"


class Outcome(StrEnum):
    HANDLED = "handled"
    DUPLICATE = "duplicate"
    DEAD_LETTERED = "dead_lettered"
    CANCELLED = "cancelled"  # an event of a cancelled run: committed, not handled


@dataclass
class _Processed:
    """One delivery whose handling is done but whose emits, marker flag and commit may be pending."""

    delivery: Delivery
    outcome: Outcome
    started: float
    messages: list[Message] = field(default_factory=list)
    marker: dict[str, Any] | None = None  # set "published" on it once ``messages`` are appended


class _Settle:
    """One background settle: ``published`` once its messages are appended, ``task`` ends after its commit."""

    def __init__(self) -> None:
        self.published = asyncio.Event()
        self.task: asyncio.Task[None]

    async def appended(self) -> None:
        """Wait until the messages are appended (or the settle failed: then raise its error)."""
        waiter = asyncio.ensure_future(self.published.wait())
        try:
            await asyncio.wait([waiter, self.task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not self.published.is_set():
            self.task.result()


class Worker(Generic[D]):
    """Runs one service's consume loop against the given backends, handing ``deps`` to its handlers.

    The loop takes the deliveries that are ready (at most ``max_batch``), handles them one by one
    in order, and then *settles* the handled ones together: publishes the events they emitted (in
    order, pipelined), flags their markers published and commits their offsets. Nothing is
    committed before the events it caused are appended, so a crash at any point redelivers, and
    the markers turn the redelivery into a re-publish of the stored outbox, not a second handling.
    A slow handler settles its event at once (``settle_after`` seconds), so batching only groups
    fast events.
    """

    @overload
    def __init__(
        self: Worker[None],
        service: Service[None],
        backends: Backends,
        *,
        sleep: Callable[[float], Awaitable[Any]] = ...,
        max_batch: int = ...,
        settle_after: float = ...,
    ) -> None: ...

    @overload
    def __init__(
        self,
        service: Service[D],
        backends: Backends,
        *,
        deps: D,
        sleep: Callable[[float], Awaitable[Any]] = ...,
        max_batch: int = ...,
        settle_after: float = ...,
    ) -> None: ...

    def __init__(
        self,
        service: Service[Any],
        backends: Backends,
        *,
        deps: Any = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        max_batch: int = 500,
        settle_after: float = 0.02,
    ) -> None:
        self.service: Service[D] = service
        self.deps: D = deps
        self.backends = backends
        self.settings = backends.settings
        self._sleep = sleep
        self.max_batch = max_batch
        self.settle_after = settle_after
        self._metrics = EventMetrics()
        self.processed: dict[Outcome, int] = {o: 0 for o in Outcome}
        self.current: Event | None = None
        self.ready = asyncio.Event()
        self.cancellations = Cancellations(self.consumer, bus=backends.bus, docs=backends.docs,
                                           poll_seconds=self.settings.poll_seconds)

    @property
    def consumer(self) -> str:
        return self.service.group

    def _context(self) -> HandlerContext[D]:
        b = self.backends
        return HandlerContext(self.service.name, b.objects, b.docs, b.settings, b.bus, self.deps,
                              self.cancellations.is_cancelled)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; the in-flight event is finished and committed first."""
        if not self.service.consumes:
            self.ready.set()
            await stop.wait()
            return
        await self.cancellations.load()
        follower = asyncio.create_task(self._follow_cancellations(stop), name=f"{self.consumer} cancellations")
        try:
            await self._run(stop)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)

    async def _follow_cancellations(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.cancellations.follow(stop)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: following run.cancelled failed; rejoining", self.consumer)
                await self._sleep(self.settings.retry_base_seconds)

    async def _run(self, stop: asyncio.Event) -> None:
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
        # Handled events are settled (emits published, offsets committed) in background tasks
        # while the next ones are handled. Settles are chained: one publishes only after the
        # previous one's messages were appended, and commits only after the previous one
        # committed, so emits and commits keep their order. At most MAX_SETTLING are pending.
        settling: deque[_Settle] = deque()
        try:
            while not stop.is_set():
                while settling and settling[0].task.done():
                    settling.popleft().task.result()  # a failed publish or commit ends this member
                batch = await sub.get_batch(self.max_batch, timeout=self.settings.poll_seconds)
                pending: list[_Processed] = []
                try:
                    for delivery in batch:
                        if stop.is_set():
                            break  # the rest is not committed: the group delivers it again
                        pending.append(await self._process(delivery))
                        if time.perf_counter() - pending[0].started >= self.settle_after:
                            await self._hand_over(sub, settling, pending)
                            pending = []
                finally:
                    # also after a failure: what was handled is published and committed first
                    if pending:
                        await self._hand_over(sub, settling, pending)
        finally:
            if settling:
                await settling[-1].task  # the last one waits for all before it

    async def _hand_over(self, sub: Subscription, settling: deque[_Settle], done: list[_Processed]) -> None:
        while len(settling) >= MAX_SETTLING:  # back-pressure: handling may not run far ahead
            await settling.popleft().task
        previous = settling[-1] if settling else None
        settle = _Settle()
        settle.task = asyncio.create_task(self._settle(sub, done, settle=settle, previous=previous),
                                          name=f"{self.consumer} settle")
        settling.append(settle)

    async def _settle(
        self,
        sub: Subscription | None,
        done: Sequence[_Processed],
        *,
        settle: _Settle | None = None,
        previous: _Settle | None = None,
    ) -> None:
        messages = [m for p in done for m in p.messages]
        if previous is not None:
            await previous.appended()  # emits keep their order
        if messages:
            await self.backends.bus.publish_batch(messages)
        for p in done:
            if p.marker is not None:
                await self._mark_published(p.marker)
        if settle is not None:
            settle.published.set()
        if previous is not None:
            await previous.task  # commits keep their order; a failed one fails this one too
        if sub is not None:
            await sub.commit_batch([p.delivery for p in done])
        now = time.perf_counter()
        for p in done:
            self.processed[p.outcome] += 1
            self._metrics.latency.record(now - p.started, {"consumer": self.consumer, "topic": p.delivery.topic})

    async def process(self, delivery: Delivery) -> Outcome:
        """Everything but the commit: handle, record the marker, publish the emitted events.

        Raises only if a backend write failed (then: redeliver).
        """
        processed = await self._process(delivery)
        await self._settle(None, [processed])
        return processed.outcome

    async def _process(self, delivery: Delivery) -> _Processed:
        started = time.perf_counter()
        attrs = {"consumer": self.consumer, "topic": delivery.topic}
        try:
            event = decode(delivery.value)
        except PoisonMessage as exc:
            letters = self._dead_letter(delivery, reason=str(exc), attempts=0, event=None)
            return _Processed(delivery, Outcome.DEAD_LETTERED, started, letters)

        if event.event_type not in LIFECYCLE and self.cancellations.skips(event.run_id):
            log.info("%s: %s of cancelled run %s not handled", self.consumer, event.event_type.value, event.run_id)
            return _Processed(delivery, Outcome.CANCELLED, started)

        marker_id = f"{self.consumer}:{event.event_id}"
        marker = await self.backends.docs.get(MARKERS, marker_id)
        if marker is not None:
            self._metrics.duplicates.add(1, attrs)
            return self._duplicate(delivery, started, marker)

        handler = self.service.handlers.get(event.event_type)
        if event.event_type is Topic.RUN_DELETED:
            handler = self._deleting(handler)
        if handler is None:
            letters = self._dead_letter(delivery, reason=f"{self.consumer} has no handler for {event.event_type}",
                                        attempts=0, event=event)
            return _Processed(delivery, Outcome.DEAD_LETTERED, started, letters)

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
                    letters = self._dead_letter(delivery, reason=failure, attempts=attempts, event=event)
                    return _Processed(delivery, Outcome.DEAD_LETTERED, started, letters)
                if not emitted:
                    safe = self.service.replay_safe.get(event.event_type)
                    if safe is not None and safe(event):
                        self._metrics.handled.add(1, attrs)
                        return _Processed(delivery, Outcome.HANDLED, started)
                encoded = [encode(e) for e in emitted]
                marker = {
                    "_id": marker_id,
                    "consumer": self.consumer,
                    "event_id": event.event_id,
                    "run_id": event.run_id,
                    "topic": event.event_type.value,
                    "outbox": [raw.decode() for raw in encoded],
                    "published": False,
                }
                try:
                    marker = await self.backends.docs.insert(MARKERS, marker)
                except Conflict:
                    # Another member of the group handled it concurrently; its outbox is the truth.
                    existing = await self.backends.docs.get(MARKERS, marker_id)
                    self._metrics.duplicates.add(1, attrs)
                    if existing is None:
                        raise
                    return self._duplicate(delivery, started, existing)
                # The publish spans are children of the handler span; the messages carry their context.
                messages = [_message(e, raw) for e, raw in zip(emitted, encoded, strict=True)]
                self._metrics.handled.add(1, attrs)
                # The marker keeps published=False: flagging every marker would cost a write per event,
                # and the offset is only committed after the messages were appended anyway.
                return _Processed(delivery, Outcome.HANDLED, started, messages)
        finally:
            detach(token)

    def _deleting(self, own: HandlerFn[D] | None) -> HandlerFn[D]:
        """``run.deleted``: the service's ``delete_run`` hook, its own handler, then the runtime's records."""
        service = self.service

        async def delete(event: Event, ctx: HandlerContext[D]) -> HandlerResult:
            if service.delete_run is not None:
                await service.delete_run(event, ctx)
            result = await own(event, ctx) if own is not None else None
            for marker in await ctx.docs.find(MARKERS, {"consumer": self.consumer, "run_id": event.run_id}):
                await ctx.docs.delete(MARKERS, marker["_id"])
            await self.cancellations.forget(event.run_id)
            return result

        return delete

    def _duplicate(self, delivery: Delivery, started: float, marker: dict[str, Any]) -> _Processed:
        if marker.get("published") or not marker.get("outbox"):
            return _Processed(delivery, Outcome.DUPLICATE, started)
        # Handled before, but a crash may have come before its emitted events were appended: publish
        # them (again: they keep their event ids, so consumers that have them skip them) and flag it.
        messages = [_message(decode(raw.encode()), raw.encode()) for raw in marker["outbox"]]
        return _Processed(delivery, Outcome.DUPLICATE, started, messages, marker)

    async def _handle_with_retries(
        self, handler: HandlerFn[D], event: Event
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

    async def _mark_published(self, marker: dict[str, Any]) -> None:
        if marker.get("published"):
            return
        try:
            await self.backends.docs.update(
                MARKERS, marker["_id"], {"published": True}, expected_version=marker["_version"]
            )
        except Conflict:
            pass  # another member re-published the outbox and flagged it first

    def _dead_letter(self, delivery: Delivery, *, reason: str, attempts: int, event: Event | None) -> list[Message]:
        """The dead letter (and the run.failed event) for ``delivery``, published when it is settled."""
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
        emitted = [Event.new(letter, run_id=run_id, causation_id=event.event_id if event else None)]
        if event is not None and event.event_type not in (Topic.RUN_FAILED, Topic.DEAD_LETTER, *LIFECYCLE):
            emitted.append(event.follow(RunFailed(stage=self.service.name, reason=reason, event_id=event.event_id)))
        self._metrics.dead_lettered.add(1, {"consumer": self.consumer, "topic": delivery.topic})
        return [_message(e, encode(e)) for e in emitted]


async def run_workers(workers: Sequence[Worker[Any]], stop: asyncio.Event) -> None:
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
