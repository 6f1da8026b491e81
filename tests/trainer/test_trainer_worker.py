"""The trainer's handlers on embedded backends: a trial reports its epochs and obeys the tuner's decisions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dlforge.common.app import settings_for
from dlforge.common.bus import Delivery
from dlforge.common.events import (
    Event,
    HpoTrial,
    HpoTrialCompleted,
    HpoTrialDecision,
    HpoTrialReported,
    Topic,
    decode,
    encode,
)
from dlforge.common.runtime import Backends, Outcome, Worker, run_workers
from dlforge.trainer.pruning import DECISIONS, decisions_service
from dlforge.trainer.settings import TrainerSettings
from dlforge.trainer.testing import make_candidate, make_dataset
from dlforge.trainer.worker import build_deps, service

PARAMS = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-6, "dropout": 0.0, "unfreeze": 0, "batch_size": 8,
          "optimizer": "adam"}


def trial_event(backends: Backends, number: int, params: dict[str, object], *, epochs: int = 2) -> Event:
    return Event.new(HpoTrial(
        study_name="s", trial_number=number, params=params, dataset_id="d", model_id="m", arch="small_cnn",
        weights_key=make_candidate(backends.objects, "cands/small.pt"),
        manifest_key=make_dataset(backends.objects, per_class={"defect": 30, "good": 30}, size=24),
        classes=["defect", "good"], epochs=epochs, sample_fraction=0.5,
    ), run_id="r")


async def handle(backends: Backends, event: Event) -> list[Event]:
    deps = await build_deps(settings_for(TrainerSettings, backends.settings), backends)  # DLFORGE_TRAINER_* now
    outcome = await Worker(service, backends, deps=deps).process(Delivery(topic=event.event_type.value, key="r",
                                                               value=encode(event)))
    assert outcome == Outcome.HANDLED
    marker = await backends.docs.get("processed_events", f"dlforge.trainer:{event.event_id}")
    assert marker is not None
    return [decode(raw.encode()) for raw in marker["outbox"]]


async def fake_tuner(backends: Backends, prune_at: int, reports: list[HpoTrialReported]) -> None:
    """Answers every report like the tuner does: 'continue', and 'prune' from step ``prune_at`` on."""
    sub = await backends.bus.subscribe(group="fake-tuner", topics=[Topic.HPO_TRIAL_REPORTED])
    try:
        while True:
            d = await sub.get(timeout=0.1)
            if d is None:
                continue
            report = decode(d.value)
            p = report.payload
            assert isinstance(p, HpoTrialReported)
            reports.append(p)
            action = "prune" if p.step >= prune_at else "continue"
            await backends.publish(report.follow(HpoTrialDecision(
                study_name=p.study_name, trial_number=p.trial_number, step=p.step, action=action, reason="test")))
            await sub.commit(d)
    finally:
        await sub.close()


async def test_a_trial_reports_each_epoch_and_stops_when_the_tuner_says_prune(backends: Backends) -> None:
    reports: list[HpoTrialReported] = []
    stop = asyncio.Event()
    decisions = Worker(decisions_service, backends, deps=None)
    tasks = [asyncio.create_task(run_workers([decisions], stop)), asyncio.create_task(fake_tuner(backends, 2, reports))]
    try:
        await decisions.ready.wait()
        [done] = await handle(backends, trial_event(backends, 1, PARAMS, epochs=4))
    finally:
        stop.set()
        tasks[1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done.payload, HpoTrialCompleted) and done.event_type == Topic.HPO_TRIAL_COMPLETED
    # epoch 1: continue; epoch 2: prune -> two of the four epochs trained, the trial ends pruned
    assert done.payload.state == "pruned" and done.payload.trial_number == 1
    assert len(done.payload.intermediate) == 2 and done.payload.value == done.payload.intermediate[-1]
    assert [(r.trial_number, r.step, r.value) for r in reports] == [
        (1, 1, done.payload.intermediate[0]), (1, 2, done.payload.intermediate[1])]
    job = await backends.docs.get("trainer_jobs", "s-trial-0001")
    assert job is not None and job["state"] == "pruned" and job["result"]["train_rows"] == 22
    epochs = await backends.docs.find("trainer_metrics", {"job_id": "s-trial-0001"}, sort=[("epoch", 1)])
    assert [e["epoch"] for e in epochs] == [1, 2]
    # the tie-break travels with the value: the loss of the epoch the value is from, as the epoch records say
    assert done.payload.val_loss == epochs[-1]["val_loss"] and epochs[-1]["val_loss"] > 0
    stored = await backends.docs.find(DECISIONS, {"study_name": "s", "trial_number": 1}, sort=[("step", 1)])
    assert [(d["step"], d["action"]) for d in stored] == [(1, "continue"), (2, "prune")]


async def test_without_an_answer_the_trial_trains_on(backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLFORGE_TRAINER_DECISION_WAIT_SECONDS", "0.2")
    sub = await backends.bus.subscribe(group="watcher", topics=[Topic.HPO_TRIAL_REPORTED])
    [done] = await handle(backends, trial_event(backends, 0, PARAMS, epochs=3))
    assert isinstance(done.payload, HpoTrialCompleted) and done.payload.state == "complete"
    assert len(done.payload.intermediate) == 3  # the values still reach the tuner, in the completion too
    sent = [decode(d.value) for d in await sub.get_batch(10, timeout=0.5)]
    await sub.close()
    # every epoch but the last (whose value the completion carries) is reported
    assert [e.payload.step for e in sent if isinstance(e.payload, HpoTrialReported)] == [1, 2]
    assert [e.payload.value for e in sent] == done.payload.intermediate[:2]  # type: ignore[union-attr]
    # keyed per trial, with ids that are the same whenever this step of this trial is reported again
    assert {e.key for e in sent} == {"r:0"} and len({e.event_id for e in sent}) == 2


async def test_invalid_parameters_make_a_failed_trial_not_a_dead_letter(backends: Backends) -> None:
    [done] = await handle(backends, trial_event(backends, 0, {**PARAMS, "optimizer": "rmsprop"}))
    assert isinstance(done.payload, HpoTrialCompleted)
    assert done.payload.state == "failed" and "optimizer" in (done.payload.error or "")


@pytest.mark.slow
async def test_final_training_on_two_workers_emits_model_trained(backends: Backends,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from dlforge.common.events import HpoCompleted, ModelTrained, PipelineOptions, Spec, TrialRecord
    from dlforge.vision.networks import load_checkpoint

    monkeypatch.setenv("DLFORGE_TRAINER_FINAL_EPOCHS", "6")
    monkeypatch.setenv("DLFORGE_TRAINER_FINAL_PATIENCE", "2")

    payload = HpoCompleted(
        study_name="s", dataset_id="d", model_id="small_cnn-mnist", arch="small_cnn",
        weights_key=make_candidate(backends.objects, "cands/small.pt"),
        manifest_key=make_dataset(backends.objects, per_class={"defect": 30, "good": 30}, size=24),
        classes=["defect", "good"], best_params=PARAMS, best_value=1.0,
        trials=[TrialRecord(number=0, state="complete", value=1.0, params=PARAMS)], spec=Spec(positive_class="defect"),
        options=PipelineOptions(train_epochs=2, no_of_workers=2),
    )
    event = Event.new(payload, run_id="run-7")
    [trained] = await handle(backends, event)
    p = trained.payload
    assert isinstance(p, ModelTrained) and trained.event_type == Topic.MODEL_TRAINED
    assert p.no_of_workers == 2 and p.checkpoint_key == "trainer/models/run-7/small_cnn-mnist.pt"
    # up to max(6, train_epochs) epochs, stopped 2 epochs after the best one (whose weights the model holds)
    epochs, best = p.metrics["epochs"], p.metrics["best_epoch"]
    assert 1 <= best <= epochs <= 6 and (epochs == 6 or epochs == best + 2)
    assert p.metrics["test_accuracy"] >= 0.8 and "test_recall_defect" in p.metrics
    assert p.params["patience"] == 2 and p.params["epochs"] == 6
    assert p.params["input_size"] == 64 and p.params["lr"] == PARAMS["lr"]
    model, ckpt = load_checkpoint(str(backends.objects.get_file(p.checkpoint_key, Path(backends.settings.work_dir)
                                                                / "m.pt")))
    assert ckpt["classes"] == ["defect", "good"] and model.head.out_features == 2
    job = await backends.docs.get("trainer_jobs", "run-7-final")
    assert job is not None and job["state"] == "completed" and job["no_of_workers"] == 2
    # the declared views (default "flips") were checked on val: the check's figures are on the record
    assert job["result"]["views"][0] == "identity" and set(job["result"]["view_check"]) == {
        "identity", "hflip", "vflip", "rot180"}
    # and in the event's metrics (the run report's training figures)
    assert {k: v for k, v in p.metrics.items() if k.startswith("view_check_")} == {
        f"view_check_{k}": v for k, v in job["result"]["view_check"].items()}
    assert p.metrics["view_allowed_cost"] == job["result"]["view_allowed_cost"] >= 0.02
    # unfreeze 0: the head is the whole trained part, so the check's probe is the model itself
    assert p.metrics["view_probe_frozen"] == 0.0 and job["result"]["view_probe"] == "model"
    assert await backends.docs.get("trainer_models", "run-7.small_cnn-mnist") is not None
    # handled again (another event id): the model exists, nothing is retrained, the same result comes back
    [again] = await handle(backends, event.model_copy(update={"event_id": "again"}))
    assert isinstance(again.payload, ModelTrained) and again.payload.metrics == p.metrics


async def test_a_trial_trains_on_the_coreset_its_event_names(backends: Backends,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from dlforge.trainer.handlers import CoresetCache

    monkeypatch.setenv("DLFORGE_TRAINER_DECISION_WAIT_SECONDS", "0.2")
    asked: list[tuple[str, float, int]] = []
    real_rows = CoresetCache.rows

    def spy(self: CoresetCache, key: object, **kw: object) -> object:  # the coreset path, as the trainer takes it
        rows = real_rows(self, key, **kw)
        asked.append((str(kw["method"]), float(kw["fraction"]), len(rows)))
        return rows

    monkeypatch.setattr(CoresetCache, "rows", spy)
    event = trial_event(backends, 3, PARAMS, epochs=1)
    assert isinstance(event.payload, HpoTrial)
    event = event.model_copy(update={"payload": event.payload.model_copy(update={"sample_method": "k_center",
                                                                                  "sample_fraction": 0.25})})
    [done] = await handle(backends, event)
    assert isinstance(done.payload, HpoTrialCompleted) and done.payload.state == "complete"
    job = await backends.docs.get("trainer_jobs", "s-trial-0003")
    assert job is not None and job["request"]["sample_method"] == "k_center"
    # round(22 * 0.25) = 6 rows of each class, taken from the k-center coreset (a random sample never asks it)
    assert asked == [("k_center", 0.25, 12)]
    assert job["request"]["sample_fraction"] == 0.25 and job["result"]["train_rows"] == 12


async def test_a_trials_random_sample_is_drawn_with_the_seed_its_event_carries(
        backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    """v4 events carry the run's seed: the jobs of two studies (two runs) sample with it, whatever their names;
    an event from before v4 (no seed) keeps the study-name seed it had."""
    import hashlib

    monkeypatch.setenv("DLFORGE_TRAINER_DECISION_WAIT_SECONDS", "0.2")
    base = trial_event(backends, 1, PARAMS, epochs=1)
    assert isinstance(base.payload, HpoTrial)
    jobs = {}
    for study, seed in (("run-a", 5), ("run-b", 5), ("run-old", None)):
        payload = base.payload.model_copy(update={"study_name": study, "sample_seed": seed})
        [done] = await handle(backends, Event.new(payload, run_id=study))
        assert isinstance(done.payload, HpoTrialCompleted) and done.payload.state == "complete"
        jobs[study] = await backends.docs.get("trainer_jobs", f"{study}-trial-0001")
    assert jobs["run-a"] is not None and jobs["run-b"] is not None and jobs["run-old"] is not None
    assert jobs["run-a"]["request"]["sample_seed"] == jobs["run-b"]["request"]["sample_seed"] == 5
    # before v4: the first 4 bytes of sha256(study name), big-endian (trainer/worker.py stable_seed)
    assert jobs["run-old"]["request"]["sample_seed"] == int.from_bytes(hashlib.sha256(b"run-old").digest()[:4], "big")
