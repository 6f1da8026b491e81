"""Kafka EventBus on aiokafka: topics created at start, keyed by run id, manual offset commits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from dlforge.common.bus import Delivery, EventBus, Subscription
from dlforge.common.events import Topic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaOptions:
    bootstrap_servers: str
    partitions: int = 3
    replication_factor: int = 1
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 3000
    max_poll_interval_ms: int = 3_600_000
    client_id: str = "dlforge"


class KafkaBus(EventBus):
    def __init__(self, options: KafkaOptions) -> None:
        self.options = options
        self._producer: AIOKafkaProducer | None = None
        self._subscriptions: list[_KafkaSubscription] = []

    async def start(self) -> None:
        await self._create_topics()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.options.bootstrap_servers,
            client_id=self.options.client_id,
            acks="all",
            enable_idempotence=False,  # not every Kafka-protocol broker supports it
            linger_ms=1,
        )
        await self._producer.start()

    async def _create_topics(self) -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.options.bootstrap_servers, client_id=self.options.client_id
        )
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [
                NewTopic(
                    name=t.value,
                    num_partitions=self.options.partitions,
                    replication_factor=self.options.replication_factor,
                )
                for t in Topic
                if t.value not in existing
            ]
            if missing:
                try:
                    await admin.create_topics(missing)
                except TopicAlreadyExistsError:
                    pass
        finally:
            await admin.close()

    async def stop(self) -> None:
        for sub in list(self._subscriptions):
            await sub.close()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def publish(
        self, topic: Topic, *, key: str, value: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        if self._producer is None:
            raise RuntimeError("KafkaBus.publish before start()")
        await self._producer.send_and_wait(
            Topic(topic).value,
            value=value,
            key=key.encode(),
            headers=[(k, v.encode()) for k, v in (headers or {}).items()],
        )

    async def subscribe(self, *, group: str, topics: Sequence[Topic]) -> Subscription:
        o = self.options
        consumer = AIOKafkaConsumer(
            *[Topic(t).value for t in topics],
            bootstrap_servers=o.bootstrap_servers,
            client_id=o.client_id,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=o.session_timeout_ms,
            heartbeat_interval_ms=o.heartbeat_interval_ms,
            max_poll_interval_ms=o.max_poll_interval_ms,
        )
        await consumer.start()
        sub = _KafkaSubscription(self, consumer)
        self._subscriptions.append(sub)
        return sub

    async def ping(self) -> None:
        if self._producer is None:
            raise RuntimeError("kafka bus not started")
        await self._producer.client.fetch_all_metadata()


class _KafkaSubscription(Subscription):
    def __init__(self, bus: KafkaBus, consumer: AIOKafkaConsumer) -> None:
        self._bus = bus
        self._consumer = consumer
        self._closed = False

    async def get(self, timeout: float | None = None) -> Delivery | None:
        if self._closed:
            return None
        try:
            if timeout is None:
                msg = await self._consumer.getone()
            else:
                msg = await asyncio.wait_for(self._consumer.getone(), timeout)
        except TimeoutError:
            return None
        return Delivery(
            topic=msg.topic,
            key=(msg.key or b"").decode(),
            value=msg.value or b"",
            headers={k: v.decode() for k, v in (msg.headers or ())},
            partition=msg.partition,
            offset=msg.offset,
        )

    async def commit(self, delivery: Delivery) -> None:
        tp = TopicPartition(delivery.topic, delivery.partition)
        await self._consumer.commit({tp: delivery.offset + 1})

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self in self._bus._subscriptions:
            self._bus._subscriptions.remove(self)
        try:
            await self._consumer.stop()
        except KafkaError as exc:  # leaving a group on a dead broker must not hide the real error
            log.warning("kafka consumer stop failed: %s", exc)
