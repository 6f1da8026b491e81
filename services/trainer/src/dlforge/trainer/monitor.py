"""What happens to a run's reports: TensorBoard event files, checkpoints, the caller's epoch hook.

All of it happens in the parent process (a data-parallel run's rank 0 only sends its reports), so
the object store is the only thing the reports need, whatever the engine. :func:`read_scalars` reads
a job's event files back from there with TensorBoard's own reader (what ``GET /jobs/{id}/tensorboard``
serves).
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dlforge.common.objects import ObjectStore
from dlforge.trainer.params import EpochMetrics
from dlforge.vision.networks import Classifier, save_checkpoint

log = logging.getLogger(__name__)

EpochHook = Callable[[EpochMetrics], bool]


class JobMonitor:
    """A :class:`~dlforge.trainer.training.FitListener` that writes TensorBoard files and checkpoints.

    Object keys: ``<key_prefix>/tensorboard/<event file>`` (uploaded after every epoch) and
    ``<key_prefix>/checkpoints/step-<step>.pt`` (full self-describing checkpoints).
    """

    def __init__(
        self,
        *,
        objects: ObjectStore,
        key_prefix: str,
        log_dir: Path,
        model: Classifier,
        tail: nn.Module,
        arch: str,
        classes: list[str],
        on_epoch: EpochHook | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.objects = objects
        self.key_prefix = key_prefix
        self.log_dir = log_dir
        self.model = model
        self.tail = tail
        self.arch = arch
        self.classes = classes
        self.hook = on_epoch
        self.extra = extra or {}
        self.epochs: list[EpochMetrics] = []
        self.step_losses: list[tuple[int, float]] = []  # (global step, loss) as written to the logs
        self.checkpoints: list[str] = []
        log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(log_dir))

    @property
    def logs_prefix(self) -> str:
        return f"{self.key_prefix}/tensorboard/"

    def on_step(self, step: int, loss: float) -> None:
        self.step_losses.append((step, loss))
        self.writer.add_scalar("train/step_loss", loss, step)

    def replay(self, epochs: list[EpochMetrics], step_losses: list[tuple[int, float]]) -> None:
        """Write what an earlier attempt logged up to the state a resumed job goes on from (its epochs, its
        step losses) to the logs: they hold one curve, not a second one from the resumed step on. The hook
        saw the epochs then."""
        for step, loss in step_losses:
            self.on_step(step, loss)
        for metrics in epochs:
            self._log_epoch(metrics)

    def on_epoch(self, metrics: EpochMetrics) -> bool:
        self._log_epoch(metrics)
        return self.hook(metrics) if self.hook is not None else True

    def _log_epoch(self, metrics: EpochMetrics) -> None:
        self.epochs.append(metrics)
        w, e = self.writer, metrics.epoch
        w.add_scalar("train/loss", metrics.train_loss, e)
        w.add_scalar("val/loss", metrics.val_loss, e)
        w.add_scalar("val/accuracy", metrics.val_accuracy, e)
        w.add_scalar("train/images_per_second", metrics.images_per_second, e)
        for cls, recall in metrics.val_recall.items():
            w.add_scalar(f"val/recall/{cls}", recall, e)
        w.flush()
        self.upload_logs()

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        if state is not None:
            self.tail.load_state_dict(state)  # the tail shares its modules with self.model
        path = self.log_dir.parent / f"step-{step:07d}.pt"
        save_checkpoint(self.model, arch=self.arch, classes=self.classes, path=str(path),
                        extra={**self.extra, "step": step, "epoch": epoch})
        key = f"{self.key_prefix}/checkpoints/step-{step:07d}.pt"
        self.objects.put_file(key, path)
        path.unlink(missing_ok=True)
        self.checkpoints.append(key)

    def upload_logs(self) -> list[str]:
        """Upload the event files under names of their own (not the writer's, which carry the time and the
        pid): a job run again after a crash overwrites its logs instead of adding a second file."""
        keys = []
        for i, f in enumerate(sorted(p for p in self.log_dir.iterdir() if p.is_file())):
            if f.is_file():
                key = f"{self.logs_prefix}events.out.tfevents.{i:03d}.dlforge"
                self.objects.put_file(key, f)
                keys.append(key)
        return keys

    def close(self) -> list[str]:
        self.writer.close()
        return self.upload_logs()


Scalar = tuple[float, int, float | None]  # (wall time, step, value: None where it was not finite)


def read_scalars(objects: ObjectStore, logs_prefix: str, *, work_dir: Path) -> dict[str, list[Scalar]]:
    """Every scalar tag in the event files under ``logs_prefix``: ``{tag: [(wall_time, step, value), ...]}`` by
    step, as TensorBoard's scalars plugin serves them (``{}``: no event file yet)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="tensorboard-") as tmp:
        files = [i.key for i in objects.list(logs_prefix) if "tfevents" in i.key.rsplit("/", 1)[-1]]
        if not files:
            return {}
        for key in files:
            objects.get_file(key, Path(tmp) / key.rsplit("/", 1)[-1])
        events = EventAccumulator(tmp, size_guidance={"scalars": 0})  # 0: keep every point
        events.Reload()
        return {tag: [(e.wall_time, e.step, e.value if math.isfinite(e.value) else None)
                      for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
