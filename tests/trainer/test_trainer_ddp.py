"""Data-parallel training: 2 DDP workers on CPU (gloo on 127.0.0.1) against 1 worker."""

from __future__ import annotations

import importlib.util
import math

import pytest

from dlforge.common.errors import ConfigError
from dlforge.common.objects import ObjectStore
from dlforge.trainer.engines import engine_for
from dlforge.trainer.handlers import TrainerConfig, TrainingOutcome, TrainingRequest, run_training
from dlforge.trainer.params import EpochMetrics, RunOptions, TrainParams
from dlforge.vision.manifest import load_manifest, save_manifest

CLASSES = ["defect", "good"]


@pytest.mark.slow
def test_two_workers_same_steps_finite_loss_checkpoints_every_k(objects: ObjectStore, manifest_key: str,
                                                                weights_key: str, config: TrainerConfig) -> None:
    hp = TrainParams(lr=0.001, batch_size=8, epochs=2, unfreeze=2, dropout=0.0)

    def run(workers: int) -> tuple[TrainingOutcome, list[EpochMetrics]]:
        seen: list[EpochMetrics] = []
        req = TrainingRequest(weights_key=weights_key, manifest_key=manifest_key, classes=CLASSES, hparams=hp,
                              run_config=RunOptions(no_of_workers=workers, checkpoint_every_steps=5))
        out = run_training(objects, req, job_id=f"w{workers}", key_prefix=f"trainer/jobs/w{workers}", config=config,
                           on_epoch=lambda m: seen.append(m) or True)
        return out, seen

    one, _ = run(1)
    two, seen2 = run(2)
    assert two.state == "completed" and [m.epoch for m in seen2] == [1, 2]  # rank 0 streamed both epochs
    assert two.steps == one.steps == 2 * math.ceil(56 / 8)  # global batch 8 = 2 x 4 per worker
    assert all(math.isfinite(m.train_loss) and math.isfinite(m.val_loss) for m in seen2)
    assert two.checkpoints == [f"trainer/jobs/w2/checkpoints/step-{s:07d}.pt" for s in (5, 10)]
    assert all(objects.exists(k) for k in two.checkpoints)
    assert any("tfevents" in i.key for i in objects.list(two.logs_prefix))
    assert two.val is not None and two.val.accuracy >= 0.8  # the trained weights came back from rank 0
    assert two.no_of_workers == 2


@pytest.mark.slow
def test_ddp_listener_stop_reaches_every_worker(objects: ObjectStore, manifest_key: str, weights_key: str,
                                                config: TrainerConfig) -> None:
    req = TrainingRequest(weights_key=weights_key, manifest_key=manifest_key, classes=CLASSES,
                          hparams=TrainParams(lr=0.01, batch_size=8, epochs=4), run_config=RunOptions(no_of_workers=2))
    out = run_training(objects, req, job_id="stop", key_prefix="t/stop", config=config, on_epoch=lambda m: False)
    assert out.state == "stopped" and len(out.epochs) == 1 and out.steps == math.ceil(56 / 8)


@pytest.mark.slow
def test_two_workers_train_on_views_and_weights_and_keep_the_best_epoch(objects: ObjectStore, manifest_key: str,
                                                                        weights_key: str,
                                                                        config: TrainerConfig) -> None:
    manifest = load_manifest(objects, manifest_key)
    for item in manifest.by_split("train")[::3]:
        item.label_source, item.confidence = "auto", 0.6
    save_manifest(objects, "ddp/manifest.json", manifest)
    seen: list[EpochMetrics] = []
    req = TrainingRequest(weights_key=weights_key, manifest_key="ddp/manifest.json", classes=CLASSES,
                          hparams=TrainParams(lr=0.05, batch_size=8, epochs=6, unfreeze=1, patience=2),
                          run_config=RunOptions(no_of_workers=2), views="flips")
    out = run_training(objects, req, job_id="views", key_prefix="t/views", config=config,
                       on_epoch=lambda m: seen.append(m) or True)
    assert out.state == "completed" and out.views == ["identity", "hflip", "vflip", "rot180"]
    best = max(seen, key=lambda m: (m.val_accuracy, -m.val_loss)).epoch
    assert out.best_epoch == best and (len(seen) == 6 or len(seen) == best + 2)
    # the weights rank 0 kept from its best epoch came back to the parent
    assert out.val is not None and out.val.accuracy == seen[best - 1].val_accuracy


def test_an_unknown_engine_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="unknown training engine 'parameter-server'; known: ddp, horovod"):
        engine_for("parameter-server")


@pytest.mark.skipif(importlib.util.find_spec("horovod") is not None, reason="horovod is installed: nothing to say")
def test_horovod_engine_says_what_to_install() -> None:
    from dlforge.trainer.engines import FitJob
    from dlforge.trainer.training import TrainData

    with pytest.raises(ConfigError, match="pip install 'horovod"):
        engine_for("horovod").run(FitJob(tail=None, data=TrainData(*[None] * 4, classes=[]),  # type: ignore[arg-type]
                                         hparams=TrainParams(), no_of_workers=2), listener=None)  # type: ignore[arg-type]
