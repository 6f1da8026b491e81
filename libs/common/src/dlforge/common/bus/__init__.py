"""The EventBus port: publish raw messages to a topic, consume them as a consumer group, commit.

The bus moves bytes and string headers; encoding events is the runtime's job (so an undecodable
message can still be dead-lettered with its original bytes). Delivery is at-least-once: a
delivery that is not committed before its subscription closes is delivered again to the group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dlforge.common.events import Topic


@dataclass(frozen=True)
class Message:
    """One message to publish (see :meth:`EventBus.publish_batch`)."""

    topic: Topic
    key: str
    value: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Delivery:
    """One message as a consumer receives it."""

    topic: str
    key: str
    value: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    partition: int = 0
    offset: int = 0


class Subscription(ABC):
    """A consumer group member's view of its topics."""

    @abstractmethod
    async def get(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery, or None when ``timeout`` seconds pass without one."""

    async def get_batch(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        """Up to ``max_count`` deliveries that are ready now, waiting up to ``timeout`` for the first.

        An empty list means ``timeout`` passed without any. Backends override this to fetch in bulk.
        """
        first = await self.get(timeout)
        if first is None:
            return []
        batch = [first]
        while len(batch) < max_count:
            more = await self.get(0)
            if more is None:
                break
            batch.append(more)
        return batch

    @abstractmethod
    async def commit(self, delivery: Delivery) -> None:
        """Mark ``delivery`` (and everything before it on its partition) as processed by the group."""

    async def commit_batch(self, deliveries: Sequence[Delivery]) -> None:
        """Commit every delivery of ``deliveries`` (only the last one per partition needs a commit)."""
        last: dict[tuple[str, int], Delivery] = {}
        for d in deliveries:
            current = last.get((d.topic, d.partition))
            if current is None or d.offset > current.offset:
                last[(d.topic, d.partition)] = d
        for d in last.values():
            await self.commit(d)

    @abstractmethod
    async def close(self) -> None:
        """Leave the group; uncommitted deliveries go to the next member."""


class EventBus(ABC):
    """Port: a partitioned, replayable log of messages with consumer groups."""

    @abstractmethod
    async def start(self) -> None:
        """Connect and create the pipeline's topics."""

    @abstractmethod
    async def stop(self) -> None:
        """Flush pending publishes and disconnect."""

    @abstractmethod
    async def publish(
        self, topic: Topic, *, key: str, value: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        """Append one message; messages with the same key keep their order."""

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        """Publish ``messages`` in order; return when every one of them is appended.

        Backends override this to pipeline the messages (one round trip instead of one each).
        """
        for m in messages:
            await self.publish(m.topic, key=m.key, value=m.value, headers=m.headers)

    @abstractmethod
    async def subscribe(self, *, group: str, topics: Sequence[Topic]) -> Subscription:
        """Join ``group``; every group receives every message of its topics."""

    async def ping(self) -> None:  # noqa: B027 - optional readiness hook, a no-op by default
        """Raise if the backend cannot be reached."""
