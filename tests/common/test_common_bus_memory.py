"""The in-process bus under cancellation: a consumer cancelled while its poll times out leaves the bus usable.

On Python 3.11, ``asyncio.wait_for(condition.wait(), t)`` runs the wait in a task of its own. When the
timeout fires while another consumer holds the condition's lock and the waiting task is then cancelled
(a worker's cancellation follower is cancelled at shutdown), wait_for returns before the inner task has
re-acquired the lock: the outer ``async with`` releases a lock it does not hold, and the inner task later
takes the lock and never gives it back. Every other consumer then blocks forever (``dlforge up`` did not
exit after SIGTERM).
"""

from __future__ import annotations

import asyncio
import random
import threading

from dlforge.common.bus.memory import MemoryBus
from dlforge.common.events import Topic


async def _churn(bus: MemoryBus, *, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    subs = [await bus.subscribe(group=f"g{i}", topics=[Topic.RUN_CANCELLED]) for i in range(4)]
    for _ in range(rounds):
        polls = [asyncio.create_task(s.get_batch(8, timeout=rng.choice([0.0005, 0.001, 0.002]))) for s in subs]
        await asyncio.sleep(rng.choice([0.0, 0.0005, 0.001, 0.002]))
        for task in polls:
            if rng.random() < 0.5:
                task.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
        if rng.random() < 0.3:
            await bus.publish(Topic.RUN_CANCELLED, key="k", value=b"x")


def test_cancelled_polls_leave_the_bus_usable() -> None:
    async def main() -> None:
        bus = MemoryBus()
        await bus.start()
        await _churn(bus, rounds=400, seed=7)
        # the lock must be free now: a new consumer's poll answers, a publish reaches it, stop returns
        fresh = await bus.subscribe(group="fresh", topics=[Topic.RUN_CANCELLED])
        async with asyncio.timeout(10):
            first = await fresh.get_batch(1000, timeout=0.01)
            assert first, "the earlier publishes are delivered to a new group"
            await bus.publish(Topic.RUN_CANCELLED, key="k", value=b"last")
            got = await fresh.get_batch(1000, timeout=1)
            assert [d.value for d in got] == [b"last"]
            await fresh.close()
            await bus.stop()
        assert not bus._changed.locked()

    # with the lock orphaned the loop blocks in a way cancellation cannot break (the inner wait retries
    # its acquire whenever it is cancelled): run it in a thread and fail at a deadline instead of hanging
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the memory bus deadlocked: a cancelled poll left its lock taken"
    if errors:
        raise errors[0]
