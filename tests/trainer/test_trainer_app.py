"""The trainer's REST API: POST /jobs, GET /jobs/{id}, GET /jobs."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accounts import create_accounts
from fastapi.testclient import TestClient

from dlforge.common.objects.fs import FsObjectStore
from dlforge.common.settings import load_settings
from dlforge.trainer.app import create_app
from dlforge.trainer.jobs import JobRecords
from dlforge.trainer.testing import make_candidate, make_dataset


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("DLFORGE_TRAINER_PREFIX_RUNNER", "torch")
    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db",
                             work_dir=str(tmp_path / "w"))
    objects = FsObjectStore(tmp_path / "o")
    make_dataset(objects, per_class={"defect": 30, "good": 30}, size=24)
    make_candidate(objects, "cands/small.pt")
    with TestClient(create_app(settings)) as c:
        yield c


def wait(client: TestClient, job_id: str, timeout: float = 120,
         headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The job once it has ended (polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}", headers=headers).json()
        if job["state"] not in ("queued", "running"):
            return job  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['state']}")


BODY = {"weights_key": "cands/small.pt", "manifest_key": "testdata/manifest.json", "classes": ["defect", "good"],
        "hparams": {"lr": 0.01, "batch_size": 8, "epochs": 2}, "run_config": {"checkpoint_every_steps": 3}}


@pytest.mark.slow
def test_job_trains_and_reports(client: TestClient) -> None:
    r = client.post("/jobs", json={**BODY, "name": "first"})
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    job = wait(client, job_id)
    assert job["state"] == "completed", job.get("error")
    assert [e["epoch"] for e in job["epochs"]] == [1, 2]
    assert job["metrics"]["val_accuracy"] >= 0.8 and job["metrics"]["test_accuracy"] >= 0.8
    assert job["checkpoints"] == [f"trainer/jobs/{job_id}/checkpoints/step-{s:07d}.pt" for s in (3, 6, 9, 12)]
    assert job["logs_prefix"] == f"trainer/jobs/{job_id}/tensorboard/"
    assert job["model_key"] == f"trainer/jobs/{job_id}/model.pt"
    assert job["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # where it trained, on record
    listed = client.get("/jobs", params={"kind": "api"}).json()
    assert [j["_id"] for j in listed] == [job_id] and listed[0]["name"] == "first"
    # go on from the trained model by its id
    r = client.post("/jobs", json={**{k: v for k, v in BODY.items() if k != "weights_key"}, "model_id": job_id,
                                   "hparams": {"epochs": 1, "lr": 0.001}})
    assert r.status_code == 202
    assert wait(client, r.json()["job_id"])["state"] == "completed"


def test_bad_jobs_are_refused_with_a_reason(client: TestClient) -> None:
    r = client.post("/jobs", json={**BODY, "hparams": {"lr": -1}})
    assert r.status_code == 422
    r = client.post("/jobs", json={**BODY, "manifest_key": "nope.json"})
    assert r.status_code == 422 and "manifest_key 'nope.json': no such object" in r.json()["detail"]
    r = client.post("/jobs", json={**BODY, "weights_key": None})
    assert r.status_code == 422 and "give weights_key" in r.json()["detail"]
    r = client.post("/jobs", json={**BODY, "model_id": "nope", "weights_key": None})
    assert r.status_code == 422 and "no such trained model" in r.json()["detail"]
    r = client.post("/jobs", json={**BODY, "run_config": {"no_of_workers": 0}})
    assert r.status_code == 422
    assert client.get("/jobs/unknown").status_code == 404
    assert client.get("/jobs").json() == []  # nothing half-written


def test_train_epochs_bound_is_within_the_trainers_own_cap() -> None:
    from pydantic import BaseModel

    from dlforge.common.events import TRAINER_MAX_EPOCHS, PipelineOptions
    from dlforge.trainer.params import RunOptions, TrainParams

    def le(model: type[BaseModel], field: str) -> float:
        return next(m.le for m in model.model_fields[field].metadata if hasattr(m, "le"))

    assert le(PipelineOptions, "train_epochs") == 500 <= le(TrainParams, "epochs") == TRAINER_MAX_EPOCHS
    assert le(PipelineOptions, "no_of_workers") == le(RunOptions, "no_of_workers") == 64


def test_jobs_are_their_projects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting a job needs operator in the project of the manifest's dataset; a job (a run's, or one started
    here) is seen only by a viewer of its project, whatever its id."""
    monkeypatch.setenv("DLFORGE_TRAINER_PREFIX_RUNNER", "torch")
    monkeypatch.setenv("DLFORGE_AUTH", "required")
    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db",
                             work_dir=str(tmp_path / "w"), auth="required")
    objects = FsObjectStore(tmp_path / "o")
    make_dataset(objects, per_class={"defect": 6, "good": 6}, size=16)  # the dataset 'testdata'
    make_candidate(objects, "proposer/models/small.pt")  # with auth on, raw weights come from the repository
    tokens = asyncio.run(create_accounts(settings.docs, {"olga": {"beta": "operator"}, "vic": {"alpha": "viewer"},
                                                   "amy": {"alpha": "operator"}},
                                   {("dataset", "testdata"): "alpha", ("run", "r1"): "alpha"}))

    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[name]}"}

    with TestClient(create_app(settings)) as client:
        body = {**BODY, "weights_key": "proposer/models/small.pt",
                "hparams": {"lr": 0.01, "batch_size": 8, "epochs": 1}}
        refused = client.post("/jobs", json=body, headers=auth("olga"))
        assert refused.status_code == 404 and "no dataset 'testdata'" in refused.json()["detail"], refused.text
        assert client.post("/jobs", json=body, headers=auth("vic")).status_code == 403
        assert client.get("/jobs", headers=auth("amy")).json() == []  # nothing was recorded
        started = client.post("/jobs", json=body, headers=auth("amy"))
        assert started.status_code == 202, started.text
        job_id = started.json()["job_id"]
        # a run's job, with the id a run's job would have
        records = JobRecords(client.app.state.backends.docs)  # type: ignore[attr-defined]
        client.portal.call(functools.partial(records.create, "r1-final", kind="final",  # type: ignore[union-attr]
                                             request={}, run_id="r1", key_prefix="trainer/jobs/r1-final"))
        for job in (job_id, "r1-final"):
            hidden = client.get(f"/jobs/{job}", headers=auth("olga"))
            assert hidden.status_code == 404 and f"no training job {job!r}" in hidden.json()["detail"]
            assert client.get(f"/jobs/{job}", headers=auth("vic")).status_code == 200
        assert client.get("/jobs", headers=auth("olga")).json() == []
        assert {j["_id"] for j in client.get("/jobs", headers=auth("vic")).json()} == {job_id, "r1-final"}
        wait(client, job_id, headers=auth("vic"))  # the job ends before the app stops
