"""REST jobs carry leases: a job whose trainer died is taken over by another trainer (one, never two), and
a trainer that lost its job stops it and leaves the stored state to the new holder."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from dlforge.common.app import settings_for
from dlforge.common.errors import InvalidInput
from dlforge.common.objects import ObjectStore
from dlforge.common.runtime import Backends
from dlforge.trainer.handlers import TrainerConfig, TrainingRequest, resume_key, run_training
from dlforge.trainer.jobs import JOBS, METRICS, JobRecords
from dlforge.trainer.params import EpochMetrics, TrainParams
from dlforge.trainer.runner import JobRunner
from dlforge.trainer.settings import TrainerSettings
from dlforge.trainer.testing import answering_late, jobs_ended

LEASE = 60.0


def _request() -> TrainingRequest:
    return TrainingRequest(weights_key="cands/none.pt", manifest_key="data/none.json", classes=["a", "b"],
                           hparams=TrainParams(lr=0.01, batch_size=4, epochs=1))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _runner(backends: Backends, clock: Callable[[], float] = time.time, lease_s: float = LEASE) -> JobRunner:
    config = TrainerConfig.from_settings(settings_for(TrainerSettings, backends.settings))
    return JobRunner(backends, config, concurrent=2, lease_s=lease_s, clock=clock)


async def _job(backends: Backends, job_id: str, **extra: Any) -> None:
    await JobRecords(backends.docs).create(job_id, kind="api", request=_request().model_dump(mode="json"),
                                           key_prefix=f"trainer/jobs/{job_id}", extra=extra)


def _fake_training(trained: list[str]) -> Callable[..., None]:
    def fake(objects: object, request: TrainingRequest, *, job_id: str, **_: object) -> None:
        trained.append(job_id)
        raise InvalidInput("stands for the training")

    return fake


async def test_an_expired_lease_is_taken_over_and_a_live_one_is_left_alone(
        backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[str] = []
    monkeypatch.setattr("dlforge.trainer.runner.run_training", _fake_training(trained))
    clock = Clock()
    await _job(backends, "dead", owner="old-pod-7f9c", lease_holder="old-pod-7f9c/1/a", lease_until=clock.now - 1)
    await _job(backends, "live", owner="pod-b", lease_holder="pod-b/1/b", lease_until=clock.now + 30)
    await _job(backends, "before-leases", owner="old-pod-7f9c")  # a record from before leases: nobody renews it
    runner = _runner(backends, clock)

    taken = await runner.take_over()

    assert sorted(taken) == ["before-leases", "dead"]
    await jobs_ended(runner)
    assert sorted(trained) == ["before-leases", "dead"]
    dead = await backends.docs.get(JOBS, "dead") or {}
    assert dead["lease_holder"] == runner.holder and "taken over from 'old-pod-7f9c/1/a'" in dead["note"]
    live = await backends.docs.get(JOBS, "live") or {}
    assert live["state"] == "queued" and live["lease_holder"] == "pod-b/1/b"

    clock.now += 31  # pod-b never renewed: now its job is taken too
    assert await runner.take_over() == ["live"]


async def test_two_trainers_racing_for_one_expired_job_train_it_once(
        backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both read the job as expired; the compare-and-set on its version lets one of them take it (the two reads
    both answer before either trainer goes on, as two pods' reads of a networked store can)."""
    trained: list[str] = []
    monkeypatch.setattr("dlforge.trainer.runner.run_training", _fake_training(trained))
    await _job(backends, "orphan", owner="gone", lease_until=time.time() - 5)
    await JobRecords(backends.docs).start("orphan")
    a, b = _runner(backends), _runner(backends)
    monkeypatch.setattr(backends.docs, "find", answering_late(backends.docs.find, together=2))

    taken = await asyncio.gather(a.take_over(), b.take_over())

    assert sorted(len(t) for t in taken) == [0, 1]
    await jobs_ended(a, b)
    assert trained == ["orphan"]


async def test_a_renewed_lease_is_not_taken_over(backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    started = threading.Event()
    release = threading.Event()

    def blocking(objects: object, request: TrainingRequest, *, job_id: str, **_: object) -> None:
        started.set()
        release.wait(30)
        raise InvalidInput("stands for the training")

    monkeypatch.setattr("dlforge.trainer.runner.run_training", blocking)
    clock_a, clock_b = Clock(), Clock()
    a, b = _runner(backends, clock_a), _runner(backends, clock_b)
    await _job(backends, "held", **a.lease_fields())
    a.submit("held", _request(), "trainer/jobs/held")
    try:
        assert await asyncio.to_thread(started.wait, 30)
        clock_a.now += 0.6 * LEASE
        await a.renew()  # lease now until 1.6 leases after the start
        clock_b.now += 1.2 * LEASE
        assert await b.take_over() == []
        clock_b.now += 0.5 * LEASE
        assert await b.take_over() == ["held"]  # a stopped renewing
    finally:
        release.set()
        await jobs_ended(a, b)


async def test_a_trainer_whose_job_was_taken_over_stops_it_and_writes_nothing_more(
        backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    epochs_seen: list[int] = []
    handed: list[bool] = []
    calls: list[str] = []
    two_epochs, go_on, release_b = threading.Event(), threading.Event(), threading.Event()

    def training(objects: object, request: TrainingRequest, *, job_id: str, on_epoch: Callable[[EpochMetrics], bool],
                 handed_over: Callable[[], bool], **_: object) -> None:
        calls.append(job_id)
        if len(calls) == 2:  # b's, after it took the job over
            release_b.wait(30)
            raise InvalidInput("stands for the new holder's training")
        for epoch in (1, 2, 3):
            if epoch == 3:  # a was paused here, past its lease: meanwhile b took the job over
                two_epochs.set()
                go_on.wait(30)
            m = EpochMetrics(epoch=epoch, steps=epoch, train_loss=1.0, val_loss=1.0, val_accuracy=0.5,
                             val_recall={"a": 0.5}, seconds=0.01, images_per_second=1.0)
            if not on_epoch(m):
                break
            epochs_seen.append(epoch)
        handed.append(handed_over())

    monkeypatch.setattr("dlforge.trainer.runner.run_training", training)
    clock_a, clock_b = Clock(), Clock()
    a, b = _runner(backends, clock_a), _runner(backends, clock_b)
    await _job(backends, "job", **a.lease_fields())
    a.submit("job", _request(), "trainer/jobs/job")
    assert await asyncio.to_thread(two_epochs.wait, 30)

    clock_b.now += 2 * LEASE  # a's lease ran out (as far as b can tell)
    assert await b.take_over() == ["job"]
    await a.renew()
    go_on.set()

    await jobs_ended(a)
    assert epochs_seen == [1, 2] and handed == [True]  # epoch 3 stopped it; the stored state is left to b
    assert "job" in b.held and "job" not in a.held
    record = await backends.docs.get(JOBS, "job") or {}
    metrics = await backends.docs.find(METRICS, {"job_id": "job"})
    assert record["lease_holder"] == b.holder and record["state"] in ("queued", "running")
    assert record["finished_at"] is None  # a did not finish it
    assert sorted(d["epoch"] for d in metrics) == [1, 2]  # each epoch before the loss was recorded, none after it
    release_b.set()
    await jobs_ended(b)
    assert (await backends.docs.get(JOBS, "job") or {})["state"] == "failed"  # b's (fake) training ended it


async def test_the_lease_loop_takes_over_a_job_that_expires_while_it_runs(
        backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[str] = []
    took = threading.Event()

    def fake(objects: object, request: TrainingRequest, *, job_id: str, **_: object) -> None:
        trained.append(job_id)
        took.set()
        raise InvalidInput("stands for the training")

    monkeypatch.setattr("dlforge.trainer.runner.run_training", fake)
    runner = _runner(backends, lease_s=3.0)  # it looks every second
    await _job(backends, "soon", owner="pod-c", lease_holder="pod-c/1/c", lease_until=time.time() + 1.5)
    runner.start_leases()
    try:
        assert await asyncio.to_thread(took.wait, 20)  # the lease ran out 1.5 s in; the loop looked again
    finally:
        await runner.close()
    await jobs_ended(runner)
    assert trained == ["soon"] and runner._leases is None


def test_run_training_keeps_the_stored_state_when_the_job_was_handed_over(
        objects: ObjectStore, manifest_key: str, weights_key: str, config: TrainerConfig) -> None:
    req = TrainingRequest(weights_key=weights_key, manifest_key=manifest_key, classes=["defect", "good"],
                          hparams=TrainParams(lr=0.01, batch_size=8, epochs=2, unfreeze=0, dropout=0.0))
    for job, handed_over, kept in (("handed", True, True), ("own", False, False)):
        prefix = f"trainer/jobs/{job}"
        run_training(objects, req, job_id=job, key_prefix=prefix, config=config, resumable=True,
                     on_epoch=lambda m: m.epoch < 2, handed_over=functools.partial(bool, handed_over))
        assert objects.exists(resume_key(prefix)) is kept, job


async def test_a_write_of_the_old_holder_never_undoes_a_takeover(backends: Backends) -> None:
    """The old holder's record writes are compare-and-sets on the lease: after b took the job, a's epoch, its
    finish and its start are refused (LeaseLost) and the record stays b's."""
    from dlforge.trainer.jobs import LeaseLost

    clock_a, clock_b = Clock(), Clock()
    a, b = _runner(backends, clock_a), _runner(backends, clock_b)
    await _job(backends, "j", **a.lease_fields())
    records = JobRecords(backends.docs)
    m = EpochMetrics(epoch=1, steps=1, train_loss=1.0, val_loss=1.0, val_accuracy=0.5, val_recall={"a": 0.5},
                     seconds=0.01, images_per_second=1.0)
    await records.add_epoch("j", m, holder=a.holder)  # a holds it: written
    clock_b.now += 2 * LEASE
    docs_update = backends.docs.update
    await docs_update(JOBS, "j", {**b.lease_fields(), "state": "queued"},
                      expected_version=(await backends.docs.get(JOBS, "j") or {})["_version"])  # b's takeover
    for write in (records.add_epoch("j", m.model_copy(update={"epoch": 2}), holder=a.holder),
                  records.finish("j", state="completed", holder=a.holder), records.start("j", holder=a.holder)):
        with pytest.raises(LeaseLost):
            await write
    record = await backends.docs.get(JOBS, "j") or {}
    assert record["lease_holder"] == b.holder and record["state"] == "queued" and record["epochs_done"] == 1
    assert [d["epoch"] for d in await backends.docs.find(METRICS, {"job_id": "j"})] == [1]


async def test_a_job_is_not_taken_back_while_the_task_that_lost_it_still_runs(
        backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    release, started = threading.Event(), threading.Event()
    calls: list[str] = []

    def blocking(objects: object, request: TrainingRequest, *, job_id: str, **_: object) -> None:
        calls.append(job_id)
        started.set()
        release.wait(30)
        raise InvalidInput("stands for the training")

    monkeypatch.setattr("dlforge.trainer.runner.run_training", blocking)
    clock = Clock()
    a = _runner(backends, clock)
    await _job(backends, "k", **a.lease_fields())
    a.submit("k", _request(), "trainer/jobs/k")
    try:
        assert await asyncio.to_thread(started.wait, 30)
        # another trainer took it and died: the lease ran out again while a's first task is still training
        job = await backends.docs.get(JOBS, "k") or {}
        await backends.docs.update(JOBS, "k", {"lease_holder": "gone/1/x", "lease_until": clock.now - 1},
                                   expected_version=job["_version"])
        await a.renew()
        assert "k" in a.lost
        assert await a.take_over() == []  # not while the task that lost it runs
    finally:
        release.set()
    await jobs_ended(a)
    assert await a.take_over() == ["k"]  # once it has ended
    await jobs_ended(a)
    assert calls == ["k", "k"]
