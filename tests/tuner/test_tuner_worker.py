"""The tuner on the memory bus: with the trainer, a study of two trials, one pruned, then the final model;
alone, against completions it is fed: stop requests, failures in a row."""

from __future__ import annotations

import asyncio
from pathlib import Path

import optuna
import pytest

from dlforge.common.app import settings_for
from dlforge.common.bus import Delivery
from dlforge.common.events import (
    CandidateScore,
    Event,
    HpoCompleted,
    HpoTrial,
    HpoTrialCompleted,
    ModelProposed,
    ModelTrained,
    PipelineOptions,
    RunFailed,
    Spec,
    Topic,
    encode,
)
from dlforge.common.packed import unpack_bools
from dlforge.common.runtime import Backends, Outcome, Worker, run_workers
from dlforge.trainer import worker as trainer_worker
from dlforge.trainer.pruning import decisions_service
from dlforge.trainer.settings import TrainerSettings
from dlforge.tuner import worker as tuner_worker
from dlforge.tuner.handlers import study_name_for
from dlforge.tuner.settings import TunerSettings

GOOD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-6, "dropout": 0.0, "unfreeze": 0, "batch_size": 8,
        "optimizer": "adam"}
BAD = {**GOOD, "lr": 1e-7, "momentum": 0.0, "optimizer": "sgd"}  # clearly worse: the head barely moves


async def tuner_deps(backends: Backends) -> tuner_worker.TunerDeps:
    """The tuner's deps from the DLFORGE_TUNER_* the env fixture set."""
    return await tuner_worker.build_deps(settings_for(TunerSettings, backends.settings), backends)


async def trainer_deps(backends: Backends) -> trainer_worker.TrainerDeps:
    """The trainer's deps from the DLFORGE_TRAINER_* the env fixture set."""
    return await trainer_worker.build_deps(settings_for(TrainerSettings, backends.settings), backends)


def proposed(data: dict[str, str], *, trials: int = 2, seed: int = 0) -> ModelProposed:
    cand = CandidateScore(model_id="small_cnn-mnist", arch="small_cnn", source_dataset="mnist",
                          weights_key=data["weights_key"], scores={"logme": 1.0}, total=1.0)
    return ModelProposed(dataset_id="testdata", manifest_key=data["manifest_key"], classes=["defect", "good"],
                         ranking=[cand], chosen_model_id=cand.model_id, weights={"logme": 1.0},
                         spec=Spec(positive_class="defect"),
                         options=PipelineOptions(hpo_trials=trials, hpo_parallel=1, train_epochs=3, seed=seed))


async def collect(backends: Backends, group: str, topics: list[Topic], until: Topic, timeout: float) -> list[Event]:
    from dlforge.common.events import decode

    sub = await backends.bus.subscribe(group=group, topics=topics)
    seen: list[Event] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while loop.time() < deadline:
            d = await sub.get(timeout=0.5)
            if d is None:
                continue
            await sub.commit(d)
            event = decode(d.value)
            seen.append(event)
            if event.event_type == until:
                return seen
    finally:
        await sub.close()
    raise AssertionError(f"no {until.value} within {timeout}s; saw {[e.event_type.value for e in seen]}")


@pytest.mark.slow
async def test_study_runs_two_trials_prunes_the_worse_one_and_trains_the_best(
    backends: Backends, data: dict[str, str], env: Path
) -> None:
    run_id = "run-prune"
    # The run's override: the space widened down to lr=1e-7, a median pruner, and the two first trials fixed.
    space = {"params": [
        {"kind": "float", "name": "lr", "low": 1e-7, "high": 0.1, "log": True},
        {"kind": "float", "name": "momentum", "low": 0.0, "high": 0.99},
        {"kind": "float", "name": "weight_decay", "low": 1e-6, "high": 1e-2, "log": True},
        {"kind": "float", "name": "dropout", "low": 0.0, "high": 0.5},
        {"kind": "int", "name": "unfreeze", "low": 0, "high": 2},
        {"kind": "categorical", "name": "batch_size", "choices": [8, 16]},
        {"kind": "categorical", "name": "optimizer", "choices": ["sgd", "adam"]},
    ]}
    await backends.docs.insert("tuner_configs", {"_id": run_id, "override": {
        "space": space, "pruner": {"name": "median"}, "startup_trials": 2, "enqueue": [GOOD, BAD],
        "sample_fraction": 0.5, "fidelity_ladder": [], "sample_method": "random"}})
    stop = asyncio.Event()
    workers = [Worker(tuner_worker.service, backends, deps=await tuner_deps(backends)),
               Worker(trainer_worker.service, backends, deps=await trainer_deps(backends)),
               Worker(decisions_service, backends, deps=None)]
    task = asyncio.create_task(run_workers(workers, stop))
    try:
        await asyncio.gather(*(w.ready.wait() for w in workers))
        await backends.publish(Event.new(proposed(data), run_id=run_id))
        events = await collect(backends, "test", [Topic.HPO_TRIAL, Topic.HPO_TRIAL_COMPLETED, Topic.HPO_COMPLETED,
                                                  Topic.MODEL_TRAINED, Topic.RUN_FAILED],
                               until=Topic.MODEL_TRAINED, timeout=300)
    finally:
        stop.set()
        await task
    types = [e.event_type for e in events]
    assert Topic.RUN_FAILED not in types
    assert types.count(Topic.HPO_TRIAL) == 2 and types.count(Topic.HPO_TRIAL_COMPLETED) == 2

    results = {e.payload.trial_number: e.payload for e in events if isinstance(e.payload, HpoTrialCompleted)}
    assert results[0].state == "complete" and results[0].value is not None and results[0].value >= 0.8
    assert len(results[0].intermediate) == 3  # three epochs reported
    # which val items the trained model got right: as many of them as the accuracy it reported says
    right = unpack_bools(results[0].val_correct or "")
    assert right.mean() == pytest.approx(results[0].value)
    assert results[1].state == "pruned"  # stopped after its first report: clearly below the median
    assert results[1].val_correct is None  # a pruned trial is not compared item by item
    # stopped at the first epoch where it fell below the median of the completed trial
    k = len(results[1].intermediate)
    assert results[1].intermediate[k - 1] < results[0].intermediate[k - 1]
    assert all(results[1].intermediate[i] >= results[0].intermediate[i] for i in range(k - 1))
    # each trial trained on the stratified half of the train split: round(22 * 0.5) = 11 of each class
    hpo_trial = next(e.payload for e in events if e.event_type == Topic.HPO_TRIAL)
    assert hpo_trial.sample_fraction == 0.5 and hpo_trial.epochs == 3
    job = await backends.docs.get("trainer_jobs", f"{trainer_worker.safe_id(hpo_trial.study_name)}-trial-0000")
    assert job is not None and job["result"]["train_rows"] == 22
    assert len(right) == job["result"]["val"]["count"] > 0  # one result per val item

    done = next(e.payload for e in events if isinstance(e.payload, HpoCompleted))
    assert done.best_params == GOOD and done.best_value == results[0].value
    assert [(t.number, t.state) for t in done.trials] == [(0, "complete"), (1, "pruned")]

    trained = next(e.payload for e in events if isinstance(e.payload, ModelTrained))
    assert trained.checkpoint_key == f"trainer/models/{run_id}/small_cnn-mnist.pt"
    assert backends.objects.exists(trained.checkpoint_key)
    assert trained.metrics["test_accuracy"] >= 0.8 and "test_recall_defect" in trained.metrics
    assert trained.params["lr"] == GOOD["lr"]
    # the final training runs up to max(DLFORGE_TRAINER_FINAL_EPOCHS, 30 by default, the run's 3 epochs),
    # stopped early on validation, keeping the best epoch
    assert 1 <= trained.metrics["best_epoch"] <= trained.metrics["epochs"] <= 30

    # the study is durable: another process reads the same trials from the storage
    study = optuna.load_study(study_name=study_name_for(run_id), storage=f"sqlite:///{env}/tuner.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    doc = await backends.docs.get("tuner_studies", study_name_for(run_id))
    assert doc is not None and doc["state"] == "completed" and doc["best_params"] == GOOD

    # Redelivery: the same completion under a new event id must neither crash nor ask a third trial;
    # the hpo.completed it re-emits has the same event id (the trainer's marker skips it).
    first_completed = next(e for e in events if e.event_type == Topic.HPO_COMPLETED)
    completion = next(e for e in events if isinstance(e.payload, HpoTrialCompleted) and e.payload.trial_number == 1)
    again = completion.model_copy(update={"event_id": "redelivered-1"})
    worker = Worker(tuner_worker.service, backends, deps=await tuner_deps(backends))
    outcome = await worker.process(Delivery(topic=Topic.HPO_TRIAL_COMPLETED.value, key=run_id, value=encode(again)))
    assert outcome == Outcome.HANDLED
    marker = await backends.docs.get("processed_events", f"dlforge.tuner:{again.event_id}")
    assert marker is not None and len(marker["outbox"]) == 1
    from dlforge.common.events import decode

    re_emitted = decode(marker["outbox"][0].encode())
    assert re_emitted.event_type == Topic.HPO_COMPLETED and re_emitted.event_id == first_completed.event_id
    assert len(optuna.load_study(study_name=study_name_for(run_id), storage=f"sqlite:///{env}/tuner.db").trials) == 2
    # and the very same event again is a duplicate for the runtime
    assert await worker.process(Delivery(topic=Topic.HPO_TRIAL_COMPLETED.value, key=run_id,
                                         value=encode(again))) == Outcome.DUPLICATE


async def tuner_handles(backends: Backends, event: Event) -> list[Event]:
    """The tuner worker handles ``event``; returns what it emitted."""
    from dlforge.common.events import decode

    outcome = await Worker(tuner_worker.service, backends, deps=await tuner_deps(backends)).process(
        Delivery(topic=event.event_type.value, key=event.key, value=encode(event)))
    assert outcome == Outcome.HANDLED
    marker = await backends.docs.get("processed_events", f"dlforge.tuner:{event.event_id}")
    assert marker is not None
    return [decode(raw.encode()) for raw in marker["outbox"]]


def trial_done(trial: Event, state: str, value: float | None, error: str | None = None) -> Event:
    assert isinstance(trial.payload, HpoTrial)
    return trial.follow(HpoTrialCompleted(study_name=trial.payload.study_name, trial_number=trial.payload.trial_number,
                                          state=state, value=value, intermediate=[] if value is None else [value],
                                          seconds=1.0, error=error))  # type: ignore[arg-type]


FAKE = {"manifest_key": "m.json", "weights_key": "w.pt"}  # the tuner never opens them


async def test_a_stop_request_is_not_undone_by_a_worker_that_read_the_study_before(backends: Backends) -> None:
    run_id = "run-stop"
    [trial0] = await tuner_handles(backends, Event.new(proposed(FAKE, trials=5), run_id=run_id))
    name = study_name_for(run_id)
    # The stop request lands while the worker handles trial 0's completion: after it read the study
    # document, before it writes it back.
    original = backends.docs.update
    stops = 0

    async def update_after_a_stop(collection: str, doc_id: str, changes: dict, *, expected_version: int) -> dict:
        nonlocal stops
        if collection == "tuner_studies" and stops == 0:
            stops += 1
            current = await backends.docs.get(collection, doc_id)
            assert current is not None
            await original(collection, doc_id, {"stop_requested": True}, expected_version=current["_version"])
        return await original(collection, doc_id, changes, expected_version=expected_version)

    backends.docs.update = update_after_a_stop  # type: ignore[method-assign]
    try:
        emitted = await tuner_handles(backends, trial_done(trial0, "complete", 0.8))
    finally:
        backends.docs.update = original  # type: ignore[method-assign]
    assert stops == 1
    # the stop holds: no trial 1 was asked, the study completed with its one trial
    assert [e.event_type for e in emitted] == [Topic.HPO_COMPLETED]
    doc = await backends.docs.get("tuner_studies", name)
    assert doc is not None and doc["stop_requested"] is True and doc["state"] == "completed"
    assert doc["n_trials"] == 1 and doc["best_value"] == 0.8


async def test_the_study_fails_with_the_reason_after_three_failed_trials_in_a_row(backends: Backends) -> None:
    run_id = "run-failing"
    [trial] = await tuner_handles(backends, Event.new(proposed(FAKE, trials=200), run_id=run_id))  # the largest budget
    asked = [trial]
    for i in range(3):
        emitted = await tuner_handles(backends, trial_done(trial, "failed", None, f"epochs 1000000 > cap ({i})"))
        if i < 2:
            [trial] = emitted
            assert trial.event_type == Topic.HPO_TRIAL
            asked.append(trial)
    # the third failure in a row ends the study: run.failed with the trials' errors, nothing more asked
    [failed] = emitted
    assert isinstance(failed.payload, RunFailed) and failed.payload.stage == "tuner"
    assert failed.payload.reason == (f"study {study_name_for(run_id)}: 3 trials failed in a row (trial 0: epochs "
                                     "1000000 > cap (0); trial 1: epochs 1000000 > cap (1); trial 2: epochs 1000000 "
                                     "> cap (2))")
    assert [e.payload.trial_number for e in asked] == [0, 1, 2]  # type: ignore[attr-defined]
    doc = await backends.docs.get("tuner_studies", study_name_for(run_id))
    assert doc is not None and doc["state"] == "failed" and doc["n_trials"] == 3
    assert doc["failure"] == failed.payload.reason.split(": ", 1)[1]
    # a redelivered completion under another id asks nothing and repeats the same run.failed
    again = await tuner_handles(backends, trial_done(trial, "failed", None, "x").model_copy(
        update={"event_id": "again"}))
    assert [(e.event_type, e.event_id) for e in again] == [(Topic.RUN_FAILED, failed.event_id)]

    # a retry (POST /runs/{id}/retry: model.proposed again under a new event id) tunes in a study of its own
    first = asked[0]
    [retried] = await tuner_handles(backends, Event.new(proposed(FAKE, trials=200), run_id=run_id))
    assert isinstance(retried.payload, HpoTrial)
    assert retried.payload.study_name == f"{study_name_for(run_id)}-retry1" and retried.payload.trial_number == 0
    assert retried.event_id != first.event_id  # the trainer does not take it for the failed attempt's trial 0
    assert (await backends.docs.get("tuner_studies", f"{study_name_for(run_id)}-retry1"))["state"] == "running"
    # another model.proposed while that attempt runs is ignored, as before
    assert await tuner_handles(backends, Event.new(proposed(FAKE, trials=200), run_id=run_id)) == []


async def test_a_success_between_failures_starts_the_count_again(backends: Backends) -> None:
    run_id = "run-mixed"
    [trial] = await tuner_handles(backends, Event.new(proposed(FAKE, trials=5), run_id=run_id))
    outcomes = [("failed", None), ("failed", None), ("complete", 0.7), ("failed", None), ("failed", None)]
    for state, value in outcomes:
        emitted = await tuner_handles(backends, trial_done(trial, state, value, "boom" if value is None else None))
        trial = emitted[0]
    # never three in a row: the budget of five is spent and the study completes with the one value
    assert isinstance(trial.payload, HpoCompleted) and trial.payload.best_value == 0.7
    assert [t.state for t in trial.payload.trials] == ["fail", "fail", "complete", "fail", "fail"]


async def test_reports_are_answered_per_step_and_a_stray_one_is_told_to_stop(backends: Backends) -> None:
    from dlforge.common.events import HpoTrialDecision, HpoTrialReported

    run_id = "run-reports"
    [trial0] = await tuner_handles(backends, Event.new(proposed(FAKE, trials=2), run_id=run_id))
    name = study_name_for(run_id)

    def report(number: int, step: int, value: float, study: str = name) -> Event:
        return trial0.follow(HpoTrialReported(study_name=study, trial_number=number, step=step, value=value))

    [answer] = await tuner_handles(backends, report(0, 1, 0.6))
    assert isinstance(answer.payload, HpoTrialDecision) and answer.payload.action == "continue"
    assert (answer.payload.trial_number, answer.payload.step, answer.key) == (0, 1, f"{run_id}:0")
    # the same step reported again (a retrained trial) gets an answer with the same id: the trainer skips it
    [again] = await tuner_handles(backends, report(0, 1, 0.6).model_copy(update={"event_id": "again"}))
    assert again.event_id == answer.event_id
    for stray in (report(5, 1, 0.6), report(0, 1, 0.6, study="dlforge-nobody")):
        [stop] = await tuner_handles(backends, stray)
        assert isinstance(stop.payload, HpoTrialDecision) and stop.payload.action == "prune"
        assert "no trial 5" in stop.payload.reason or "no study 'dlforge-nobody'" in stop.payload.reason
    # the study holds the one value reported for trial 0
    doc = await backends.docs.get("tuner_studies", name)
    assert doc is not None and doc["state"] == "running"
    study = optuna.load_study(study_name=name, storage=doc["context"]["storage_url"])
    assert study.trials[0].intermediate_values == {1: 0.6}


async def test_a_completed_study_with_a_fingerprint_warm_starts_the_next_run_on_similar_data(
        backends: Backends) -> None:
    from dlforge.tuner.warmstart import PAST_STUDIES

    # run A: data fingerprint (0, 1, 0, 1); its one trial (fixed: no run would draw it at random) completes
    # at 0.9 -> remembered with its parameters
    fixed = {"lr": 0.0123, "momentum": 0.77, "weight_decay": 1e-5, "dropout": 0.2, "unfreeze": 1, "batch_size": 32,
             "optimizer": "adamw"}
    await backends.docs.insert("tuner_configs", {"_id": "run-a", "override": {"fingerprint": [0.0, 1.0, 0.0, 1.0],
                                                                              "enqueue": [fixed]}})
    [trial_a] = await tuner_handles(backends, Event.new(proposed(FAKE, trials=1), run_id="run-a"))
    assert isinstance(trial_a.payload, HpoTrial) and trial_a.payload.params == fixed
    [done] = await tuner_handles(backends, trial_done(trial_a, "complete", 0.9))
    assert isinstance(done.payload, HpoCompleted)
    past = await backends.docs.get(PAST_STUDIES, study_name_for("run-a"))
    assert past is not None and past["best_params"] == [fixed] and past["fingerprint"] == [0.0, 1.0, 0.0, 1.0]
    # run B, on data with a nearby fingerprint: its first trial is run A's best
    await backends.docs.insert("tuner_configs", {"_id": "run-b", "override": {"fingerprint": [0.1, 0.9, 0.0, 1.0]}})
    [trial_b] = await tuner_handles(backends, Event.new(proposed(FAKE, trials=2), run_id="run-b"))
    assert isinstance(trial_b.payload, HpoTrial) and trial_b.payload.params == fixed
    # a run without a fingerprint is neither warm-started nor remembered
    [trial_c] = await tuner_handles(backends, Event.new(proposed(FAKE, trials=1), run_id="run-c"))
    assert isinstance(trial_c.payload, HpoTrial) and trial_c.payload.params != fixed
    await tuner_handles(backends, trial_done(trial_c, "complete", 0.95))
    assert await backends.docs.get(PAST_STUDIES, study_name_for("run-c")) is None


async def test_every_trial_samples_its_rows_with_the_runs_seed_not_the_runs_id(backends: Backends) -> None:
    """Two runs of the same data and seed hand the trainer the same sampling seed, another seed another one:
    the run's id plays no part (the trainer's rows for a seed: test_trainer_training's random-sample test)."""
    seeds = {}
    for run_id, seed in (("run-s1", 41), ("run-s2", 41), ("run-s3", 42)):
        [trial] = await tuner_handles(backends, Event.new(proposed(FAKE, trials=1, seed=seed), run_id=run_id))
        assert isinstance(trial.payload, HpoTrial)
        seeds[run_id] = trial.payload.sample_seed
    assert seeds == {"run-s1": 41, "run-s2": 41, "run-s3": 42}


async def test_the_proposers_fingerprint_warm_starts_a_run_and_an_override_wins(backends: Backends) -> None:
    """No tuning override: the study takes ``model.proposed``'s fingerprint, is remembered with it and warm-starts
    the next run on nearby data; a run whose override gives a fingerprint of its own is matched by that one."""
    from dlforge.tuner.warmstart import PAST_STUDIES

    fixed = {"lr": 0.0321, "momentum": 0.66, "weight_decay": 1e-4, "dropout": 0.1, "unfreeze": 0, "batch_size": 16,
             "optimizer": "sgd"}
    await backends.docs.insert("tuner_configs", {"_id": "run-p", "override": {"enqueue": [fixed]}})
    first = proposed(FAKE, trials=1).model_copy(update={"fingerprint": [1.0, 0.0, 1.0, 0.0]})
    [trial] = await tuner_handles(backends, Event.new(first, run_id="run-p"))
    await tuner_handles(backends, trial_done(trial, "complete", 0.8))
    past = await backends.docs.get(PAST_STUDIES, study_name_for("run-p"))
    assert past is not None and past["fingerprint"] == [1.0, 0.0, 1.0, 0.0] and past["best_params"] == [fixed]

    nearby = proposed(FAKE, trials=2).model_copy(update={"fingerprint": [0.9, 0.1, 1.0, 0.0]})
    [trial_q] = await tuner_handles(backends, Event.new(nearby, run_id="run-q"))
    assert isinstance(trial_q.payload, HpoTrial) and trial_q.payload.params == fixed

    # the override's fingerprint (far from run-p's in another width) wins over the event's: no warm start
    await backends.docs.insert("tuner_configs", {"_id": "run-r", "override": {"fingerprint": [5.0, 5.0]}})
    [trial_r] = await tuner_handles(backends, Event.new(nearby, run_id="run-r"))
    assert isinstance(trial_r.payload, HpoTrial) and trial_r.payload.params != fixed


async def test_with_a_fidelity_ladder_the_best_third_of_a_rung_trains_again_on_the_next(backends: Backends) -> None:
    """Ladder 0.25 -> 0.5 on k-center coresets, a budget of six trainings, one trial at a time."""
    run_id = "run-ladder"
    await backends.docs.insert("tuner_configs", {"_id": run_id, "override": {
        "fidelity_ladder": [0.25, 0.5], "sample_method": "k_center"}})
    [t0] = await tuner_handles(backends, Event.new(proposed(FAKE, trials=6), run_id=run_id))
    asked = [t0]

    async def complete(trial: Event, value: float) -> Event:
        [nxt] = await tuner_handles(backends, trial_done(trial, "complete", value))
        asked.append(nxt)
        return nxt

    # two completions at 0.25 promote nothing, however good: a rung needs three before it ranks them
    t1 = await complete(t0, 0.6)
    t2 = await complete(t1, 0.9)
    # the third, 0.95, is the best third of {0.6, 0.9, 0.95}: its parameters come back at 0.5
    t3 = await complete(t2, 0.95)
    trials = [e.payload for e in asked]
    assert all(isinstance(t, HpoTrial) for t in trials)
    assert [t.sample_fraction for t in trials] == [0.25, 0.25, 0.25, 0.5]  # type: ignore[union-attr]
    assert {t.sample_method for t in trials} == {"k_center"}  # type: ignore[union-attr]
    assert trials[3].params == trials[2].params and trials[3].trial_number == 3  # type: ignore[union-attr]
    assert len({repr(sorted(t.params.items())) for t in trials[:3]}) == 3  # type: ignore[union-attr]
    # the same completion handled again (another event id) promotes nothing twice, asks nothing more
    assert await tuner_handles(backends, trial_done(t2, "complete", 0.95).model_copy(
        update={"event_id": "t2-again"})) == []
    # 0.97 at 0.5, the top rung: no promotion; the next trial is new, at 0.25
    t4 = await complete(t3, 0.97)
    assert t4.payload.sample_fraction == 0.25  # type: ignore[union-attr]
    assert t4.payload.params not in [t.params for t in trials]  # type: ignore[union-attr]
    # 0.5 is not among the best two of {0.6, 0.9, 0.95, 0.5}, but trial 1's 0.9 now is (the rung is ranked
    # again): passed over when it completed among three, its parameters come back at 0.5
    t5 = await complete(t4, 0.5)
    assert t5.payload.sample_fraction == 0.5 and t5.payload.params == trials[1].params  # type: ignore[union-attr]
    # the promotions were two of the six trainings: the budget is spent
    [done] = await tuner_handles(backends, trial_done(t5, "complete", 0.99))
    assert isinstance(done.payload, HpoCompleted)
    assert [(t.number, t.state) for t in done.payload.trials] == [(n, "complete") for n in range(6)]
    assert [(t.fidelity, t.promoted_from) for t in done.payload.trials] == [
        (0.25, None), (0.25, None), (0.25, None), (0.5, 2), (0.25, None), (0.5, 1)]
    study = optuna.load_study(study_name=study_name_for(run_id),
                              storage=(await backends.docs.get("tuner_studies", study_name_for(run_id)))[
                                  "context"]["storage_url"])
    assert [t.user_attrs["fidelity"] for t in study.trials] == [0.25, 0.25, 0.25, 0.5, 0.25, 0.5]
    assert [t.user_attrs.get("dlforge.promoted_from") for t in study.trials] == [None, None, None, 2, None, 1]


async def test_deleting_a_run_forgets_its_study_for_warm_starts(backends: Backends) -> None:
    import dlforge.tuner.reconcile  # noqa: F401  (registers the tuner's run.deleted handler)
    from dlforge.common.events import RunDeleted
    from dlforge.tuner.warmstart import PAST_STUDIES

    first = proposed(FAKE, trials=1).model_copy(update={"fingerprint": [1.0, 0.0, 1.0, 0.0]})
    [trial] = await tuner_handles(backends, Event.new(first, run_id="run-d"))
    await tuner_handles(backends, trial_done(trial, "complete", 0.8))
    assert await backends.docs.get(PAST_STUDIES, study_name_for("run-d")) is not None
    await tuner_handles(backends, Event.new(RunDeleted(dataset_id="testdata"), run_id="run-d"))
    assert await backends.docs.get(PAST_STUDIES, study_name_for("run-d")) is None
    assert await backends.docs.find("tuner_studies") == []


@pytest.mark.parametrize(("trials", "ladder", "first"), [(11, [0.25, 0.5, 1.0], 0.25), (10, None, 0.5),
                                                         (4, None, 0.5)])
async def test_the_default_ladder_is_used_when_the_runs_trials_can_climb_it(
        backends: Backends, trials: int, ladder: list[float] | None, first: float) -> None:
    """The defaults (0.25, 0.5, 1 on k-center coresets): 11 trials one at a time climb it; with fewer there is no
    ladder and every trial trains on a random 0.5, as before the ladder (the demo's 4)."""
    [trial] = await tuner_handles(backends, Event.new(proposed(FAKE, trials=trials), run_id=f"run-cut{trials}"))
    assert isinstance(trial.payload, HpoTrial) and trial.payload.sample_fraction == first
    assert trial.payload.sample_method == ("k_center" if ladder else "random")
    stored = await backends.docs.get("tuner_studies", study_name_for(f"run-cut{trials}"))
    assert stored is not None and stored["context"]["config"]["fidelity_ladder"] == ladder
