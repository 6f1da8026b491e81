"""Training processes SIGKILLed in the middle of an epoch, then started again, go on from their last checkpoint.

Real processes, really killed: the trainer service (``python -m dlforge.trainer``) with a REST job, and a
data-parallel run on 2 DDP worker processes that comes back on 1. The kill waits on a condition with a
deadline: a state to resume from, stored at a checkpoint step past ``MIN_STEP``, inside an epoch. The
process group is stopped (SIGSTOP) when the condition is seen, the stored state is read again (nothing can
write it while the group is stopped) and, if it is still inside an epoch, the group is SIGKILLed; so the
kill happens mid-epoch, after a known checkpoint, every time.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from dlforge.common.errors import NotFound
from dlforge.common.objects import ObjectStore
from dlforge.common.objects.fs import FsObjectStore
from dlforge.trainer.handlers import TrainerConfig, TrainingOutcome, TrainingRequest, resume_key, run_training
from dlforge.trainer.params import RunOptions, TrainParams
from dlforge.trainer.testing import make_candidate, make_dataset
from dlforge.vision.networks import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CLASSES = ["defect", "good"]
MIN_STEP = 10
CHECKPOINT_EVERY = 6  # never an epoch's last step below: 35 steps an epoch (140 train rows, batches of 4)


def _wait(what: str, condition: Callable[[], Any], deadline: float = 300.0) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {deadline:.0f} s waiting for {what}")


def _stored_state(objects: ObjectStore, key_prefix: str) -> dict[str, Any] | None:
    try:
        raw: dict[str, Any] = torch.load(io.BytesIO(objects.get_bytes(resume_key(key_prefix))), weights_only=False)
    except NotFound:
        return None
    return raw


def _kill_mid_epoch(proc: subprocess.Popen[bytes], objects: ObjectStore, key_prefix: str) -> dict[str, Any]:
    """SIGKILL ``proc``'s process group once its stored state is past MIN_STEP and inside an epoch; that state."""

    def mid_epoch() -> dict[str, Any] | None:
        assert proc.poll() is None, "the training process ended before it could be killed"
        state = _stored_state(objects, key_prefix)
        if state is None or state["steps"] <= MIN_STEP or state["position"] == 0:
            return None
        os.killpg(proc.pid, signal.SIGSTOP)
        state = _stored_state(objects, key_prefix)  # what the restarted process will find
        if state is not None and state["position"] > 0:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return state
        os.killpg(proc.pid, signal.SIGCONT)  # it had just ended an epoch: wait for the next checkpoint
        return None

    state: dict[str, Any] = _wait(f"a state stored inside an epoch past step {MIN_STEP}", mid_epoch)
    return state


def _scalars(objects: ObjectStore, prefix: str, tag: str, tmp: Path) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` in the job's TensorBoard event files, read back with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = tmp / prefix.replace("/", "_")
    for info in objects.list(prefix):
        objects.get_file(info.key, folder / info.key.rsplit("/", 1)[-1])
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env(**variables: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("DLFORGE_")},
            "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", **variables}


@pytest.fixture
def objects(tmp_path: Path) -> ObjectStore:
    store = FsObjectStore(tmp_path / "o")
    make_dataset(store, per_class={"defect": 100, "good": 100}, size=32)  # 140 train rows
    make_candidate(store, "cands/small.pt")
    return store


def _reference(objects: ObjectStore, request: TrainingRequest, tmp_path: Path) -> TrainingOutcome:
    """The same job trained without interruption, in this process (it also fills the activation cache)."""
    config = TrainerConfig(work_dir=tmp_path / "ref-work", threads=2, train_threads=1, prefix_runner="torch")
    out = run_training(objects, request, job_id="ref", key_prefix="trainer/jobs/ref", config=config, resumable=True)
    assert out.state == "completed" and out.resumed_from is None
    return out


HPARAMS = {"lr": 0.005, "batch_size": 4, "epochs": 3, "unfreeze": 2, "dropout": 0.2, "lr_schedule": "cosine",
           "seed": 3}


class _Server:
    """``python -m dlforge.trainer`` on 127.0.0.1 in a process group of its own."""

    def __init__(self, tmp_path: Path, name: str) -> None:
        self.port = _free_port()
        self.out = tmp_path / f"{name}.out"
        env = _env(DLFORGE_BUS="memory://", DLFORGE_OBJECTS=f"file://{tmp_path}/o",
                   DLFORGE_DOCS=f"sqlite:///{tmp_path}/d.db", DLFORGE_WORK_DIR=str(tmp_path / "w"),
                   DLFORGE_HTTP_HOST="127.0.0.1", DLFORGE_HTTP_PORT=str(self.port),
                   DLFORGE_TRAINER_PREFIX_RUNNER="torch", DLFORGE_AUTH="off")
        with self.out.open("wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "dlforge.trainer"], env=env, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        _wait("the trainer to answer", self._up, deadline=120)

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.out.read_text(errors="replace")
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[_Server]]:
    started: list[_Server] = []
    yield started
    for server in started:
        server.close()


def test_a_rest_job_killed_mid_epoch_goes_on_from_its_checkpoint_when_the_trainer_restarts(
    objects: ObjectStore, tmp_path: Path, servers: list[_Server],
) -> None:
    """What is asserted, and why it can be asserted exactly: the restarted trainer resumes the job (it is not
    failed, not trained from step 0) at the state the killed one stored, and ends at the step count, loss curve,
    epoch losses and weights of an uninterrupted run of the same job. One worker on one thread trains the same
    operations in the same order in both processes, and the state carries the weights, Adam's moments, the
    cosine schedule's step and the place in the epoch; dropout's masks follow the step (see
    dlforge.trainer.training), so the curves agree to float rounding."""
    body = {"weights_key": "cands/small.pt", "manifest_key": "testdata/manifest.json", "classes": CLASSES,
            "hparams": HPARAMS, "run_config": {"checkpoint_every_steps": CHECKPOINT_EVERY, "summary_every_steps": 1}}
    reference = _reference(objects, TrainingRequest.model_validate(body), tmp_path)
    assert reference.train_rows == 140 and reference.steps == 3 * 35

    first = _Server(tmp_path, "first")
    servers.append(first)
    created = first.http.post("/jobs", json=body)
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]
    prefix = f"trainer/jobs/{job_id}"
    killed_at = _kill_mid_epoch(first.proc, objects, prefix)
    assert killed_at["steps"] % CHECKPOINT_EVERY == 0 and 0 < killed_at["position"] < 140

    again = _Server(tmp_path, "again")
    servers.append(again)
    job = _wait("the resumed job to end", lambda: (lambda j: j if j["state"] not in ("queued", "running") else None)(
        again.http.get(f"/jobs/{job_id}").json()), deadline=600)
    assert job["state"] == "completed", job.get("error")
    # resumed from the state the killed process stored, in the epoch it was killed in, not from step 0
    assert job["resumed_from"] == {"epoch": killed_at["epoch"] + 1, "position": killed_at["position"],
                                   "step": killed_at["steps"]}
    assert f"samples into the next, at step {killed_at['steps']}" in again.out.read_text(errors="replace")
    assert job["result"]["steps"] == reference.steps
    assert [e["epoch"] for e in job["epochs"]] == [1, 2, 3]
    assert [e["train_loss"] for e in job["epochs"]] == pytest.approx([m.train_loss for m in reference.epochs],
                                                                    rel=1e-5)
    # one loss curve in the job's logs: every step once, in order, as the uninterrupted run logged it
    curve = _scalars(objects, f"{prefix}/tensorboard/", "train/step_loss", tmp_path)
    ref_curve = _scalars(objects, "trainer/jobs/ref/tensorboard/", "train/step_loss", tmp_path)
    assert [s for s, _ in curve] == [s for s, _ in ref_curve] == list(range(1, reference.steps + 1))
    assert [v for _, v in curve] == pytest.approx([v for _, v in ref_curve], rel=1e-5)
    model, _ = load_checkpoint(str(objects.get_file(job["model_key"], tmp_path / "model.pt")))
    for (name, a), b in zip(model.state_dict().items(), reference.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    with pytest.raises(NotFound):
        objects.stat(resume_key(prefix))  # the state is removed once the job has ended


CHILD = """
import sys
from pathlib import Path
from dlforge.common.objects.fs import FsObjectStore
from dlforge.trainer.handlers import TrainerConfig, TrainingRequest, run_training

request = TrainingRequest.model_validate_json(Path(sys.argv[1]).read_text())
config = TrainerConfig(work_dir=Path(sys.argv[3]), threads=2, train_threads=2, prefix_runner="torch")
run_training(FsObjectStore(sys.argv[2]), request, job_id="ddp", key_prefix="trainer/jobs/ddp", config=config,
             resumable=True)
"""


def test_a_ddp_run_killed_mid_epoch_on_two_workers_goes_on_on_one(objects: ObjectStore, tmp_path: Path) -> None:
    """2 DDP worker processes (gloo on 127.0.0.1) are killed inside an epoch; the job comes back on 1 worker at
    the same place: the state's position is in samples of the epoch's one global order, so the resumed run
    trains the rows the 2 workers had not. It ends at the uninterrupted run's step count and (dropout off: its
    masks depend on the rank) its weights and loss curve up to float rounding, the 2 workers' gradients being
    averaged by all-reduce in another order of summation."""
    hparams = TrainParams.model_validate({**HPARAMS, "dropout": 0.0})
    request = TrainingRequest(weights_key="cands/small.pt", manifest_key="testdata/manifest.json", classes=CLASSES,
                              hparams=hparams, run_config=RunOptions(no_of_workers=2, summary_every_steps=1,
                                                                     checkpoint_every_steps=CHECKPOINT_EVERY))
    one = request.model_copy(update={"run_config": request.run_config.model_copy(update={"no_of_workers": 1})})
    reference = _reference(objects, one, tmp_path)
    (tmp_path / "request.json").write_text(request.model_dump_json())
    with (tmp_path / "child.out").open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "request.json"), str(tmp_path / "o"),
                                 str(tmp_path / "child-work")], env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        killed_at = _kill_mid_epoch(proc, objects, "trainer/jobs/ddp")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    config = TrainerConfig(work_dir=tmp_path / "work", threads=2, train_threads=1, prefix_runner="torch")
    out = run_training(objects, one, job_id="ddp", key_prefix="trainer/jobs/ddp", config=config, resumable=True)
    assert out.resumed_from == {"epoch": killed_at["epoch"] + 1, "position": killed_at["position"],
                                "step": killed_at["steps"]}
    assert out.steps == reference.steps and [m.epoch for m in out.epochs] == [1, 2, 3]
    assert [m.train_loss for m in out.epochs] == pytest.approx([m.train_loss for m in reference.epochs], rel=1e-4)
    curve = _scalars(objects, "trainer/jobs/ddp/tensorboard/", "train/step_loss", tmp_path)
    ref_curve = _scalars(objects, "trainer/jobs/ref/tensorboard/", "train/step_loss", tmp_path)
    assert [s for s, _ in curve] == list(range(1, reference.steps + 1))
    assert [v for _, v in curve] == pytest.approx([v for _, v in ref_curve], rel=1e-4, abs=1e-6)
    for a, b in zip(out.model.state_dict().values(), reference.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-4)
