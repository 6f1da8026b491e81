"""In-process EventBus: one ordered log per topic, consumer groups with committed offsets."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dlforge.common.bus import Delivery, EventBus, Subscription
from dlforge.common.events import Topic


@dataclass
class _GroupState:
    next_offset: dict[str, int] = field(default_factory=dict)
    redeliver: deque[tuple[str, int]] = field(default_factory=deque)
    committed: dict[str, int] = field(default_factory=dict)


class MemoryBus(EventBus):
    """Each topic is a single partition, so per-key (indeed total) order is preserved."""

    def __init__(self) -> None:
        self._logs: dict[str, list[Delivery]] = {}
        self._groups: dict[str, _GroupState] = {}
        self._changed = asyncio.Condition()
        self._closed = False

    async def start(self) -> None:
        for topic in Topic:
            self._logs.setdefault(topic.value, [])
        self._closed = False

    async def stop(self) -> None:
        self._closed = True
        async with self._changed:
            self._changed.notify_all()

    async def publish(
        self, topic: Topic, *, key: str, value: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        if self._closed:
            raise RuntimeError("the memory bus is stopped")
        log = self._logs.setdefault(Topic(topic).value, [])
        log.append(
            Delivery(topic=Topic(topic).value, key=key, value=value, headers=dict(headers or {}), offset=len(log))
        )
        async with self._changed:
            self._changed.notify_all()

    async def subscribe(self, *, group: str, topics: Sequence[Topic]) -> Subscription:
        state = self._groups.setdefault(group, _GroupState())
        for topic in topics:
            self._logs.setdefault(Topic(topic).value, [])
            state.next_offset.setdefault(Topic(topic).value, 0)
        return _MemorySubscription(self, state, [Topic(t).value for t in topics])

    def _take(self, state: _GroupState, topics: list[str]) -> Delivery | None:
        for i, (topic, offset) in enumerate(state.redeliver):
            if topic in topics:
                del state.redeliver[i]
                return self._logs[topic][offset]
        for topic in topics:
            offset = state.next_offset[topic]
            log = self._logs[topic]
            if offset < len(log):
                state.next_offset[topic] = offset + 1
                return log[offset]
        return None

    def backlog(self, group: str) -> int:
        """Messages not yet committed by ``group`` (the consumer lag)."""
        state = self._groups.get(group)
        if state is None:
            return 0
        return sum(len(self._logs[t]) - state.committed.get(t, 0) for t in state.next_offset)


class _MemorySubscription(Subscription):
    def __init__(self, bus: MemoryBus, state: _GroupState, topics: list[str]) -> None:
        self._bus = bus
        self._state = state
        self._topics = topics
        self._inflight: dict[tuple[str, int], Delivery] = {}
        self._closed = False

    async def get(self, timeout: float | None = None) -> Delivery | None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        async with self._bus._changed:
            while True:
                if self._closed or self._bus._closed:
                    return None
                delivery = self._bus._take(self._state, self._topics)
                if delivery is not None:
                    self._inflight[(delivery.topic, delivery.offset)] = delivery
                    return delivery
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return None
                # asyncio.timeout, not wait_for: on 3.11 wait_for runs the wait in a task of its own, and a
                # cancellation landing while that task re-acquires the lock leaves the lock held for ever
                try:
                    async with asyncio.timeout(remaining):
                        await self._bus._changed.wait()
                except TimeoutError:
                    return None

    async def get_batch(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        first = await self.get(timeout)
        if first is None:
            return []
        batch = [first]
        while len(batch) < max_count and not self._closed:
            delivery = self._bus._take(self._state, self._topics)
            if delivery is None:
                break
            self._inflight[(delivery.topic, delivery.offset)] = delivery
            batch.append(delivery)
        return batch

    async def commit(self, delivery: Delivery) -> None:
        for key in [k for k in self._inflight if k[0] == delivery.topic and k[1] <= delivery.offset]:
            del self._inflight[key]
        current = self._state.committed.get(delivery.topic, 0)
        self._state.committed[delivery.topic] = max(current, delivery.offset + 1)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for key in sorted(self._inflight, key=lambda k: k[1]):
            self._state.redeliver.append(key)
        self._inflight.clear()
        async with self._bus._changed:
            self._bus._changed.notify_all()
