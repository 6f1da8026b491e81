"""``python -m dlforge.trainer.pod <launch prefix>``: one data-parallel worker in a Kubernetes pod.

The Kubernetes launcher (:mod:`dlforge.trainer.launcher`) writes the job (the tail, the cached
activations, the parameters, the state to resume from) under ``<launch prefix>/job/`` in the object
store (``DLFORGE_OBJECTS``, from the pod's environment) and starts one pod per worker under
``torchrun``, which sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Every rank
trains its share with :func:`dlforge.trainer.training.fit`; rank 0 reports through the object store
(:class:`StoreReports`), which the launcher reads and answers, as the local DDP engine's queue does.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlforge.common.objects import ObjectStore
from dlforge.trainer.engines import DdpCollective, _read_job, _resume_of, _SilentListener
from dlforge.trainer.params import EpochMetrics, TrainParams
from dlforge.trainer.training import FitState, fit, resolve_device

log = logging.getLogger(__name__)

REPLY_TIMEOUT = 3600.0


def report_key(launch: str, seq: int) -> str:
    return f"{launch}/reports/{seq:09d}.json"


def reply_key(launch: str, epoch: int) -> str:
    return f"{launch}/replies/{epoch:05d}.json"


class StoreReports:
    """Rank 0's listener in a pod: each report is an object ``<launch>/reports/<seq>.json`` (tensors beside it
    under ``files/``); after an epoch it waits for the launcher's go-on/stop at ``replies/<epoch>.json``."""

    def __init__(self, objects: ObjectStore, launch: str, tail: nn.Module, work_dir: Path,
                 poll_seconds: float = 0.2) -> None:
        self.objects, self.launch, self.tail, self.work_dir = objects, launch, tail, work_dir
        self.poll_seconds = poll_seconds
        self.seq = 0

    def emit(self, kind: str, body: dict[str, Any], tensors: Any = None) -> None:
        self.seq += 1
        if tensors is not None:
            path = self.work_dir / f"report-{self.seq}.pt"
            torch.save(tensors, path)
            body = {**body, "file": f"{self.launch}/files/{self.seq:09d}.pt"}
            self.objects.put_file(body["file"], path)
            path.unlink(missing_ok=True)
        self.objects.put_bytes(report_key(self.launch, self.seq), json.dumps({"kind": kind, **body}).encode(),
                               content_type="application/json")

    def on_step(self, step: int, loss: float) -> None:
        self.emit("step", {"step": step, "loss": loss})

    def on_epoch(self, metrics: EpochMetrics) -> bool:
        self.emit("epoch", {"metrics": metrics.model_dump(mode="json")})
        deadline = time.monotonic() + REPLY_TIMEOUT
        key = reply_key(self.launch, metrics.epoch)
        while not self.objects.exists(key):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from the launcher to epoch {metrics.epoch} in {REPLY_TIMEOUT:.0f} s")
            time.sleep(self.poll_seconds)
        return bool(json.loads(self.objects.get_bytes(key))["go_on"])

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        self.emit("checkpoint", {"step": step, "epoch": epoch}, {k: v.cpu() for k, v in self.tail.state_dict().items()})

    def on_state(self, state: FitState) -> None:
        self.emit("state", {"steps": state.steps}, state.to_dict())


def run(objects: ObjectStore, launch: str) -> None:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    with tempfile.TemporaryDirectory(prefix="dlforge-pod-") as tmp:
        job_dir = Path(tmp) / "job"
        for info in objects.list(f"{launch}/job/"):
            objects.get_file(info.key, job_dir / info.key.rsplit("/", 1)[-1])
        tail, data, spec = _read_job(job_dir)
        torch.set_num_threads(int(spec["threads"]))
        device = resolve_device(str(spec.get("device", "auto")), local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before the group: NCCL binds each rank to its current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=timedelta(minutes=30))
        try:
            world = dist.get_world_size()
            listener = StoreReports(objects, launch, tail, Path(tmp)) if rank == 0 else _SilentListener()
            result = fit(tail, data, TrainParams(**spec["hparams"]), listener=listener,
                         collective=DdpCollective(rank, world, device),
                         checkpoint_every_steps=int(spec["checkpoint_every_steps"]),
                         summary_every_steps=int(spec["summary_every_steps"]), device=device,
                         resume=_resume_of(job_dir),
                         on_state=listener.on_state if isinstance(listener, StoreReports) else None)
            if isinstance(listener, StoreReports):
                payload = asdict(result)
                payload["epochs"] = [m.model_dump(mode="json") for m in result.epochs]
                listener.emit("done", {"result": payload}, {k: v.cpu() for k, v in tail.state_dict().items()})
            dist.barrier()
        finally:
            dist.destroy_process_group()


def main() -> None:
    from dlforge.common.backends import open_objects

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m dlforge.trainer.pod <launch prefix>  (DLFORGE_OBJECTS: the object store)\n")
        raise SystemExit(2)
    url = os.environ.get("DLFORGE_OBJECTS")
    if not url:
        sys.stderr.write("dlforge.trainer.pod: DLFORGE_OBJECTS is not set (the object store holding the job)\n")
        raise SystemExit(2)
    run(open_objects(url), sys.argv[1].rstrip("/"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads may abort the interpreter's teardown (see dlforge.trainer.engines._leave)


if __name__ == "__main__":
    main()
