"""Experiment.run in process and over HTTP: the job finishes and reports its metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dlforge.common.objects.fs import FsObjectStore
from dlforge.common.settings import load_settings
from dlforge.sdk import Estimator, Experiment, HParams, HttpTransport, InProcessTransport, JobFailed, RunConfig
from dlforge.trainer.testing import make_candidate, make_dataset


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FsObjectStore:
    monkeypatch.setenv("DLFORGE_TRAINER_PREFIX_RUNNER", "torch")
    objects = FsObjectStore(tmp_path / "o")
    make_dataset(objects, per_class={"defect": 30, "good": 30}, size=24)
    make_candidate(objects, "cands/small.pt")
    return objects


ESTIMATOR = Estimator(weights_key="cands/small.pt", manifest_key="testdata/manifest.json", classes=["defect", "good"])


def test_in_process_job_returns_metrics(store: FsObjectStore, tmp_path: Path) -> None:
    transport = InProcessTransport(store, work_dir=tmp_path / "w")
    job = Experiment.run(experiment_name="tiny", estimator=ESTIMATOR,
                         hyper_parameters=HParams(lr=0.01, batch_size=8, epochs=2),
                         run_config=RunConfig(checkpoint_every_steps=4), transport=transport)
    assert job.get_single_job() is job
    job.wait_until_finish(timeout=120)
    assert job.has_finished() and job.state == "completed"
    assert [m["epoch"] for m in job.metrics] == [1, 2]
    assert {"train_loss", "val_loss", "val_accuracy", "val_recall"} <= set(job.metrics[0])
    assert job.final_metrics["val_accuracy"] >= 0.8 and job.final_metrics["test_accuracy"] >= 0.8
    assert job.model_key is not None and store.exists(job.model_key)
    assert len(job.checkpoints) == 3 and job.get_tensorboard_logdir().endswith("/tensorboard/")


def test_in_process_failures(store: FsObjectStore, tmp_path: Path) -> None:
    transport = InProcessTransport(store, work_dir=tmp_path / "w")
    with pytest.raises(ValueError, match="no such object"):
        Experiment.run(experiment_name="x", estimator=ESTIMATOR.model_copy(update={"manifest_key": "nope.json"}),
                       transport=transport)
    job = Experiment.run(experiment_name="x", estimator=ESTIMATOR, hyper_parameters=HParams(unfreeze=60),
                         transport=transport)
    with pytest.raises(JobFailed, match="out of range"):
        job.wait_until_finish(timeout=60, raise_on_failure=True)
    assert job.state == "failed" and "unfreeze=60" in (job.error or "")


@pytest.fixture
def client(store: FsObjectStore, tmp_path: Path) -> Iterator[TestClient]:
    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db",
                             work_dir=str(tmp_path / "w"))
    from dlforge.trainer.app import create_app

    with TestClient(create_app(settings)) as c:
        yield c


def test_http_job_behaves_the_same(client: TestClient) -> None:
    transport = HttpTransport(client=client)
    job = Experiment.run(experiment_name="over-http", estimator=ESTIMATOR,
                         hyper_parameters=HParams(lr=0.01, batch_size=8, epochs=2), transport=transport)
    job.wait_until_finish(timeout=120, raise_on_failure=True)
    assert job.has_finished() and [m["epoch"] for m in job.metrics] == [1, 2]
    assert job.final_metrics["val_accuracy"] >= 0.8
    assert client.get(f"/jobs/{job.job_id}").json()["name"] == "over-http"
    with pytest.raises(ValueError, match="the trainer refused the job"):
        Experiment.run(experiment_name="bad", estimator=ESTIMATOR.model_copy(update={"manifest_key": "nope.json"}),
                       transport=transport)


class _Forever:
    """A transport whose job never ends."""

    def submit(self, request: dict[str, object]) -> str:
        return "j1"

    def status(self, job_id: str) -> dict[str, object]:
        return {"state": "running", "epochs": [], "metrics": {}, "error": None}


def test_wait_until_finish_times_out() -> None:
    job = Experiment.run(experiment_name="slow", estimator=ESTIMATOR, transport=_Forever())
    assert not job.has_finished()
    with pytest.raises(TimeoutError, match="still running"):
        job.wait_until_finish(timeout=0.05, poll_seconds=0.01)
