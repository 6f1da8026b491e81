"""At start the trainer submits its unfinished REST jobs again (they resume); another host's are left alone."""

from __future__ import annotations

import time

import pytest

from dlforge.common.app import settings_for
from dlforge.common.errors import InvalidInput
from dlforge.common.runtime import Backends
from dlforge.trainer.handlers import TrainingRequest, resume_key
from dlforge.trainer.jobs import OWNER, JobRecords
from dlforge.trainer.params import TrainParams
from dlforge.trainer.reconcile import reconcile, resume_jobs
from dlforge.trainer.settings import TrainerSettings
from dlforge.trainer.testing import answering_late, jobs_ended, make_candidate, make_dataset
from dlforge.trainer.worker import build_deps


async def test_this_hosts_unfinished_rest_jobs_are_trained_again_at_start(backends: Backends) -> None:
    request = TrainingRequest(weights_key=make_candidate(backends.objects, "cands/small.pt"),
                              manifest_key=make_dataset(backends.objects, per_class={"defect": 12, "good": 12},
                                                        size=16),
                              classes=["defect", "good"], hparams=TrainParams(lr=0.01, batch_size=4, epochs=1))
    records = JobRecords(backends.docs)
    stored = request.model_dump(mode="json")
    theirs = {"owner": "another-host", "lease_holder": "another-host/7/x", "lease_until": time.time() + 3600}
    for job_id, extra, body in (("mine", {"owner": OWNER}, stored), ("queued-mine", {"owner": OWNER}, stored),
                                ("theirs", theirs, stored),
                                ("outdated", {"owner": OWNER}, {**stored, "hparams": {"learning_rate": 0.1}})):
        await records.create(job_id, kind="api", request=body, key_prefix=f"trainer/jobs/{job_id}", extra=extra)
        if job_id != "queued-mine":
            await records.start(job_id)
    deps = await build_deps(settings_for(TrainerSettings, backends.settings), backends)

    await resume_jobs(deps, backends)
    await reconcile(backends)  # runs after resume_jobs at start: it leaves REST jobs to it

    await jobs_ended(deps.jobs, timeout=120)
    states = {j: (await records.get(j) or {}) for j in ("mine", "queued-mine", "theirs", "outdated")}
    assert states["mine"]["state"] == states["queued-mine"]["state"] == "completed"
    assert states["mine"]["resumed_from"] is None  # it had stored no state yet: trained from the start
    assert states["mine"]["model_key"] == "trainer/jobs/mine/model.pt" and backends.objects.exists(
        "trainer/jobs/mine/model.pt")
    assert states["theirs"]["state"] == "running"  # another trainer process runs it and renews its lease
    assert states["mine"]["lease_holder"] == deps.jobs.holder
    await deps.jobs.close()
    assert states["outdated"]["state"] == "failed"
    assert "no longer validates" in states["outdated"]["error"] and "learning_rate" in states["outdated"]["error"]


async def test_a_job_queued_at_the_restart_is_trained_once_when_the_store_answers_late(
        backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job submitted again from ``queued`` starts (``running``) as soon as the event loop lets it; a
    document store that yields while it answers (Mongo does) must not then find it among the ``running``
    jobs and submit it a second time: two trainings of one job on one key prefix."""
    records = JobRecords(backends.docs)
    request = TrainingRequest(weights_key="cands/none.pt", manifest_key="data/none.json", classes=["a", "b"],
                              hparams=TrainParams(lr=0.01, batch_size=4, epochs=1))
    for job_id in ("queued-mine", "running-mine"):
        await records.create(job_id, kind="api", request=request.model_dump(mode="json"),
                             key_prefix=f"trainer/jobs/{job_id}", extra={"owner": OWNER})
    await records.start("running-mine")
    trained: list[str] = []

    def fake_training(objects: object, request: TrainingRequest, *, job_id: str, **_: object) -> None:
        trained.append(job_id)
        raise InvalidInput("stands for the training")

    monkeypatch.setattr("dlforge.trainer.runner.run_training", fake_training)
    monkeypatch.setattr(backends.docs, "find", answering_late(backends.docs.find))
    deps = await build_deps(settings_for(TrainerSettings, backends.settings), backends)

    await resume_jobs(deps, backends)
    await jobs_ended(deps.jobs, timeout=30)
    assert sorted(trained) == ["queued-mine", "running-mine"]
    await deps.jobs.close()


async def test_a_resumed_job_that_fails_leaves_no_state_to_resume_from(backends: Backends) -> None:
    """A failed REST job is never submitted again: the state its killed attempt stored goes with it (here the
    manifest was deleted while the trainer was down, so the resumed attempt fails before training; the other
    job's stored request no longer validates, so it is not submitted at all)."""
    records = JobRecords(backends.docs)
    request = TrainingRequest(weights_key=make_candidate(backends.objects, "cands/small.pt"),
                              manifest_key="data/deleted.json", classes=["a", "b"],
                              hparams=TrainParams(lr=0.01, batch_size=4, epochs=1))
    await records.create("failing", kind="api", request=request.model_dump(mode="json"),
                         key_prefix="trainer/jobs/failing", extra={"owner": OWNER})
    await records.create("outdated", kind="api", request={**request.model_dump(mode="json"), "hparams": {"lr": -1}},
                         key_prefix="trainer/jobs/outdated", extra={"owner": OWNER})
    for job_id in ("failing", "outdated"):
        await records.start(job_id)
        backends.objects.put_bytes(resume_key(f"trainer/jobs/{job_id}"), b"the state a killed attempt stored")
    deps = await build_deps(settings_for(TrainerSettings, backends.settings), backends)

    await resume_jobs(deps, backends)
    await jobs_ended(deps.jobs, timeout=60)
    job = await records.get("failing") or {}
    assert job["state"] == "failed" and "data/deleted.json" in job["error"]
    outdated = await records.get("outdated") or {}
    assert outdated["state"] == "failed" and "no longer validates" in outdated["error"]
    assert [k for k in ("failing", "outdated") if backends.objects.exists(resume_key(f"trainer/jobs/{k}"))] == []
    await deps.jobs.close()
