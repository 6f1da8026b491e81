"""The SQLite bus beyond the contract: what survives a killed process, and processes sharing the file.

The contract suite (tests/contract/test_contract_bus.py) and the runtime tests run on this backend
too; here are the properties only a durable, shared log has:
  * a process killed with SIGKILL after taking and committing some deliveries: the next member of
    its group gets exactly the uncommitted ones again, and the log still holds every message;
  * a member that stops heartbeating (SIGSTOP) loses its partition to a live member, and its late
    commit is refused with PartitionLost;
  * two processes on one file: one publishes while the other consumes; two members of one group
    split the partitions and each message goes to one of them;
  * one instance: subscriptions of one group share the work; a clean stop with deliveries in
    flight leaves the durable offset at the first uncommitted one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dlforge.common.backends import open_bus
from dlforge.common.bus import Delivery, EventBus, Message, Subscription
from dlforge.common.bus.sqlite import PartitionLost, SqliteBus
from dlforge.common.events import Topic

PROGRAMS = Path(__file__).parent / "programs"
TOPIC = Topic.LABELS_SUBMITTED  # the topic bus_client.py uses


class Child:
    """A bus_client.py process whose stdout lines the test waits for (each with a deadline)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert raw, f"the child exited (code {await self.proc.wait()}) without the expected line"
        return raw.decode().rstrip("\n")

    async def expect(self, prefix: str, timeout: float = 30.0) -> str:
        line = await self.line(timeout)
        assert line.startswith(prefix), f"expected {prefix!r}, the child said {line!r}"
        return line[len(prefix):].strip()


@contextlib.asynccontextmanager
async def child(*args: str) -> AsyncIterator[Child]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "libs" / "common" / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = await asyncio.create_subprocess_exec(sys.executable, str(PROGRAMS / "bus_client.py"), *args, env=env,
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        yield Child(proc)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def started(url: str) -> AsyncIterator[EventBus]:
    bus = open_bus(url)
    await bus.start()
    try:
        yield bus
    finally:
        await bus.stop()


async def take(sub: Subscription, n: int, *, timeout: float = 20.0) -> list[Delivery]:
    """Exactly ``n`` deliveries (fails if they do not come within ``timeout``)."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {n} deliveries arrived within {timeout}s: {[d.value for d in got]}"
        got += await sub.get_batch(n - len(got), timeout=min(left, 1.0))
    return got


async def nothing_before(bus: EventBus, sub: Subscription, *, key: str = "k") -> None:
    """Prove the group has nothing else pending: a marker published now is the very next delivery.

    One key, so one partition: everything pending on it would come before the marker.
    """
    await bus.publish(TOPIC, key=key, value=b"end")
    (d,) = await take(sub, 1)
    assert d.value == b"end", f"{d.value!r} was still pending"


def values(deliveries: list[Delivery]) -> list[str]:
    return [d.value.decode() for d in deliveries]


# ------------------------------------------------------------------------------------------------
# a killed process
# ------------------------------------------------------------------------------------------------


async def test_a_process_killed_with_sigkill_loses_no_event(tmp_path: Path) -> None:
    # With a session timeout of ten minutes, the next member can only take over because it sees
    # that the owner's process is gone, not because its heartbeat went stale.
    url = f"sqlite:///{tmp_path}/bus.db?session_timeout_ms=600000"
    async with child(url, "publish-and-take", "20", "12", "5") as c:
        ready = json.loads(await c.expect("ready"))
        assert ready["taken"] == [f"m{i}" for i in range(12)]  # m0..m4 committed, m5..m11 in flight
        os.kill(c.proc.pid, signal.SIGKILL)
        assert await c.proc.wait() == -signal.SIGKILL

    async with started(url) as bus:
        sub = await bus.subscribe(group="workers", topics=[TOPIC])
        again = await take(sub, 15)
        assert values(again) == [f"m{i}" for i in range(5, 20)]  # the uncommitted ones, in order, once
        await nothing_before(bus, sub)
        await sub.close()

        audit = await bus.subscribe(group="audit", topics=[TOPIC])  # the log itself lost nothing
        assert values(await take(audit, 21)) == [f"m{i}" for i in range(20)] + ["end"]
        await audit.close()


async def test_a_member_that_stops_heartbeating_loses_its_partition_and_its_late_commit(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    async with child(f"sqlite:///{path}", "publish-and-take", "10", "6", "2") as c:
        ready = json.loads(await c.expect("ready"))
        assert ready["taken"] == [f"m{i}" for i in range(6)]
        c.proc.send_signal(signal.SIGSTOP)  # alive, but it answers nothing: no heartbeat

        # this member takes a heartbeat older than one second for dead
        url = f"sqlite:///{path}?session_timeout_ms=1000&heartbeat_interval_ms=100"
        async with started(url) as bus:
            sub = await bus.subscribe(group="workers", topics=[TOPIC])
            got = await take(sub, 8)
            assert values(got) == [f"m{i}" for i in range(2, 10)]
            await sub.commit_batch(got)

            c.proc.send_signal(signal.SIGCONT)
            assert c.proc.stdin is not None
            c.proc.stdin.write(b"commit the rest\n")
            await c.proc.stdin.drain()
            assert (await c.expect("commit")).startswith(f"refused: {PartitionLost.__name__}")
            await nothing_before(bus, sub)
            await sub.close()


# ------------------------------------------------------------------------------------------------
# processes sharing the file
# ------------------------------------------------------------------------------------------------


async def test_one_process_publishes_while_another_consumes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    async with started(url) as bus:
        sub = await bus.subscribe(group="readers", topics=[TOPIC])
        async with child(url, "publish", "60", "5") as c:
            got = await take(sub, 60, timeout=60)
            await c.expect("published")
        await sub.commit_batch(got)
        assert sorted(values(got), key=lambda v: int(v[1:])) == [f"m{i}" for i in range(60)]
        assert len(set(values(got))) == 60
        for key in ("k0", "k1", "k2", "k3"):
            seq = [int(d.value[1:]) for d in got if d.key == key]
            assert seq == sorted(seq) and len(seq) == 15, (key, seq)
        await nothing_before(bus, sub)
        await sub.close()


async def test_two_processes_in_one_group_split_the_partitions(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    url = f"sqlite:///{path}?partitions=4&heartbeat_interval_ms=100"
    async with started(url) as bus, child(url, "consume", "workers") as c:
        await c.expect("joined")
        sub = await bus.subscribe(group="workers", topics=[TOPIC])
        await _wait_for_leases(path, "workers", per_member=2)

        keys = [f"key-{i}" for i in range(16)]
        await bus.publish_batch([Message(TOPIC, key=keys[i % 16], value=f"m{i}".encode()) for i in range(80)])
        mine: list[Delivery] = []
        theirs: list[tuple[str, str, int]] = []
        deadline = time.monotonic() + 60
        while len(mine) + len(theirs) < 80:
            assert time.monotonic() < deadline, f"{len(mine)} + {len(theirs)} of 80 deliveries"
            batch = await sub.get_batch(80, timeout=0.05)
            await sub.commit_batch(batch)
            mine += batch
            with contextlib.suppress(TimeoutError):
                while True:
                    value, key, part, _ = (await c.expect("got", timeout=0.05)).split()
                    theirs.append((value, key, int(part)))
        everything = values(mine) + [v for v, _, _ in theirs]
        assert sorted(everything, key=lambda v: int(v[1:])) == [f"m{i}" for i in range(80)]  # each exactly once
        my_parts, their_parts = {d.partition for d in mine}, {p for _, _, p in theirs}
        assert len(my_parts) == 2 and len(their_parts) == 2 and my_parts.isdisjoint(their_parts)
        for key in keys:  # one member has all of a key's messages, in order
            seq = [int(d.value[1:]) for d in mine if d.key == key] or [int(v[1:]) for v, k, _ in theirs if k == key]
            assert seq == list(range(keys.index(key), 80, 16)), (key, seq)
        await sub.close()
        assert c.proc.stdin is not None
        c.proc.stdin.close()
        assert await asyncio.wait_for(c.proc.wait(), 30) == 0


async def _wait_for_leases(path: Path, group: str, *, per_member: int, timeout: float = 30.0) -> None:
    """Wait until every member of ``group`` holds ``per_member`` partitions (read from the file)."""
    deadline = time.monotonic() + timeout
    counts: list[int] = []
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(path)) as db:
            counts = [n for (n,) in db.execute(
                "SELECT COUNT(*) FROM leases WHERE grp = ? AND topic = ? GROUP BY member", (group, TOPIC.value))]
        if counts == [per_member, per_member]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"partitions per member stayed {counts}")


# ------------------------------------------------------------------------------------------------
# one instance
# ------------------------------------------------------------------------------------------------


async def test_subscriptions_of_one_group_share_the_work_and_a_closed_ones_deliveries_go_back(tmp_path: Path) -> None:
    async with started(f"sqlite:///{tmp_path}/bus.db") as bus:
        await bus.publish_batch([Message(TOPIC, key="k", value=f"m{i}".encode()) for i in range(20)])
        a = await bus.subscribe(group="g", topics=[TOPIC])
        b = await bus.subscribe(group="g", topics=[TOPIC])
        got_a = await take(a, 8)
        got_b = await take(b, 12)
        assert values(got_a) + values(got_b) == [f"m{i}" for i in range(20)]  # each to one of them
        await b.commit_batch(got_b)
        await a.commit(got_a[2])  # m0..m2
        await a.close()  # m3..m7 go back to the group
        assert values(await take(b, 5)) == [f"m{i}" for i in range(3, 8)]
        await nothing_before(bus, b)
        await b.close()


async def test_a_commit_never_passes_a_delivery_still_in_flight(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    async with started(url) as bus:
        await bus.publish_batch([Message(TOPIC, key="k", value=f"m{i}".encode()) for i in range(4)])
        slow = await bus.subscribe(group="g", topics=[TOPIC])
        fast = await bus.subscribe(group="g", topics=[TOPIC])
        assert values(await take(slow, 1)) == ["m0"]
        m1_m2 = await take(fast, 2)
        assert values(m1_m2) == ["m1", "m2"]
        await fast.commit(m1_m2[1])  # m0 is still in flight on the other subscription
    # the bus stopped with m0 uncommitted: the next instance starts there (m1, m2 come again: at least once)
    async with started(url) as bus:
        sub = await bus.subscribe(group="g", topics=[TOPIC])
        assert values(await take(sub, 4)) == ["m0", "m1", "m2", "m3"]
        await nothing_before(bus, sub)
        await sub.close()


async def test_keys_spread_over_partitions_and_keep_their_order(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db?partitions=3"
    keys = [f"run-{i}" for i in range(9)]
    async with started(url) as bus:
        for i in range(90):
            await bus.publish(TOPIC, key=keys[i % 9], value=f"{i}".encode())
        sub = await bus.subscribe(group="g", topics=[TOPIC])
        got = await take(sub, 90)
        await sub.close()
    assert len({d.partition for d in got}) > 1
    for key in keys:
        mine = [d for d in got if d.key == key]
        assert len({d.partition for d in mine}) == 1
        assert [int(d.value) for d in mine] == list(range(keys.index(key), 90, 9))
    # the partition count is the file's: a later URL does not change it
    async with started(f"sqlite:///{tmp_path}/bus.db?partitions=1") as bus:
        await bus.publish(TOPIC, key="run-0", value=b"later")
        sub = await bus.subscribe(group="g2", topics=[TOPIC])
        got = await take(sub, 91)
        await sub.close()
    first, later = next(d for d in got if d.key == "run-0"), next(d for d in got if d.value == b"later")
    assert later.partition == first.partition


async def test_messages_older_than_the_retention_are_removed_at_start(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    async with started(f"sqlite:///{path}") as bus:
        await bus.publish(TOPIC, key="k", value=b"old")
        await bus.publish(TOPIC, key="k", value=b"new")
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE messages SET appended_at = appended_at - 7200 WHERE value = ?", (b"old",))  # two hours ago
    async with started(f"sqlite:///{path}?retention_hours=1") as bus:
        sub = await bus.subscribe(group="g", topics=[TOPIC])
        (d,) = await take(sub, 1)
        assert (d.value, d.offset) == (b"new", 1)  # offsets stay: "new" is still offset 1
        await nothing_before(bus, sub)
        await sub.close()


async def test_a_write_waiting_for_another_process_does_not_block_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    async with started(f"sqlite:///{path}") as bus:
        sub = await bus.subscribe(group="g", topics=[TOPIC])
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the file's write lock
        publishing = asyncio.create_task(bus.publish(TOPIC, key="k", value=b"waited"))
        slept = time.monotonic()
        await asyncio.sleep(0.2)  # the publish starts waiting; the loop must run on meanwhile
        assert time.monotonic() - slept < 10  # a publish waiting on the loop would hold it for its 30 s busy timeout
        assert not publishing.done()
        other.execute("COMMIT")
        other.close()
        await asyncio.wait_for(publishing, 30)
        (d,) = await take(sub, 1)
        assert d.value == b"waited"
        await sub.close()


async def test_a_stopped_bus_refuses_work(tmp_path: Path) -> None:
    bus = open_bus(f"sqlite:///{tmp_path}/bus.db")
    assert isinstance(bus, SqliteBus)
    with pytest.raises(RuntimeError, match="not started"):
        await bus.publish(TOPIC, key="k", value=b"x")
    await bus.start()
    sub = await bus.subscribe(group="g", topics=[TOPIC])
    await bus.publish(TOPIC, key="k", value=b"x")
    (d,) = await take(sub, 1)
    await bus.stop()
    assert await sub.get(timeout=0.1) is None  # stop() closed it
    with pytest.raises(RuntimeError, match="closed subscription"):
        await sub.commit(d)
    with pytest.raises(RuntimeError, match="not started"):
        await bus.ping()

