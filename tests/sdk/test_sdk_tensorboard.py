"""``job.get_tensorboard_url()``: the trainer serves the job's TensorBoard scalars over HTTP, to its project only."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from accounts import create_accounts

from dlforge.common.objects.fs import FsObjectStore
from dlforge.common.settings import CommonSettings, load_settings
from dlforge.sdk import Estimator, Experiment, HParams, HttpTransport, Job, RunConfig
from dlforge.trainer.app import create_app
from dlforge.trainer.testing import make_candidate, make_dataset


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, dict[str, str]]]:
    """The trainer with auth on, served by uvicorn on 127.0.0.1: (its URL, a token per user)."""
    monkeypatch.setenv("DLFORGE_TRAINER_PREFIX_RUNNER", "torch")
    settings: CommonSettings = load_settings(bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db",
                                             work_dir=str(tmp_path / "w"), auth="required")
    objects = FsObjectStore(tmp_path / "o")
    make_dataset(objects, per_class={"defect": 30, "good": 30}, size=24)  # the dataset 'testdata'
    make_candidate(objects, "proposer/models/small.pt")
    tokens = asyncio.run(create_accounts(settings.docs, {"amy": {"alpha": "operator"}, "olga": {"beta": "operator"}},
                                         {("dataset", "testdata"): "alpha"}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="trainer-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", tokens
    server.should_exit = True
    thread.join(timeout=120)


def _points(scalars: dict[str, list[list[Any]]], tag: str) -> list[tuple[int, float]]:
    return [(step, value) for _, step, value in scalars[tag]]


@pytest.mark.slow
def test_the_tensorboard_url_serves_the_jobs_scalars(served: tuple[str, dict[str, str]]) -> None:
    """The URL answers 200 with what the job logged. The expected values are not read from the event files:
    the epoch scalars must equal the per-epoch metrics the job record holds (the document store, written by
    the epoch hook), and each epoch's step losses, weighted by their batch's rows, must average to that
    epoch's train loss (every step is logged here). TensorBoard keeps float32: compared to rel 1e-6."""
    base, tokens = served
    transport = HttpTransport(base, token=tokens["amy"])
    job = Experiment.run(experiment_name="tb", hyper_parameters=HParams(lr=0.01, batch_size=8, epochs=3),
                         estimator=Estimator(weights_key="proposer/models/small.pt",
                                             manifest_key="testdata/manifest.json", classes=["defect", "good"]),
                         run_config=RunConfig(summary_save_frequency=1), transport=transport)
    job.wait_until_finish(timeout=300, raise_on_failure=True)

    url = job.get_tensorboard_url()
    assert url == f"{base}/jobs/{job.job_id}/tensorboard"
    amy = {"Authorization": f"Bearer {tokens['amy']}"}
    r = httpx.get(url, headers=amy)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["job_id"] == job.job_id and body["logs_prefix"] == job.get_tensorboard_logdir()
    scalars = body["scalars"]
    epochs = job.metrics
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    for tag, name in (("train/loss", "train_loss"), ("val/loss", "val_loss"), ("val/accuracy", "val_accuracy")):
        assert [s for s, _ in _points(scalars, tag)] == [1, 2, 3]
        assert [v for _, v in _points(scalars, tag)] == pytest.approx([e[name] for e in epochs], rel=1e-6), tag
    for cls in ("defect", "good"):
        assert [v for _, v in _points(scalars, f"val/recall/{cls}")] == pytest.approx(
            [e["val_recall"][cls] for e in epochs], rel=1e-6)

    rows = int(job.status()["result"]["train_rows"])
    per_epoch = -(-rows // 8)
    steps = _points(scalars, "train/step_loss")
    assert [s for s, _ in steps] == list(range(1, 3 * per_epoch + 1))
    sizes = [8] * (per_epoch - 1) + [rows - 8 * (per_epoch - 1)]
    for k, e in enumerate(epochs):
        losses = [v for _, v in steps[k * per_epoch:(k + 1) * per_epoch]]
        assert sum(v * n for v, n in zip(losses, sizes, strict=True)) / rows == pytest.approx(e["train_loss"],
                                                                                              rel=1e-6)

    one = httpx.get(url, params={"tag": "val/accuracy"}, headers=amy)
    assert one.status_code == 200 and list(one.json()["scalars"]) == ["val/accuracy"]
    unknown_tag = httpx.get(url, params={"tag": "val/f1"}, headers=amy)
    assert unknown_tag.status_code == 404 and "no scalar 'val/f1'" in unknown_tag.json()["detail"]
    assert "train/step_loss" in unknown_tag.json()["detail"]  # it says which tags there are

    # an unknown job, a user of another project (as if there were no such job), no token
    unknown = httpx.get(f"{base}/jobs/no-such-job/tensorboard", headers=amy)
    assert unknown.status_code == 404 and "no training job 'no-such-job'" in unknown.json()["detail"]
    hidden = httpx.get(url, headers={"Authorization": f"Bearer {tokens['olga']}"})
    assert hidden.status_code == 404 and f"no training job {job.job_id!r}" in hidden.json()["detail"]
    assert httpx.get(url).status_code == 401
    with pytest.raises(KeyError, match="no job"):
        Job(job.job_id, experiment_name="tb", transport=HttpTransport(base, token=tokens["olga"])).get_tensorboard_url()


class _Local:
    """A transport with no HTTP server (as the in-process one)."""

    def submit(self, request: dict[str, object]) -> str:
        return "j1"

    def status(self, job_id: str) -> dict[str, object]:
        return {"state": "running", "logs_prefix": "trainer/jobs/j1/tensorboard/"}


def test_a_transport_without_a_server_says_where_the_event_files_are() -> None:
    job = Job("j1", experiment_name="x", transport=_Local())
    with pytest.raises(ValueError, match=r"serves no TensorBoard URL .* 'trainer/jobs/j1/tensorboard/'"):
        job.get_tensorboard_url()
