"""The tuner and the trainer as two separate processes on Kafka and S3: the tuner prunes a trial.

Each service runs as its own ``python -m dlforge.<service>`` process in its own working directory
with its own SQLite documents and work folder; they share only the Kafka topics and the S3 bucket.
The tuner's Optuna study lives in the tuner's folder: the trainer reports each epoch as
``hpo.trial.reported`` and stops a trial when the tuner's ``hpo.trial.decision`` says prune.

The study: two enqueued trials trained one after the other for three epochs each, a median pruner
that prunes after one finished trial. Trial 0 learns (lr 0.01, Adam); trial 1 cannot (lr 1e-7, plain
SGD), so after its first epoch it is below trial 0's first-epoch value and is pruned there.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from uuid import uuid4

import optuna
import pytest

from dlforge.common.events import (
    CandidateScore,
    DatasetUploaded,
    Event,
    HpoCompleted,
    HpoTrialCompleted,
    HpoTrialDecision,
    HpoTrialReported,
    ModelProposed,
    ModelTrained,
    PipelineOptions,
    Spec,
    Topic,
    decode,
)
from dlforge.common.runtime import Backends
from dlforge.common.settings import load_settings
from dlforge.trainer.testing import make_candidate, make_dataset

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
GOOD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-6, "dropout": 0.0, "unfreeze": 0, "batch_size": 8,
        "optimizer": "adam"}
BAD = {**GOOD, "lr": 1e-7, "momentum": 0.0, "optimizer": "sgd"}
EPOCHS = 3
SPACE = {"params": [
    {"kind": "float", "name": "lr", "low": 1e-7, "high": 0.1, "log": True},
    {"kind": "float", "name": "momentum", "low": 0.0, "high": 0.99},
    {"kind": "float", "name": "weight_decay", "low": 1e-6, "high": 1e-2, "log": True},
    {"kind": "float", "name": "dropout", "low": 0.0, "high": 0.5},
    {"kind": "int", "name": "unfreeze", "low": 0, "high": 2},
    {"kind": "categorical", "name": "batch_size", "choices": [8, 16]},
    {"kind": "categorical", "name": "optimizer", "choices": ["sgd", "adam"]},
]}
WATCHED = [Topic.HPO_TRIAL, Topic.HPO_TRIAL_REPORTED, Topic.HPO_TRIAL_DECISION, Topic.HPO_TRIAL_COMPLETED,
           Topic.HPO_COMPLETED, Topic.MODEL_TRAINED, Topic.RUN_FAILED, Topic.DEAD_LETTER]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(service: str, folder: Path, *, bus: str, objects: str, port: int, extra: dict[str, str]) -> subprocess.Popen:
    """``python -m dlforge.<service>`` in ``folder``, with relative (so folder-local) documents and work dir."""
    folder.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLFORGE_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in sorted(REPO.glob("libs/*/src"))),
                                         *(str(p) for p in sorted(REPO.glob("services/*/src"))),
                                         env.get("PYTHONPATH", "")])
    # access control is tested in tests/auth (introspection between services included); each process
    # here has a document store of its own, so with auth required neither would know a token
    env.update({"DLFORGE_AUTH": "off", "DLFORGE_BUS": bus, "DLFORGE_OBJECTS": objects, "DLFORGE_DOCS": "sqlite:///./docs.db",
                "DLFORGE_WORK_DIR": "./work", "DLFORGE_HTTP_HOST": "127.0.0.1", "DLFORGE_HTTP_PORT": str(port),
                "DLFORGE_POLL_SECONDS": "0.1", "OTEL_SDK_DISABLED": "true", **extra})
    log = (folder / "service.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", f"dlforge.{service}"], cwd=folder, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError:
        return 0, {}


async def until(condition: Any, *, timeout: float, what: str, logs: list[Path]) -> Any:
    """Poll ``condition()`` (sync) until it returns something truthy, or fail naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await asyncio.to_thread(condition)
        if value:
            return value
        await asyncio.sleep(0.2)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tails}")


async def test_the_tuner_prunes_a_trial_the_trainer_trains_in_another_process(
    tmp_path: Path, kafka_url: str, s3_url: str
) -> None:
    run_id = f"run-{uuid4().hex[:8]}"
    test_backends = Backends.from_settings(load_settings(bus=kafka_url, objects=s3_url,
                                                         docs=f"sqlite:///{tmp_path}/test-docs.db"))
    await test_backends.start()
    manifest_key = make_dataset(test_backends.objects, per_class={"defect": 30, "good": 30}, size=24)
    weights_key = make_candidate(test_backends.objects, "proposer/models/small_cnn-mnist.pt")
    watch = await test_backends.bus.subscribe(group="e2e-watch", topics=WATCHED)

    tuner_dir, trainer_dir = tmp_path / "tuner", tmp_path / "trainer"
    tuner_port, trainer_port = free_port(), free_port()
    procs = {
        "tuner": start("tuner", tuner_dir, bus=kafka_url, objects=s3_url, port=tuner_port, extra={}),
        "trainer": start("trainer", trainer_dir, bus=kafka_url, objects=s3_url, port=trainer_port, extra={
            "DLFORGE_TRAINER_PREFIX_RUNNER": "torch", "DLFORGE_TRAINER_THREADS": "1",
            "DLFORGE_TRAINER_FINAL_EPOCHS": "1", "DLFORGE_TRAINER_FINAL_VIEWS": "none"}),
    }
    logs = [tuner_dir / "service.log", trainer_dir / "service.log"]
    events: list[Event] = []
    try:
        for port in (tuner_port, trainer_port):
            await until(lambda p=port: http("GET", f"http://127.0.0.1:{p}/readyz")[0] == 200, timeout=90,
                        what=f"the service on port {port} to be ready", logs=logs)
        # the run starts; once the tuner has seen it, the run's tuning is set: two fixed trials, a median pruner
        await test_backends.publish(Event.new(DatasetUploaded(
            dataset_id="testdata", name="testdata", item_count=60, classes=["defect", "good"], labeled_count=60,
            rejected_count=0, duplicate_count=0, manifest_key=manifest_key, spec=Spec(positive_class="defect")),
            run_id=run_id))
        override = {"space": SPACE, "pruner": {"name": "median", "kwargs": {"n_startup_trials": 1}},
                    "startup_trials": 2, "enqueue": [GOOD, BAD], "sample_fraction": 0.5, "fidelity_ladder": [],
                    "sample_method": "random"}
        await until(lambda: http("PUT", f"http://127.0.0.1:{tuner_port}/runs/{run_id}/tuning", override)[0] == 200,
                    timeout=60, what="the tuner to accept the run's tuning", logs=logs)
        cand = CandidateScore(model_id="small_cnn-mnist", arch="small_cnn", source_dataset="mnist",
                              weights_key=weights_key, scores={"logme": 1.0}, total=1.0)
        await test_backends.publish(Event.new(ModelProposed(
            dataset_id="testdata", manifest_key=manifest_key, classes=["defect", "good"], ranking=[cand],
            chosen_model_id=cand.model_id, weights={"logme": 1.0}, spec=Spec(positive_class="defect"),
            options=PipelineOptions(hpo_trials=2, hpo_parallel=1, train_epochs=EPOCHS)), run_id=run_id))

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 180
        while not any(e.event_type in (Topic.MODEL_TRAINED, Topic.RUN_FAILED) for e in events):
            assert loop.time() < deadline, f"no model.trained within 180s; saw {[e.event_type for e in events]}"
            for name, proc in procs.items():
                assert proc.poll() is None, f"the {name} process ended: {logs}"
            for d in await watch.get_batch(100, timeout=0.5):
                event = decode(d.value)
                if event.run_id == run_id:
                    events.append(event)
                await watch.commit(d)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {name: await asyncio.to_thread(proc.wait, 60) for name, proc in procs.items()}
        await watch.close()
        await test_backends.stop()
    assert codes == {"tuner": 0, "trainer": 0}, [p.read_text(errors="replace")[-3000:] for p in logs]
    assert not [e for e in events if e.event_type in (Topic.RUN_FAILED, Topic.DEAD_LETTER)], events

    # trial 0 trained all its epochs; trial 1 was pruned by the tuner and stopped early by the trainer
    done = {e.payload.trial_number: e.payload for e in events if isinstance(e.payload, HpoTrialCompleted)}
    assert done[0].state == "complete" and len(done[0].intermediate) == EPOCHS
    assert done[1].state == "pruned" and len(done[1].intermediate) < EPOCHS
    pruned_at = len(done[1].intermediate)
    # partitions interleave: one trial's reports (and decisions) are in order, two trials' are not
    reports = sorted((e.payload for e in events if isinstance(e.payload, HpoTrialReported)),
                     key=lambda r: (r.trial_number, r.step))
    decisions = sorted((e.payload for e in events if isinstance(e.payload, HpoTrialDecision)),
                       key=lambda d: (d.trial_number, d.step))
    # every epoch but a trial's last is reported and answered; trial 1's last answer is the prune
    assert [(r.trial_number, r.step) for r in reports] == [(0, s) for s in range(1, EPOCHS)] + [
        (1, s) for s in range(1, pruned_at + 1)]
    assert [r.value for r in reports if r.trial_number == 1] == done[1].intermediate
    assert [(d.trial_number, d.step, d.action) for d in decisions] == [
        (0, s, "continue") for s in range(1, EPOCHS)] + [
        (1, s, "continue") for s in range(1, pruned_at)] + [(1, pruned_at, "prune")]
    assert "MedianPruner" in decisions[-1].reason
    # the median pruner's rule, checked by hand: trial 1 fell below trial 0 at the step it was pruned
    assert done[1].intermediate[-1] < done[0].intermediate[pruned_at - 1]

    completed = next(e.payload for e in events if isinstance(e.payload, HpoCompleted))
    assert [(t.number, t.state) for t in completed.trials] == [(0, "complete"), (1, "pruned")]
    assert completed.best_params == GOOD
    assert any(isinstance(e.payload, ModelTrained) for e in events)

    # the study is the tuner's: in the tuner's folder, with trial 1 pruned and its reported values
    study = optuna.load_study(study_name=f"dlforge-{run_id}", storage=f"sqlite:///{tuner_dir}/.dlforge/tuner.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    assert study.trials[1].intermediate_values == {s: v for s, v in enumerate(done[1].intermediate, start=1)}
    # ...and the trainer's folder holds no Optuna database: it never opened the tuner's
    assert not list(trainer_dir.rglob("tuner.db")) and not list(trainer_dir.rglob("*optuna*"))
    assert (trainer_dir / "docs.db").is_file() and (tuner_dir / "docs.db").is_file()
