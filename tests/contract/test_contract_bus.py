"""EventBus contract: one suite, run against every backend (memory and Kafka)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from dlforge.common.backends import open_bus
from dlforge.common.bus import Delivery, EventBus, Message, Subscription
from dlforge.common.events import Topic

T = Topic.RUN_FAILED  # any topic: each test has its own topics (memory bus or Kafka topic prefix)


@pytest.fixture
async def bus(bus_url: str) -> AsyncIterator[EventBus]:
    b = open_bus(bus_url)
    await b.start()
    yield b
    await b.stop()


async def take(sub: Subscription, n: int, *, timeout: float = 20.0) -> list[Delivery]:
    """Exactly ``n`` deliveries (fails if they do not come within ``timeout``)."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {n} deliveries arrived within {timeout}s"
        d = await sub.get(timeout=min(left, 1.0))
        if d is not None:
            got.append(d)
    return got


async def test_a_subscriber_receives_what_was_published(bus: EventBus) -> None:
    await bus.publish(T, key="run-1", value=b"first", headers={"traceparent": "00-abc-def-01", "x": "1"})
    await bus.publish(T, key="run-1", value=b"second")
    sub = await bus.subscribe(group="g", topics=[T])
    first, second = await take(sub, 2)
    assert (first.topic, first.key, first.value) == (T.value, "run-1", b"first")
    assert first.headers == {"traceparent": "00-abc-def-01", "x": "1"}
    assert (second.value, dict(second.headers)) == (b"second", {})
    assert second.offset > first.offset and second.partition == first.partition
    await sub.close()


async def test_every_group_gets_every_event(bus: EventBus) -> None:
    values = [f"event-{i}".encode() for i in range(6)]
    for i, v in enumerate(values):
        await bus.publish(T, key=f"run-{i % 3}", value=v)
    a = await bus.subscribe(group="group-a", topics=[T])
    b = await bus.subscribe(group="group-b", topics=[T])
    got_a, got_b = await asyncio.gather(take(a, 6), take(b, 6))
    assert sorted(d.value for d in got_a) == sorted(values)
    assert sorted(d.value for d in got_b) == sorted(values)
    assert await a.get(timeout=0.3) is None  # and nothing more
    await a.close()
    await b.close()


async def test_only_subscribed_topics_are_delivered(bus: EventBus) -> None:
    await bus.publish(Topic.HPO_TRIAL, key="r", value=b"other topic")
    await bus.publish(T, key="r", value=b"mine")
    sub = await bus.subscribe(group="g", topics=[T])
    (d,) = await take(sub, 1)
    assert d.value == b"mine" and d.topic == T.value
    assert await sub.get(timeout=0.5) is None
    await sub.close()


async def test_messages_of_one_key_keep_their_order(bus: EventBus) -> None:
    keys = ["run-a", "run-b", "run-c"]
    for i in range(30):
        await bus.publish(T, key=keys[i % 3], value=f"{keys[i % 3]}:{i}".encode())
    sub = await bus.subscribe(group="g", topics=[T])
    got = await take(sub, 30)
    for key in keys:
        seq = [int(d.value.decode().split(":")[1]) for d in got if d.key == key]
        assert seq == sorted(seq) and len(seq) == 10, (key, seq)
    await sub.close()


async def test_publish_batch_keeps_order(bus: EventBus) -> None:
    await bus.publish_batch([Message(T, key="run-1", value=f"{i}".encode(), headers={"i": str(i)}) for i in range(50)])
    sub = await bus.subscribe(group="g", topics=[T])
    got = await take(sub, 50)
    assert [int(d.value) for d in got] == list(range(50))
    assert [d.headers["i"] for d in got] == [str(i) for i in range(50)]
    await sub.close()


async def test_an_uncommitted_delivery_goes_to_the_next_member(bus: EventBus) -> None:
    for v in (b"m1", b"m2", b"m3"):
        await bus.publish(T, key="run-1", value=v)
    first = await bus.subscribe(group="workers", topics=[T])
    m1, m2 = await take(first, 2)
    assert (m1.value, m2.value) == (b"m1", b"m2")
    await first.commit(m1)
    await first.close()  # m2 was received but never committed: the member "died"

    replacement = await bus.subscribe(group="workers", topics=[T])
    again, m3 = await take(replacement, 2)
    assert again.value == b"m2" and again.offset == m2.offset  # redelivered, m1 is not
    assert m3.value == b"m3"
    await replacement.commit(m3)
    await replacement.close()

    # everything is committed now: a third member gets nothing old, only what comes next
    third = await bus.subscribe(group="workers", topics=[T])
    await bus.publish(T, key="run-1", value=b"m4")
    (m4,) = await take(third, 1)
    assert m4.value == b"m4"
    await third.close()


async def test_batches_are_fetched_and_committed_together(bus: EventBus) -> None:
    for i in range(20):
        await bus.publish(T, key=f"run-{i % 4}", value=f"{i}".encode())
    sub = await bus.subscribe(group="g", topics=[T])
    got: list[Delivery] = []
    deadline = time.monotonic() + 20
    while len(got) < 20 and time.monotonic() < deadline:
        got += await sub.get_batch(8, timeout=1.0)
    assert sorted(int(d.value) for d in got) == list(range(20))
    await sub.commit_batch(got)
    await sub.close()
    again = await bus.subscribe(group="g", topics=[T])
    assert await again.get_batch(8, timeout=1.5) == []
    await again.close()


async def test_get_returns_none_when_nothing_comes(bus: EventBus) -> None:
    sub = await bus.subscribe(group="g", topics=[T])
    started = time.monotonic()
    assert await sub.get(timeout=0.4) is None
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 5.0
    assert await sub.get_batch(10, timeout=0.2) == []
    await sub.close()
    assert await sub.get(timeout=0.1) is None  # a closed subscription gets nothing


async def test_ping_answers_when_started(bus: EventBus) -> None:
    await bus.ping()


async def test_a_get_cancelled_as_it_is_woken_ends_cancelled(bus: EventBus) -> None:
    """A cancellation that lands as the wait ends is not lost (Python 3.11's wait_for can drop it).

    The runtime cancels a worker's followers when it stops; a poll that swallowed that cancel kept
    polling for ever, and the worker's stop never returned. A publish on another topic wakes every
    waiting poll of the SQLite bus; the cancel lands 0..11 event-loop steps later, so one of the
    trials hits the step between the wait's end and the poll's resumption.
    """
    sub = await bus.subscribe(group="g", topics=[T])
    try:
        for steps in range(12):
            poll = asyncio.create_task(sub.get(timeout=3.0))
            await asyncio.sleep(0.05)  # the poll is waiting
            await bus.publish(Topic.RUN_CANCELLED, key="other", value=f"wake-{steps}".encode())
            for _ in range(steps):
                await asyncio.sleep(0)
            poll.cancel()
            done, _ = await asyncio.wait({poll}, timeout=10)
            assert done, f"a poll cancelled {steps} steps after its wake-up still ran 10 s later"
            assert poll.cancelled(), f"a poll cancelled {steps} steps after its wake-up returned {poll.result()!r}"
    finally:
        await sub.close()
