"""Kafka EventBus on aiokafka: topics created at start, keyed by run id, manual offset commits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from dlforge.common.bus import Delivery, EventBus, Message, Subscription
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
    # How long the broker may hold a fetch that found nothing. Kafka answers as soon as data comes;
    # some Kafka-protocol brokers (tansu) hold it the whole time, which then is the idle latency.
    fetch_max_wait_ms: int = 100
    client_id: str = "dlforge"
    # namespaces the topics and consumer groups, e.g. one cluster shared by environments or tests
    topic_prefix: str = ""

    def topic_name(self, topic: Topic | str) -> str:
        return self.topic_prefix + Topic(topic).value


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
        )
        await self._producer.start()

    async def _create_topics(self) -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.options.bootstrap_servers, client_id=self.options.client_id
        )
        await admin.start()
        try:
            # Ask for all of them (no listing of the cluster's topics first) and accept "exists".
            response = await admin.create_topics([
                NewTopic(
                    name=self.options.topic_name(t),
                    num_partitions=self.options.partitions,
                    replication_factor=self.options.replication_factor,
                )
                for t in Topic
            ])
            failed = [(topic, code, message) for topic, code, message in response.topic_errors
                      if code not in (0, TopicAlreadyExistsError.errno)]
            if failed:
                topic, code, message = failed[0]
                raise for_code(code)(f"cannot create topic {topic}: {message}")
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
            self.options.topic_name(topic),
            value=value,
            key=key.encode(),
            headers=[(k, v.encode()) for k, v in (headers or {}).items()],
        )

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        if self._producer is None:
            raise RuntimeError("KafkaBus.publish before start()")
        # enqueue in order (one batch per partition), then wait for every acknowledgement
        pending = [
            await self._producer.send(
                self.options.topic_name(m.topic),
                value=m.value,
                key=m.key.encode(),
                headers=[(k, v.encode()) for k, v in m.headers.items()],
            )
            for m in messages
        ]
        if pending:
            await asyncio.gather(*pending)

    async def subscribe(self, *, group: str, topics: Sequence[Topic]) -> Subscription:
        o = self.options
        consumer = AIOKafkaConsumer(
            *[o.topic_name(t) for t in topics],
            bootstrap_servers=o.bootstrap_servers,
            client_id=o.client_id,
            group_id=o.topic_prefix + group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=o.session_timeout_ms,
            heartbeat_interval_ms=o.heartbeat_interval_ms,
            max_poll_interval_ms=o.max_poll_interval_ms,
            fetch_max_wait_ms=o.fetch_max_wait_ms,
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
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation that lands as a
            # record arrives, and the cancelled poll goes on polling
            async with asyncio.timeout(timeout):
                msg = await self._consumer.getone()
        except TimeoutError:
            return None
        return self._delivery(msg)

    def _delivery(self, msg: ConsumerRecord[bytes, bytes]) -> Delivery:
        return Delivery(
            topic=msg.topic[len(self._bus.options.topic_prefix):],
            key=(msg.key or b"").decode(),
            value=msg.value or b"",
            headers={k: v.decode() for k, v in (msg.headers or ())},
            partition=msg.partition,
            offset=msg.offset,
        )

    async def get_batch(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._closed:
            wait = 1.0 if deadline is None else max(0.0, deadline - loop.time())
            fetched = await self._consumer.getmany(timeout_ms=int(wait * 1000), max_records=max_count)
            batch = [self._delivery(m) for records in fetched.values() for m in records]
            if batch or (deadline is not None and loop.time() >= deadline):
                return batch
        return []

    async def commit(self, delivery: Delivery) -> None:
        await self.commit_batch([delivery])

    async def commit_batch(self, deliveries: Sequence[Delivery]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for d in deliveries:
            tp = TopicPartition(self._bus.options.topic_name(d.topic), d.partition)
            offsets[tp] = max(offsets.get(tp, 0), d.offset + 1)
        if offsets:
            await self._consumer.commit(offsets)

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
