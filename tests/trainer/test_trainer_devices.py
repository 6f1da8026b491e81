"""Where training runs: the device setting, mixed precision on CUDA only, the pods' GPU requests.

The tests without the ``gpu`` mark run anywhere; those with it need ``torch.cuda.is_available()`` (and
are skipped, saying so, where it is false).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import numpy as np
import pytest
import torch
from torch import nn

from dlforge.common.errors import ConfigError
from dlforge.common.settings import load_settings
from dlforge.trainer.engines import DdpEngine, FitJob
from dlforge.trainer.launcher import KubernetesConfig, KubernetesEngine
from dlforge.trainer.params import EpochMetrics, TrainParams
from dlforge.trainer.settings import TrainerSettings
from dlforge.trainer.training import FitResult, Precision, TrainData, fit, resolve_device, workers_device

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch.cuda.is_available() is False: no CUDA device here")


class _Quiet:
    def on_step(self, step: int, loss: float) -> None:
        """Not reported."""

    def on_epoch(self, metrics: EpochMetrics) -> bool:
        return True

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        """Not kept."""


def _data(n_train: int = 43, n_val: int = 12, seed: int = 0) -> TrainData:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    y = rng.integers(0, 2, size=n_train + n_val)
    x = (centers[y] + 0.7 * rng.normal(size=(len(y), 3, 4, 4))).astype(np.float32)
    return TrainData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], ["a", "b"])


def _tail(seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 2))


HP = TrainParams(lr=0.01, batch_size=8, epochs=2, optimizer="adam", dropout=0.0, class_weighting="none", seed=5)


def _reference_weights(data: TrainData, hp: TrainParams) -> dict[str, torch.Tensor]:
    """A plain float32 loop of the same steps (a second implementation, not the trainer's): each epoch visits
    the rows in ``randperm(seed + epoch)`` order, ``batch_size`` at a time, mean cross-entropy, Adam."""
    tail = _tail()
    opt = torch.optim.Adam(tail.parameters(), lr=hp.lr, betas=(hp.momentum, 0.999))
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y.astype(np.int64))
    for epoch in range(1, hp.epochs + 1):
        g = torch.Generator()
        g.manual_seed(hp.seed + epoch)
        order = torch.randperm(len(y), generator=g)
        for lo in range(0, len(y), hp.batch_size):
            idx = order[lo:lo + hp.batch_size].sort().values
            opt.zero_grad()
            nn.functional.cross_entropy(tail(x[idx]), y[idx]).backward()
            opt.step()
    return tail.state_dict()


# --------------------------------------------------------------------------------------------
# the choice of device
# --------------------------------------------------------------------------------------------


def test_auto_picks_the_cpu_without_cuda_and_the_local_gpu_with_it() -> None:
    assert resolve_device("auto", cuda_available=False) == torch.device("cpu")
    assert resolve_device("auto", cuda_available=True, local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cpu", cuda_available=True) == torch.device("cpu")
    assert resolve_device("cuda", cuda_available=True) == torch.device("cuda", 0)
    # on this machine, as torch sees it
    assert resolve_device("auto") == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))


def test_cuda_asked_for_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"DLFORGE_TRAINER_DEVICE=cuda, but torch sees no CUDA device"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(ConfigError, match="'tpu' is not one of auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(CUDA, reason="checks the refusal at start, which needs a machine without CUDA")
def test_the_trainer_refuses_to_start_with_cuda_asked_for_and_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLFORGE_TRAINER_DEVICE", "cuda")
    with pytest.raises(ConfigError, match=r"DLFORGE_TRAINER_DEVICE.*no CUDA device"):
        load_settings(TrainerSettings)
    monkeypatch.setenv("DLFORGE_TRAINER_DEVICE", "gpu")
    with pytest.raises(ConfigError, match="DLFORGE_TRAINER_DEVICE"):
        load_settings(TrainerSettings)
    monkeypatch.setenv("DLFORGE_TRAINER_DEVICE", "auto")
    assert load_settings(TrainerSettings).trainer_device == "auto"


def test_workers_get_a_gpu_each_or_the_cpu() -> None:
    assert workers_device("auto", 2, cuda_count=0) == "cpu"
    assert workers_device("auto", 2, cuda_count=1) == "cpu"  # NCCL wants a GPU per process
    assert workers_device("auto", 2, cuda_count=2) == "cuda"
    assert workers_device("cpu", 2, cuda_count=4) == "cpu"
    with pytest.raises(ConfigError, match="2 workers need one GPU each, this machine has 1"):
        workers_device("cuda", 2, cuda_count=1)
    with pytest.raises(ConfigError, match="no CUDA device"):
        workers_device("cuda", 2, cuda_count=0)


# --------------------------------------------------------------------------------------------
# mixed precision is CUDA's; the CPU run is the float32 run it was
# --------------------------------------------------------------------------------------------


def test_mixed_precision_is_off_on_the_cpu() -> None:
    p = Precision(torch.device("cpu"))
    assert not p.enabled and not p.scaler.is_enabled()
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with p.autocast():
        assert not torch.is_autocast_enabled("cpu") and (a @ b).dtype == torch.float32
    with pytest.raises(ConfigError, match="for CUDA"):
        Precision(torch.device("cpu"), enabled=True)


def test_a_cpu_fit_is_the_plain_float32_loop_whether_the_device_is_default_auto_or_cpu() -> None:
    data = _data()
    expected = _reference_weights(data, HP)
    runs: dict[str, tuple[FitResult, dict[str, torch.Tensor]]] = {}
    for how, kwargs in (("default", {}), ("cpu", {"device": torch.device("cpu")}),
                        ("cpu, amp off", {"device": torch.device("cpu"), "amp": False})):
        tail = _tail()
        runs[how] = (fit(tail, data, HP, listener=_Quiet(), **kwargs), tail.state_dict())  # type: ignore[arg-type]
    for how, (result, weights) in runs.items():
        assert result.device == "cpu" and not result.amp and result.steps == 2 * 6, how
        for k, v in expected.items():
            torch.testing.assert_close(weights[k], v, rtol=1e-5, atol=1e-6, msg=f"{how}: {k}")
    # the three paths are one computation: bit for bit the same
    for how in ("cpu", "cpu, amp off"):
        for k, v in runs["default"][1].items():
            assert torch.equal(runs[how][1][k], v), (how, k)


def test_the_engine_trains_one_worker_on_the_device_asked_for() -> None:
    data = _data()
    a, b = _tail(), _tail()
    ra = DdpEngine().run(FitJob(tail=a, data=data, hparams=HP, device="cpu"), _Quiet())
    rb = DdpEngine().run(FitJob(tail=b, data=data, hparams=HP, device="auto"), _Quiet())
    assert ra.device == "cpu" and rb.device == ("cuda" if CUDA else "cpu")
    assert all(p.device.type == "cpu" for p in b.parameters())  # handed back on the CPU
    if not CUDA:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    # and it trained: the weights are the plain float32 loop's, not the initial ones
    expected, initial = _reference_weights(data, HP), _tail().state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(a.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(initial[k], v) for k, v in expected.items())


def test_the_horovod_engine_refuses_cuda_rather_than_train_on_the_cpu() -> None:
    from dlforge.trainer.engines import HorovodEngine

    with pytest.raises(ConfigError, match="horovod engine trains on the CPU"):
        HorovodEngine().run(FitJob(tail=_tail(), data=_data(), hparams=HP, no_of_workers=2, device="cuda"), _Quiet())


# --------------------------------------------------------------------------------------------
# the Kubernetes pods ask for a GPU when the run is on CUDA
# --------------------------------------------------------------------------------------------


class _RecordingApi:
    """Records what the launcher creates; the Job fails at once (the pods are not the point here)."""

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []

    def names(self, kind: str, selector: str) -> list[str]:
        return []

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.created.append(manifest)
        return manifest

    def watch_job(self, name: str, *, resource_version: str | None, timeout_seconds: int) -> list[dict[str, Any]]:
        return [{"type": "MODIFIED", "object": {"metadata": {"resourceVersion": "2"}, "status": {"conditions": [
            {"type": "Failed", "status": "True", "reason": "Stopped", "message": "by the test"}]}}}]

    def pod_logs(self, selector: str) -> dict[str, str]:
        return {}

    def delete(self, kind: str, name: str) -> None:
        """Nothing is left."""


@pytest.mark.parametrize(("device", "configured", "gpus"), [("cuda", 0, "1"), ("cpu", 1, None), ("auto", 1, "1"),
                                                            ("auto", 0, None)])
def test_worker_pods_request_a_gpu_when_the_run_is_on_cuda(tmp_path: Path, device: str, configured: int,
                                                           gpus: str | None) -> None:
    from dlforge.common.objects.fs import FsObjectStore

    api = _RecordingApi()
    config = KubernetesConfig(image="dlforge/trainer:test", token_file=None, ca_file=None, gpus_per_worker=configured)
    engine = KubernetesEngine(config, objects=FsObjectStore(tmp_path / "o"), key_prefix="trainer/jobs/j", job_id="j",
                              api=api)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="Failed: Stopped by the test"):
        engine.run(FitJob(tail=_tail(), data=_data(), hparams=HP, no_of_workers=4, device=device, work_dir=tmp_path),
                   _Quiet())
    job = next(m for m in api.created if m["kind"] == "Job")
    kubernetes_validate.validate(job, "1.33", strict=True)
    assert job["spec"]["completions"] == 4
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == gpus
    assert ("tolerations" in job["spec"]["template"]["spec"]) == (gpus is not None)


# --------------------------------------------------------------------------------------------
# on a GPU
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_cuda_fit_runs_in_mixed_precision_and_learns_what_the_cpu_learns() -> None:
    data = _data(n_train=400, n_val=100)
    hp = HP.model_copy(update={"epochs": 4})
    cpu, gpu = _tail(), _tail()
    on_cpu = fit(cpu, data, hp, listener=_Quiet())
    on_gpu = fit(gpu, data, hp, listener=_Quiet(), device=torch.device("cuda", 0))
    assert on_gpu.device == "cuda" and on_gpu.amp and on_gpu.steps == on_cpu.steps
    assert on_gpu.epochs[-1].train_loss < on_gpu.epochs[0].train_loss
    assert abs(on_gpu.epochs[-1].val_accuracy - on_cpu.epochs[-1].val_accuracy) <= 0.05
    assert on_gpu.epochs[-1].train_loss == pytest.approx(on_cpu.epochs[-1].train_loss, rel=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for 2 NCCL workers")
def test_two_workers_train_on_two_gpus_over_nccl(tmp_path: Path) -> None:
    data = _data(n_train=400, n_val=100)
    one, two = _tail(), _tail()
    r1 = DdpEngine().run(FitJob(tail=one, data=data, hparams=HP, device="cuda", work_dir=tmp_path), _Quiet())
    r2 = DdpEngine().run(FitJob(tail=two, data=data, hparams=HP, no_of_workers=2, device="cuda", work_dir=tmp_path),
                         _Quiet())
    assert r2.device == "cuda" and r2.amp and r2.steps == r1.steps
    assert r2.epochs[-1].train_loss == pytest.approx(r1.epochs[-1].train_loss, rel=0.05)
