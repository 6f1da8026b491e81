"""POST /runs/{id}/retry end to end: the augmenter fails once (an injected generator failure, handed in
through its deps), the run view shows the run failed in the augmenter, the retry emits dataset.labeled
again under a new event id, the augmenter redoes the work and the run goes on to the proposer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from dlforge.augmenter.filters import KeepAllFilter
from dlforge.augmenter.generators import Generated
from dlforge.augmenter.settings import AugmenterSettings
from dlforge.augmenter.worker import AugmenterDeps, build_generator, service
from dlforge.common import runs
from dlforge.common.app import ServicePart, create_app
from dlforge.common.events import DatasetLabeled, DatasetUploaded, Event, PipelineOptions, Spec
from dlforge.common.runtime import Backends
from dlforge.common.settings import load_settings

LAYOUT = {"stripes": ("stripes", {"train": 20, "val": 4, "test": 4}),
          "spots": ("spots", {"train": 6, "val": 4, "test": 4})}


class FailsOnce:
    """The real generator, but its first call raises (a stand-in for a transient plug-in bug)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0

    def generate(self, images: np.ndarray, n: int, rng: np.random.Generator) -> Generated:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("injected generator failure")
        result: Generated = self.inner.generate(images, n, rng)
        return result


async def _until(client: httpx.AsyncClient, run_id: str, check: Any, *, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = await client.get(f"/runs/{run_id}")
        if r.status_code == 200:
            doc = r.json()
            if check(doc):
                return doc
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not reached within {timeout} s; last run document: {doc}")


async def test_a_failed_stage_is_retried_and_redone(tmp_path: Path, write_dataset: Any) -> None:
    settings = load_settings(AugmenterSettings, bus="memory://", objects=f"file://{tmp_path}/o",
                             docs=f"sqlite:///{tmp_path}/d.db", retry_attempts=1, poll_seconds=0.05)
    backends = Backends.from_settings(settings)
    generator = FailsOnce(build_generator(settings))

    async def build(s: AugmenterSettings, b: Backends) -> AugmenterDeps:
        return AugmenterDeps(settings=s, generator=generator, sample_filter=KeepAllFilter())

    augmenter = ServicePart(service=service, settings=AugmenterSettings, build=build)
    app = create_app([runs.part(), augmenter], backends=backends)
    spec = Spec(positive_class="spots", min_recall=0.9)
    options = PipelineOptions(min_per_class=20, max_imbalance=1.0, seed=3)
    _, labels_key = write_dataset(backends.objects, "ds1", LAYOUT)
    uploaded = Event.new(DatasetUploaded(dataset_id="ds1", name="t", item_count=56, classes=list(LAYOUT),
                                         labeled_count=56, rejected_count=0, duplicate_count=0,
                                         manifest_key="labeler/ds1/manifest.json", spec=spec, options=options),
                         run_id="run-1")
    labeled = uploaded.follow(DatasetLabeled(dataset_id="ds1", labels_key=labels_key, classes=list(LAYOUT),
                                             counts=[], human_labels=56, auto_labels=0, rounds=1, spec=spec,
                                             options=options))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/runs/run-1/retry")).status_code == 404
        await backends.publish(uploaded)
        await backends.publish(labeled)
        failed = await _until(client, "run-1", lambda d: d["state"] == "failed")
        assert failed["stages"]["augmenter"]["state"] == "failed"
        assert "injected generator failure" in failed["failure"]["reason"]
        assert failed["stages"]["labeler"]["state"] == "succeeded"

        r = await client.post("/runs/run-1/retry")
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["stage"] == "augmenter" and body["topic"] == "dataset.labeled"
        assert body["event_id"] != labeled.event_id
        assert (await client.post("/runs/run-1/retry")).status_code == 409  # running again: nothing to retry

        done = await _until(client, "run-1", lambda d: d["stages"]["augmenter"]["state"] == "succeeded")
        assert generator.calls >= 2  # the work was really done again
        assert done["state"] == "running" and done["failure"] is None
        assert done["stages"]["proposer"]["state"] == "running"
        assert done["stages"]["labeler"]["state"] == "succeeded"
        assert done["counts"]["dataset.labeled"] == 2 and done["counts"]["dataset.augmented"] == 1
        assert [r["stage"] for r in done["retries"]] == ["augmenter"]
        assert done["retries"][0]["failure"]["stage"] == "augmenter"
        # the report is not there while the run goes on
        assert (await client.get("/runs/run-1/report")).status_code == 409

