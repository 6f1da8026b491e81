"""At start the trainer submits its unfinished REST jobs again (they resume); another host's are left alone."""

from __future__ import annotations

import asyncio
import time

from dlforge.common.app import settings_for
from dlforge.common.runtime import Backends
from dlforge.trainer.handlers import TrainingRequest
from dlforge.trainer.jobs import OWNER, JobRecords
from dlforge.trainer.params import TrainParams
from dlforge.trainer.reconcile import reconcile, resume_jobs
from dlforge.trainer.settings import TrainerSettings
from dlforge.trainer.testing import make_candidate, make_dataset
from dlforge.trainer.worker import build_deps


async def test_this_hosts_unfinished_rest_jobs_are_trained_again_at_start(backends: Backends) -> None:
    request = TrainingRequest(weights_key=make_candidate(backends.objects, "cands/small.pt"),
                              manifest_key=make_dataset(backends.objects, per_class={"defect": 12, "good": 12},
                                                        size=16),
                              classes=["defect", "good"], hparams=TrainParams(lr=0.01, batch_size=4, epochs=1))
    records = JobRecords(backends.docs)
    stored = request.model_dump(mode="json")
    for job_id, owner, body in (("mine", OWNER, stored), ("queued-mine", OWNER, stored),
                                ("theirs", "another-host", stored),
                                ("outdated", OWNER, {**stored, "hparams": {"learning_rate": 0.1}})):
        await records.create(job_id, kind="api", request=body, key_prefix=f"trainer/jobs/{job_id}",
                             extra={"owner": owner})
        if job_id != "queued-mine":
            await records.start(job_id)
    deps = await build_deps(settings_for(TrainerSettings, backends.settings), backends)

    await resume_jobs(deps, backends)
    await reconcile(backends)  # runs after resume_jobs at start: it leaves REST jobs to it

    deadline = time.monotonic() + 120
    while deps.jobs.tasks and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    states = {j: (await records.get(j) or {}) for j in ("mine", "queued-mine", "theirs", "outdated")}
    assert states["mine"]["state"] == states["queued-mine"]["state"] == "completed"
    assert states["mine"]["resumed_from"] is None  # it had stored no state yet: trained from the start
    assert states["mine"]["model_key"] == "trainer/jobs/mine/model.pt" and backends.objects.exists(
        "trainer/jobs/mine/model.pt")
    assert states["theirs"]["state"] == "running"  # another trainer process runs it
    assert states["outdated"]["state"] == "failed"
    assert "no longer validates" in states["outdated"]["error"] and "learning_rate" in states["outdated"]["error"]
