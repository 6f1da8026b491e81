"""A process that uses the SQLite bus file a test shares with it (for the durability tests).

    python bus_client.py BUS_URL publish-and-take N TAKE COMMIT
        publish N messages m0..m{N-1} (key "k"), take TAKE of them as group "workers", commit the
        first COMMIT, print "ready <json>"; then, when a line comes on stdin, commit the rest and print
        "commit ok" or "commit refused: <error>"; wait to be killed (SIGKILL)
    python bus_client.py BUS_URL publish N EVERY_MS
        publish N messages m0..m{N-1} with keys k0..k3, one every EVERY_MS ms, print "published"
    python bus_client.py BUS_URL consume GROUP
        print "joined", then for each delivery commit it and print "got <value> <key> <partition> <offset>"
        until stdin closes (then leave the group and exit)

Each line is flushed at once: the test waits for it.
"""

from __future__ import annotations

import asyncio
import json
import sys

from dlforge.common.backends import open_bus
from dlforge.common.bus import EventBus, Message
from dlforge.common.events import Topic

TOPIC = Topic.LABELS_SUBMITTED


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def publish_and_take(bus: EventBus, n: int, take: int, commit: int) -> None:
    await bus.publish_batch([Message(TOPIC, key="k", value=f"m{i}".encode()) for i in range(n)])
    sub = await bus.subscribe(group="workers", topics=[TOPIC])
    taken = []
    while len(taken) < take:
        taken += await sub.get_batch(take - len(taken), timeout=10)
    if commit:
        await sub.commit(taken[commit - 1])
    say("ready " + json.dumps({"taken": [d.value.decode() for d in taken], "committed": commit}))
    if await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline):
        try:
            await sub.commit(taken[-1])
        except Exception as exc:
            say(f"commit refused: {type(exc).__name__}: {exc}")
        else:
            say("commit ok")
    await asyncio.Event().wait()  # hold the in-flight deliveries until killed


async def publish(bus: EventBus, n: int, every_ms: int) -> None:
    for i in range(n):
        await bus.publish(TOPIC, key=f"k{i % 4}", value=f"m{i}".encode())
        await asyncio.sleep(every_ms / 1000)
    say("published")


async def consume(bus: EventBus, group: str) -> None:
    sub = await bus.subscribe(group=group, topics=[TOPIC])
    say("joined")
    stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    while not stdin_closed.done():
        for d in await sub.get_batch(10, timeout=0.1):
            await sub.commit(d)
            say(f"got {d.value.decode()} {d.key} {d.partition} {d.offset}")
    await sub.close()


async def main(argv: list[str]) -> None:
    url, command, *args = argv
    bus = open_bus(url)
    await bus.start()
    try:
        if command == "publish-and-take":
            await publish_and_take(bus, int(args[0]), int(args[1]), int(args[2]))
        elif command == "publish":
            await publish(bus, int(args[0]), int(args[1]))
        elif command == "consume":
            await consume(bus, args[0])
        else:
            raise SystemExit(f"unknown command {command!r}")
    finally:
        await bus.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
