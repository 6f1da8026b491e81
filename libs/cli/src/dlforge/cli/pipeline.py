"""Drive one pipeline run through the combined app and follow it on the bus and the run view."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import uuid4

import httpx
from fastapi import FastAPI

from dlforge.common.bus import EventBus, Subscription
from dlforge.common.errors import PoisonMessage
from dlforge.common.events import Event, Topic, decode
from dlforge.common.runs import STAGES


class RunCollector:
    """Keeps every event of one run, read from the bus as a consumer group of its own."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self.events: list[Event] = []

    async def start(self) -> None:
        topics = [t for t in Topic if t is not Topic.DEAD_LETTER]
        self._sub = await self._bus.subscribe(group=f"dlforge.cli.{uuid4().hex[:8]}", topics=topics)
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        assert self._sub is not None
        while True:
            delivery = await self._sub.get(timeout=0.5)
            if delivery is None:
                continue
            try:
                self.events.append(decode(delivery.value))
            except PoisonMessage:
                pass  # the services dead-letter it; the report only needs well-formed events
            await self._sub.commit(delivery)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sub is not None:
            await self._sub.close()

    def of_run(self, run_id: str) -> list[Event]:
        return [e for e in self.events if e.run_id == run_id]


ProgressFn = Callable[[dict[str, Any]], None]


async def follow_run(
    client: httpx.AsyncClient, run_id: str, *, on_progress: ProgressFn, timeout: float, poll: float = 0.5
) -> dict[str, Any]:
    """Poll ``GET /runs/{id}`` until the run succeeds or fails (or ``timeout`` seconds pass)."""
    deadline = time.monotonic() + timeout
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await client.get(f"/runs/{run_id}")
        if response.status_code == 200:
            run = response.json()
            on_progress(run)
            if run["state"] != "running":
                return run
        await asyncio.sleep(poll)
    raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s; last state: "
                       + ", ".join(f"{s}={run.get('stages', {}).get(s, {}).get('state')}" for s in STAGES))


async def run_in_process(
    app: FastAPI,
    *,
    upload: Callable[[httpx.AsyncClient], Any],
    on_progress: ProgressFn,
    timeout: float,
    after: Callable[[httpx.AsyncClient, dict[str, Any]], Awaitable[None]] | None = None,
) -> tuple[dict[str, Any], list[Event], Any]:
    """Start the app's workers, upload through its API, follow the run; returns (run, events, upload).

    ``after(client, run)`` runs once the run has ended, with the same client (e.g. to download its bundle).

    With auth on, the requests carry a token minted for this run (:func:`dlforge.cli.admin.run_token`,
    revoked at the end), or ``DLFORGE_TOKEN`` where accounts live in another service (``DLFORGE_AUTH_URL``).
    """
    from dlforge.cli.admin import run_token
    from dlforge.common.auth import AuthRuntime

    async with app.router.lifespan_context(app):
        auth: AuthRuntime = app.state.auth
        headers: dict[str, str] = {}
        token_id: str | None = None
        if auth.mode == "required":
            if auth.store is not None:
                token, token_id = await run_token(auth.store, hours=timeout / 3600 + 1)
            else:
                token = os.environ.get("DLFORGE_TOKEN", "")
            headers["Authorization"] = f"Bearer {token}"
        collector = RunCollector(app.state.backends.bus)
        await collector.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://dlforge", timeout=600,
                                         headers=headers) as client:
                uploaded = await upload(client)
                run = await follow_run(client, uploaded["run_id"], on_progress=on_progress, timeout=timeout)
                if after is not None:
                    await after(client, run)
            await asyncio.sleep(0.2)  # let the collector read the last event
            return run, collector.of_run(uploaded["run_id"]), uploaded
        finally:
            await collector.stop()
            if token_id is not None and auth.store is not None:
                await auth.store.revoke(token_id)
