"""Data-parallel engines: run :func:`fit` on N worker processes and stream rank 0's reports back.

``ddp`` (default): ``torch.multiprocessing`` spawns N processes that rendezvous on
``tcp://127.0.0.1:<free port>`` (gloo on CPU with ``GLOO_SOCKET_IFNAME=lo``; on CUDA one process per GPU:
rank ``r`` on ``cuda:r`` with NCCL, see :func:`dlforge.trainer.training.workers_device`) and wrap the
tail in ``DistributedDataParallel``; each rank trains its share of every global batch (see
:mod:`dlforge.trainer.training`). Rank 0 sends its reports (step losses, epoch metrics, checkpoint
files, states to resume from) over a queue; the parent hands them to the listener, whose go-on/stop
answer goes back to rank 0, which broadcasts it.
With one worker the loop runs in the calling process (no spawn, no process group), on the device
``FitJob.device`` resolves to (:func:`dlforge.trainer.training.resolve_device`).

``horovod`` (optional): the same loop under ``horovod.run``; imported lazily, failing with what to
install. Its reports reach the listener when the run ends, so it cannot stop a run early.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import tempfile
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dlforge.common.backends import optional_import
from dlforge.common.errors import ConfigError
from dlforge.trainer.params import EpochMetrics, TrainParams
from dlforge.trainer.training import (
    Collective,
    FitListener,
    FitResult,
    FitState,
    StateHook,
    TrainData,
    fit,
    resolve_device,
    workers_device,
)

log = logging.getLogger(__name__)

_REPLY_TIMEOUT = 3600.0


@dataclass
class FitJob:
    """Everything a training run needs besides the listener."""

    tail: nn.Module
    data: TrainData
    hparams: TrainParams
    no_of_workers: int = 1
    checkpoint_every_steps: int = 0
    summary_every_steps: int = 10
    threads: int = 1  # in all: each of N workers gets max(1, threads // N)
    work_dir: Path | None = None
    resume: FitState | None = None  # go on from this state (its epoch and position)
    on_state: StateHook | None = None  # the states to resume from: after epochs, at checkpoint steps
    device: str = "auto"  # auto | cpu | cuda (DLFORGE_TRAINER_DEVICE)


class Engine(ABC):
    """Plug-in: trains ``job.tail`` in place on ``job.no_of_workers`` workers."""

    name: str = "?"

    @abstractmethod
    def run(self, job: FitJob, listener: FitListener) -> FitResult:
        """Train; on return ``job.tail`` holds the trained weights."""


def engine_for(name: str) -> Engine:
    engines: dict[str, type[Engine]] = {"ddp": DdpEngine, "horovod": HorovodEngine}
    try:
        return engines[name]()
    except KeyError as exc:
        raise ConfigError(f"unknown training engine {name!r}; known: {', '.join(engines)}") from exc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# What the parent writes for the workers (spawned processes read it back)
# --------------------------------------------------------------------------------------------


def _write_job(job: FitJob, job_dir: Path) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    torch.save(job.tail, job_dir / "tail.pt")
    for name in ("train_x", "train_y", "val_x", "val_y"):
        np.save(job_dir / f"{name}.npy", np.ascontiguousarray(getattr(job.data, name)))
    for name in ("train_w", "train_soft"):
        if getattr(job.data, name) is not None:
            np.save(job_dir / f"{name}.npy", np.ascontiguousarray(getattr(job.data, name)))
    for k, view in enumerate(job.data.train_views):
        np.save(job_dir / f"train_view{k}.npy", np.ascontiguousarray(view))
    spec = {
        "hparams": job.hparams.model_dump(),
        "classes": job.data.classes,
        "train_views": len(job.data.train_views),
        "checkpoint_every_steps": job.checkpoint_every_steps,
        "summary_every_steps": job.summary_every_steps,
        "threads": job.threads,
        "device": job.device,
    }
    (job_dir / "job.json").write_text(json.dumps(spec))
    if job.resume is not None:
        torch.save(job.resume.to_dict(), job_dir / "resume.pt")


def _resume_of(job_dir: Path) -> FitState | None:
    """The state the parent wrote for the workers to go on from, if any."""
    path = job_dir / "resume.pt"
    raw = torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None  # CUDA states too
    return FitState.from_dict(raw) if raw is not None else None


def _read_job(job_dir: Path) -> tuple[nn.Module, TrainData, dict[str, Any]]:
    spec = json.loads((job_dir / "job.json").read_text())
    tail: nn.Module = torch.load(job_dir / "tail.pt", weights_only=False)
    arrays = {n: np.load(job_dir / f"{n}.npy", mmap_mode="r") for n in ("train_x", "train_y", "val_x", "val_y")}
    rows = {n: np.load(job_dir / f"{n}.npy") for n in ("train_w", "train_soft") if (job_dir / f"{n}.npy").exists()}
    views = [np.load(job_dir / f"train_view{k}.npy", mmap_mode="r") for k in range(int(spec.get("train_views", 0)))]
    return tail, TrainData(classes=spec["classes"], train_views=views, **rows, **arrays), spec


class _QueueListener:
    """Rank 0's listener inside a worker process: forwards reports to the parent and waits for answers."""

    def __init__(self, tail: nn.Module, job_dir: Path, messages: Any, replies: Any) -> None:
        self.tail, self.job_dir, self.messages, self.replies = tail, job_dir, messages, replies

    def on_step(self, step: int, loss: float) -> None:
        self.messages.put(("step", step, loss))

    def on_epoch(self, metrics: EpochMetrics) -> bool:
        self.messages.put(("epoch", metrics.model_dump_json()))
        go_on: bool = self.replies.get(timeout=_REPLY_TIMEOUT)
        return go_on

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        path = self.job_dir / f"checkpoint-{step:07d}.pt"
        torch.save(self.tail.state_dict(), path)
        self.messages.put(("checkpoint", step, epoch, str(path)))

    def on_state(self, state: FitState) -> None:
        path = self.job_dir / f"state-{state.steps:09d}.pt"  # one per state: the parent may not have read the last
        torch.save(state.to_dict(), path)
        self.messages.put(("state", str(path)))


class _SilentListener:
    """The listener of DDP ranks other than 0: rank 0 alone reports, checkpoints and asks to go on."""

    def on_step(self, step: int, loss: float) -> None:
        """Rank 0 reports the step."""

    def on_epoch(self, metrics: EpochMetrics) -> bool:
        return True

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        """Rank 0 writes the checkpoint."""


# --------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------


class DdpCollective(Collective):
    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device

    def wrap_model(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def agree(self, go_on: bool) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([1 if go_on else 0], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return [float(v) for v in t.cpu()]


def _ddp_worker(rank: int, world: int, init_method: str, backend: str, job_dir: str, messages: Any,
                replies: Any) -> None:
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    path = Path(job_dir)
    tail, data, spec = _read_job(path)
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")  # one GPU per process
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group: NCCL binds each rank to its current device
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(minutes=30))
    try:
        listener = _QueueListener(tail, path, messages, replies) if rank == 0 else _SilentListener()
        result = fit(tail, data, TrainParams(**spec["hparams"]), listener=listener,
                     collective=DdpCollective(rank, world, device),
                     checkpoint_every_steps=int(spec["checkpoint_every_steps"]),
                     summary_every_steps=int(spec["summary_every_steps"]), device=device, resume=_resume_of(path),
                     on_state=listener.on_state if isinstance(listener, _QueueListener) else None)
        if rank == 0:
            torch.save(tail.cpu().state_dict(), path / "final.pt")
            payload = asdict(result)
            payload["epochs"] = [m.model_dump() for m in result.epochs]
            messages.put(("done", json.dumps(payload)))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _leave(messages, replies)


def _leave(*queues: Any) -> None:
    """End a DDP worker that finished cleanly without the interpreter's teardown.

    At interpreter exit, the destructors of gloo's background threads occasionally abort the process
    ("terminate called without an active exception", SIGABRT) after the work is done. The queues are
    flushed first, so the parent has every message; then the process exits 0 at once.
    """
    import sys

    for q in queues:
        q.close()
        q.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class DdpEngine(Engine):
    name = "ddp"

    def run(self, job: FitJob, listener: FitListener) -> FitResult:
        if job.no_of_workers == 1:
            torch.set_num_threads(job.threads)
            device = resolve_device(job.device)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            result = fit(job.tail, job.data, job.hparams, listener=listener,
                         checkpoint_every_steps=job.checkpoint_every_steps,
                         summary_every_steps=job.summary_every_steps, resume=job.resume, on_state=job.on_state,
                         device=device)
            job.tail.cpu()  # the caller evaluates and saves the tail on the CPU
            return result
        import torch.multiprocessing as mp

        world = job.no_of_workers
        backend = "nccl" if workers_device(job.device, world) == "cuda" else "gloo"
        with tempfile.TemporaryDirectory(dir=job.work_dir, prefix="ddp-") as tmp:
            job_dir = Path(tmp)
            threads = job.threads
            job = FitJob(**{**job.__dict__, "threads": max(1, threads // world)})
            _write_job(job, job_dir)
            ctx = mp.get_context("spawn")
            messages, replies = ctx.Queue(), ctx.Queue()
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            log.info("ddp: %d workers (%s) rendezvous at %s", world, backend, init_method)
            procs = mp.start_processes(_ddp_worker, args=(world, init_method, backend, str(job_dir), messages,
                                                          replies), nprocs=world, join=False, start_method="spawn")
            done: FitResult | None = None
            finished = False
            try:
                while True:
                    try:
                        msg = messages.get(timeout=0.2)
                    except queue.Empty:
                        if finished:
                            break
                        try:
                            finished = procs.join(timeout=0)  # raises if a worker failed (and ends the others)
                        except mp.ProcessExitedException as exc:
                            done = self._drain(messages, listener, replies, job) or done
                            if done is None or not (job_dir / "final.pt").exists():
                                raise
                            # the result and the final weights were delivered: a crash on the way out
                            # (see _leave) does not undo the training
                            log.warning("ddp: a worker died after training had finished (%s); the result stands",
                                        exc)
                            finished = True
                        continue
                    done = self._dispatch(msg, listener, replies, job) or done
            except BaseException:
                for p in procs.processes:
                    if p.is_alive():
                        p.terminate()
                raise
            if done is None:
                raise RuntimeError("ddp: the workers ended without a result")
            job.tail.load_state_dict(torch.load(job_dir / "final.pt", weights_only=True))
            return done

    @classmethod
    def _drain(cls, messages: Any, listener: FitListener, replies: Any, job: FitJob) -> FitResult | None:
        """Dispatch what is still queued (a worker may have died after sending it)."""
        done = None
        while True:
            try:
                msg = messages.get(timeout=0.5)
            except queue.Empty:
                return done
            done = cls._dispatch(msg, listener, replies, job) or done

    @staticmethod
    def _dispatch(msg: tuple[Any, ...], listener: FitListener, replies: Any, job: FitJob) -> FitResult | None:
        kind = msg[0]
        if kind == "step":
            listener.on_step(msg[1], msg[2])
        elif kind == "epoch":
            replies.put(bool(listener.on_epoch(EpochMetrics.model_validate_json(msg[1]))))
        elif kind == "checkpoint":
            state = torch.load(msg[3], map_location="cpu", weights_only=True)
            listener.on_checkpoint(msg[1], msg[2], state)
            Path(msg[3]).unlink(missing_ok=True)
        elif kind == "state":
            if job.on_state is not None:
                job.on_state(FitState.from_dict(torch.load(msg[1], map_location="cpu", weights_only=False)))
            Path(msg[1]).unlink(missing_ok=True)
        elif kind == "done":
            payload = json.loads(msg[1])
            payload["epochs"] = [EpochMetrics.model_validate(m) for m in payload["epochs"]]
            return FitResult(**payload)
        return None


# --------------------------------------------------------------------------------------------
# Horovod (optional)
# --------------------------------------------------------------------------------------------


class HorovodCollective(Collective):
    def __init__(self, hvd: Any) -> None:
        self.hvd = hvd
        self.rank, self.world = hvd.rank(), hvd.size()

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        wrapped: torch.optim.Optimizer = self.hvd.DistributedOptimizer(
            optimizer, named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad]
        )
        return wrapped

    def agree(self, go_on: bool) -> bool:
        return bool(self.hvd.broadcast_object(go_on, root_rank=0))

    def sum(self, values: list[float]) -> list[float]:
        t = self.hvd.allreduce(torch.tensor(values, dtype=torch.float64), op=self.hvd.Sum)
        return [float(v) for v in t]


class _RecordingListener:
    """Rank 0 under Horovod: keeps the reports for the parent (they are replayed when the run ends)."""

    def __init__(self, tail: nn.Module, job_dir: Path) -> None:
        self.tail, self.job_dir = tail, job_dir
        self.reports: list[tuple[Any, ...]] = []

    def on_step(self, step: int, loss: float) -> None:
        self.reports.append(("step", step, loss))

    def on_epoch(self, metrics: EpochMetrics) -> bool:
        self.reports.append(("epoch", metrics.model_dump_json()))
        return True

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        path = self.job_dir / f"checkpoint-{step:07d}.pt"
        torch.save(self.tail.state_dict(), path)
        self.reports.append(("checkpoint", step, epoch, str(path)))


def _horovod_worker(job_dir: str) -> list[tuple[Any, ...]] | None:
    import horovod.torch as hvd

    hvd.init()
    path = Path(job_dir)
    tail, data, spec = _read_job(path)
    torch.set_num_threads(int(spec["threads"]))
    listener = _RecordingListener(tail, path) if hvd.rank() == 0 else _SilentListener()
    result = fit(tail, data, TrainParams(**spec["hparams"]), listener=listener, collective=HorovodCollective(hvd),
                 checkpoint_every_steps=int(spec["checkpoint_every_steps"]),
                 summary_every_steps=int(spec["summary_every_steps"]), resume=_resume_of(path))
    if hvd.rank() != 0:
        return None
    torch.save(tail.state_dict(), path / "final.pt")
    payload = asdict(result)
    payload["epochs"] = [m.model_dump() for m in result.epochs]
    assert isinstance(listener, _RecordingListener)
    return [*listener.reports, ("done", json.dumps(payload))]


class HorovodEngine(Engine):
    name = "horovod"

    def run(self, job: FitJob, listener: FitListener) -> FitResult:
        if job.device == "cuda":
            raise ConfigError("the horovod engine trains on the CPU (gloo); with DLFORGE_TRAINER_DEVICE=cuda use "
                              "DLFORGE_TRAINER_ENGINE=ddp (one process per GPU, NCCL)")
        horovod = optional_import("horovod", install="pip install 'horovod[pytorch]'",
                                  purpose="the horovod training engine")
        optional_import("horovod.torch", install="HOROVOD_WITH_PYTORCH=1 pip install 'horovod[pytorch]'",
                        purpose="the horovod training engine")
        with tempfile.TemporaryDirectory(dir=job.work_dir, prefix="horovod-") as tmp:
            job_dir = Path(tmp)
            job = FitJob(**{**job.__dict__, "threads": max(1, job.threads // job.no_of_workers)})
            _write_job(job, job_dir)
            results = horovod.run(_horovod_worker, args=(str(job_dir),), np=job.no_of_workers,
                                  hosts=f"localhost:{job.no_of_workers}", use_gloo=True)
            reports = next(r for r in results if r is not None)
            done: FitResult | None = None
            sink: queue.SimpleQueue[bool] = queue.SimpleQueue()
            for msg in reports:
                done = DdpEngine._dispatch(msg, listener, sink, job) or done
            if done is None:
                raise RuntimeError("horovod: rank 0 returned no result")
            job.tail.load_state_dict(torch.load(job_dir / "final.pt", weights_only=True))
            return done
