"""The trainer's hpo.trial handler on embedded backends, against a real Optuna storage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import optuna
import pytest

from dlforge.common.app import settings_for
from dlforge.common.bus import Delivery
from dlforge.common.events import Event, HpoTrial, HpoTrialCompleted, Topic, decode, encode
from dlforge.common.runtime import Backends, Outcome, Worker
from dlforge.common.settings import load_settings
from dlforge.trainer.settings import TrainerSettings
from dlforge.trainer.testing import make_candidate, make_dataset
from dlforge.trainer.worker import build_deps, service

PARAMS = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-6, "dropout": 0.0, "unfreeze": 0, "batch_size": 8,
          "optimizer": "adam"}


@pytest.fixture
async def backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Backends]:
    monkeypatch.setenv("DLFORGE_TRAINER_PREFIX_RUNNER", "torch")
    b = Backends.from_settings(load_settings(bus="memory://", objects=f"file://{tmp_path}/o",
                                             docs=f"sqlite:///{tmp_path}/d.db", work_dir=str(tmp_path / "w")))
    await b.start()
    yield b
    await b.stop()


def trial_event(backends: Backends, storage: str, number: int, params: dict[str, object]) -> Event:
    return Event.new(HpoTrial(
        study_name="s", trial_number=number, params=params, dataset_id="d", model_id="m", arch="small_cnn",
        weights_key=make_candidate(backends.objects, "cands/small.pt"),
        manifest_key=make_dataset(backends.objects, per_class={"defect": 30, "good": 30}, size=24),
        classes=["defect", "good"], epochs=2, sample_fraction=0.5, storage_url=storage,
    ), run_id="r")


async def handle(backends: Backends, event: Event) -> list[Event]:
    deps = await build_deps(settings_for(TrainerSettings, backends.settings), backends)  # DLFORGE_TRAINER_* now
    outcome = await Worker(service, backends, deps=deps).process(Delivery(topic=event.event_type.value, key="r",
                                                               value=encode(event)))
    assert outcome == Outcome.HANDLED
    marker = await backends.docs.get("processed_events", f"dlforge.trainer:{event.event_id}")
    assert marker is not None
    return [decode(raw.encode()) for raw in marker["outbox"]]


@pytest.mark.slow
async def test_trial_reports_each_epoch_to_the_study(backends: Backends, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.set_user_attr("dlforge.pruner", {"factory": "optuna.pruners.NopPruner", "kwargs": {}})
    study.ask()
    study.ask()
    [done] = await handle(backends, trial_event(backends, storage, 1, PARAMS))
    assert isinstance(done.payload, HpoTrialCompleted) and done.event_type == Topic.HPO_TRIAL_COMPLETED
    assert done.payload.state == "complete" and done.payload.trial_number == 1
    assert done.payload.value is not None and done.payload.value >= 0.8
    stored = optuna.load_study(study_name="s", storage=storage).trials[1]
    assert stored.intermediate_values == {1: done.payload.intermediate[0], 2: done.payload.intermediate[1]}
    assert stored.state == optuna.trial.TrialState.RUNNING  # the tuner tells, not the trainer
    job = await backends.docs.get("trainer_jobs", "s-trial-0001")
    assert job is not None and job["state"] == "completed" and job["result"]["train_rows"] == 22
    epochs = await backends.docs.find("trainer_metrics", {"job_id": "s-trial-0001"}, sort=[("epoch", 1)])
    assert [e["epoch"] for e in epochs] == [1, 2]

    # a trial the study already finished is not trained again
    study.tell(1, 0.5, skip_if_finished=True)
    again = trial_event(backends, storage, 1, PARAMS).model_copy(update={"event_id": "again"})
    assert await handle(backends, again) == []


async def test_invalid_parameters_make_a_failed_trial_not_a_dead_letter(backends: Backends, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="s", storage=storage, direction="maximize").ask()
    [done] = await handle(backends, trial_event(backends, storage, 0, {**PARAMS, "optimizer": "rmsprop"}))
    assert isinstance(done.payload, HpoTrialCompleted)
    assert done.payload.state == "failed" and "optimizer" in (done.payload.error or "")


async def test_unreachable_study_trains_without_pruning(backends: Backends, tmp_path: Path) -> None:
    [done] = await handle(backends, trial_event(backends, f"sqlite:///{tmp_path}/elsewhere.db", 0, PARAMS))
    assert isinstance(done.payload, HpoTrialCompleted) and done.payload.state == "complete"
    assert len(done.payload.intermediate) == 2  # the values still reach the tuner, in the event


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
    assert await backends.docs.get("trainer_models", "run-7.small_cnn-mnist") is not None
    # handled again (another event id): the model exists, nothing is retrained, the same result comes back
    [again] = await handle(backends, event.model_copy(update={"event_id": "again"}))
    assert isinstance(again.payload, ModelTrained) and again.payload.metrics == p.metrics
