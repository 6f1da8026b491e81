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

    @abstractmethod
    async def commit(self, delivery: Delivery) -> None:
        """Mark ``delivery`` (and everything before it on its partition) as processed by the group."""

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

    @abstractmethod
    async def subscribe(self, *, group: str, topics: Sequence[Topic]) -> Subscription:
        """Join ``group``; every group receives every message of its topics."""

    async def ping(self) -> None:  # noqa: B027 - optional readiness hook, a no-op by default
        """Raise if the backend cannot be reached."""
